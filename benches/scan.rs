//! Scan benchmark (issue #6): files per second on 1000 generated small adapters with
//! `--jobs 2`, and MB/s on large ones, against `openssl dgst -sha256` over the same files.
//! Run: `cargo bench --bench scan`. Prints a Markdown table for docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use lorascope::fixtures::{Rng, SafetensorsBuilder};
use safetensors::Dtype;

fn small_adapter(rng: &mut Rng, i: usize) -> SafetensorsBuilder {
    let mut b = SafetensorsBuilder::new();
    let r = 4 + i % 5;
    for m in 0..8 {
        let (out, inp) = (64 + 32 * (m % 3), 64 + 16 * (i % 4));
        let n = format!("lora_unet_down_blocks_0_attentions_0_transformer_blocks_{m}_attn1_to_q");
        b.random(rng, &format!("{n}.lora_down.weight"), &[r, inp], 0.1, Dtype::F16);
        b.random(rng, &format!("{n}.lora_up.weight"), &[out, r], 0.1, Dtype::F16);
        b.add(&format!("{n}.alpha"), &[], &[r as f32], Dtype::F16);
    }
    b.meta("ss_num_train_images", &(10 + i % 40).to_string()).meta("ss_max_train_steps", "2000");
    b
}

fn large_adapter(rng: &mut Rng) -> SafetensorsBuilder {
    let mut b = SafetensorsBuilder::new();
    for l in 0..32 {
        for (m, out, inp) in [("q_proj", 4096, 4096), ("v_proj", 4096, 4096), ("down_proj", 4096, 11008)] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            b.random(rng, &format!("{p}.lora_A.weight"), &[16, inp], 0.02, Dtype::F16);
            b.random(rng, &format!("{p}.lora_B.weight"), &[out, 16], 0.02, Dtype::F16);
        }
    }
    b
}

fn time_cmd(mut c: Command) -> f64 {
    let t = Instant::now();
    let s = c.stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(s.success() || s.code() == Some(1), "{c:?}");
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn files_in(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn main() {
    let bin = env!("CARGO_BIN_EXE_lorascope");
    let dir = tempfile::tempdir().unwrap();
    let (small, large) = (dir.path().join("small"), dir.path().join("large"));
    std::fs::create_dir_all(&small).unwrap();
    std::fs::create_dir_all(&large).unwrap();
    let mut rng = Rng::new(9);
    for i in 0..1000 {
        small_adapter(&mut rng, i).write(&small.join(format!("a{i:04}.safetensors"))).unwrap();
    }
    let big = large_adapter(&mut rng);
    for i in 0..4 {
        big.write(&large.join(format!("big{i}.safetensors"))).unwrap();
    }
    println!("| files | total size | lorascope scan --jobs 2 | openssl dgst -sha256 | ratio |");
    println!("|---|---|---|---|---|");
    for (label, d, reps) in [("1000 small adapters", &small, 5), ("4 large adapters", &large, 5)] {
        let files = files_in(d);
        let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
        let ts = median(
            (0..reps)
                .map(|_| {
                    let mut c = Command::new(bin);
                    c.args(["scan", "--jobs", "2", "--quiet"]).arg(d);
                    time_cmd(c)
                })
                .collect(),
        );
        let to = median(
            (0..reps)
                .map(|_| {
                    let mut c = Command::new("openssl");
                    c.args(["dgst", "-sha256"]).args(&files);
                    time_cmd(c)
                })
                .collect(),
        );
        let mb = bytes as f64 / 1e6;
        println!(
            "| {label} | {mb:.1} MB | {ts:.2} s ({:.0} files/s, {:.0} MB/s) | {to:.2} s ({:.0} files/s, {:.0} MB/s) | {:.2}x |",
            files.len() as f64 / ts,
            mb / ts,
            files.len() as f64 / to,
            mb / to,
            ts / to
        );
    }
}
