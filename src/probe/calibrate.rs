//! Calibration against controls: empirical p-values, multiple-testing corrections, ROC-AUC with
//! a bootstrap interval, and an A/A check on the controls themselves.

use crate::rng::Rng;

/// `(1 + #{controls ≥ s}) / (1 + n)`: the smallest reachable value is 1/(n+1).
pub(crate) fn empirical_p(s: f64, controls: &[f64]) -> f64 {
    let above = controls.iter().filter(|&&c| c >= s).count();
    (1 + above) as f64 / (1 + controls.len()) as f64
}

/// Holm's step-down adjusted p-values (family-wise error), in input order.
pub(crate) fn holm(p: &[f64]) -> Vec<f64> {
    let n = p.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
    let mut out = vec![0.0; n];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((n - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Benjamini–Hochberg adjusted p-values (q-values), in input order.
pub(crate) fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let n = p.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
    let mut out = vec![0.0; n];
    let mut running: f64 = 1.0;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * n as f64 / (rank + 1) as f64).min(1.0);
        out[i] = running;
    }
    out
}

/// ROC-AUC with members (works) as the positive class: P(work score > control score), ties ½.
pub(crate) fn auc(works: &[f64], controls: &[f64]) -> Option<f64> {
    if works.is_empty() || controls.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for w in works {
        for c in controls {
            wins += if w > c {
                1.0
            } else if w == c {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (works.len() * controls.len()) as f64)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Auc {
    pub value: f64,
    /// 95% percentile bootstrap interval (works and controls resampled separately).
    pub ci_low: f64,
    pub ci_high: f64,
    pub bootstrap_samples: usize,
    pub seed: u64,
}

pub(crate) fn auc_with_interval(works: &[f64], controls: &[f64], samples: usize, seed: u64) -> Option<Auc> {
    let value = auc(works, controls)?;
    let mut rng = Rng::new(seed);
    let mut pick =
        |v: &[f64]| -> Vec<f64> { (0..v.len()).map(|_| v[(rng.next_u64() % v.len() as u64) as usize]).collect() };
    let mut boot: Vec<f64> = (0..samples).filter_map(|_| auc(&pick(works), &pick(controls))).collect();
    boot.sort_by(f64::total_cmp);
    let q = |f: f64| boot[((boot.len() - 1) as f64 * f).round() as usize];
    Some(Auc { value, ci_low: q(0.025), ci_high: q(0.975), bootstrap_samples: samples, seed })
}

/// The A/A check: controls split in two by position (even, odd); the p-values of the first half
/// against the second should look uniform when the statistic is calibrated.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AaCheck {
    pub p_values: Vec<f64>,
    /// Kolmogorov–Smirnov distance of those p-values from the uniform distribution.
    pub ks_distance: f64,
    /// Asymptotic KS p-value (rough for few controls).
    pub ks_p_value: f64,
    pub looks_uniform: bool,
    pub note: String,
}

pub(crate) fn aa_check(controls: &[f64]) -> Option<AaCheck> {
    if controls.len() < 4 {
        return None;
    }
    let a: Vec<f64> = controls.iter().step_by(2).copied().collect();
    let b: Vec<f64> = controls.iter().skip(1).step_by(2).copied().collect();
    let mut p: Vec<f64> = a.iter().map(|&s| empirical_p(s, &b)).collect();
    let p_values = p.clone();
    p.sort_by(f64::total_cmp);
    let n = p.len() as f64;
    let d = p
        .iter()
        .enumerate()
        .map(|(i, &x)| ((i + 1) as f64 / n - x).abs().max((x - i as f64 / n).abs()))
        .fold(0.0, f64::max);
    let ks_p = kolmogorov_sf((n.sqrt() + 0.12 + 0.11 / n.sqrt()) * d);
    let note = if controls.len() < 20 {
        format!("only {} controls: the check can reveal gross miscalibration only", controls.len())
    } else {
        "controls split by position into two halves".to_string()
    };
    Some(AaCheck { p_values, ks_distance: d, ks_p_value: ks_p, looks_uniform: ks_p > 0.05, note })
}

/// Survival function of the Kolmogorov distribution, Q(λ) = 2 Σ (−1)^(k−1) e^(−2k²λ²).
fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda < 0.2 {
        return 1.0;
    }
    let s: f64 = (1..=100)
        .map(|k| (if k % 2 == 1 { 2.0 } else { -2.0 }) * (-2.0 * (k * k) as f64 * lambda * lambda).exp())
        .sum();
    s.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_values_and_corrections_by_hand() {
        assert_eq!(empirical_p(5.0, &[1.0, 2.0, 3.0]), 0.25);
        assert_eq!(empirical_p(2.0, &[1.0, 2.0, 3.0]), 0.75);
        // Holm: sorted 0.01, 0.02, 0.04 ×3,×2,×1 → 0.03, 0.04, 0.04 (monotone).
        let h = holm(&[0.04, 0.01, 0.02]);
        assert_eq!(h, vec![0.04, 0.03, 0.04]);
        // BH: 0.01·3/1, 0.02·3/2, 0.04·3/3 → 0.03, 0.03, 0.04.
        let q = benjamini_hochberg(&[0.04, 0.01, 0.02]);
        assert!((q[0] - 0.04).abs() < 1e-12 && (q[1] - 0.03).abs() < 1e-12 && (q[2] - 0.03).abs() < 1e-12);
    }

    #[test]
    fn auc_orientation_members_positive() {
        // Works scoring higher than every control: AUC 1, not 0.
        assert_eq!(auc(&[5.0, 6.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auc(&[1.0], &[1.0, 2.0]), Some(0.25));
        let a = auc_with_interval(&[5.0, 6.0, 7.0], &[1.0, 2.0, 3.0], 200, 7).unwrap();
        assert_eq!((a.value, a.ci_low, a.ci_high), (1.0, 1.0, 1.0));
    }

    #[test]
    fn kolmogorov_tail_known_value() {
        // Q(1.36) ≈ 0.049 (the classic 5% critical value).
        assert!((kolmogorov_sf(1.36) - 0.0494).abs() < 1e-3);
    }
}
