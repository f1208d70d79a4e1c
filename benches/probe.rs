//! Probe throughput on SmolLM2-135M (f32, this CPU) against PyTorch + transformers doing the
//! same work in the same run: teacher-forced scoring (log p plus the next-token distribution's
//! mean and sd at every position) and greedy generation with a KV cache.
//! Needs `scripts/fetch-smollm2.sh`; the PyTorch side is set up by `scripts/bench-pytorch.sh`.
//! `cargo bench --bench probe` (add `-- --no-pytorch` to skip the reference).

use std::path::Path;
use std::time::Instant;

use lorascope::model::{greedy, score, RunOptions, TextModel};
use lorascope::BaseModel;

const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const REPS: usize = 3;
const NEW_TOKENS: usize = 50;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let _ = f(); // warm-up
    let mut times = vec![];
    let mut last = None;
    for _ in 0..REPS {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed().as_secs_f64());
    }
    (median(times), last.expect("REPS > 0"))
}

fn main() {
    let no_pytorch = std::env::args().any(|a| a == "--no-pytorch");
    let path = Path::new(GGUF);
    if !path.exists() {
        eprintln!("{GGUF} missing: run scripts/fetch-smollm2.sh first");
        return;
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let t = Instant::now();
    let base = BaseModel::open(path).expect("GGUF opens");
    let model = TextModel::load(&base).expect("model loads");
    println!("load (dequantise to f32): {:.2} s", t.elapsed().as_secs_f64());
    let mut text = String::new();
    for d in ["fixtures/demo/works", "fixtures/demo/controls"] {
        for w in lorascope::load::works::load_works(Path::new(d)).expect("demo texts").works {
            text += &w.text;
            text.push('\n');
        }
    }
    let ids = model.tokenizer.encode(&text).expect("tokenises");
    let bos = model.llama.cfg.bos_token_id.unwrap_or(0);
    // Two batches of 4 sequences × 256 positions; prompts of 32 tokens.
    let seq = |k: usize, len: usize| -> Vec<u32> {
        std::iter::once(bos).chain(ids.iter().cycle().skip(k * 97).take(len - 1).copied()).collect()
    };
    let score_batches: Vec<Vec<Vec<u32>>> = (0..2).map(|b| (0..4).map(|r| seq(b * 4 + r, 256)).collect()).collect();
    let all: Vec<Vec<u32>> = score_batches.iter().flatten().cloned().collect();
    let scored: usize = all.iter().map(|s| s.len() - 1).sum();
    let opts = RunOptions { context: 2048, batch_tokens: 1024 };
    let (score_s, stats) = timed(|| score(&model.llama, &all, opts, &|_| {}).expect("scores"));
    let gen_batches: Vec<(&str, Vec<Vec<u32>>)> =
        vec![("batch1", vec![seq(0, 33)]), ("batch8", (0..8).map(|k| seq(k, 33)).collect())];
    let mut ours = vec![];
    for (name, prompts) in &gen_batches {
        let (s, out) = timed(|| greedy(&model.llama, prompts, NEW_TOKENS, None, 16, &|_| {}).expect("generates"));
        let n: usize = out.iter().map(Vec::len).sum();
        ours.push((name.to_string(), s, n, out[0].clone()));
    }
    println!("threads {threads}");
    println!("lorascope scoring: {scored} tokens in {score_s:.3} s = {:.0} tokens/s", scored as f64 / score_s);
    for (name, s, n, _) in &ours {
        println!("lorascope generation {name}: {n} tokens in {s:.3} s = {:.1} tokens/s", *n as f64 / s);
    }
    if no_pytorch {
        return;
    }
    let job = serde_json::json!({
        "gguf": std::fs::canonicalize(path).expect("path").display().to_string(),
        "threads": threads,
        "reps": REPS,
        "new_tokens": NEW_TOKENS,
        "score_batches": score_batches,
        "gen_batches": gen_batches.iter().map(|(n, p)| (n.to_string(), p.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let job_path = Path::new("target/bench-probe-job.json");
    std::fs::write(job_path, job.to_string()).expect("job written");
    let out = std::process::Command::new("scripts/bench-pytorch.sh").arg(job_path).output().expect("runs the script");
    if !out.status.success() {
        eprintln!("PyTorch reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or("")).expect("reference JSON");
    let pt_score = r["score_seconds"].as_f64().expect("score_seconds");
    println!(
        "pytorch {} scoring: {scored} tokens in {pt_score:.3} s = {:.0} tokens/s  → lorascope/pytorch throughput {:.2}×",
        r["torch"],
        scored as f64 / pt_score,
        pt_score / score_s
    );
    let lp: Vec<f64> = r["first_logprobs"].as_array().expect("logprobs").iter().filter_map(|x| x.as_f64()).collect();
    let diff = lp.iter().zip(&stats[0].logp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!("same model check: max |Δ log p| over the first 8 positions = {diff:.2e}");
    for (name, s, n, first) in &ours {
        let g = &r["gen"][name];
        let pt = g["seconds"].as_f64().expect("seconds");
        let same: Vec<u32> =
            g["first_row"].as_array().expect("row").iter().filter_map(|x| x.as_u64().map(|v| v as u32)).collect();
        let agree = same.iter().zip(first).take_while(|(a, b)| a == b).count();
        println!(
            "pytorch generation {name}: {} tokens in {pt:.3} s = {:.1} tokens/s  → lorascope/pytorch throughput {:.2}× (first row agrees on {agree}/{} tokens)",
            g["tokens"],
            g["tokens"].as_f64().unwrap_or(0.0) / pt,
            (*n as f64 / s) / (g["tokens"].as_f64().unwrap_or(0.0) / pt),
            first.len()
        );
    }
}
