//! The span search: every continuation, of the windows and of the neutral prompts, searched for
//! verbatim spans of at least `min_span_chars` normalised characters of every subject (Aerni et
//! al. 2024: extraction is not limited to a work's own prefixes). Per subject and model it keeps
//! the characters covered, the spans and which prompts produced them with their surprisal
//! under each model, and the longest passage. A span the base finds improbable (docs/probe.md,
//! "Improbable spans"; `surprisal.rs`) also marks its characters as improbably covered.

use crate::error::Result;
use crate::model::TextTokenizer;

use super::plan::{Plan, Subject};
use super::surprisal::span_bits;
use super::text::{normalise, Normalised, Span};
use super::{Passage, SpanSource, Thresholds};

/// Reproduced spans of one subject under one model.
pub(crate) struct Found {
    /// Per normalised character of the subject: inside some reproduced span.
    pub covered: Vec<bool>,
    /// Per normalised character: inside a span the base finds improbable.
    pub covered_improbable: Vec<bool>,
    pub spans: usize,
    /// Spans the base finds improbable, and the longest of them.
    pub improbable: usize,
    pub longest_improbable: usize,
    /// Spans produced by prompts other than the subject's own windows.
    pub cross: usize,
    pub longest: Option<Passage>,
    /// Every span with the prompt that produced it, in search order.
    pub sources: Vec<SpanSource>,
}

/// Search one model's (`model`) continuations (in `plan.prompts()` order) for every subject;
/// one `Found` per subject.
pub(crate) fn search(
    model: &str,
    tok: &TextTokenizer,
    subjects: &[Subject],
    plan: &Plan,
    generated: &[Vec<u32>],
    th: &Thresholds,
) -> Result<Vec<Found>> {
    let mut found: Vec<Found> = subjects.iter().map(|s| Found::new(s.norm.len())).collect();
    for (prompt, ids) in plan.prompts().zip(generated) {
        let text = tok.decode(ids)?;
        let norm = normalise(&text);
        for (si, s) in subjects.iter().enumerate() {
            for sp in s.index.spans(&norm.chars, th.min_span_chars) {
                let own = prompt.owner == Some(si);
                found[si].add(sp, Origin { label: prompt.label, model, own }, &norm, &text, s, th.min_span_bits);
            }
        }
    }
    Ok(found)
}

/// Which continuation a span came from.
struct Origin<'a> {
    label: &'a str,
    model: &'a str,
    /// The prompt is one of the subject's own windows.
    own: bool,
}

impl Found {
    fn new(len: usize) -> Self {
        Found {
            covered: vec![false; len],
            covered_improbable: vec![false; len],
            spans: 0,
            improbable: 0,
            longest_improbable: 0,
            cross: 0,
            longest: None,
            sources: vec![],
        }
    }

    fn add(&mut self, sp: Span, from: Origin, gen: &Normalised, gen_text: &str, s: &Subject, min_bits: f64) {
        let label = from.label;
        let range = sp.work_start..sp.work_start + sp.len;
        let bits_base = span_bits(&s.bits.base, sp.work_start, sp.len);
        let improbable = bits_base >= min_bits;
        self.covered[range.clone()].iter_mut().for_each(|c| *c = true);
        if improbable {
            self.covered_improbable[range].iter_mut().for_each(|c| *c = true);
            self.improbable += 1;
            self.longest_improbable = self.longest_improbable.max(sp.len);
        }
        self.spans += 1;
        if !from.own {
            self.cross += 1;
        }
        self.sources.push(SpanSource {
            source: label.to_string(),
            model: from.model.to_string(),
            chars: sp.len,
            work_offset: sp.work_start,
            bits_base,
            bits_merged: span_bits(&s.bits.merged, sp.work_start, sp.len),
            improbable,
        });
        // The first of equally long spans is kept.
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

    /// Share of the subject's normalised characters covered.
    pub(crate) fn coverage(&self) -> f64 {
        if self.covered.is_empty() {
            0.0
        } else {
            self.covered.iter().filter(|&&c| c).count() as f64 / self.covered.len() as f64
        }
    }
}
