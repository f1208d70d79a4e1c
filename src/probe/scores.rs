//! Scores derived from per-token statistics: code length, memorisation bits, and the
//! membership scores of mimir (reference, Min-K%++, zlib) with fixed hyper-parameters.

use std::io::Write;

use crate::model::TokenStats;

const LN2: f64 = std::f64::consts::LN_2;

/// Code length in bits: Σ −log₂ p(xᵢ | x<ᵢ).
pub(crate) fn code_length_bits(s: &TokenStats) -> f64 {
    -s.logp.iter().sum::<f64>() / LN2
}

/// Morris et al. 2025's unintended memorisation with the base as reference:
/// Σᵢ max(0, log₂ p_merged(xᵢ) − log₂ p_base(xᵢ)).
pub(crate) fn mem_bits(merged: &TokenStats, base: &TokenStats) -> f64 {
    merged.logp.iter().zip(&base.logp).map(|(m, b)| ((m - b) / LN2).max(0.0)).sum()
}

/// Mean negative log-likelihood in nats per token (mimir's "loss").
pub(crate) fn mean_nll(s: &TokenStats) -> f64 {
    if s.logp.is_empty() {
        return 0.0;
    }
    -s.logp.iter().sum::<f64>() / s.logp.len() as f64
}

/// Min-K%++ (Zhang et al. 2024): mean over the lowest k·n of zᵢ = (log p(xᵢ) − μᵢ)/σᵢ, where μ
/// and σ are the mean and standard deviation of log p under the next-token distribution.
/// Higher = more member-like.
pub(crate) fn min_k_pp(s: &TokenStats, k: f64) -> f64 {
    let mut z: Vec<f64> = (0..s.logp.len())
        .map(|i| {
            let sd = s.std[i];
            if sd > 0.0 {
                (s.logp[i] - s.mean[i]) / sd
            } else {
                0.0
            }
        })
        .collect();
    if z.is_empty() {
        return 0.0;
    }
    z.sort_by(f64::total_cmp);
    let n = ((z.len() as f64 * k).floor() as usize).max(1);
    z[..n].iter().sum::<f64>() / n as f64
}

/// Bytes of zlib's output at its default level (6), as Python's `zlib.compress`.
pub(crate) fn zlib_bytes(text: &str) -> usize {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(text.as_bytes()).expect("writing to memory");
    e.finish().expect("writing to memory").len()
}

/// mimir's zlib score: mean NLL / zlib bytes. Lower = more member-like.
pub(crate) fn zlib_ratio(s: &TokenStats, zlib: usize) -> f64 {
    mean_nll(s) / zlib.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        let ln = |p: f64| p.ln();
        let m = TokenStats { logp: vec![ln(0.5), ln(0.25)], mean: vec![ln(0.5), ln(0.5)], std: vec![1.0, 0.5] };
        let b = TokenStats { logp: vec![ln(0.25), ln(0.5)], mean: vec![0.0, 0.0], std: vec![1.0, 1.0] };
        assert!((code_length_bits(&m) - 3.0).abs() < 1e-12);
        assert!((code_length_bits(&b) - 3.0).abs() < 1e-12);
        // +1 bit on the first token, −1 (clipped to 0) on the second.
        assert!((mem_bits(&m, &b) - 1.0).abs() < 1e-12);
        // z = [0, (ln .25 − ln .5)/.5 = −2 ln 2]; k=0.2 keeps the lowest one.
        assert!((min_k_pp(&m, 0.2) + 2.0 * LN2).abs() < 1e-12);
        assert!((mean_nll(&m) - 1.5 * LN2).abs() < 1e-12);
        assert!(zlib_bytes("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") < 20);
    }
}
