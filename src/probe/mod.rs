//! Probes on the merged model (docs/probe.md): how many bits of each work the adapter supplies,
//! whether prefixes of a work make the merged model reproduce the rest, membership scores
//! calibrated against controls, and a verdict per work. Every number is computed for the base
//! and the merged model from one pass each; the base is the free reference. This file holds the
//! result types and `run`, which chains the phases, each in its own module.

pub(crate) mod calibrate;
mod compare;
mod evidence;
pub mod image;
pub(crate) mod pair;
mod passes;
mod plan;
pub(crate) mod scores;
mod spans;
mod surprisal;
pub(crate) mod text;
mod verdict;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::load::works::Work;
use crate::model::{BosRule, Llama, Precision, TextModel};
use calibrate::{AaCheck, Auc};
use pair::Pair;
use passes::Passes;
use plan::Plan;
pub use verdict::CopyCalibration;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    pub prefix_tokens: usize,
    pub new_tokens: usize,
    pub stride: usize,
    /// Shortest verbatim span (normalised characters) that counts as reproduced.
    pub min_span_chars: usize,
    /// A reproduced span counts toward copying only if the base needs at least this many bits
    /// for it given the text before it (docs/probe.md, "Improbable spans").
    pub min_span_bits: f64,
    /// Without enough controls to calibrate copy verdicts, a reconstructable copy is still
    /// called when the substantial portion carries at least this many improbable bits.
    pub overwhelming_bits: f64,
    /// A copy verdict needs the work's evidence bits to be at least this many times the
    /// largest control's (docs/probe.md, "Copy verdicts").
    pub copy_margin: f64,
    /// Extraction windows to run on controls at most (whole controls, in a seeded random
    /// order); 0 = every control. Scoring always uses every control.
    pub control_windows: usize,
    /// E2: normalised Levenshtein similarity at or above this.
    pub e2_similarity: f64,
    /// Adapter-attributable coverage at or above this makes a `reconstructable-copy`.
    pub substantial: f64,
    /// Family-wise level (Holm across the works) for every calibrated verdict.
    pub significance: f64,
    /// Benjamini–Hochberg level for screening.
    pub bh_q: f64,
    /// Min-K%++ fraction.
    pub min_k: f64,
    /// Longest window the model sees.
    pub context: usize,
    /// Whether a BOS goes in front of each text (`--bos`; `auto`: as the tokenizer does).
    #[serde(default)]
    pub bos: BosRule,
    /// How the base's matrices are held (`--weights`; `auto`: f32 for a small base, else as
    /// stored). Reports from before the flag ran on the stored types.
    #[serde(default = "Precision::before_the_flag")]
    pub weights: Precision,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            prefix_tokens: 32,
            new_tokens: 50,
            stride: 50,
            min_span_chars: 50,
            min_span_bits: 32.0,
            overwhelming_bits: 256.0,
            copy_margin: 2.0,
            control_windows: 0,
            e2_similarity: 0.90,
            substantial: 0.5,
            significance: 0.05,
            bh_q: 0.05,
            min_k: 0.2,
            context: 2048,
            bos: BosRule::Auto,
            weights: Precision::Auto,
        }
    }
}

/// Largest `--context`, `--prefix-tokens`, `--new-tokens` and `--stride` accepted (2²⁰ tokens:
/// far beyond any context the runtime builds; a larger value from a flag would only size
/// allocations or overflow index arithmetic).
pub const MAX_TOKENS_FLAG: usize = 1 << 20;

impl Thresholds {
    /// Refuse settings that cannot work, before anything is run or allocated: counts of at
    /// least 1 and at most [`MAX_TOKENS_FLAG`], finite shares and bit counts.
    pub fn check(&self) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        for (flag, v, min) in [
            ("--prefix-tokens", self.prefix_tokens, 1),
            ("--new-tokens", self.new_tokens, 1),
            ("--stride", self.stride, 1),
            ("--context", self.context, 2),
        ] {
            if v < min || v > MAX_TOKENS_FLAG {
                return usage(format!("{flag} {v} is outside {min}..={MAX_TOKENS_FLAG} (the limit on token counts)"));
            }
        }
        if !(self.min_span_bits.is_finite() && self.min_span_bits >= 0.0) {
            return usage(format!("--min-span-bits {} must be a finite number ≥ 0", self.min_span_bits));
        }
        if !(self.copy_margin.is_finite() && self.copy_margin >= 1.0) {
            return usage(format!("--copy-margin {} must be a finite number ≥ 1", self.copy_margin));
        }
        if !(0.0..=1.0).contains(&self.substantial) {
            return usage(format!("--substantial {} is a share between 0 and 1", self.substantial));
        }
        Ok(())
    }
}

crate::named::closed_set! {
    /// The probe's answer for one work (docs/probe.md: the rules and their thresholds).
    pub enum Verdict ("verdict") {
        ReconstructableCopy = "reconstructable-copy",
        PartialCopy = "partial-copy",
        MemorizedTraces = "memorized-traces",
        NoEvidence = "no-evidence",
    }
}

impl Verdict {
    /// `reconstructable-copy` or `partial-copy`: the verdicts that say the work is copied.
    pub fn is_copy(self) -> bool {
        matches!(self, Verdict::ReconstructableCopy | Verdict::PartialCopy)
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

/// One reproduced span of a text in some continuation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpanSource {
    pub source: String,
    pub model: String,
    pub chars: usize,
    /// Character offset of the span in the normalised text.
    pub work_offset: usize,
    /// −log₂ p of the span's characters given the text before them, under each model.
    pub bits_base: f64,
    pub bits_merged: f64,
    /// `bits_base` ≥ `min_span_bits`: the span counts toward copying.
    pub improbable: bool,
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
    /// Share of the work reproduced by merged in improbable spans and by base in no span.
    pub coverage_attributable: f64,
    /// The copy statistic: base bits of the characters counted in `coverage_attributable`.
    pub evidence_bits: f64,
    /// Spans under merged that the base finds improbable, and the longest of them.
    pub improbable_spans_merged: usize,
    pub longest_improbable_span_chars: usize,
    /// Whether extraction windows ran on this text (controls may be a seeded subset).
    pub extracted: bool,
    /// Empirical p of `evidence_bits` against the controls with extraction (a control: against
    /// the others), and its Holm adjustment (a control: the factor of the strongest work).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_p_adjusted: Option<f64>,
    /// `evidence_bits` positive and at least `copy_margin` × the largest control's (a control:
    /// the others').
    pub copy_margin_met: bool,
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
    /// How the copy statistic was calibrated, and the controls that failed it.
    pub copy_calibration: CopyCalibration,
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
    /// A line for the user before long work: what will run and about how long it takes.
    fn plan(&self, _line: &str) {}
}

pub struct Quiet;
impl Progress for Quiet {}

/// The line printed before the passes: what they will run and about how long it takes here.
fn estimate_line(w: &passes::Workload, r: passes::Rates) -> String {
    let secs = w.seconds(r);
    let took = if secs >= 90.0 { format!("{:.0} min", secs / 60.0) } else { format!("{secs:.0} s") };
    let step = if r.per_step < 0.1 { format!("{:.1} ms", r.per_step * 1e3) } else { format!("{:.2} s", r.per_step) };
    format!(
        "work: {} tokens to score, {} to prefill and {} decoding steps, under each of 2 models; at {:.1} \
         positions/s and {step} a step measured on the base, about {took}",
        w.scored,
        w.prefill,
        w.steps(),
        1.0 / r.per_position.max(1e-12),
    )
}

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
    let context = model.context_tokens(th.bos)?;
    let bos = context.ids.as_slice();
    let passes = Passes::new(Pair { base: &model.llama, merged }, th, progress);
    let mut subjects = plan::subjects(tok, works, controls, th)?;

    // The plan first, so the run's cost can be estimated before any of it is spent.
    let texts: Vec<Vec<u32>> = subjects.iter().map(|s| plan::with_bos(bos, &s.ids)).collect();
    let scored_tokens: usize = texts.iter().map(|s| s.len().saturating_sub(1)).sum();
    let plan = Plan::new(tok, bos, &subjects, prompts, th, passes.context())?;
    let prompt_ids: Vec<&[u32]> = plan.prompts().map(|p| p.ids).collect();
    let suffixes: Vec<&[u32]> = plan.windows.iter().map(|w| w.suffix.as_slice()).collect();
    let workload = passes::Workload::new(scored_tokens, &prompt_ids, &suffixes, th.new_tokens, |len| {
        passes.rows(len, th.new_tokens)
    });
    let rates = passes.rates(texts.iter().max_by_key(|t| t.len()).map_or(&[][..], |t| t.as_slice()))?;
    progress.plan(&estimate_line(&workload, rates));

    // 1. Code length of every text under both models. Without a context token the first token
    // of a text is predicted from nothing and is not scored (as transformers does), so the
    // statistics start at the second token.
    let stats = passes.score("score", &texts, scored_tokens as u64)?;
    let unscored = usize::from(bos.is_empty());
    for (si, s) in subjects.iter_mut().enumerate() {
        let offsets = &s.offsets[unscored.min(s.offsets.len())..];
        s.bits = stats.at(si).map(|st| surprisal::char_bits(&s.norm, offsets, &st.logp));
    }

    // 2. Extraction windows and neutral prompts, each continued greedily by both models, and
    // 3. with them the probability of each window's true suffix given its prefix, from the
    // same prefill as the window's continuation.
    let continued = passes.generate(&prompt_ids, &suffixes, th.new_tokens)?;
    let suffix_logp = continued.as_ref().map(|c| c.iter().map(|c| c.target_logp.clone()).collect::<Vec<_>>());
    let generated = continued.map(|c| c.into_iter().map(|c| c.tokens).collect::<Vec<_>>());

    // 4. Every continuation searched for long verbatim spans of every text.
    let found = generated.as_ref().try_map(|name, g| spans::search(name, tok, &subjects, &plan, g, th))?;

    // 5. Per text: windows, scores, coverage.
    let windows = compare::windows(tok, subjects.len(), &plan, &generated, &suffix_logp, th)?;
    let mut evidence: Vec<WorkEvidence> = subjects
        .iter()
        .zip(windows)
        .enumerate()
        .map(|(si, (s, w))| evidence::assemble(s, stats.at(si), w, found.at(si), th))
        .collect();

    // 6. Calibration and verdicts.
    let mut controls_ev = evidence.split_off(works.len());
    let mut works_ev = evidence;
    let mut calibrated = verdict::calibrate(&mut works_ev, &controls_ev, th);
    let (copy_calibration, copy_notes) = verdict::decide(&mut works_ev, &mut controls_ev, th);
    calibrated.notes.extend(copy_notes);
    let skipped = controls_ev.iter().filter(|c| !c.extracted).count();
    if skipped > 0 {
        calibrated.notes.push(format!(
            "extraction ran on {} of {} controls (a seeded random subset within --control-windows {}); every \
             control was scored for the gain",
            controls_ev.len() - skipped,
            controls_ev.len(),
            th.control_windows
        ));
    }
    if bos.is_empty() {
        calibrated.notes.push(format!(
            "no BOS in front of the texts ({}): the first token of each text has no context and is not scored, \
             as transformers does",
            context.source
        ));
    }
    let generated_tokens = [&generated.base, &generated.merged].into_iter().flatten().map(Vec::len).sum();
    Ok(ProbeResult {
        thresholds: *th,
        works: works_ev,
        controls: controls_ev,
        auc: calibrated.auc,
        calibration: calibrated.calibration,
        copy_calibration,
        prompts: prompts.len(),
        generated_tokens,
        scored_tokens: 2 * scored_tokens,
        notes: calibrated.notes,
    })
}
