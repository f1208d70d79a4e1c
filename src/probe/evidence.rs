//! One subject's evidence put together from the phases: code lengths and membership scores from
//! its token statistics, extraction counts from its windows, coverage and passages from the span
//! search. Calibration and the verdict are filled in later, once every subject is assembled.

use crate::model::TokenStats;

use super::pair::Pair;
use super::plan::Subject;
use super::spans::Found;
use super::surprisal::evidence_bits;
use super::{scores, MembershipScores, SpanSource, Thresholds, Verdict, WindowEvidence, WorkEvidence};

pub(crate) fn assemble(
    s: &Subject,
    stats: Pair<&TokenStats>,
    windows: Vec<WindowEvidence>,
    found: Pair<&Found>,
    th: &Thresholds,
) -> WorkEvidence {
    let (sb, sm) = (stats.base, stats.merged);
    let bits_base = scores::code_length_bits(sb);
    let bits_merged = scores::code_length_bits(sm);
    let tokens = sb.logp.len();
    let zlib = scores::zlib_bytes(&s.work.text);
    let per_token = |b: f64| if tokens == 0 { 0.0 } else { b / tokens as f64 };
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
        coverage_base: found.base.coverage(),
        coverage_merged: found.merged.coverage(),
        coverage_attributable: attributable_coverage(s, found),
        evidence_bits: evidence_bits(&s.bits.base, &found.merged.covered_improbable, &found.base.covered),
        improbable_spans_merged: found.merged.improbable,
        longest_improbable_span_chars: found.merged.longest_improbable,
        extracted: s.extract,
        copy_p_value: None,
        copy_p_adjusted: None,
        copy_margin_met: false,
        longest_span_chars: found.merged.longest.as_ref().map_or(0, |p| p.chars),
        longest_span_chars_base: found.base.longest.as_ref().map_or(0, |p| p.chars),
        longest_passage: found.merged.longest.clone(),
        reproduced_spans_base: found.base.spans,
        reproduced_spans_merged: found.merged.spans,
        cross_prompt_spans_merged: found.merged.cross,
        span_sources: span_sources(found),
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

/// Share of the subject's characters reproduced by the merged model in spans the base finds
/// improbable, and by the base in no span at all: the base may already know a famous text.
fn attributable_coverage(s: &Subject, found: Pair<&Found>) -> f64 {
    let (m, b) = (&found.merged.covered_improbable, &found.base.covered);
    m.iter().zip(b).filter(|(m, b)| **m && !**b).count() as f64 / s.norm.len().max(1) as f64
}

/// Every span with its source, the base's first.
fn span_sources(found: Pair<&Found>) -> Vec<SpanSource> {
    found.base.sources.iter().chain(&found.merged.sources).cloned().collect()
}
