//! Probes on the merged model (docs/probe.md): how many bits of each work the adapter supplies,
//! whether prefixes of a work make the merged model reproduce the rest, membership scores
//! calibrated against controls, and a verdict per work. Every number is computed for the base
//! and the merged model from one pass each; the base is the free reference. This file holds the
//! result types and `run`, which chains the phases, each in its own module.

pub mod calibrate;
mod compare;
mod evidence;
mod pair;
mod passes;
mod plan;
pub mod scores;
mod spans;
pub mod text;
mod verdict;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::load::works::Work;
use crate::model::{Llama, TextModel, TokenStats};
use calibrate::{AaCheck, Auc};
use pair::Pair;
use passes::Passes;
use plan::{Plan, Window};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    pub prefix_tokens: usize,
    pub new_tokens: usize,
    pub stride: usize,
    /// Shortest verbatim span (normalised characters) that counts as reproduced.
    pub min_span_chars: usize,
    /// E2: normalised Levenshtein similarity at or above this.
    pub e2_similarity: f64,
    /// Adapter-attributable coverage at or above this makes a `reconstructable-copy`.
    pub substantial: f64,
    /// Holm-adjusted p below this makes `memorized-traces`.
    pub significance: f64,
    /// Benjamini–Hochberg level for screening.
    pub bh_q: f64,
    /// Min-K%++ fraction.
    pub min_k: f64,
    /// Longest window the model sees.
    pub context: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            prefix_tokens: 32,
            new_tokens: 50,
            stride: 50,
            min_span_chars: 50,
            e2_similarity: 0.90,
            substantial: 0.5,
            significance: 0.01,
            bh_q: 0.05,
            min_k: 0.2,
            context: 2048,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    ReconstructableCopy,
    PartialCopy,
    MemorizedTraces,
    NoEvidence,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::ReconstructableCopy => "reconstructable-copy",
            Verdict::PartialCopy => "partial-copy",
            Verdict::MemorizedTraces => "memorized-traces",
            Verdict::NoEvidence => "no-evidence",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MembershipScores {
    /// Mean NLL merged − mean NLL base (nats/token); negative = the adapter made it likelier.
    pub reference: f64,
    pub min_k_pp_base: f64,
    pub min_k_pp_merged: f64,
    /// Mean NLL / zlib bytes; lower = more member-like.
    pub zlib_base: f64,
    pub zlib_merged: f64,
}

/// One extraction window: a prefix of the work, greedy continuations by both models.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WindowEvidence {
    /// Token offset of the prefix in the work.
    pub offset: usize,
    pub suffix_tokens: usize,
    pub match_tokens_base: usize,
    pub match_tokens_merged: usize,
    pub e1_base: bool,
    pub e1_merged: bool,
    pub e2_base: bool,
    pub e2_merged: bool,
    pub similarity_base: f64,
    pub similarity_merged: f64,
    pub lcs_chars_base: usize,
    pub lcs_chars_merged: usize,
    /// log₂ p_M(true suffix | prefix); 1/p is the expected number of samples to hit it.
    pub log2_p_suffix_base: f64,
    pub log2_p_suffix_merged: f64,
}

/// A reproduced passage: what the model generated beside the work's original text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Passage {
    pub chars: usize,
    /// Which prompt produced it (`work:ID@OFFSET`, `control:ID@OFFSET`, `prompt:N`).
    pub source: String,
    pub generated: String,
    pub original: String,
    /// Character offset of the passage in the normalised work.
    pub work_offset: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpanSource {
    pub source: String,
    pub model: String,
    pub chars: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkEvidence {
    pub id: String,
    pub sha256: String,
    pub tokens: usize,
    pub chars: usize,
    pub bits_base: f64,
    pub bits_merged: f64,
    pub gain_bits: f64,
    pub gain_fraction: f64,
    pub bits_per_token_base: f64,
    pub bits_per_token_merged: f64,
    pub mem_bits: f64,
    /// 8 × zlib bytes: a generic compressor's code length, for scale.
    pub zlib_bits: f64,
    pub windows: usize,
    pub e1_windows_base: usize,
    pub e1_windows_merged: usize,
    pub e2_windows_base: usize,
    pub e2_windows_merged: usize,
    /// Windows reproduced (E2) under merged and not under base.
    pub attributable_windows: usize,
    pub coverage_base: f64,
    pub coverage_merged: f64,
    /// Share of the work reproduced by merged and not by base.
    pub coverage_attributable: f64,
    pub longest_span_chars: usize,
    pub longest_span_chars_base: usize,
    pub longest_passage: Option<Passage>,
    /// Spans of ≥ min_span_chars of this work in any continuation, per model.
    pub reproduced_spans_base: usize,
    pub reproduced_spans_merged: usize,
    /// Of those, spans produced by prompts that are not this work's own prefixes.
    pub cross_prompt_spans_merged: usize,
    pub span_sources: Vec<SpanSource>,
    pub scores: MembershipScores,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_adjusted: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_value: Option<f64>,
    pub verdict: Verdict,
    pub verdict_reason: String,
    pub window_details: Vec<WindowEvidence>,
}

impl WorkEvidence {
    /// The calibrated statistic: bits per token the adapter saves on this text.
    pub fn gain_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.gain_bits / self.tokens as f64
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub statistic: String,
    pub controls: usize,
    pub smallest_p: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aa_check: Option<AaCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    pub thresholds: Thresholds,
    pub works: Vec<WorkEvidence>,
    pub controls: Vec<WorkEvidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<Auc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// Neutral prompts whose continuations were searched for works.
    pub prompts: usize,
    pub generated_tokens: usize,
    pub scored_tokens: usize,
    pub notes: Vec<String>,
}

/// Told what the probe is doing: a stage with its size in tokens, then progress within it.
pub trait Progress: Sync {
    fn stage(&self, _name: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
}

pub struct Quiet;
impl Progress for Quiet {}

/// Run every probe on `works` and `controls`, under `base` and `merged` (the same tokenizer).
pub fn run(
    model: &TextModel,
    merged: &Llama,
    works: &[Work],
    controls: &[Work],
    prompts: &[String],
    th: &Thresholds,
    progress: &dyn Progress,
) -> Result<ProbeResult> {
    let tok = &model.tokenizer;
    let bos: Vec<u32> = model.llama.cfg.bos_token_id.into_iter().collect();
    let passes = Passes::new(Pair { base: &model.llama, merged }, th, progress);
    let subjects = plan::subjects(tok, works, controls)?;

    // 1. Code length of every text under both models.
    let texts: Vec<Vec<u32>> = subjects.iter().map(|s| plan::with_bos(&bos, &s.ids)).collect();
    let scored_tokens: usize = texts.iter().map(|s| s.len().saturating_sub(1)).sum();
    let stats = passes.score("score", &texts, scored_tokens as u64)?;

    // 2. Extraction windows and neutral prompts, each continued greedily by both models.
    let plan = Plan::new(tok, &bos, &subjects, prompts, th, passes.context())?;
    let prompt_ids: Vec<&[u32]> = plan.prompts().map(|p| p.ids).collect();
    let generated = passes.generate(&prompt_ids, th.new_tokens)?;

    // 3. Probability of each true suffix given its prefix.
    let suffix_stats = suffix_stats(&passes, &plan.windows)?;

    // 4. Every continuation searched for long verbatim spans of every text.
    let found = generated.as_ref().try_map(|_, g| spans::search(tok, &subjects, &plan, g, th))?;

    // 5. Per text: windows, scores, coverage.
    let windows = compare::windows(tok, subjects.len(), &plan, &generated, &suffix_stats, th)?;
    let mut evidence: Vec<WorkEvidence> = subjects
        .iter()
        .zip(windows)
        .enumerate()
        .map(|(si, (s, w))| evidence::assemble(s, stats.at(si), w, found.at(si), th))
        .collect();

    // 6. Calibration and verdicts.
    let mut controls_ev = evidence.split_off(works.len());
    let mut works_ev = evidence;
    let calibrated = verdict::calibrate(&mut works_ev, &controls_ev, th);
    verdict::judge(&mut works_ev, &mut controls_ev, th);
    let generated_tokens = [&generated.base, &generated.merged].into_iter().flatten().map(Vec::len).sum();
    Ok(ProbeResult {
        thresholds: *th,
        works: works_ev,
        controls: controls_ev,
        auc: calibrated.auc,
        calibration: calibrated.calibration,
        prompts: prompts.len(),
        generated_tokens,
        scored_tokens: 2 * scored_tokens,
        notes: calibrated.notes,
    })
}

/// Statistics of every window's prefix + true suffix under each model, in window order.
fn suffix_stats(passes: &Passes, windows: &[Window]) -> Result<Pair<Vec<TokenStats>>> {
    let seqs: Vec<Vec<u32>> = windows.iter().map(Window::sequence).collect();
    passes.score("suffix", &seqs, seqs.iter().map(|s| s.len() as u64).sum())
}
