//! Probes on the merged model (docs/probe.md): how many bits of each work the adapter supplies,
//! whether prefixes of a work make the merged model reproduce the rest, membership scores
//! calibrated against controls, and a verdict per work. Every number is computed for the base
//! and the merged model from one pass each; the base is the free reference.

pub mod calibrate;
pub mod scores;
mod spans;
pub mod text;
mod verdict;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::load::works::Work;
use crate::model::{greedy, score, Llama, RunOptions, TextModel, TokenStats};
use calibrate::{AaCheck, Auc};
use text::{normalise, Normalised, SpanIndex};
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
        }
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
    /// `evidence_bits` at least `copy_margin` × the largest control's (a control: the others').
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
}

pub struct Quiet;
impl Progress for Quiet {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Work,
    Control,
}

/// A text under test, tokenised and normalised once.
struct Subject<'a> {
    role: Role,
    work: &'a Work,
    ids: Vec<u32>,
    /// Byte range of each token in the text.
    offsets: Vec<(usize, usize)>,
    norm: Normalised,
    index: SpanIndex,
    /// Whether extraction windows run on this text.
    extract: bool,
    /// Bits per normalised character under base and merged (teacher-forced).
    bits: [Vec<f64>; 2],
}

/// A generated continuation and where its prompt came from.
struct Generation {
    /// `Some((subject, window))` for a work's or control's own window.
    owner: Option<(usize, usize)>,
    label: String,
    ids: Vec<u32>,
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
    let base = &model.llama;
    let tok = &model.tokenizer;
    let bos: Vec<u32> = base.cfg.bos_token_id.into_iter().collect();
    let run_opts = RunOptions { context: th.context.min(base.cfg.context()).max(2), ..RunOptions::for_model(base) };
    let mut subjects = vec![];
    let extract = extracted_controls(controls, th, |w| tok.encode(&w.text).map(|ids| ids.len()))?;
    for (role, set) in [(Role::Work, works), (Role::Control, controls)] {
        for (i, w) in set.iter().enumerate() {
            let norm = normalise(&w.text);
            let index = SpanIndex::new(&norm.chars);
            let (ids, offsets) = tok.encode_with_offsets(&w.text)?;
            let extract = role == Role::Work || extract[i];
            subjects.push(Subject { role, work: w, ids, offsets, norm, index, extract, bits: [vec![], vec![]] });
        }
    }
    let with_bos = |ids: &[u32]| -> Vec<u32> { bos.iter().chain(ids).copied().collect() };

    // 1. Code length of every text under both models.
    let seqs: Vec<Vec<u32>> = subjects.iter().map(|s| with_bos(&s.ids)).collect();
    let scored_tokens: usize = seqs.iter().map(|s| s.len().saturating_sub(1)).sum();
    let mut stats = vec![];
    for (name, m) in [("score base", base), ("score merged", merged)] {
        progress.stage(name, scored_tokens as u64);
        stats.push(score(m, &seqs, run_opts, &|n| progress.inc(n as u64))?);
    }
    let (stats_base, stats_merged) = (&stats[0], &stats[1]);
    for (si, s) in subjects.iter_mut().enumerate() {
        for (mi, st) in [stats_base, stats_merged].into_iter().enumerate() {
            s.bits[mi] = spans::char_bits(&s.norm, &s.offsets, &st[si].logp);
        }
    }

    // 2. Extraction windows: prefix → greedy continuation under both models.
    let mut gens: Vec<Generation> = vec![];
    let mut window_suffix: Vec<Vec<(usize, Vec<u32>)>> = vec![];
    for (si, s) in subjects.iter().enumerate() {
        let mut ws = vec![];
        let mut o = 0;
        while s.extract && o + th.prefix_tokens < s.ids.len() && th.prefix_tokens > 0 {
            let end = (o + th.prefix_tokens + th.new_tokens).min(s.ids.len());
            ws.push((o, s.ids[o + th.prefix_tokens..end].to_vec()));
            let tag = if s.role == Role::Work { "work" } else { "control" };
            gens.push(Generation {
                owner: Some((si, ws.len() - 1)),
                label: format!("{tag}:{}@{o}", s.work.id),
                ids: with_bos(&s.ids[o..o + th.prefix_tokens]),
            });
            o += th.stride.max(1);
        }
        window_suffix.push(ws);
    }
    for (i, p) in prompts.iter().enumerate() {
        let ids = with_bos(&tok.encode(p)?);
        if !ids.is_empty() && ids.len() < run_opts.context {
            gens.push(Generation { owner: None, label: format!("prompt:{}", i + 1), ids });
        }
    }
    let gen_total = (gens.len() * th.new_tokens) as u64;
    let mut continuations: Vec<Vec<Vec<u32>>> = vec![];
    for (name, m) in [("generate base", base), ("generate merged", merged)] {
        progress.stage(name, gen_total);
        continuations.push(generate_all(m, &gens, th.new_tokens, &|n| progress.inc(n as u64))?);
    }

    // 3. Probability of each true suffix given its prefix.
    let suffix_seqs: Vec<Vec<u32>> = gens
        .iter()
        .filter_map(|g| g.owner.map(|(si, wi)| g.ids.iter().chain(&window_suffix[si][wi].1).copied().collect()))
        .collect();
    let mut suffix_logp = vec![];
    for (name, m) in [("suffix base", base), ("suffix merged", merged)] {
        progress.stage(name, suffix_seqs.iter().map(|s| s.len() as u64).sum());
        suffix_logp.push(score(m, &suffix_seqs, run_opts, &|n| progress.inc(n as u64))?);
    }

    // 4. Every continuation searched for long verbatim spans of every text.
    let models = ["base", "merged"];
    let mut found: Vec<[Found; 2]> =
        subjects.iter().map(|s| [Found::new(s.norm.len()), Found::new(s.norm.len())]).collect();
    for mi in 0..2 {
        for (gi, g) in gens.iter().enumerate() {
            let text = tok.decode(&continuations[mi][gi])?;
            let norm = normalise(&text);
            for (si, s) in subjects.iter().enumerate() {
                for sp in s.index.spans(&norm.chars, th.min_span_chars) {
                    let own = g.owner.map(|(o, _)| o) == Some(si);
                    found[si][mi].add(sp, &g.label, models[mi], own, &norm, &text, s, th.min_span_bits);
                }
            }
        }
    }

    // 5. Per text: windows, scores, coverage. Windows come first in `gens` and in
    // `suffix_seqs`, in the same order, so one running index serves both.
    let mut evidence = vec![];
    let mut wi = 0;
    for (si, s) in subjects.iter().enumerate() {
        let (sb, sm) = (&stats_base[si], &stats_merged[si]);
        let mut windows = vec![];
        for (o, suffix) in &window_suffix[si] {
            let true_text = normalise(&tok.decode(suffix)?);
            let mut per = vec![];
            for mi in 0..2 {
                let mut g = continuations[mi][wi].clone();
                g.truncate(suffix.len());
                let gen_text = normalise(&tok.decode(&g)?);
                let matched = g.iter().zip(suffix).take_while(|(a, b)| a == b).count();
                let e1 = g == *suffix || gen_text.chars == true_text.chars;
                let sim = text::similarity(&gen_text.chars, &true_text.chars);
                let lcs = text::longest_common_substring(&gen_text.chars, &true_text.chars);
                let e2 = e1 || sim >= th.e2_similarity || lcs >= th.min_span_chars;
                let st = &suffix_logp[mi][wi];
                let lp: f64 = st.logp[st.logp.len() - suffix.len()..].iter().sum::<f64>() / std::f64::consts::LN_2;
                per.push((matched, e1, e2, sim, lcs, lp));
            }
            let (b, m) = (per[0], per[1]);
            windows.push(WindowEvidence {
                offset: *o,
                suffix_tokens: suffix.len(),
                match_tokens_base: b.0,
                match_tokens_merged: m.0,
                e1_base: b.1,
                e1_merged: m.1,
                e2_base: b.2,
                e2_merged: m.2,
                similarity_base: b.3,
                similarity_merged: m.3,
                lcs_chars_base: b.4,
                lcs_chars_merged: m.4,
                log2_p_suffix_base: b.5,
                log2_p_suffix_merged: m.5,
            });
            wi += 1;
        }
        evidence.push(assemble(s, sb, sm, windows, &found[si], th));
    }

    // 6. Calibration and verdicts.
    let n_works = works.len();
    let mut controls_ev = evidence.split_off(n_works);
    let mut works_ev = evidence;
    let control_stats: Vec<f64> = controls_ev.iter().map(WorkEvidence::gain_per_token).collect();
    let mut notes = vec![];
    let calibration = gain_calibration(&mut works_ev, &control_stats, th, &mut notes);
    let work_stats: Vec<f64> = works_ev.iter().map(WorkEvidence::gain_per_token).collect();
    let auc = calibrate::auc_with_interval(&work_stats, &control_stats, 1000, 0x10ca);
    let (copy_calibration, copy_notes) = verdict::decide(&mut works_ev, &mut controls_ev, th);
    notes.extend(copy_notes);
    let skipped = controls_ev.iter().filter(|c| !c.extracted).count();
    if skipped > 0 {
        notes.push(format!(
            "extraction ran on {} of {} controls (a seeded random subset within --control-windows {}); every \
             control was scored for the gain",
            controls_ev.len() - skipped,
            controls_ev.len(),
            th.control_windows
        ));
    }
    let generated_tokens = continuations.iter().flatten().map(Vec::len).sum();
    Ok(ProbeResult {
        thresholds: *th,
        works: works_ev,
        controls: controls_ev,
        auc,
        calibration,
        copy_calibration,
        prompts: prompts.len(),
        generated_tokens,
        scored_tokens: 2 * scored_tokens,
        notes,
    })
}

fn generate_all(m: &Llama, gens: &[Generation], n: usize, progress: &dyn Fn(usize)) -> Result<Vec<Vec<u32>>> {
    // Equal-length prompts run together; results go back in input order.
    let mut order: Vec<usize> = (0..gens.len()).collect();
    order.sort_by_key(|&i| (gens[i].ids.len(), i));
    let mut out = vec![vec![]; gens.len()];
    let mut i = 0;
    while i < order.len() {
        let len = gens[order[i]].ids.len();
        let j = order[i..].iter().position(|&k| gens[k].ids.len() != len).map_or(order.len(), |p| i + p);
        let prompts: Vec<Vec<u32>> = order[i..j].iter().map(|&k| gens[k].ids.clone()).collect();
        let res = greedy(m, &prompts, n, m.cfg.eos_token_id, 16, progress)?;
        for (k, r) in order[i..j].iter().zip(res) {
            out[*k] = r;
        }
        i = j;
    }
    Ok(out)
}

/// Reproduced spans of one text under one model.
struct Found {
    /// Characters inside any reproduced span.
    covered: Vec<bool>,
    /// Characters inside a span the base finds improbable.
    covered_improbable: Vec<bool>,
    spans: usize,
    improbable: usize,
    cross: usize,
    longest: Option<Passage>,
    longest_improbable: usize,
    sources: Vec<SpanSource>,
}

impl Found {
    fn new(len: usize) -> Self {
        Found {
            covered: vec![false; len],
            covered_improbable: vec![false; len],
            spans: 0,
            improbable: 0,
            cross: 0,
            longest: None,
            longest_improbable: 0,
            sources: vec![],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        sp: text::Span,
        label: &str,
        model: &str,
        own: bool,
        gen: &Normalised,
        gen_text: &str,
        s: &Subject,
        min_bits: f64,
    ) {
        let range = sp.work_start..sp.work_start + sp.len;
        let bits_base = spans::span_bits(&s.bits[0], sp.work_start, sp.len);
        let improbable = bits_base >= min_bits;
        self.covered[range.clone()].iter_mut().for_each(|c| *c = true);
        if improbable {
            self.covered_improbable[range].iter_mut().for_each(|c| *c = true);
            self.improbable += 1;
            self.longest_improbable = self.longest_improbable.max(sp.len);
        }
        self.spans += 1;
        if !own {
            self.cross += 1;
        }
        self.sources.push(SpanSource {
            source: label.to_string(),
            model: model.to_string(),
            chars: sp.len,
            work_offset: sp.work_start,
            bits_base,
            bits_merged: spans::span_bits(&s.bits[1], sp.work_start, sp.len),
            improbable,
        });
        if self.longest.as_ref().is_none_or(|p| sp.len > p.chars) {
            self.longest = Some(Passage {
                chars: sp.len,
                source: label.to_string(),
                generated: gen.original(gen_text, sp.gen_start, sp.gen_start + sp.len).to_string(),
                original: s.norm.original(&s.work.text, sp.work_start, sp.work_start + sp.len).to_string(),
                work_offset: sp.work_start,
            });
        }
    }

    fn coverage(&self) -> f64 {
        if self.covered.is_empty() {
            0.0
        } else {
            self.covered.iter().filter(|&&c| c).count() as f64 / self.covered.len() as f64
        }
    }
}

fn assemble(
    s: &Subject,
    sb: &TokenStats,
    sm: &TokenStats,
    windows: Vec<WindowEvidence>,
    found: &[Found; 2],
    th: &Thresholds,
) -> WorkEvidence {
    let bits_base = scores::code_length_bits(sb);
    let bits_merged = scores::code_length_bits(sm);
    let tokens = sb.logp.len();
    let zlib = scores::zlib_bytes(&s.work.text);
    let per_token = |b: f64| if tokens == 0 { 0.0 } else { b / tokens as f64 };
    let attributable = found[1].covered_improbable.iter().zip(&found[0].covered).filter(|(m, b)| **m && !**b).count()
        as f64
        / s.norm.len().max(1) as f64;
    let span_sources: Vec<SpanSource> = found.iter().flat_map(|f| f.sources.iter().cloned()).collect();
    WorkEvidence {
        id: s.work.id.clone(),
        sha256: s.work.sha256.clone(),
        tokens,
        chars: s.norm.len(),
        bits_base,
        bits_merged,
        gain_bits: bits_base - bits_merged,
        gain_fraction: if bits_base > 0.0 { (bits_base - bits_merged) / bits_base } else { 0.0 },
        bits_per_token_base: per_token(bits_base),
        bits_per_token_merged: per_token(bits_merged),
        mem_bits: scores::mem_bits(sm, sb),
        zlib_bits: 8.0 * zlib as f64,
        windows: windows.len(),
        e1_windows_base: windows.iter().filter(|w| w.e1_base).count(),
        e1_windows_merged: windows.iter().filter(|w| w.e1_merged).count(),
        e2_windows_base: windows.iter().filter(|w| w.e2_base).count(),
        e2_windows_merged: windows.iter().filter(|w| w.e2_merged).count(),
        attributable_windows: windows.iter().filter(|w| w.e2_merged && !w.e2_base).count(),
        coverage_base: found[0].coverage(),
        coverage_merged: found[1].coverage(),
        coverage_attributable: attributable,
        evidence_bits: spans::evidence_bits(&s.bits[0], &found[1].covered_improbable, &found[0].covered),
        improbable_spans_merged: found[1].improbable,
        longest_improbable_span_chars: found[1].longest_improbable,
        extracted: s.extract,
        copy_p_value: None,
        copy_p_adjusted: None,
        copy_margin_met: false,
        longest_span_chars: found[1].longest.as_ref().map_or(0, |p| p.chars),
        longest_span_chars_base: found[0].longest.as_ref().map_or(0, |p| p.chars),
        longest_passage: found[1].longest.clone(),
        reproduced_spans_base: found[0].spans,
        reproduced_spans_merged: found[1].spans,
        cross_prompt_spans_merged: found[1].cross,
        span_sources,
        scores: MembershipScores {
            reference: scores::mean_nll(sm) - scores::mean_nll(sb),
            min_k_pp_base: scores::min_k_pp(sb, th.min_k),
            min_k_pp_merged: scores::min_k_pp(sm, th.min_k),
            zlib_base: scores::zlib_ratio(sb, zlib),
            zlib_merged: scores::zlib_ratio(sm, zlib),
        },
        p_value: None,
        p_adjusted: None,
        q_value: None,
        verdict: Verdict::NoEvidence,
        verdict_reason: String::new(),
        window_details: windows,
    }
}

/// Which controls get extraction windows: all with `control_windows` = 0; otherwise whole
/// controls in a seeded random order (fixed seed, so runs repeat) while their windows fit the
/// budget. `tokens` counts a control's tokens.
fn extracted_controls(
    controls: &[Work],
    th: &Thresholds,
    tokens: impl Fn(&Work) -> Result<usize>,
) -> Result<Vec<bool>> {
    if th.control_windows == 0 {
        return Ok(vec![true; controls.len()]);
    }
    let mut order: Vec<(u64, usize)> = {
        let mut rng = crate::rng::Rng::new(0x5eed_c0de);
        (0..controls.len()).map(|i| (rng.next_u64(), i)).collect()
    };
    order.sort_unstable();
    let windows = |n: usize| n.saturating_sub(th.prefix_tokens).div_ceil(th.stride.max(1));
    let mut chosen = vec![false; controls.len()];
    let mut budget = th.control_windows;
    for (_, i) in order {
        let w = windows(tokens(&controls[i])?);
        if w <= budget {
            chosen[i] = true;
            budget -= w;
        }
    }
    Ok(chosen)
}

/// p-values of the gain per token against the controls (Holm and Benjamini–Hochberg across the
/// works); notes when the controls cannot reach the significance level.
fn gain_calibration(
    works: &mut [WorkEvidence],
    control_stats: &[f64],
    th: &Thresholds,
    notes: &mut Vec<String>,
) -> Option<Calibration> {
    if control_stats.is_empty() {
        notes.push(
            "no --controls: membership scores are reported uncalibrated, without p-values; give works of the same \
             author, kind, length and era known not to be in training"
                .to_string(),
        );
        return None;
    }
    let p: Vec<f64> = works.iter().map(|w| calibrate::empirical_p(w.gain_per_token(), control_stats)).collect();
    let holm = calibrate::holm(&p);
    let bh = calibrate::benjamini_hochberg(&p);
    for (i, w) in works.iter_mut().enumerate() {
        w.p_value = Some(p[i]);
        w.p_adjusted = Some(holm[i]);
        w.q_value = Some(bh[i]);
    }
    let smallest = 1.0 / (control_stats.len() + 1) as f64;
    let m = works.len().max(1);
    if smallest * m as f64 >= th.significance {
        notes.push(format!(
            "with {} controls the smallest Holm-adjusted p-value {m} work(s) can reach is {:.3}, not below the \
             significance level {}: give at least {} controls for `memorized-traces` to be possible",
            control_stats.len(),
            (smallest * m as f64).min(1.0),
            th.significance,
            verdict::controls_needed(m, th.significance)
        ));
    }
    Some(Calibration {
        statistic: "gain bits per token (code length under base − under merged)".into(),
        controls: control_stats.len(),
        smallest_p: smallest,
        aa_check: calibrate::aa_check(control_stats),
    })
}
