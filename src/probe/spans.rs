//! The span search: every continuation, of the windows and of the neutral prompts, searched for
//! verbatim spans of at least `min_span_chars` normalised characters of every subject (Aerni et
//! al. 2024: extraction is not limited to a work's own prefixes). Per subject and model it keeps
//! the characters covered, the spans and which prompts produced them, and the longest passage.

use crate::error::Result;
use crate::model::TextTokenizer;

use super::plan::{Plan, Subject};
use super::text::{normalise, Normalised, Span};
use super::{Passage, Thresholds};

/// Reproduced spans of one subject under one model.
pub struct Found {
    /// Per normalised character of the subject: inside some reproduced span.
    pub covered: Vec<bool>,
    pub spans: usize,
    /// Spans produced by prompts other than the subject's own windows.
    pub cross: usize,
    pub longest: Option<Passage>,
    /// Label of the prompt and length of every span, in search order.
    pub sources: Vec<(String, usize)>,
}

/// Search one model's continuations (in `plan.prompts()` order) for every subject; one
/// `Found` per subject.
pub fn search(
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
                found[si].add(sp, prompt.label, own, &norm, &text, s);
            }
        }
    }
    Ok(found)
}

impl Found {
    fn new(len: usize) -> Self {
        Found { covered: vec![false; len], spans: 0, cross: 0, longest: None, sources: vec![] }
    }

    fn add(&mut self, sp: Span, label: &str, own: bool, gen: &Normalised, gen_text: &str, s: &Subject) {
        for c in &mut self.covered[sp.work_start..sp.work_start + sp.len] {
            *c = true;
        }
        self.spans += 1;
        if !own {
            self.cross += 1;
        }
        self.sources.push((label.to_string(), sp.len));
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
    pub fn coverage(&self) -> f64 {
        if self.covered.is_empty() {
            0.0
        } else {
            self.covered.iter().filter(|&&c| c).count() as f64 / self.covered.len() as f64
        }
    }
}
