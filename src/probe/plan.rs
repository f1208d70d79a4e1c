//! What the probe runs: every work and control tokenised and normalised once (a `Subject`), the
//! extraction windows cut from them (a prefix to prompt with, the true suffix to compare
//! against), and the neutral `--prompts` lines, in the order the model passes take them.

use crate::error::Result;
use crate::load::works::Work;
use crate::model::TextTokenizer;

use super::pair::Pair;
use super::text::{normalise, Normalised, SpanIndex};
use super::Thresholds;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Work,
    Control,
}

impl Role {
    fn tag(self) -> &'static str {
        match self {
            Role::Work => "work",
            Role::Control => "control",
        }
    }
}

/// A text under test, tokenised and normalised once.
pub(crate) struct Subject<'a> {
    pub role: Role,
    pub work: &'a Work,
    /// Token ids of the text, without BOS.
    pub ids: Vec<u32>,
    /// Byte range of each token in the text.
    pub offsets: Vec<(usize, usize)>,
    pub norm: Normalised,
    pub index: SpanIndex,
    /// Whether extraction windows run on this text (controls may be a seeded subset).
    pub extract: bool,
    /// Bits per normalised character under each model, given the text before it; filled in
    /// once the texts are scored.
    pub bits: Pair<Vec<f64>>,
}

/// Works first, then controls, each set in its given order; every work and the controls that
/// `extracted_controls` picks get extraction windows.
pub(crate) fn subjects<'a>(
    tok: &TextTokenizer,
    works: &'a [Work],
    controls: &'a [Work],
    th: &Thresholds,
) -> Result<Vec<Subject<'a>>> {
    let mut out = vec![];
    for (role, set) in [(Role::Work, works), (Role::Control, controls)] {
        for work in set {
            let norm = normalise(&work.text);
            let index = SpanIndex::new(&norm.chars);
            let (ids, offsets) = tok.encode_with_offsets(&work.text)?;
            out.push(Subject { role, work, ids, offsets, norm, index, extract: true, bits: Pair::default() });
        }
    }
    let chosen = extracted_controls(&out[works.len()..], th);
    for (s, extract) in out[works.len()..].iter_mut().zip(chosen) {
        s.extract = extract;
    }
    Ok(out)
}

/// Which controls get extraction windows: all with `control_windows` = 0; otherwise whole
/// controls in a seeded random order (a fixed seed, so runs repeat) while their windows fit the
/// budget.
fn extracted_controls(controls: &[Subject], th: &Thresholds) -> Vec<bool> {
    if th.control_windows == 0 {
        return vec![true; controls.len()];
    }
    let mut rng = crate::rng::Rng::new(0x5eed_c0de);
    let mut order: Vec<(u64, usize)> = (0..controls.len()).map(|i| (rng.next_u64(), i)).collect();
    order.sort_unstable();
    let mut chosen = vec![false; controls.len()];
    let mut budget = th.control_windows;
    for (_, i) in order {
        let n = window_count(controls[i].ids.len(), th);
        if n <= budget {
            chosen[i] = true;
            budget -= n;
        }
    }
    chosen
}

/// Windows `windows` cuts from a text of `tokens` tokens.
fn window_count(tokens: usize, th: &Thresholds) -> usize {
    if th.prefix_tokens == 0 {
        return 0;
    }
    tokens.saturating_sub(th.prefix_tokens).div_ceil(th.stride.max(1))
}

/// `ids` after the model's BOS token, when it has one.
pub(crate) fn with_bos(bos: &[u32], ids: &[u32]) -> Vec<u32> {
    bos.iter().chain(ids).copied().collect()
}

/// One extraction window: a prefix of a subject to prompt with and the true suffix after it.
pub(crate) struct Window {
    /// Index of the subject in the list `subjects` returns.
    pub subject: usize,
    /// Token offset of the prefix in the subject.
    pub start: usize,
    /// `work:ID@OFFSET` or `control:ID@OFFSET`.
    pub label: String,
    /// BOS + `prefix_tokens` tokens of the subject from `start`: the prompt.
    pub prefix: Vec<u32>,
    /// Up to `new_tokens` tokens of the subject after the prefix.
    pub suffix: Vec<u32>,
}

/// A neutral `--prompts` line: its continuations are searched for every subject.
pub(crate) struct Neutral {
    /// `prompt:N`, N counting every line given from 1.
    pub label: String,
    /// BOS + the line's tokens.
    pub ids: Vec<u32>,
}

/// A prompt to continue and where it came from.
pub(crate) struct Prompt<'a> {
    /// The subject whose own window this is; `None` for a neutral prompt.
    pub owner: Option<usize>,
    pub label: &'a str,
    pub ids: &'a [u32],
}

/// Every prompt of the probe.
pub(crate) struct Plan {
    pub windows: Vec<Window>,
    pub neutral: Vec<Neutral>,
}

impl Plan {
    /// Windows at every `stride` tokens of every subject while a whole prefix and at least one
    /// suffix token fit; neutral prompts that are not empty and fit in `context`.
    pub(crate) fn new(
        tok: &TextTokenizer,
        bos: &[u32],
        subjects: &[Subject],
        prompts: &[String],
        th: &Thresholds,
        context: usize,
    ) -> Result<Plan> {
        let windows = subjects.iter().enumerate().flat_map(|(si, s)| windows(si, s, bos, th)).collect();
        let mut neutral = vec![];
        for (i, p) in prompts.iter().enumerate() {
            let ids = with_bos(bos, &tok.encode(p)?);
            if !ids.is_empty() && ids.len() < context {
                neutral.push(Neutral { label: format!("prompt:{}", i + 1), ids });
            }
        }
        Ok(Plan { windows, neutral })
    }

    /// Windows first, then neutral prompts: continuations come back in this order, so the
    /// first `windows.len()` of them belong to the windows.
    pub(crate) fn prompts(&self) -> impl Iterator<Item = Prompt<'_>> {
        let own = self.windows.iter().map(|w| Prompt { owner: Some(w.subject), label: &w.label, ids: &w.prefix });
        own.chain(self.neutral.iter().map(|n| Prompt { owner: None, label: &n.label, ids: &n.ids }))
    }
}

/// The windows of subject `si`, in offset order.
fn windows(si: usize, s: &Subject, bos: &[u32], th: &Thresholds) -> Vec<Window> {
    let mut out = vec![];
    let mut start = 0;
    while s.extract && start + th.prefix_tokens < s.ids.len() && th.prefix_tokens > 0 {
        let cut = start + th.prefix_tokens;
        let end = (cut + th.new_tokens).min(s.ids.len());
        out.push(Window {
            subject: si,
            start,
            label: format!("{}:{}@{start}", s.role.tag(), s.work.id),
            prefix: with_bos(bos, &s.ids[start..cut]),
            suffix: s.ids[cut..end].to_vec(),
        });
        start += th.stride.max(1);
    }
    out
}
