//! Scalar summaries of a singular-value spectrum.

/// ‖ΔW‖_F = sqrt(Σσ²).
pub fn fro(s: &[f64]) -> f64 {
    s.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Σσ² / σ₁² (numerical or stable rank); 0 for a zero matrix.
pub fn stable_rank(s: &[f64]) -> f64 {
    match s.first() {
        Some(&s1) if s1 > 0.0 => s.iter().map(|x| x * x).sum::<f64>() / (s1 * s1),
        _ => 0.0,
    }
}

/// exp(H(p)) with pᵢ = σᵢ/Σσ (Roy & Vetterli 2007); 0 for a zero matrix.
pub fn effective_rank(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| {
            let p = x / total;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Smallest k with Σ_{i≤k} σᵢ² ≥ share · `total_energy` (pass Σσ² over the full spectrum; a
/// truncated spectrum may not reach it, giving `None`).
pub fn rank_for_energy(s: &[f64], share: f64, total_energy: f64) -> Option<usize> {
    if total_energy <= 0.0 {
        return Some(0);
    }
    let target = share * total_energy;
    let mut acc = 0.0;
    for (i, x) in s.iter().enumerate() {
        acc += x * x;
        // Relative slack so that a spectrum whose energy is exactly the target counts.
        if acc >= target * (1.0 - 1e-12) {
            return Some(i + 1);
        }
    }
    None
}

/// Degrees of freedom of an m×n matrix of rank k: k(m + n − k). This equals m·n at full rank,
/// where k(m+n) would count more values than the matrix has.
pub fn rank_k_params(k: usize, m: usize, n: usize) -> usize {
    let k = k.min(m.min(n));
    k * (m + n - k)
}
