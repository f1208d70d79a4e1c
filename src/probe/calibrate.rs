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

/// The set-level test of works against controls: Mann–Whitney U, one-sided (works higher).
/// A set of one owner's works can be significant where no single work is (dataset inference,
/// Maini et al. 2024, arXiv 2411.12858).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SetTest {
    /// U of the works: pairs (work, control) with the work higher, ties counting one half.
    pub u: f64,
    /// U / (works × controls): the AUC.
    pub auc: f64,
    pub p_value: f64,
    pub method: SetTestMethod,
    pub works: usize,
    pub controls: usize,
}

crate::named::closed_set! {
    /// How the U test's p-value was computed.
    pub enum SetTestMethod ("set test method") {
        /// The exact null distribution of U (no ties, works × controls ≤ EXACT_U_PAIRS).
        Exact = "exact",
        /// The normal approximation with continuity and tie corrections.
        Normal = "normal",
    }
}

/// Largest works × controls for which U's exact distribution is counted (the table has
/// m·n + 1 entries per step; beyond this the normal approximation is within 1e-3).
pub(crate) const EXACT_U_PAIRS: usize = 40_000;

pub(crate) fn mann_whitney(works: &[f64], controls: &[f64]) -> Option<SetTest> {
    let (m, n) = (works.len(), controls.len());
    if m == 0 || n == 0 {
        return None;
    }
    let u = auc(works, controls)? * (m * n) as f64;
    let mut all: Vec<f64> = works.iter().chain(controls).copied().collect();
    all.sort_by(f64::total_cmp);
    let ties: Vec<usize> = all.chunk_by(|a, b| a == b).map(<[f64]>::len).collect();
    let tied = ties.iter().any(|&t| t > 1);
    let (p_value, method) = if !tied && m * n <= EXACT_U_PAIRS {
        (exact_u_upper(m, n, u.round() as usize), SetTestMethod::Exact)
    } else {
        (normal_u_upper(m, n, u, &ties), SetTestMethod::Normal)
    };
    Some(SetTest { u, auc: u / (m * n) as f64, p_value, method, works: m, controls: n })
}

/// P(U ≥ u) under the null, from the count of arrangements with each U: the recursion
/// c(m, n, u) = c(m − 1, n, u − n) + c(m, n − 1, u) (Mann and Whitney 1947), in f64 (counts
/// up to C(m+n, m) overflow integers; only their ratio is needed).
fn exact_u_upper(m: usize, n: usize, u: usize) -> f64 {
    // table[j][v]: arrangements of i works and j controls with U = v, for the current i.
    let max = m * n;
    let mut table: Vec<Vec<f64>> = (0..=n).map(|_| vec![0.0; max + 1]).collect();
    for row in table.iter_mut() {
        row[0] = 1.0; // i = 0 works: U = 0 in exactly one way.
    }
    for _i in 1..=m {
        let mut next: Vec<Vec<f64>> = (0..=n).map(|_| vec![0.0; max + 1]).collect();
        next[0][0] = 1.0; // no controls: the works beat nothing.
        for j in 1..=n {
            for v in 0..=max {
                // The largest value is a work (beating all j controls) or a control.
                let a = if v >= j { table[j][v - j] } else { 0.0 };
                next[j][v] = a + next[j - 1][v];
            }
        }
        table = next;
    }
    let counts = &table[n];
    let total: f64 = counts.iter().sum();
    let upper: f64 = counts.iter().skip(u.min(max + 1)).sum();
    upper / total
}

/// P(U ≥ u) by the normal approximation, variance corrected for ties, continuity-corrected.
fn normal_u_upper(m: usize, n: usize, u: f64, ties: &[usize]) -> f64 {
    let (mf, nf) = (m as f64, n as f64);
    let total = mf + nf;
    let tie_term: f64 = ties.iter().map(|&t| (t as f64).powi(3) - t as f64).sum::<f64>() / (total * (total - 1.0));
    let var = mf * nf / 12.0 * ((total + 1.0) - tie_term);
    if var <= 0.0 {
        return 1.0; // every value tied: no evidence either way.
    }
    let z = (u - mf * nf / 2.0 - 0.5) / var.sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function: the Chebyshev fit of Numerical Recipes' `erfcc` (Press et
/// al., 2nd ed., §6.2), fractional error below 1.2e-7 everywhere.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
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
    #[test]
    fn mann_whitney_exact_by_enumeration_and_normal_by_table() {
        // Works {3, 4} vs controls {1, 2}: U = 4 is the largest of C(4,2) = 6 equally likely
        // arrangements, so P(U ≥ 4) = 1/6.
        let t = mann_whitney(&[3.0, 4.0], &[1.0, 2.0]).unwrap();
        assert_eq!((t.u, t.method), (4.0, SetTestMethod::Exact));
        assert!((t.p_value - 1.0 / 6.0).abs() < 1e-12);
        // {2, 4} vs {1, 3}: U = 3; arrangements with U ≥ 3 are U = 3 and U = 4, 2 of 6.
        let t = mann_whitney(&[2.0, 4.0], &[1.0, 3.0]).unwrap();
        assert!((t.p_value - 2.0 / 6.0).abs() < 1e-12);
        // Exact: 3 works above 5 controls: 1 / C(8,3) = 1/56.
        let t = mann_whitney(&[10.0, 11.0, 12.0], &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert!((t.p_value - 1.0 / 56.0).abs() < 1e-12);
        // Every value tied: no evidence.
        let t = mann_whitney(&[0.0, 0.0], &[0.0, 0.0, 0.0]).unwrap();
        assert_eq!((t.method, t.p_value, t.auc), (SetTestMethod::Normal, 1.0, 0.5));
        // Normal tail: Φ̄(1.959964) = 0.025 (standard table).
        assert!((0.5 * erfc(1.959964 / std::f64::consts::SQRT_2) - 0.025).abs() < 1e-6);
    }
}
