//! Every forward pass the probe makes, under the base and then the merged model, each a
//! progress stage: code lengths of token sequences (`model::score`, batched, in sliding windows
//! past the context) and greedy continuations with the log-probability of each window's true
//! suffix from the same prefill (`model::continue_and_score`, batched by prompt length).

use crate::error::Result;
use crate::model::{
    continue_and_score, rows_per_batch, score, time_passes, Continuation, Llama, RunOptions, TokenStats,
};

use super::pair::Pair;
use super::{Progress, Thresholds};

/// Most rows per greedy batch (fewer where their KV caches would be large: `rows_per_batch`).
const GREEDY_ROWS: usize = 16;

/// The two models with the run options and progress sink every pass shares.
pub(crate) struct Passes<'a> {
    models: Pair<&'a Llama>,
    opts: RunOptions,
    progress: &'a dyn Progress,
}

impl<'a> Passes<'a> {
    /// The context is `th.context`, capped by the base model's and never below 2 positions.
    pub(crate) fn new(models: Pair<&'a Llama>, th: &Thresholds, progress: &'a dyn Progress) -> Self {
        let base = models.base;
        let opts = RunOptions { context: th.context.min(base.cfg.context()).max(2), ..RunOptions::for_model(base) };
        Passes { models, opts, progress }
    }

    /// Longest window the models see.
    pub(crate) fn context(&self) -> usize {
        self.opts.context
    }

    /// Per-token statistics of `seqs` under each model, as stages "`stage` base" and
    /// "`stage` merged" of `total` tokens each.
    pub fn score(&self, stage: &str, seqs: &[Vec<u32>], total: u64) -> Result<Pair<Vec<TokenStats>>> {
        self.models.try_map(|name, m| {
            self.progress.stage(&format!("{stage} {name}"), total);
            score(m, seqs, self.opts, &|n| self.progress.inc(n as u64))
        })
    }

    /// `new_tokens` greedy tokens after each prompt (fewer where EOS or the context ends them)
    /// and log p of `targets[i]` after `prompts[i]` (empty: none), in the order of `prompts`,
    /// as stages "generate base" and "generate merged".
    pub(crate) fn generate(
        &self,
        prompts: &[&[u32]],
        targets: &[&[u32]],
        new_tokens: usize,
    ) -> Result<Pair<Vec<Continuation>>> {
        let total = (prompts.len() * new_tokens + targets.iter().map(|t| t.len()).sum::<usize>()) as u64;
        self.models.try_map(|name, m| {
            self.progress.stage(&format!("generate {name}"), total);
            generate_all(m, prompts, targets, new_tokens, &|n| self.progress.inc(n as u64))
        })
    }
}

/// Measured costs of the base model on this machine: seconds per position of a batched
/// teacher-forced pass, and seconds per decoding step of one batch of continuations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rates {
    pub per_position: f64,
    pub per_step: f64,
}

/// What the passes will run, per model.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    /// Tokens scored in the code-length pass.
    pub scored: usize,
    /// Prompt and target positions of the continuations' prefills.
    pub prefill: usize,
    /// Rows of each batch of continuations.
    pub batch_rows: Vec<usize>,
    pub new_tokens: usize,
}

impl Workload {
    /// Seconds for both models at `rates`; a decoding step never costs less than its rows'
    /// positions would in a batched pass (small models are bound by arithmetic, not memory).
    pub(crate) fn seconds(&self, r: Rates) -> f64 {
        let steps: f64 = self
            .batch_rows
            .iter()
            .map(|&rows| self.new_tokens as f64 * r.per_step.max(rows as f64 * r.per_position))
            .sum();
        2.0 * ((self.scored + self.prefill) as f64 * r.per_position + steps)
    }

    /// The batches `generate` will run: prompts of one length together, `rows(length)` at a
    /// time.
    pub(crate) fn new(
        scored: usize,
        prompts: &[&[u32]],
        targets: &[&[u32]],
        new_tokens: usize,
        rows: impl Fn(usize) -> usize,
    ) -> Self {
        let prefill = prompts.iter().chain(targets).map(|p| p.len()).sum();
        let mut lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        lengths.sort_unstable();
        let mut batch_rows = vec![];
        for group in lengths.chunk_by(|a, b| a == b) {
            let r = rows(group[0]).max(1);
            batch_rows.extend(group.chunks(r).map(<[usize]>::len));
        }
        Workload { scored, prefill, batch_rows, new_tokens }
    }

    /// Decoding steps: new tokens times batches of continuations.
    pub(crate) fn steps(&self) -> usize {
        self.batch_rows.len() * self.new_tokens
    }
}

impl Passes<'_> {
    /// Rows per batch of continuations of prompts of `len` tokens, as `generate` runs them.
    pub(crate) fn rows(&self, len: usize, new_tokens: usize) -> usize {
        batch_rows(self.models.base, len, new_tokens)
    }

    /// Time one batched pass of up to 256 positions of `sample` and one decoding step after
    /// it, under the base model: a second or so on a 7B model, and what the estimate printed
    /// before the run is made from.
    pub(crate) fn rates(&self, sample: &[u32]) -> Result<Rates> {
        let n = sample.len().min(256).min(self.opts.context.saturating_sub(1));
        let (per_position, per_step) = time_passes(self.models.base, &sample[..n])?;
        Ok(Rates { per_position, per_step })
    }
}

/// Rows per batch of continuations of `len`-token prompts with `new_tokens` each: at most
/// [`GREEDY_ROWS`], fewer where their KV caches would pass the budget.
fn batch_rows(m: &Llama, len: usize, new_tokens: usize) -> usize {
    rows_per_batch(m, len + new_tokens, GREEDY_ROWS)
}

fn generate_all(
    m: &Llama,
    prompts: &[&[u32]],
    targets: &[&[u32]],
    n: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<Continuation>> {
    // Equal-length prompts run together; results go back in input order.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut out = vec![Continuation::default(); prompts.len()];
    let mut i = 0;
    while i < order.len() {
        let len = prompts[order[i]].len();
        let j = order[i..].iter().position(|&k| prompts[k].len() != len).map_or(order.len(), |p| i + p);
        let batch: Vec<Vec<u32>> = order[i..j].iter().map(|&k| prompts[k].to_vec()).collect();
        let tgt: Vec<Vec<u32>> = order[i..j].iter().map(|&k| targets.get(k).map_or(vec![], |t| t.to_vec())).collect();
        let res = continue_and_score(m, &batch, &tgt, n, m.cfg.eos_token_id, batch_rows(m, len, n), progress)?;
        for (k, r) in order[i..j].iter().zip(res) {
            out[*k] = r;
        }
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_counts_batches_by_prompt_length_and_prices_both_models() {
        let (a, b, c) = (vec![1u32; 4], vec![1u32; 4], vec![1u32; 7]);
        let prompts: Vec<&[u32]> = vec![&a, &b, &c];
        let t = vec![2u32; 5];
        let targets: Vec<&[u32]> = vec![&t, &t];
        let w = Workload::new(100, &prompts, &targets, 10, |_| 16);
        // Two prompt lengths: two batches of continuations (2 rows and 1), 10 steps each.
        assert_eq!((w.scored, w.prefill, w.steps(), w.batch_rows.clone()), (100, 15 + 10, 20, vec![2, 1]));
        // Memory-bound steps (0.5 s, above 2 rows × 0.01 s): 2 × (125 × 0.01 + 20 × 0.5).
        let s = w.seconds(Rates { per_position: 0.01, per_step: 0.5 });
        assert!((s - 22.5).abs() < 1e-9, "{s}");
        // Arithmetic-bound steps cost their rows' positions: 2 × (125 + 10 × 2 + 10 × 1) × 0.01.
        let s = w.seconds(Rates { per_position: 0.01, per_step: 0.001 });
        assert!((s - 3.1).abs() < 1e-9, "{s}");
        // One row a batch: three batches.
        assert_eq!(Workload::new(0, &prompts, &[], 10, |_| 1).batch_rows, vec![1, 1, 1]);
    }
}
