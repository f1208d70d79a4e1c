//! Text comparison for extraction: normalisation (NFKC, lower case, whitespace collapsed) with
//! a map back to the original, normalised Levenshtein similarity (the distance from strsim),
//! longest common substring, and a suffix automaton that finds every long verbatim span of a
//! work inside generated text.

use unicode_normalization::char::canonical_combining_class;
use unicode_normalization::UnicodeNormalization;

/// A normalised text; `origin[i]` is the byte offset in the original of normalised char `i`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Normalised {
    pub chars: Vec<char>,
    pub origin: Vec<usize>,
}

impl Normalised {
    pub(crate) fn len(&self) -> usize {
        self.chars.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }
    #[cfg(test)]
    pub(crate) fn as_string(&self) -> String {
        self.chars.iter().collect()
    }
    /// The original text behind normalised chars `start..end`.
    pub(crate) fn original<'a>(&self, text: &'a str, start: usize, end: usize) -> &'a str {
        if start >= end || end > self.origin.len() {
            return "";
        }
        let from = self.origin[start];
        let to = self.origin.get(end).copied().unwrap_or(text.len()).max(from);
        // The char behind `end-1` may end past the next origin when one char expanded.
        let last = self.origin[end - 1];
        let last_end = last + text[last..].chars().next().map(char::len_utf8).unwrap_or(0);
        &text[from..to.max(last_end)]
    }
}

/// NFKC + lower case + every whitespace run as one space, trimmed. Normalisation runs over
/// each base character with its combining marks, so every output char maps to a source offset.
pub(crate) fn normalise(text: &str) -> Normalised {
    let mut out = Normalised::default();
    let mut pending_space = false;
    let mut segment = String::new();
    let mut seg_start = 0;
    let flush = |seg: &str, at: usize, out: &mut Normalised, pending_space: &mut bool| {
        for c in seg.nfkc().flat_map(char::to_lowercase) {
            if c.is_whitespace() {
                *pending_space = !out.is_empty();
                continue;
            }
            if *pending_space {
                out.chars.push(' ');
                out.origin.push(at);
                *pending_space = false;
            }
            out.chars.push(c);
            out.origin.push(at);
        }
    };
    for (i, c) in text.char_indices() {
        if canonical_combining_class(c) != 0 && !segment.is_empty() {
            segment.push(c);
            continue;
        }
        flush(&segment, seg_start, &mut out, &mut pending_space);
        segment.clear();
        segment.push(c);
        seg_start = i;
    }
    flush(&segment, seg_start, &mut out, &mut pending_space);
    out
}

/// 1 − Levenshtein(a, b) / max(|a|, |b|) over chars; 1 for two empty strings. The distance is
/// strsim's `generic_levenshtein`, run on the normalised chars themselves.
pub(crate) fn similarity(a: &[char], b: &[char]) -> f64 {
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    1.0 - strsim::generic_levenshtein(&CharSlice(a), &CharSlice(b)) as f64 / n as f64
}

/// `generic_levenshtein` takes `&T` with `&T: IntoIterator` and a sized `T`, which a bare
/// `[char]` is not: this wraps the slice without copying it.
struct CharSlice<'a>(&'a [char]);

impl<'a> IntoIterator for &CharSlice<'a> {
    type Item = &'a char;
    type IntoIter = std::slice::Iter<'a, char>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Length of the longest common substring of `a` and `b`.
pub(crate) fn longest_common_substring(a: &[char], b: &[char]) -> usize {
    let mut best = 0;
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for ca in a {
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = if ca == cb { prev[j] + 1 } else { 0 };
            best = best.max(cur[j + 1]);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    best
}

/// A verbatim span of a work found in generated text: `work[work_start..work_start+len]` equals
/// `generated[gen_start..gen_start+len]` (normalised chars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub work_start: usize,
    pub gen_start: usize,
    pub len: usize,
}

#[derive(Debug, Clone)]
struct State {
    len: usize,
    link: usize,
    /// End position (exclusive) of the first occurrence of this state's strings.
    first_end: usize,
    next: Vec<(char, u32)>,
}

/// Suffix automaton of one normalised work: finds maximal common spans with any text in time
/// linear in that text.
#[derive(Debug, Clone)]
pub(crate) struct SpanIndex {
    states: Vec<State>,
}

impl SpanIndex {
    pub(crate) fn new(text: &[char]) -> Self {
        let mut st = vec![State { len: 0, link: usize::MAX, first_end: 0, next: vec![] }];
        let mut last = 0;
        for (i, &c) in text.iter().enumerate() {
            let cur = st.len();
            st.push(State { len: st[last].len + 1, link: 0, first_end: i + 1, next: vec![] });
            let mut p = last;
            loop {
                if get(&st[p], c).is_some() {
                    break;
                }
                st[p].next.push((c, cur as u32));
                if st[p].link == usize::MAX {
                    p = usize::MAX;
                    break;
                }
                p = st[p].link;
            }
            if p != usize::MAX {
                let q = get(&st[p], c).expect("checked");
                if st[p].len + 1 == st[q].len {
                    st[cur].link = q;
                } else {
                    let clone = st.len();
                    let mut cl = st[q].clone();
                    cl.len = st[p].len + 1;
                    st.push(cl);
                    while p != usize::MAX && get(&st[p], c) == Some(q) {
                        for e in st[p].next.iter_mut() {
                            if e.0 == c {
                                e.1 = clone as u32;
                            }
                        }
                        p = st[p].link;
                    }
                    st[q].link = clone;
                    st[cur].link = clone;
                }
            }
            last = cur;
        }
        SpanIndex { states: st }
    }

    /// Every right-maximal span of at least `min_len` chars of `generated` that occurs in the
    /// work (the first occurrence in the work is reported).
    pub(crate) fn spans(&self, generated: &[char], min_len: usize) -> Vec<Span> {
        let mut out = vec![];
        let (mut v, mut l) = (0usize, 0usize);
        let mut prev: Option<(usize, usize, usize)> = None; // (end in gen, len, work end)
        for (i, &c) in generated.iter().enumerate() {
            loop {
                if let Some(n) = get(&self.states[v], c) {
                    v = n;
                    l += 1;
                    break;
                }
                if v == 0 {
                    l = 0;
                    break;
                }
                v = self.states[v].link;
                l = self.states[v].len;
            }
            // The previous match could not be extended by this char: it was right-maximal.
            if let Some((end, plen, wend)) = prev {
                if l != plen + 1 && plen >= min_len {
                    out.push(Span { work_start: wend - plen, gen_start: end - plen, len: plen });
                }
            }
            // Match of length l ends at work position first_end(v) − (state len − l)… the
            // first occurrence of the whole state ends at first_end; a suffix of it ends there too.
            prev = Some((i + 1, l, self.states[v].first_end));
        }
        if let Some((end, plen, wend)) = prev {
            if plen >= min_len {
                out.push(Span { work_start: wend - plen, gen_start: end - plen, len: plen });
            }
        }
        out
    }
}

fn get(s: &State, c: char) -> Option<usize> {
    s.next.iter().find(|e| e.0 == c).map(|e| e.1 as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn normalise_folds_width_case_and_space() {
        let n = normalise("  Ｈｅｌｌｏ,\n\t WORLD ﬁne  ");
        assert_eq!(n.as_string(), "hello, world fine");
        // "fi" comes from the one ligature char at its byte offset.
        let text = "  Ｈｅｌｌｏ,\n\t WORLD ﬁne  ";
        assert_eq!(n.original(text, 0, 5), "Ｈｅｌｌｏ");
        assert_eq!(n.original(text, 13, 15), "ﬁ");
        // Decomposed é composes.
        assert_eq!(normalise("e\u{301}t\u{e9}").as_string(), "\u{e9}t\u{e9}");
    }

    #[test]
    fn similarity_and_lcs_by_hand() {
        // kitten → sitting: distance 3, max length 7.
        assert!((similarity(&chars("kitten"), &chars("sitting")) - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert_eq!(similarity(&chars(""), &chars("")), 1.0);
        assert_eq!(longest_common_substring(&chars("xabcdey"), &chars("zzabcdzz")), 4);
    }

    #[test]
    fn spans_match_brute_force() {
        let work = chars("the quick brown fox jumps over the lazy dog and the quick red fox");
        let idx = SpanIndex::new(&work);
        let gen = chars("xx the quick brown fox leaps; over the lazy dog and thy quick red fox!");
        let spans = idx.spans(&gen, 8);
        for s in &spans {
            assert_eq!(&work[s.work_start..s.work_start + s.len], &gen[s.gen_start..s.gen_start + s.len]);
            // Right-maximal in the generated text.
            let e = s.gen_start + s.len;
            if e < gen.len() {
                let ext = &gen[s.gen_start..=e];
                assert!(!work.windows(ext.len()).any(|w| w == ext));
            }
        }
        let lens: Vec<usize> = spans.iter().map(|s| s.len).collect();
        // " the quick " occurs only before "red"; "the quick brown fox " at the start of the work.
        assert_eq!(
            lens,
            vec![
                " the quick ".len(),
                "the quick brown fox ".len(),
                " over the lazy dog and th".len(),
                " quick red fox".len()
            ]
        );
    }
}
