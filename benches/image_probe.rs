//! The image probe's model work against diffusers on the same CPU and threads (issue #11): one
//! UNet forward and one VAE encode (latent mean × scaling factor), lorascope's SD runtime
//! (src/model/sd) and diffusers (PyTorch, float32, its default attention processor) alternating
//! in one process pair, on the same weights and the same inputs.
//!
//! Two cases: `fixtures/sd-micro/pipeline` at the probe's batch (8 images × caption and empty
//! caption = 16 latents), and a pipeline with SD 1.5's published shapes and random weights
//! (written once by `scripts/bench-diffusers.sh make-sd15 target/bench-sd15`, about 4.3 GB) at
//! 64×64 latents, batch 2 (one image with and without its caption), VAE encode of one 512×512
//! image, caption context of 77 tokens as SD 1.5's CLIP gives. Peak RSS of this process (the lorascope side; diffusers runs in a child) is reset
//! before each case and read after it.
//!
//! `cargo bench --bench image_probe` (add `-- --no-diffusers` to time lorascope alone,
//! `--fixture-only` to skip the SD 1.5-shaped case, `--reps N` for the number of pairs).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::Value;

use lorascope::model::SdModel;
use lorascope::rng::Rng;
use lorascope::BaseModel;

use common::{median, Reference};

/// The command line's allocator (src/main.rs), so the bench times what `lorascope` runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SD15_DIR: &str = "target/bench-sd15";

/// This process's peak resident set (VmHWM) in bytes, and its reset (clear_refs 5).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

struct Case {
    name: &'static str,
    pipeline: PathBuf,
    /// Latents per UNet call.
    unet_batch: usize,
    /// Images per VAE encode.
    vae_batch: usize,
    /// Tokens of the caption context (None: the model's tokenizer length).
    context_len: Option<usize>,
    reps: usize,
    /// Each side makes one untimed call before its timed one, so that the timed call runs as
    /// the probe's back-to-back calls do: for calls of milliseconds, the other side's idle
    /// threads, still polling for a few milliseconds after its call (PyTorch's OpenMP workers,
    /// rayon's), or one's own threads gone to sleep during the other's call, would otherwise be
    /// a large part of the time (on the fixture they doubled both sides' times).
    untimed_first: bool,
}

/// Standard normal values from lorascope's seeded generator.
fn normal(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape fits")
}

/// max |a − b| / max |b|.
fn relative_diff(ours: &Tensor, theirs: &Value) -> f64 {
    let a: Vec<f32> = ours.flatten_all().and_then(|t| t.to_vec1()).expect("values");
    let b: Vec<f64> = theirs.as_array().expect("values").iter().filter_map(Value::as_f64).collect();
    assert_eq!(a.len(), b.len(), "both sides return the same number of values");
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter().zip(&b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max) / scale.max(f64::MIN_POSITIVE)
}

fn run_case(case: &Case, threads: usize, diffusers: bool) -> Vec<String> {
    println!("{}: {}", case.name, case.pipeline.display());
    reset_peak_rss();
    let t = Instant::now();
    let base = BaseModel::open(&case.pipeline).expect("pipeline opens");
    let model = SdModel::load(&base, None, &Device::Cpu).expect("model loads");
    let load_s = t.elapsed().as_secs_f64();
    let info = model.info();
    let params = info.params.unet + info.params.vae + info.params.text_encoder;
    let (r, l) = (model.resolution(), model.latent_size());
    println!(
        "  lorascope load {load_s:.1} s; UNet {:.0}M, VAE {:.0}M, text encoder {:.0}M parameters (f32 {}); {r} px, {l}×{l} latents",
        info.params.unet as f64 / 1e6,
        info.params.vae as f64 / 1e6,
        info.params.text_encoder as f64 / 1e6,
        gib(params as f64 * 4.0)
    );

    // Inputs: noisy latents, a timestep, a caption-like context (the text encoder's output for
    // real captions is what the probe feeds; its values do not change the arithmetic), pixels.
    let mut rng = Rng::new(11);
    let (b, vb) = (case.unet_batch, case.vae_batch);
    let x = tensor(normal(&mut rng, b * 4 * l * l, 1.0), &[b, 4, l, l]);
    let ctx_dims = model.encode_text(&[""]).expect("text encoder runs").dims().to_vec();
    let (cl, cd) = (case.context_len.unwrap_or(ctx_dims[1]), ctx_dims[2]);
    let ctx = tensor(normal(&mut rng, b * cl * cd, 1.0), &[b, cl, cd]);
    let px: Vec<f32> = (0..vb * 3 * r * r).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    let px = tensor(px, &[vb, 3, r, r]);
    let ts = 500usize;
    let inputs = Path::new("target").join(format!("bench-image-inputs-{}.safetensors", case.unet_batch));
    let t_tensor = tensor(vec![ts as f32], &[1]);
    let named: HashMap<String, Tensor> = [("x", &x), ("context", &ctx), ("pixels", &px), ("t", &t_tensor)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&named, &inputs).expect("inputs written");

    let unet = || model.predict(&x, ts, &ctx).expect("UNet runs");
    let vae = || model.encode_images(&px).expect("VAE runs");

    let mut reference = diffusers.then(|| {
        let job = serde_json::json!({
            "pipeline": std::fs::canonicalize(&case.pipeline).expect("path").display().to_string(),
            "threads": threads,
            "inputs": std::fs::canonicalize(&inputs).expect("path").display().to_string(),
        });
        let job_path = Path::new("target/bench-image-job.json");
        std::fs::write(job_path, job.to_string()).expect("job written");
        let r = Reference::start("scripts/bench-diffusers.sh", &["serve".as_ref(), job_path.as_os_str()]);
        println!("  diffusers side: torch {} with {} threads", r.hello["torch"], r.hello["threads"]);
        r
    });

    let mut rows = vec![];
    for (what, work, cmd) in [("UNet forward", &unet as &dyn Fn() -> Tensor, "unet"), ("VAE encode", &vae, "vae")] {
        let size = if cmd == "unet" { format!("{b}×4×{l}×{l}") } else { format!("{vb}×3×{r}×{r}") };
        // Warm-up both sides; the warm-up's outputs check that both run the same model.
        let ours_out = work();
        let agree = reference.as_mut().map(|rf| relative_diff(&ours_out, &rf.ask(&format!("{cmd} check"))["values"]));
        let (mut ours, mut theirs, mut ratios) = (vec![], vec![], vec![]);
        for _ in 0..case.reps {
            if case.untimed_first {
                drop(work());
            }
            let t = Instant::now();
            drop(work());
            let s = t.elapsed().as_secs_f64();
            ours.push(s);
            if let Some(rf) = reference.as_mut() {
                if case.untimed_first {
                    rf.ask(cmd);
                }
                let p = rf.ask(cmd)["seconds"].as_f64().unwrap_or(f64::NAN);
                theirs.push(p);
                ratios.push(p / s);
            }
        }
        let row = match agree {
            Some(d) => format!(
                "  {what} ({size}): lorascope {:.3} s, diffusers {:.3} s, ratio {:.2}× (diffusers time / lorascope time, median of {} interleaved pairs: {}); outputs agree to {d:.1e} of their scale",
                median(ours),
                median(theirs),
                median(ratios.clone()),
                case.reps,
                ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
            ),
            None => format!("  {what} ({size}): lorascope {:.3} s (median of {})", median(ours), case.reps),
        };
        println!("{row}");
        rows.push(row);
    }
    let peak = peak_rss() as f64;
    let budget = params as f64 * 4.0 + (1u64 << 30) as f64;
    let mut row = format!(
        "  peak RSS, lorascope side: {} (target f32 model {} + 1 GiB = {}: {})",
        gib(peak),
        gib(params as f64 * 4.0),
        gib(budget),
        if peak <= budget { "met" } else { "NOT met" }
    );
    if let Some(mut rf) = reference {
        let kib = rf.ask("rss")["peak_rss_kib"].as_f64().unwrap_or(f64::NAN);
        row += &format!("; diffusers process {}", gib(kib * 1024.0));
        rf.quit();
    }
    println!("{row}");
    rows.push(row);
    rows
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let reps = args.iter().position(|a| a == "--reps").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok());
    let diffusers = !flag("--no-diffusers");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("threads {threads} (lorascope: rayon and candle's gemm use every core; diffusers: torch.set_num_threads)");
    let mut cases = vec![Case {
        name: "sd-micro fixture (the probe's batch)",
        pipeline: PathBuf::from("fixtures/sd-micro/pipeline"),
        unet_batch: 16,
        vae_batch: 8,
        context_len: None,
        reps: reps.unwrap_or(15),
        untimed_first: true,
    }];
    if !flag("--fixture-only") {
        if !Path::new(SD15_DIR).join("unet").exists() {
            println!("writing the SD 1.5-shaped random pipeline to {SD15_DIR} (once)");
            let ok = Command::new("scripts/bench-diffusers.sh").args(["make-sd15", SD15_DIR]).status();
            assert!(ok.is_ok_and(|s| s.success()), "scripts/bench-diffusers.sh make-sd15 failed");
        }
        cases.push(Case {
            name: "SD 1.5 shapes, random weights, 64×64 latents",
            pipeline: PathBuf::from(SD15_DIR),
            unet_batch: 2,
            vae_batch: 1,
            // SD 1.5's CLIP context (the shipped tokenizer is the fixture's, of 16 tokens).
            context_len: Some(77),
            reps: reps.unwrap_or(3),
            untimed_first: false,
        });
    }
    let rows: Vec<String> = cases.iter().flat_map(|c| run_case(c, threads, diffusers)).collect();
    println!("\nsummary");
    for r in rows {
        println!("{r}");
    }
}
