//! `lorascope compare A B` (issue #12): a kohya file against itself with other metadata
//! (identical), against its rank-resized version (derived, per-module cosine equal to the
//! truncated SVD's known value), against an unrelated adapter (unrelated), and the cosines
//! against a dense reference computed here with plain loops (tests/common). The files are
//! written by the tests.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use lorascope::fixtures::{lycoris_loha, SafetensorsBuilder};
use lorascope::rng::Rng;
use nalgebra::DMatrix;
use safetensors::Dtype;
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(bin()).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `compare --json` of two files, parsed.
fn compare_json(a: &Path, b: &Path) -> Value {
    let (code, out, err) = run(&["compare", s(a), s(b), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Linear modules (out, in) and one 3x3 conv (LoCon), kohya names, rank 4, alpha 2.
const LINEAR: &[(&str, usize, usize)] = &[
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 40, 40),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 40, 48),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", 64, 40),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 48, 32),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
];
const CONV: (&str, usize, usize) = ("lora_unet_down_blocks_0_resnets_0_conv1", 24, 16);
const RANK: usize = 4;
const ALPHA: f32 = 2.0;

fn module_names() -> Vec<&'static str> {
    LINEAR.iter().map(|m| m.0).chain(std::iter::once(CONV.0)).collect()
}

/// A kohya LoRA with sd-scripts-style metadata.
fn kohya(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    for &(name, out, inp) in LINEAR {
        b.random(&mut rng, &format!("{name}.lora_down.weight"), &[RANK, inp], 0.5, Dtype::F32);
        b.random(&mut rng, &format!("{name}.lora_up.weight"), &[out, RANK], 0.5, Dtype::F32);
        b.add(&format!("{name}.alpha"), &[], &[ALPHA], Dtype::F32);
    }
    let (c, out, inp) = CONV;
    b.random(&mut rng, &format!("{c}.lora_down.weight"), &[RANK, inp, 3, 3], 0.5, Dtype::F32);
    b.random(&mut rng, &format!("{c}.lora_up.weight"), &[out, RANK, 1, 1], 0.5, Dtype::F32);
    b.add(&format!("{c}.alpha"), &[], &[ALPHA], Dtype::F32);
    let tags: Vec<String> = (0..60).map(|i| format!("\"tag{i}\": {}", 60 - i)).collect();
    b.meta("ss_network_module", "networks.lora")
        .meta("ss_output_name", "demo_style")
        .meta("ss_network_dim", "4")
        .meta("ss_tag_frequency", &format!("{{\"10_demo\": {{{}}}}}", tags.join(", ")));
    b
}

/// ΔW = alpha/r · up · down of a kohya module, from the file's bytes by plain loops.
fn dense_delta(path: &Path, name: &str) -> M {
    let up = mat(path, &format!("{name}.lora_up.weight"));
    let down = mat(path, &format!("{name}.lora_down.weight"));
    let alpha = scalar(path, &format!("{name}.alpha"));
    up.matmul(&down).scale(alpha / up.c as f64)
}

/// The per-module cosines of a `compare --json` report, by module key.
fn cosines(v: &Value) -> std::collections::BTreeMap<String, f64> {
    v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap().to_string(), m["delta"]["cosine"].as_f64().unwrap()))
        .collect()
}

#[test]
fn the_same_weights_with_other_metadata_are_identical() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("reupload.safetensors"));
    kohya(1).write(&a).unwrap();
    let mut re = kohya(1);
    re.metadata.remove("ss_network_dim");
    re.meta("ss_output_name", "totally_original_style").meta("modelspec.title", "My Style");
    re.metadata.insert("ss_tag_frequency".into(), "{\"other\": {\"x\": 1}}".into());
    re.write(&b).unwrap();
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "the files differ (metadata)");
    let v = compare_json(&a, &b);
    assert_eq!(v["conclusion"], "identical");
    assert_eq!(v["identity"]["content_hash_equal"], true);
    assert_eq!(v["identity"]["modules_identical"], true);
    assert_eq!(v["a"]["content_hash"], v["b"]["content_hash"]);
    assert_ne!(v["a"]["sha256"], v["b"]["sha256"]);
    // The content hash is SHA-256 of the data section, computed here from the bytes.
    let bytes = std::fs::read(&a).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let path = d.path().join("data");
    std::fs::write(&path, &bytes[8 + n..]).unwrap();
    let o = Command::new("sha256sum").arg(&path).output().unwrap();
    assert_eq!(v["a"]["content_hash"].as_str().unwrap(), &String::from_utf8_lossy(&o.stdout)[..64]);
    // Metadata diff: one key only in A, one only in B, two changed; the long tag list summarised.
    let m = &v["metadata"];
    assert_eq!(m["only_a"][0]["key"], "ss_network_dim");
    assert_eq!(m["only_b"][0]["key"], "modelspec.title");
    let changed: Vec<&str> = m["changed"].as_array().unwrap().iter().map(|c| c["key"].as_str().unwrap()).collect();
    assert_eq!(changed, ["ss_output_name", "ss_tag_frequency"]);
    let tags = m["changed"][1]["a"].as_str().unwrap();
    assert!(tags.starts_with("(JSON object of 1 keys, ") && !tags.contains("tag59"), "{tags}");
    for c in cosines(&v).values() {
        assert!((c - 1.0).abs() < 1e-12, "{c}");
    }
    // The terminal says the same.
    let (code, out, _) = run(&["compare", s(&a), s(&b)]);
    assert_eq!(code, 0);
    assert!(
        out.contains("conclusion  identical") && out.contains("ss_output_name: demo_style → totally_original_style")
    );
}

/// Truncated SVD of each module's ΔW at rank k, written as a kohya file (alpha = k, scale 1),
/// and the cosine a truncated SVD must have with the original: √(Σ_{i≤k} σᵢ² / Σ σᵢ²).
fn resize(src: &Path, dst: &Path, k: usize) -> std::collections::BTreeMap<String, f64> {
    let mut b = SafetensorsBuilder::new();
    let mut want = std::collections::BTreeMap::new();
    for name in module_names() {
        let w = dense_delta(src, name);
        let svd = DMatrix::from_row_slice(w.r, w.c, &w.v).svd(true, true);
        let mut idx: Vec<usize> = (0..svd.singular_values.len()).collect();
        idx.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
        let (u, vt) = (svd.u.unwrap(), svd.v_t.unwrap());
        let sig = |i: usize| svd.singular_values[idx[i]];
        let up: Vec<f32> = (0..w.r)
            .flat_map(|row| (0..k).map(move |j| (row, j)))
            .map(|(row, j)| (u[(row, idx[j])] * sig(j).sqrt()) as f32)
            .collect();
        let down: Vec<f32> = (0..k)
            .flat_map(|j| (0..w.c).map(move |col| (j, col)))
            .map(|(j, col)| (vt[(idx[j], col)] * sig(j).sqrt()) as f32)
            .collect();
        let conv = name == CONV.0;
        let up_shape = if conv { vec![w.r, k, 1, 1] } else { vec![w.r, k] };
        let down_shape = if conv { vec![k, CONV.2, 3, 3] } else { vec![k, w.c] };
        b.add(&format!("{name}.lora_up.weight"), &up_shape, &up, Dtype::F32);
        b.add(&format!("{name}.lora_down.weight"), &down_shape, &down, Dtype::F32);
        b.add(&format!("{name}.alpha"), &[], &[k as f32], Dtype::F32);
        let all: f64 = (0..idx.len()).map(|i| sig(i).powi(2)).sum();
        let kept: f64 = (0..k).map(|i| sig(i).powi(2)).sum();
        want.insert(name.to_string(), (kept / all).sqrt());
    }
    b.meta("ss_network_module", "networks.lora").meta("ss_network_dim", &k.to_string());
    b.write(dst).unwrap();
    want
}

#[test]
fn a_rank_resized_version_is_derived_with_the_truncated_svd_cosine() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("resized.safetensors"));
    kohya(1).write(&a).unwrap();
    let want = resize(&a, &b, 2);
    let v = compare_json(&a, &b);
    assert_eq!(v["conclusion"], "derived", "{:#}", v["reasons"]);
    assert_eq!(v["identity"]["content_hash_equal"], false);
    let got = cosines(&v);
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let g = got[name];
        // f32 storage of the truncated factors: about 1e-7 relative.
        assert!((g - w).abs() < 1e-5, "{name}: cosine {g}, truncated SVD gives {w}");
        assert!(*w < 0.999, "{name}: the truncation must drop energy ({w})");
    }
    // The top-2 singular subspaces are the same: every principal cosine is 1.
    for m in v["modules"].as_array().unwrap() {
        for side in ["left", "right"] {
            assert_eq!(m["delta"][side]["k"], 2);
            assert!((m["delta"][side]["overlap"].as_f64().unwrap() - 1.0).abs() < 1e-5, "{m:#}");
        }
        assert_eq!(m["rank_b"], 2);
    }
    let agg = v["aggregate"]["cosine"].as_f64().unwrap();
    assert!(agg > 0.5 && agg < 1.0, "{agg}");
    eprintln!("resized cosines: {got:?}, aggregate {agg}");
}

#[test]
fn an_adapter_with_the_same_modules_and_another_seed_is_unrelated() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
    kohya(1).write(&a).unwrap();
    kohya(2).write(&b).unwrap();
    let v = compare_json(&a, &b);
    assert_eq!(v["conclusion"], "unrelated", "{:#}", v["reasons"]);
    assert_eq!(v["modules"].as_array().unwrap().len(), module_names().len());
    let agg = &v["aggregate"];
    let (c, z) = (agg["cosine"].as_f64().unwrap(), agg["cosine_z"].as_f64().unwrap());
    assert!(c.abs() < 0.2 && z < 6.0, "aggregate cosine {c}, {z} sd");
    eprintln!("unrelated: aggregate cosine {c}, {z} sd; {:?}", cosines(&v));
}

#[test]
fn cosines_match_a_dense_reference() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("tuned.safetensors"));
    kohya(1).write(&a).unwrap();
    // "Further trained": the up factors of A plus noise, the down factors kept, alpha changed.
    let mut tuned = SafetensorsBuilder::new();
    let mut rng = Rng::new(9);
    for name in module_names() {
        for part in ["lora_up", "lora_down"] {
            let key = format!("{name}.{part}.weight");
            let (shape, vals) = raw(&a, &key);
            let noise = if part == "lora_up" { 0.4 } else { 0.0 };
            let v: Vec<f32> = vals.iter().map(|x| (x + noise * rng.normal()) as f32).collect();
            tuned.add(&key, &shape, &v, Dtype::F32);
        }
        tuned.add(&format!("{name}.alpha"), &[], &[3.0], Dtype::F32);
    }
    tuned.write(&b).unwrap();
    let v = compare_json(&a, &b);
    let got = cosines(&v);
    for name in module_names() {
        let want = frobenius_cosine(&dense_delta(&a, name), &dense_delta(&b, name));
        assert!((got[name] - want).abs() < 1e-10, "{name}: {} vs dense {want}", got[name]);
    }
    eprintln!("tuned cosines: {got:?}, aggregate {}", v["aggregate"]["cosine"]);
    assert_eq!(v["conclusion"], "derived", "{:#}", v["reasons"]);
    // LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, compared through its face-splitting factors.
    let (la, lb) = (d.path().join("loha1.safetensors"), d.path().join("loha2.safetensors"));
    lycoris_loha(1).write(&la).unwrap();
    lycoris_loha(2).write(&lb).unwrap();
    let v = compare_json(&la, &lb);
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v";
    let loha = |p: &Path| {
        let g = |s: &str| mat(p, &format!("{n}.{s}"));
        g("hada_w1_a").matmul(&g("hada_w1_b")).hadamard(&g("hada_w2_a").matmul(&g("hada_w2_b"))).scale(0.5)
    };
    let want = frobenius_cosine(&loha(&la), &loha(&lb));
    assert!((cosines(&v)[n] - want).abs() < 1e-10, "{} vs {want}", cosines(&v)[n]);
}

#[test]
fn json_is_deterministic_and_bad_input_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
    kohya(1).write(&a).unwrap();
    let mut other = kohya(2);
    other.meta("ss_output_name", "\u{1b}[31mred\u{202e}");
    other.write(&b).unwrap();
    let first = run(&["compare", s(&a), s(&b), "--json"]).1;
    assert_eq!(first, run(&["compare", s(&a), s(&b), "--json"]).1);
    assert!(!first.contains("NaN") && !first.contains("Infinity"));
    let v: Value = serde_json::from_str(&first).unwrap();
    assert!(v["aggregate"].as_object().unwrap().values().all(Value::is_number), "{:#}", v["aggregate"]);
    // Hostile metadata is shown escaped, never raw.
    let (_, out, _) = run(&["compare", s(&a), s(&b)]);
    assert!(!out.contains('\u{1b}') && !out.contains('\u{202e}'), "{out}");
    // A missing file and a file that is not an adapter: exit 2, the message names the file.
    let missing = d.path().join("missing.safetensors");
    let (code, _, err) = run(&["compare", s(&a), s(&missing)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.safetensors"), "{err}");
    let junk = d.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file at all").unwrap();
    let (code, _, err) = run(&["compare", s(&junk), s(&a)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("junk.safetensors"), "{err}");
    let (code, _, err) = run(&["compare", s(&a), s(&b), "--top-k", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn scan_records_group_reuploads_by_content_hash() {
    let d = tempfile::tempdir().unwrap();
    kohya(1).write(&d.path().join("original.safetensors")).unwrap();
    let mut re = kohya(1);
    re.meta("ss_output_name", "stolen");
    re.write(&d.path().join("reupload.safetensors")).unwrap();
    kohya(2).write(&d.path().join("other.safetensors")).unwrap();
    let (code, out, err) = run(&["scan", s(d.path()), "-q"]);
    assert_eq!(code, 0, "{err}");
    let recs: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by_name = |n: &str| recs.iter().find(|r| r["path"].as_str().unwrap().ends_with(n)).unwrap();
    let (o, r, x) = (by_name("original.safetensors"), by_name("reupload.safetensors"), by_name("other.safetensors"));
    assert_eq!(o["content_hash"], r["content_hash"]);
    assert_ne!(o["sha256"], r["sha256"]);
    assert_ne!(o["content_hash"], x["content_hash"]);
    assert_eq!(o["content_hash"].as_str().unwrap().len(), 64);
}

#[test]
fn base_dependent_modules_and_modules_on_one_side_are_listed() {
    // DoRA and (IA)³ need the base for ΔW: listed as not compared, with the reason.
    let f = fixtures().join("lycoris-full-dora-ia3.safetensors");
    let v = compare_json(&f, &f);
    assert_eq!(v["conclusion"], "identical");
    let reasons: Vec<(String, Value)> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["kind_a"].as_str().unwrap().to_string(), m["not_compared"]["reason"].clone()))
        .collect();
    for (kind, reason) in &reasons {
        let want = if kind == "full" { Value::Null } else { Value::from("needs-base") };
        assert_eq!(reason, &want, "{kind}: {reasons:?}");
    }
    assert!(reasons.iter().any(|(k, _)| k == "dora") && reasons.iter().any(|(k, _)| k == "ia3"), "{reasons:?}");
    // A with one module dropped: the rest is bit-identical, but the adapters are not the same
    // weights; the dropped module is listed, and B is derived from A.
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("part.safetensors"));
    kohya(1).write(&a).unwrap();
    let mut part = SafetensorsBuilder::new();
    for name in module_names().into_iter().filter(|n| *n != CONV.0) {
        for t in ["lora_up.weight", "lora_down.weight", "alpha"] {
            let key = format!("{name}.{t}");
            let (shape, vals) = raw(&a, &key);
            part.add(&key, &shape, &vals.iter().map(|x| *x as f32).collect::<Vec<_>>(), Dtype::F32);
        }
    }
    part.write(&b).unwrap();
    let v = compare_json(&a, &b);
    assert_eq!(v["only_a"], serde_json::json!([CONV.0]));
    assert_eq!(v["identity"]["modules_identical"], false);
    assert!(v["modules"].as_array().unwrap().iter().all(|m| m["identical_tensors"] == true));
    assert_eq!(v["conclusion"], "derived", "{:#}", v["reasons"]);
}
