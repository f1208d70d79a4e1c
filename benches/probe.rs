//! Probe throughput on SmolLM2-135M (this CPU) against a reference doing the same work in the
//! same run: teacher-forced scoring (log p plus the next-token distribution's mean and sd at
//! every position) and greedy generation with a KV cache. The reference is PyTorch +
//! transformers in f32 (`scripts/bench-pytorch.sh`), or with `--llamacpp` llama.cpp on the
//! GGUF's own Q4_1 blocks (`scripts/bench-llamacpp.sh`).
//! Needs `scripts/fetch-smollm2.sh`. `cargo bench --bench probe` (add `-- --no-pytorch` to skip
//! the reference, `--scoring-only` to time scoring alone, e.g. under a profiler, `--stored` to
//! run lorascope on the Q4_1 blocks instead of the f32 copy its probe makes of a base this small).

mod common;

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use lorascope::model::{greedy, score, Precision, RunOptions, TextModel};
use lorascope::BaseModel;

use common::{median, Reference};

const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const REPS: usize = 5;
const NEW_TOKENS: usize = 50;

fn main() {
    let no_pytorch = std::env::args().any(|a| a == "--no-pytorch");
    let llamacpp = std::env::args().any(|a| a == "--llamacpp");
    let (script, side) =
        if llamacpp { ("scripts/bench-llamacpp.sh", "llama.cpp") } else { ("scripts/bench-pytorch.sh", "pytorch") };
    let path = Path::new(GGUF);
    if !path.exists() {
        eprintln!("{GGUF} missing: run scripts/fetch-smollm2.sh first");
        return;
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let t = Instant::now();
    let base = BaseModel::open(path).expect("GGUF opens");
    // By default lorascope holds an f32 copy, as its probe does for a base this small
    // (Precision::Auto); `--stored` runs it on the Q4_1 blocks, as for a base above 2 GiB of f32.
    let stored = std::env::args().any(|a| a == "--stored");
    let precision = if stored { Precision::Stored } else { Precision::F32 };
    let model = TextModel::load_as(&base, &candle_core::Device::Cpu, precision).expect("model loads");
    let how = if stored { "Q4_1 blocks as stored" } else { "dequantised to f32" };
    println!("load ({how}): {:.2} s; threads {threads}", t.elapsed().as_secs_f64());
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
    let mut gen_batches: Vec<(&str, Vec<Vec<u32>>)> =
        vec![("batch1", vec![seq(0, 33)]), ("batch8", (0..8).map(|k| seq(k, 33)).collect())];
    if llamacpp {
        // llama-cpp-python generates one sequence at a time: only one prompt compares.
        gen_batches.truncate(1);
    }
    if std::env::args().any(|a| a == "--scoring-only") {
        gen_batches.clear();
    }
    let opts = RunOptions { context: 2048, batch_tokens: 1024 };
    let run_score = || score(&model.llama, &all, opts, &|_| {}).expect("scores");
    let run_gen = |p: &[Vec<u32>]| greedy(&model.llama, p, NEW_TOKENS, None, 16, &|_| {}).expect("generates");

    let mut reference = (!no_pytorch).then(|| {
        let job = serde_json::json!({
            "gguf": std::fs::canonicalize(path).expect("path").display().to_string(),
            "threads": threads,
            "new_tokens": NEW_TOKENS,
            "score_batches": score_batches,
            "gen_batches": gen_batches.iter().map(|(n, p)| (n.to_string(), p.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        });
        let job_path = Path::new("target/bench-probe-job.json");
        std::fs::write(job_path, job.to_string()).expect("job written");
        Reference::start(script, &[job_path.as_os_str()])
    });
    // Warm-up both sides, then alternate them REPS times; the ratio is the median of the
    // per-pair ratios, so a noisy neighbour hurts both sides of a pair alike.
    let stats = run_score();
    let mut first_pt = vec![];
    if let Some(r) = reference.as_mut() {
        r.ask("score");
        first_pt =
            r.ask("score")["first_logprobs"].as_array().expect("logprobs").iter().filter_map(Value::as_f64).collect();
    }
    let mut rows = vec![];
    for (name, work) in std::iter::once(("scoring", None)).chain(gen_batches.iter().map(|(n, p)| (*n, Some(p)))) {
        let (mut ours, mut theirs, mut ratios, mut eval_ratios) = (vec![], vec![], vec![], vec![]);
        let mut tokens = scored;
        let mut agree = None;
        if let Some(p) = work {
            run_gen(p);
            if let Some(r) = reference.as_mut() {
                r.ask(&format!("gen {name}"));
            }
        }
        for _ in 0..REPS {
            let t = Instant::now();
            match work {
                None => drop(run_score()),
                Some(p) => {
                    let out = run_gen(p);
                    tokens = out.iter().map(Vec::len).sum();
                    if let Some(r) = reference.as_mut() {
                        let s = t.elapsed().as_secs_f64();
                        let a = r.ask(&format!("gen {name}"));
                        let row: Vec<u32> = a["first_row"]
                            .as_array()
                            .expect("row")
                            .iter()
                            .filter_map(|x| x.as_u64().map(|v| v as u32))
                            .collect();
                        agree = Some(row.iter().zip(&out[0]).take_while(|(x, y)| x == y).count());
                        ours.push(tokens as f64 / s);
                        theirs.push(a["tokens"].as_f64().unwrap_or(0.0) / a["seconds"].as_f64().unwrap_or(f64::NAN));
                        ratios.push(ours[ours.len() - 1] / theirs[theirs.len() - 1]);
                        continue;
                    }
                }
            }
            let s = t.elapsed().as_secs_f64();
            ours.push(tokens as f64 / s);
            if let Some(r) = reference.as_mut() {
                if work.is_none() {
                    let a = r.ask("score");
                    theirs.push(scored as f64 / a["seconds"].as_f64().unwrap_or(f64::NAN));
                    ratios.push(ours[ours.len() - 1] / theirs[theirs.len() - 1]);
                    // llama.cpp's evaluation alone, before numpy's log-softmax and moments.
                    if let Some(e) = a["eval_seconds"].as_f64() {
                        eval_ratios.push(ours[ours.len() - 1] / (scored as f64 / e));
                    }
                }
            }
        }
        let what = if work.is_none() {
            format!("scoring ({tokens} tokens)")
        } else {
            format!("generation {name} ({tokens} tokens)")
        };
        match reference {
            Some(_) => rows.push(format!(
                "{what}: lorascope {:.1} tokens/s, {side} {:.1} tokens/s, ratio {:.2}× (median of {REPS} interleaved pairs: {}){}{}",
                median(ours),
                median(theirs),
                median(ratios.clone()),
                ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
                agree.map_or(String::new(), |a| format!("; greedy tokens agree {a}/{NEW_TOKENS}")),
                if eval_ratios.is_empty() {
                    String::new()
                } else {
                    format!("; against {side}'s evaluation alone {:.2}×", median(eval_ratios.clone()))
                }
            )),
            None => rows.push(format!("{what}: lorascope {:.1} tokens/s", median(ours))),
        }
    }
    if !first_pt.is_empty() {
        let diff = first_pt.iter().zip(&stats[0].logp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        rows.push(format!("same model check: max |Δ log p| over the first 8 positions = {diff:.2e}"));
    }
    for r in rows {
        println!("{r}");
    }
    if let Some(r) = reference {
        r.quit();
    }
}
