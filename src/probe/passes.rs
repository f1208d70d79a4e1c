//! Every forward pass the probe makes, under the base and then the merged model, each a
//! progress stage: code lengths of token sequences (`model::score`, batched, in sliding windows
//! past the context) and greedy continuations with the log-probability of each window's true
//! suffix from the same prefill (`model::continue_and_score`, batched by prompt length).

use crate::error::Result;
use crate::model::{continue_and_score, score, Continuation, Llama, RunOptions, TokenStats};

use super::pair::Pair;
use super::{Progress, Thresholds};

/// Rows per greedy batch.
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
        let res = continue_and_score(m, &batch, &tgt, n, m.cfg.eos_token_id, GREEDY_ROWS, progress)?;
        for (k, r) in order[i..j].iter().zip(res) {
            out[*k] = r;
        }
        i = j;
    }
    Ok(out)
}
