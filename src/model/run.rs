//! Teacher-forced token statistics and greedy generation, batched.

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

impl RunOptions {
    pub(crate) fn for_model(m: &Llama) -> Self {
        RunOptions { context: m.cfg.context().min(2048), batch_tokens: 4096 }
    }
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
    let mut out = Vec::with_capacity(prompts.len());
    for batch in prompts.chunks(rows_per_batch.max(1)) {
        out.extend(greedy_batch(m, batch, n_new, eos).map_err(cerr)?);
        progress(batch.len() * n_new);
    }
    Ok(out)
}

fn greedy_batch(m: &Llama, prompts: &[Vec<u32>], n_new: usize, eos: Option<u32>) -> CResult<Vec<Vec<u32>>> {
    let b = prompts.len();
    let plen = prompts[0].len();
    if prompts.iter().any(|p| p.len() != plen) || plen == 0 {
        candle_core::bail!("greedy decoding needs non-empty prompts of equal length");
    }
    let n_new = n_new.min(m.cfg.context().saturating_sub(plen));
    let mut cache = Cache::new(&m.cfg, plen + n_new);
    let mut outs: Vec<Vec<u32>> = vec![Vec::with_capacity(n_new); b];
    let mut done = vec![false; b];
    let mut input = ids_tensor(prompts, m.device())?;
    for _ in 0..n_new {
        let h = m.hidden(&input, Some(&mut cache), false)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
        let next = m.logits(&last)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (r, &t) in next.iter().enumerate() {
            if !done[r] {
                outs[r].push(t);
                done[r] = Some(t) == eos;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), m.device())?;
    }
    Ok(outs)
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
