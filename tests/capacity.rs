//! Issue #12, item 1: a module's capacity bound never exceeds what it stores. Random LoRA,
//! LoCon-with-Tucker, LoHa (with and without Tucker cores) and LoKr (whole and decomposed)
//! modules of random shapes: effective parameters ≤ stored values for every module, so the
//! capacity (× 3.6 bits) is below the stored values × their bits. Before the fix a LoKr's
//! k(m+n−k) counted the rank of the Kronecker product (the shipped LoKr fixture: 608 effective
//! parameters from 120 stored values).

mod common;

use lorascope::fixtures::SafetensorsBuilder;
use lorascope::rng::Rng;
use lorascope::spectral::SpectrumOptions;
use lorascope::LoadOptions;
use safetensors::Dtype;

fn pick(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + (rng.next_u64() as usize) % (hi - lo + 1)
}

/// One random module of a random kind under the kohya/LyCORIS name `lora_unet_m{i}`.
fn random_module(rng: &mut Rng, b: &mut SafetensorsBuilder, i: usize) -> &'static str {
    let n = format!("lora_unet_m{i}");
    let d = Dtype::F32;
    let (out, inp) = (pick(rng, 2, 40), pick(rng, 2, 40));
    let r = pick(rng, 1, out.min(inp).min(6));
    b.add(&format!("{n}.alpha"), &[], &[r as f32], Dtype::F32);
    match rng.next_u64() % 5 {
        0 => {
            b.random(rng, &format!("{n}.lora_down.weight"), &[r, inp], 0.5, d);
            b.random(rng, &format!("{n}.lora_up.weight"), &[out, r], 0.5, d);
            "lora"
        }
        1 => {
            // LoHa on a linear weight: ΔW = (w1a·w1b) ⊙ (w2a·w2b), rank up to r².
            for w in ["w1", "w2"] {
                b.random(rng, &format!("{n}.hada_{w}_a"), &[out, r], 0.5, d);
                b.random(rng, &format!("{n}.hada_{w}_b"), &[r, inp], 0.5, d);
            }
            "loha"
        }
        2 => {
            // LoHa with Tucker cores on a 3×3 conv.
            for w in ["1", "2"] {
                b.random(rng, &format!("{n}.hada_w{w}_a"), &[r, out], 0.5, d);
                b.random(rng, &format!("{n}.hada_w{w}_b"), &[r, inp], 0.5, d);
                b.random(rng, &format!("{n}.hada_t{w}"), &[r, r, 3, 3], 0.5, d);
            }
            "loha-tucker"
        }
        3 => {
            // LoKr, both factors whole: ΔW = w1 ⊗ w2 of shape (a·c) × (b·e).
            let (a, bb) = (pick(rng, 1, 4), pick(rng, 1, 4));
            let (c, e) = (pick(rng, 2, 12), pick(rng, 2, 12));
            b.random(rng, &format!("{n}.lokr_w1"), &[a, bb], 0.5, d);
            b.random(rng, &format!("{n}.lokr_w2"), &[c, e], 0.5, d);
            "lokr"
        }
        _ => {
            // LoKr with w2 decomposed: w2 = w2a · w2b.
            let (a, bb) = (pick(rng, 1, 4), pick(rng, 1, 4));
            let (c, e) = (pick(rng, 2, 12), pick(rng, 2, 12));
            let k = pick(rng, 1, c.min(e));
            b.random(rng, &format!("{n}.lokr_w1"), &[a, bb], 0.5, d);
            b.random(rng, &format!("{n}.lokr_w2_a"), &[c, k], 0.5, d);
            b.random(rng, &format!("{n}.lokr_w2_b"), &[k, e], 0.5, d);
            "lokr-decomposed"
        }
    }
}

#[test]
fn capacity_never_exceeds_the_stored_values() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(2026);
    let mut kinds = std::collections::BTreeMap::new();
    for case in 0..12 {
        let mut b = SafetensorsBuilder::new();
        for i in 0..8 {
            *kinds.entry(random_module(&mut rng, &mut b, i)).or_insert(0) += 1;
        }
        let p = d.path().join(format!("case{case}.safetensors"));
        b.write(&p).unwrap();
        let (adapter, _) = lorascope::open(&p, None, &LoadOptions::default()).unwrap();
        let r = lorascope::spectrum(&adapter, None, &SpectrumOptions::default(), &|| {}).unwrap();
        for m in &r.modules {
            assert!(
                m.effective_params <= m.params,
                "case {case} {}: {} > {} stored",
                m.name,
                m.effective_params,
                m.params
            );
            // f32 values: 32 bits each is what the file holds.
            assert!(m.capacity_bits <= (m.params * 32) as f64, "case {case} {}", m.name);
        }
        assert!(r.totals.effective_params <= r.totals.params);
    }
    assert!(kinds.len() == 5 && kinds.values().all(|&n| n >= 5), "every kind drawn several times: {kinds:?}");
}

#[test]
fn the_shipped_lokr_is_bounded_by_its_120_stored_values() {
    // fixtures/lycoris-lokr.safetensors stores (alphas aside) to_q kron([2,2], [4,2]·[2,4]):
    // 4+8+8 = 20 values, ff kron([4,2], [8,4]): 8+32 = 40, conv1 with a Tucker w2:
    // 4+4+36+8+8 = 60; 120 in all. ff's ΔW is 32×8 of rank 8, k(m+n−k) = 8·32 = 256
    // degrees of freedom by the rank rule, cut to its 40 stored values.
    let (adapter, _) =
        lorascope::open(&common::fixtures().join("lycoris-lokr.safetensors"), None, &LoadOptions::default()).unwrap();
    let r = lorascope::spectrum(&adapter, None, &SpectrumOptions::default(), &|| {}).unwrap();
    let ff = r.modules.iter().find(|m| m.name.ends_with("ff_net_0_proj")).unwrap();
    assert_eq!(ff.params, 8 + 32);
    assert_eq!(ff.rank_99, Some(8));
    assert_eq!(ff.effective_params, 40);
    assert_eq!(r.totals.params, 120);
    assert_eq!(r.totals.effective_params, 120, "every module bounded by its stored values here");
}

/// Issue #12, item 2: `ss_num_train_images` counts repeats (sd-scripts adds num_repeats ×
/// images per folder); per-image figures and the scan use the distinct images the folders list.
#[test]
fn training_images_are_the_distinct_images_not_the_repeats() {
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(5);
    b.random(&mut rng, "lora_unet_m.lora_down.weight", &[2, 16], 0.5, Dtype::F32);
    b.random(&mut rng, "lora_unet_m.lora_up.weight", &[16, 2], 0.5, Dtype::F32);
    // 100 images × 10 repeats + 30 × 6 = 1180 presentations of 130 distinct images.
    b.meta("ss_num_train_images", "1180").meta("ss_max_train_steps", "2000").meta(
        "ss_dataset_dirs",
        r#"{"10_alice": {"n_repeats": 10, "img_count": 100}, "6_bob": {"n_repeats": 6, "img_count": 30}}"#,
    );
    let p = d.path().join("repeats.safetensors");
    b.write(&p).unwrap();
    let (adapter, _) = lorascope::open(&p, None, &LoadOptions::default()).unwrap();
    let t = &adapter.metadata.training;
    assert_eq!((t.distinct_images, t.num_train_images), (Some(130), Some(1180)));
    let r = lorascope::spectrum(&adapter, None, &SpectrumOptions::default(), &|| {}).unwrap();
    assert_eq!(r.totals.train_images, Some(130));
    let per = r.totals.capacity_bits_per_image.unwrap();
    assert!((per - r.totals.capacity_bits / 130.0).abs() < 1e-9);
    // The scan record and the terminal say the same.
    let o = std::process::Command::new(common::bin()).args(["scan", p.to_str().unwrap(), "-q"]).output().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rec["train_images"], 130);
    let o = std::process::Command::new(common::bin()).args(["inspect", p.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("130 distinct (1180 with repeats, ss_num_train_images)"), "{text}");
}
