//! Teacher-forced token statistics and greedy generation, batched.

use std::time::Instant;

use candle_core::{Device, Tensor, D};
use rayon::prelude::*;

use super::llama::{ids_tensor, Cache, Llama};
use super::{cerr, with_f32, CResult};
use crate::error::Result;

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Longest window the model sees; longer sequences are scored in sliding windows.
    pub context: usize,
    /// Positions per forward batch (rows × padded length).
    pub batch_tokens: usize,
}

/// Most bytes of activations a teacher-forced batch holds at once: with the weights as stored,
/// a 7B model's activations at 4096 positions (0.7 GB) would cost more than its adapter and
/// working buffers together are allowed (docs/probe.md, "Memory").
pub const ACTIVATION_BUDGET: usize = 256 << 20;

/// Most bytes of KV cache one batch of continuations holds (the generation's cache and the copy
/// its true suffix is scored on, together).
pub const KV_BUDGET: usize = 512 << 20;

impl RunOptions {
    /// Up to 4096 positions a batch, fewer where their activations would pass
    /// [`ACTIVATION_BUDGET`] (a 7B model: about 1500), never fewer than 64.
    pub(crate) fn for_model(m: &Llama) -> Self {
        let fit = ACTIVATION_BUDGET / m.cfg.activation_bytes_per_position().max(1);
        RunOptions { context: m.cfg.context().min(2048), batch_tokens: fit.clamp(64, 4096) }
    }
}

/// Rows of continuations run together, at most `most`: as many as keep the KV caches of a batch
/// (the generation's, `positions` long, and a copy for scoring its target) within [`KV_BUDGET`],
/// and at least one.
pub fn rows_per_batch(m: &Llama, positions: usize, most: usize) -> usize {
    let per_row = 2 * positions.max(1) * m.cfg.kv_bytes_per_position();
    (KV_BUDGET / per_row.max(1)).clamp(1, most.max(1))
}

/// Per predicted token (positions 1.. of a sequence): log p of the true token and the mean and
/// standard deviation of log p over the model's next-token distribution (natural log), which
/// is what Min-K%++ needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStats {
    pub logp: Vec<f64>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl TokenStats {
    fn zeros(n: usize) -> Self {
        TokenStats { logp: vec![0.0; n], mean: vec![0.0; n], std: vec![0.0; n] }
    }
}

/// One forward job: positions `begin..end` of sequence `seq`, scoring targets from `first`.
#[derive(Debug, Clone, Copy)]
struct Job {
    seq: usize,
    begin: usize,
    end: usize,
    first: usize,
}

/// Sliding windows of `context` positions with a stride of half of it: every token is scored
/// once, with the longest context a window gives it (transformers' perplexity recipe).
fn windows(seq: usize, len: usize, context: usize) -> Vec<Job> {
    let context = context.max(2);
    let stride = (context / 2).max(1);
    let mut jobs = vec![];
    let mut scored_to = 1;
    let mut begin = 0;
    while scored_to < len {
        let end = (begin + context).min(len);
        jobs.push(Job { seq, begin, end, first: scored_to });
        scored_to = end;
        begin += stride;
    }
    jobs
}

/// Token statistics of every sequence (each starts with its context token, usually BOS; the
/// result for a sequence of n ids has n−1 entries). `progress` is told how many tokens are done.
pub fn score(m: &Llama, seqs: &[Vec<u32>], opts: RunOptions, progress: &dyn Fn(usize)) -> Result<Vec<TokenStats>> {
    let mut out: Vec<TokenStats> = seqs.iter().map(|s| TokenStats::zeros(s.len().saturating_sub(1))).collect();
    let mut jobs: Vec<Job> = seqs.iter().enumerate().flat_map(|(i, s)| windows(i, s.len(), opts.context)).collect();
    // Longest first, so each batch pads little.
    jobs.sort_by_key(|j| (std::cmp::Reverse(j.end - j.begin), j.seq, j.begin));
    let mut i = 0;
    while i < jobs.len() {
        let len = jobs[i].end - jobs[i].begin;
        let rows = (opts.batch_tokens / len.max(1)).max(1);
        let batch = &jobs[i..(i + rows).min(jobs.len())];
        run_batch(m, seqs, batch, len, &mut out).map_err(cerr)?;
        progress(batch.iter().map(|j| j.end - j.first).sum());
        i += batch.len();
    }
    Ok(out)
}

fn run_batch(m: &Llama, seqs: &[Vec<u32>], batch: &[Job], len: usize, out: &mut [TokenStats]) -> CResult<()> {
    // Right padding: under the causal mask, real positions never see the pad ids after them.
    let rows: Vec<Vec<u32>> = batch
        .iter()
        .map(|j| {
            let mut r = seqs[j.seq][j.begin..j.end].to_vec();
            r.resize(len, 0);
            r
        })
        .collect();
    let hidden = m.hidden(&ids_tensor(&rows, m.device())?, None, false)?;
    for (row, j) in batch.iter().enumerate() {
        // Hidden state at position p predicts token p+1.
        let from = j.first - 1 - j.begin;
        let n = j.end - j.first;
        let h = hidden.get(row)?.narrow(0, from, n)?;
        let targets = &seqs[j.seq][j.first..j.end];
        let stats = token_stats(m, &h, targets)?;
        let dst = &mut out[j.seq];
        for (k, (lp, mu, sd)) in stats.into_iter().enumerate() {
            let at = j.first - 1 + k;
            dst.logp[at] = lp;
            dst.mean[at] = mu;
            dst.std[at] = sd;
        }
    }
    Ok(())
}

/// (log p(target), E[log p], sd[log p]) per row of `hidden` `[n, hidden]`, in chunks so the
/// logits of a large vocabulary stay small.
pub(crate) fn token_stats(m: &Llama, hidden: &Tensor, targets: &[u32]) -> CResult<Vec<(f64, f64, f64)>> {
    let vocab = m.cfg.vocab_size;
    // Up to 32 Mi logits (128 MiB) at a time: large enough for an efficient matmul.
    let chunk = (32 << 20) / vocab.max(1);
    let chunk = chunk.max(1);
    let n = targets.len();
    let mut res = Vec::with_capacity(n);
    let mut s = 0;
    while s < n {
        let c = chunk.min(n - s);
        // The statistics are computed on the host, wherever the model runs.
        let logits = m.logits(&hidden.narrow(0, s, c)?)?.to_device(&Device::Cpu)?.contiguous()?;
        with_f32(&logits, |rows| {
            res.par_extend(rows.par_chunks(vocab).zip(&targets[s..s + c]).map(|(row, &t)| row_stats(row, t as usize)))
        })?;
        s += c;
    }
    Ok(res)
}

/// (log p(target), E[log p], sd[log p]) of one row of logits, in two passes: the maximum, then
/// one exponential per entry. With d = l − max, e = exp d, Z = Σe: log p = d − ln Z,
/// E[log p] = Σe·d/Z − ln Z, E[(log p)²] = Σe·d²/Z − 2 ln Z·Σe·d/Z + (ln Z)².
fn row_stats(row: &[f32], target: usize) -> (f64, f64, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut z, mut a, mut b) = (0f64, 0f64, 0f64);
    for &l in row {
        // exp in f32 (faster, 1e-7 relative error); sums in f64.
        let d32 = l - max;
        let (d, e) = (d32 as f64, d32.exp() as f64);
        z += e;
        a += e * d;
        b += e * d * d;
    }
    let lz = z.ln();
    let mean_d = a / z;
    let mean = mean_d - lz;
    let second = b / z - 2.0 * lz * mean_d + lz * lz;
    let lp = row.get(target).map_or(f64::NEG_INFINITY, |&l| (l - max) as f64 - lz);
    (lp, mean, (second - mean * mean).max(0.0).sqrt())
}

/// Greedy continuations of `n_new` tokens for prompts of equal length, with a KV cache; a row
/// stops at `eos` (the token itself is kept). Rows are run `rows_per_batch` at a time.
pub fn greedy(
    m: &Llama,
    prompts: &[Vec<u32>],
    n_new: usize,
    eos: Option<u32>,
    rows_per_batch: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Vec<u32>>> {
    let none = vec![vec![]; prompts.len()];
    let out = continue_and_score(m, prompts, &none, n_new, eos, rows_per_batch, progress)?;
    Ok(out.into_iter().map(|c| c.tokens).collect())
}

/// A prompt's greedy continuation and, where a true continuation was given, the natural log
/// probability of each of its tokens given the prompt and the true tokens before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    pub tokens: Vec<u32>,
    pub target_logp: Vec<f64>,
}

/// [`greedy`], and the log-probabilities of `targets[i]` after `prompts[i]` (an empty target:
/// none) from the same prefill: the prompt's keys and values are computed once and serve both
/// the generation and the teacher-forced target, instead of a second pass over prompt + target.
/// `progress` is told the generated and target tokens of each batch.
pub fn continue_and_score(
    m: &Llama,
    prompts: &[Vec<u32>],
    targets: &[Vec<u32>],
    n_new: usize,
    eos: Option<u32>,
    rows_per_batch: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Continuation>> {
    if targets.len() != prompts.len() {
        return Err(cerr(candle_core::Error::Msg(format!("{} targets for {} prompts", targets.len(), prompts.len()))));
    }
    let rows = rows_per_batch.max(1);
    let mut out = Vec::with_capacity(prompts.len());
    for (batch, tgt) in prompts.chunks(rows).zip(targets.chunks(rows)) {
        out.extend(greedy_batch(m, batch, tgt, n_new, eos).map_err(cerr)?);
        progress(batch.len() * n_new + tgt.iter().map(Vec::len).sum::<usize>());
    }
    Ok(out)
}

fn greedy_batch(
    m: &Llama,
    prompts: &[Vec<u32>],
    targets: &[Vec<u32>],
    n_new: usize,
    eos: Option<u32>,
) -> CResult<Vec<Continuation>> {
    let b = prompts.len();
    let plen = prompts[0].len();
    if prompts.iter().any(|p| p.len() != plen) || plen == 0 {
        candle_core::bail!("greedy decoding needs non-empty prompts of equal length");
    }
    let n_new = n_new.min(m.cfg.context().saturating_sub(plen));
    let mut cache = Cache::new(&m.cfg, plen + n_new);
    let h = m.hidden(&ids_tensor(prompts, m.device())?, Some(&mut cache), false)?;
    let mut last = h.narrow(1, plen - 1, 1)?.squeeze(1)?;
    let target_logp = teacher_forced(m, &cache, &last, targets)?;
    let mut outs: Vec<Vec<u32>> = vec![Vec::with_capacity(n_new); b];
    let mut done = vec![false; b];
    for step in 0..n_new {
        let next = m.logits(&last)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (r, &t) in next.iter().enumerate() {
            if !done[r] {
                outs[r].push(t);
                done[r] = Some(t) == eos;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == n_new {
            break;
        }
        let input = Tensor::from_vec(next, (b, 1), m.device())?;
        last = m.hidden(&input, Some(&mut cache), false)?.squeeze(1)?;
    }
    Ok(outs.into_iter().zip(target_logp).map(|(tokens, target_logp)| Continuation { tokens, target_logp }).collect())
}

/// log p of each row's target tokens after the prompt held in `cache`, whose last hidden states
/// are `last` `[rows, hidden]`: the first token from `last`, the rest from one batched pass of
/// the target (all but its last token, right-padded) on a copy of the prompt's cache.
fn teacher_forced(m: &Llama, cache: &Cache, last: &Tensor, targets: &[Vec<u32>]) -> CResult<Vec<Vec<f64>>> {
    let longest = targets.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return Ok(vec![vec![]; targets.len()]);
    }
    let firsts: Vec<u32> = targets.iter().map(|t| t.first().copied().unwrap_or(0)).collect();
    let first = token_stats(m, last, &firsts)?;
    let mut out: Vec<Vec<f64>> =
        targets.iter().zip(&first).map(|(t, f)| if t.is_empty() { vec![] } else { vec![f.0] }).collect();
    if longest > 1 {
        let mut fork = cache.fork(longest - 1)?;
        let rows: Vec<Vec<u32>> = targets
            .iter()
            .map(|t| {
                let mut r = t[..t.len().saturating_sub(1)].to_vec();
                r.resize(longest - 1, 0);
                r
            })
            .collect();
        let h = m.hidden(&ids_tensor(&rows, m.device())?, Some(&mut fork), false)?;
        for (r, t) in targets.iter().enumerate().filter(|(_, t)| t.len() > 1) {
            let stats = token_stats(m, &h.get(r)?.narrow(0, 0, t.len() - 1)?, &t[1..])?;
            out[r].extend(stats.into_iter().map(|s| s.0));
        }
    }
    Ok(out)
}

/// Seconds per position of one teacher-forced pass over `sample` (a single position when it is
/// empty) and seconds of one decoding step after it: the measurements a run's estimate is made
/// from.
pub fn time_passes(m: &Llama, sample: &[u32]) -> Result<(f64, f64)> {
    let ids: Vec<u32> = if sample.is_empty() { vec![0] } else { sample.to_vec() };
    let run = || -> CResult<(f64, f64)> {
        let mut cache = Cache::new(&m.cfg, ids.len() + 1);
        let t0 = Instant::now();
        let h = m.hidden(&ids_tensor(std::slice::from_ref(&ids), m.device())?, Some(&mut cache), false)?;
        m.logits(&h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?)?;
        let per_position = t0.elapsed().as_secs_f64() / ids.len() as f64;
        let t1 = Instant::now();
        let h = m.hidden(&ids_tensor(&[vec![ids[0]]], m.device())?, Some(&mut cache), false)?;
        m.logits(&h.squeeze(1)?)?;
        Ok((per_position, t1.elapsed().as_secs_f64()))
    };
    run().map_err(cerr)
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_score_each_token_once() {
        for (len, ctx) in [(1, 8), (2, 8), (8, 8), (9, 8), (30, 8), (31, 7)] {
            let jobs = windows(0, len, ctx);
            let mut seen = vec![0; len];
            for j in &jobs {
                assert!(j.end - j.begin <= ctx.max(2));
                assert!(j.first > j.begin);
                for p in j.first..j.end {
                    seen[p] += 1;
                }
            }
            assert_eq!(seen.iter().skip(1).filter(|&&c| c != 1).count(), 0, "len {len} ctx {ctx}");
        }
    }
}
