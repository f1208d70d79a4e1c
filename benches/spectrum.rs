//! Spectrum benchmark (issue #3; targets in docs/benchmarks.md): realistic-size adapters generated on the fly.
//!
//! - `lorascope spectrum` wall time (open, hash, analyse, report, in process) against
//!   `openssl dgst -sha256` of the same file: hashing is the floor, the file is hashed anyway.
//! - factored SVD (QR of factors + r×r core) against a dense SVD of the formed ΔW.
//!
//! Run: `cargo bench --bench spectrum` (set LORASCOPE_BENCH_SKIP_DENSE_4096=1 to skip the
//! slowest dense SVD). Prints a Markdown table for docs/benchmarks.md.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lorascope::fixtures::{Rng, SafetensorsBuilder};
use lorascope::linalg::svd_low_rank;
use lorascope::load::LoadOptions;
use lorascope::spectral::SpectrumOptions;
use nalgebra::DMatrix;
use safetensors::Dtype;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// An SD1.5-shaped kohya LoRA: every attention/feed-forward/proj module of the 16 UNet
/// transformer blocks and the 12 CLIP-L layers, rank `r`, f16.
fn sd15_kohya(r: usize) -> SafetensorsBuilder {
    let mut rng = Rng::new(1);
    let mut b = SafetensorsBuilder::new();
    let mut blocks: Vec<(String, usize)> = vec![];
    for (lvl, c) in [(0, 320), (1, 640), (2, 1280)] {
        for a in 0..2 {
            blocks.push((format!("lora_unet_down_blocks_{lvl}_attentions_{a}"), c));
        }
    }
    blocks.push(("lora_unet_mid_block_attentions_0".into(), 1280));
    for (lvl, c) in [(1, 1280), (2, 640), (3, 320)] {
        for a in 0..3 {
            blocks.push((format!("lora_unet_up_blocks_{lvl}_attentions_{a}"), c));
        }
    }
    let mut add = |b: &mut SafetensorsBuilder, name: &str, out: usize, inp: usize| {
        b.random(&mut rng, &format!("{name}.lora_down.weight"), &[r, inp], 0.05, Dtype::F16);
        b.random(&mut rng, &format!("{name}.lora_up.weight"), &[out, r], 0.05, Dtype::F16);
        b.add(&format!("{name}.alpha"), &[], &[r as f32 / 2.0], Dtype::F16);
    };
    for (p, c) in &blocks {
        let c = *c;
        add(&mut b, &format!("{p}_proj_in"), c, c);
        add(&mut b, &format!("{p}_proj_out"), c, c);
        let t = format!("{p}_transformer_blocks_0");
        for m in ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_out_0"] {
            add(&mut b, &format!("{t}_{m}"), c, c);
        }
        add(&mut b, &format!("{t}_attn2_to_k"), c, 768);
        add(&mut b, &format!("{t}_attn2_to_v"), c, 768);
        add(&mut b, &format!("{t}_ff_net_0_proj"), 8 * c, c);
        add(&mut b, &format!("{t}_ff_net_2"), c, 4 * c);
    }
    for l in 0..12 {
        let p = format!("lora_te_text_model_encoder_layers_{l}");
        for m in ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"] {
            add(&mut b, &format!("{p}_{m}"), 768, 768);
        }
        add(&mut b, &format!("{p}_mlp_fc1"), 3072, 768);
        add(&mut b, &format!("{p}_mlp_fc2"), 768, 3072);
    }
    b
}

/// A 7B-llama-shaped PEFT LoRA, rank `r` on every linear layer of 32 layers, f16.
fn llama7b_peft(r: usize) -> (SafetensorsBuilder, String) {
    let mut rng = Rng::new(2);
    let mut b = SafetensorsBuilder::new();
    let (h, i) = (4096, 11008);
    for l in 0..32 {
        for (m, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            b.random(&mut rng, &format!("{p}.lora_A.weight"), &[r, inp], 0.02, Dtype::F16);
            b.random(&mut rng, &format!("{p}.lora_B.weight"), &[out, r], 0.02, Dtype::F16);
        }
    }
    let cfg = format!(r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": {}, "target_modules": "all-linear"}}"#, 2 * r);
    (b, cfg)
}

fn have_openssl() -> bool {
    Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success())
}

fn openssl_once(p: &Path) -> f64 {
    let t = Instant::now();
    let out = Command::new("openssl").args(["dgst", "-sha256"]).arg(p).output().unwrap();
    assert!(out.status.success());
    t.elapsed().as_secs_f64()
}

fn spectrum_once(p: &Path) -> (f64, usize) {
    let t = Instant::now();
    let (a, _) = lorascope::open(p, None, &LoadOptions::default()).unwrap();
    let r = lorascope::spectrum(&a, None, &SpectrumOptions::default(), &|| {}).unwrap();
    (t.elapsed().as_secs_f64(), r.modules.len())
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!("## spectrum vs SHA-256 of the same file\n");
    println!("| adapter | size | modules | lorascope spectrum | openssl dgst -sha256 | ratio |");
    println!("|---|---|---|---|---|---|");
    let sd = dir.path().join("sd15-kohya-r32.safetensors");
    sd15_kohya(32).write(&sd).unwrap();
    let llama_dir = dir.path().join("llama7b-peft-r16");
    let (w, cfg) = llama7b_peft(16);
    w.write(&llama_dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(llama_dir.join("adapter_config.json"), cfg).unwrap();
    for (label, p, file) in [
        ("SD1.5 kohya LoRA r32 (f16)", sd.clone(), sd.clone()),
        ("7B llama PEFT LoRA r16, all linear (f16)", llama_dir.clone(), llama_dir.join("adapter_model.safetensors")),
    ] {
        let size = std::fs::metadata(&file).unwrap().len() as f64 / 1e6;
        // Interleaved runs, so machine noise hits both sides alike; medians of 15 pairs and the
        // median of the per-pair ratios.
        let mut n = 0;
        let (mut ts, mut tos, mut ratios) = (vec![], vec![], vec![]);
        for _ in 0..15 {
            let (t, m) = spectrum_once(&p);
            n = m;
            ts.push(t);
            if have_openssl() {
                let o = openssl_once(&file);
                tos.push(o);
                ratios.push(t / o);
            }
        }
        let t = median(ts);
        let (sha_s, ratio) = if tos.is_empty() {
            ("openssl not found".into(), "-".into())
        } else {
            (format!("{:.1} ms", median(tos) * 1e3), format!("{:.2}x", median(ratios)))
        };
        println!("| {label} | {size:.1} MB | {n} | {:.1} ms | {sha_s} | {ratio} |", t * 1e3);
    }

    println!("\n## factored SVD vs dense SVD of the formed ΔW (rank 16, singular values only)\n");
    println!("| size | factored | dense | speed-up |");
    println!("|---|---|---|---|");
    let skip4096 = std::env::var("LORASCOPE_BENCH_SKIP_DENSE_4096").is_ok();
    let mut rng = Rng::new(3);
    for n in [1024usize, 2048, 4096] {
        let up = DMatrix::from_fn(n, 16, |_, _| rng.normal());
        let down_t = DMatrix::from_fn(n, 16, |_, _| rng.normal());
        let tf = time(9, || {
            std::hint::black_box(svd_low_rank(&up, &down_t, false).unwrap());
        });
        if n == 4096 && skip4096 {
            println!("| {n}x{n} | {:.2} ms | skipped | - |", tf * 1e3);
            continue;
        }
        let dense = &up * down_t.transpose();
        let reps = if n >= 4096 { 1 } else { 3 };
        let td = time(reps, || {
            std::hint::black_box(dense.clone().svd(false, false));
        });
        println!("| {n}x{n} | {:.2} ms | {:.2} s | {:.0}x |", tf * 1e3, td, td / tf);
    }
}
