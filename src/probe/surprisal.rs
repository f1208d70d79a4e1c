//! Reproduced spans as evidence of copying. A verbatim span counts only when the base model
//! finds it improbable given the text before it: a long span that the base predicts at a few
//! bits is ordinary language (or domain phrasing a fine-tune learned), not a copy. Carlini et
//! al. 2021 ("Extracting Training Data from Large Language Models", §5.2) filter extracted
//! strings by comparing the model's likelihood with a reference's for the same reason; Aerni et
//! al. 2024 ("Measuring Non-Adversarial Reproduction of Training Data in LLMs") find 50-character
//! overlaps in ordinary outputs of models that never saw the text. Each character of a text
//! carries the surprisal of the token it belongs to (teacher-forced over the whole text), so
//! a span's bits are the sum over its characters and overlapping spans never count twice.

use super::text::Normalised;

/// Bits each normalised character costs a model given the text before it: the surprisal
/// −log₂ p of each token (from `logp`, natural log) spread evenly over the normalised
/// characters whose source byte lies in the token's byte range (`offsets`). A token with no
/// normalised character of its own (a whitespace run) passes its bits on to the next character.
pub(crate) fn char_bits(norm: &Normalised, offsets: &[(usize, usize)], logp: &[f64]) -> Vec<f64> {
    let mut bits = vec![0.0; norm.len()];
    let mut carry = 0.0;
    let mut i = 0;
    for (k, &(start, end)) in offsets.iter().enumerate() {
        let Some(lp) = logp.get(k) else { break };
        carry += -lp / std::f64::consts::LN_2;
        // Characters before this token's start that no token claimed keep zero bits.
        while i < norm.len() && norm.origin[i] < start {
            i += 1;
        }
        let first = i;
        while i < norm.len() && norm.origin[i] < end {
            i += 1;
        }
        if i > first {
            let each = carry / (i - first) as f64;
            bits[first..i].iter_mut().for_each(|b| *b = each);
            carry = 0.0;
        }
    }
    if carry > 0.0 {
        if let Some(last) = bits.last_mut() {
            *last += carry;
        }
    }
    bits
}

/// Sum of `bits` over `start..start+len`.
pub(crate) fn span_bits(bits: &[f64], start: usize, len: usize) -> f64 {
    bits.get(start..start + len).map_or(0.0, |s| s.iter().sum())
}

/// The copy statistic of a text: the base's surprisal, in bits, summed over the characters the
/// merged model reproduced in improbable spans and the base reproduced in no span at all.
pub(crate) fn evidence_bits(base_bits: &[f64], merged_improbable: &[bool], base_any: &[bool]) -> f64 {
    // + 0.0: an empty float sum is −0.0, which JSON would print as such.
    base_bits
        .iter()
        .zip(merged_improbable.iter().zip(base_any))
        .filter(|(_, (m, b))| **m && !**b)
        .map(|(x, _)| x)
        .sum::<f64>()
        + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::text::normalise;

    #[test]
    fn token_bits_spread_over_their_characters() {
        // "ab  cd": tokens "ab" (2 bits), "  " (1 bit), "cd" (4 bits). Normalised "ab cd": the
        // space takes the origin of 'c', so the whitespace token's bit goes to " cd" with cd's.
        let text = "ab  cd";
        let norm = normalise(text);
        assert_eq!(norm.as_string(), "ab cd");
        let ln2 = std::f64::consts::LN_2;
        let logp = [-2.0 * ln2, -ln2, -4.0 * ln2];
        let bits = char_bits(&norm, &[(0, 2), (2, 4), (4, 6)], &logp);
        // The space's origin is byte 4 (the segment after the run), inside "cd"'s range:
        // "cd" spreads its 4 bits plus the carried 1 over " ", "c", "d".
        let want = [1.0, 1.0, 5.0 / 3.0, 5.0 / 3.0, 5.0 / 3.0];
        for (g, w) in bits.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{bits:?}");
        }
        assert!((bits.iter().sum::<f64>() - 7.0).abs() < 1e-12, "every bit lands on a character");
        assert!((span_bits(&bits, 1, 3) - (1.0 + 10.0 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn evidence_counts_merged_only_improbable_characters_once() {
        let bits = [1.0, 2.0, 4.0, 8.0];
        let merged = [true, true, true, false];
        let base = [false, true, false, false];
        assert_eq!(evidence_bits(&bits, &merged, &base), 5.0);
    }
}
