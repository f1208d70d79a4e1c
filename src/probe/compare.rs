//! Each extraction window's greedy continuation against the window's true suffix, per model:
//! tokens matched before the first difference, E1 (identical tokens or normalised text), E2
//! (near-verbatim: Levenshtein similarity or a long common substring), and log₂ p of the true
//! suffix given the prefix.

use crate::error::Result;
use crate::model::TextTokenizer;

use super::pair::Pair;
use super::plan::{Plan, Window};
use super::text::{self, normalise, Normalised};
use super::{Thresholds, WindowEvidence};

/// One window's continuation under one model, against the true suffix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Comparison {
    pub matched_tokens: usize,
    pub e1: bool,
    pub e2: bool,
    pub similarity: f64,
    pub lcs_chars: usize,
    pub log2_p_suffix: f64,
}

/// Every window's evidence, grouped by subject (`subjects` of them), in window order. The
/// windows' continuations are the first of `generated`, in the order of `plan.windows`, as are
/// `suffix_logp` (log p of each true suffix token given the prefix and the suffix before it).
pub(crate) fn windows(
    tok: &TextTokenizer,
    subjects: usize,
    plan: &Plan,
    generated: &Pair<Vec<Vec<u32>>>,
    suffix_logp: &Pair<Vec<Vec<f64>>>,
    th: &Thresholds,
) -> Result<Vec<Vec<WindowEvidence>>> {
    let mut out = vec![vec![]; subjects];
    for (wi, w) in plan.windows.iter().enumerate() {
        let gen = generated.at(wi).map(|g| g.as_slice());
        out[w.subject].push(window(tok, w, gen, suffix_logp.at(wi).map(Vec::as_slice), th)?);
    }
    Ok(out)
}

/// Evidence of `window` from what each model generated after its prefix and the statistics
/// of its true suffix under each model.
fn window(
    tok: &TextTokenizer,
    window: &Window,
    generated: Pair<&[u32]>,
    suffix_logp: Pair<&[f64]>,
    th: &Thresholds,
) -> Result<WindowEvidence> {
    let true_text = normalise(&tok.decode(&window.suffix)?);
    let c = generated.zip(suffix_logp).try_map(|_, (g, lp)| compare(tok, window, g, &true_text, lp, th))?;
    Ok(WindowEvidence {
        offset: window.start,
        suffix_tokens: window.suffix.len(),
        match_tokens_base: c.base.matched_tokens,
        match_tokens_merged: c.merged.matched_tokens,
        e1_base: c.base.e1,
        e1_merged: c.merged.e1,
        e2_base: c.base.e2,
        e2_merged: c.merged.e2,
        similarity_base: c.base.similarity,
        similarity_merged: c.merged.similarity,
        lcs_chars_base: c.base.lcs_chars,
        lcs_chars_merged: c.merged.lcs_chars,
        log2_p_suffix_base: c.base.log2_p_suffix,
        log2_p_suffix_merged: c.merged.log2_p_suffix,
    })
}

/// The continuation is cut to the suffix's length: near the end of a work the true suffix is
/// shorter than the continuation, and what a model adds past the end is no evidence either way.
fn compare(
    tok: &TextTokenizer,
    window: &Window,
    generated: &[u32],
    true_text: &Normalised,
    suffix_logp: &[f64],
    th: &Thresholds,
) -> Result<Comparison> {
    let suffix = &window.suffix;
    let g = &generated[..generated.len().min(suffix.len())];
    let gen_text = normalise(&tok.decode(g)?);
    let matched_tokens = g.iter().zip(suffix).take_while(|(a, b)| a == b).count();
    let e1 = g == suffix.as_slice() || gen_text.chars == true_text.chars;
    let similarity = text::similarity(&gen_text.chars, &true_text.chars);
    let lcs_chars = text::longest_common_substring(&gen_text.chars, &true_text.chars);
    let e2 = e1 || similarity >= th.e2_similarity || lcs_chars >= th.min_span_chars;
    Ok(Comparison {
        matched_tokens,
        e1,
        e2,
        similarity,
        lcs_chars,
        log2_p_suffix: suffix_logp.iter().sum::<f64>() / std::f64::consts::LN_2,
    })
}
