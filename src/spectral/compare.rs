//! Comparison of two adapters' ΔW, module by module, from the stored factors: the cosine
//! ⟨ΔA, ΔB⟩_F / (‖ΔA‖‖ΔB‖) and the principal angles between the top-k left and right singular
//! subspaces (Björck & Golub 1973: the cosines are the singular values of U_kᵀ V_k), their
//! energy-weighted aggregate, and the conclusion `identical` / `derived` / `unrelated` with the
//! thresholds of docs/compare.md. For ΔA = U_a D_aᵀ and ΔB = U_b D_bᵀ the inner product is
//! tr((U_aᵀ U_b)(D_bᵀ D_a)), so low-rank modules are never formed densely.

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::delta::{loha_beyond_exact_svd, DeltaW, MAX_CORE_RANK, MAX_EXACT_SVD_DIM, MAX_WORK_VALUES};
use crate::error::{Error, Result};
use crate::linalg::{svd_dense, svd_factors, Factors, Svd};
use crate::load::{Delta, LoraModule};
use crate::named::closed_set;

/// Largest `--top-k`: no factored ΔW has a rank above the widest core the analysis takes.
pub const MAX_TOP_K: usize = MAX_CORE_RANK;

/// Singular values below this fraction of the largest count as zero (rounding of a product of
/// factors stored in 16 or 32 bits is far above f64 noise, far below any trained direction).
const RANK_TOLERANCE: f64 = 1e-9;

closed_set! {
    /// What `compare` concludes about two adapters (rules: docs/compare.md).
    pub enum Conclusion ("conclusion") {
        /// The same weights: equal tensor data, or every module's stored tensors bit-identical.
        Identical = "identical",
        /// One derived from the other (resized, merged, further trained): ΔW shared far beyond
        /// chance.
        Derived = "derived",
        /// Nothing beyond what independent adapters share by chance.
        Unrelated = "unrelated",
    }
}

closed_set! {
    /// Why a matched pair of modules was not compared.
    pub enum NotCompared ("reason") {
        /// ΔW depends on the base weight (DoRA magnitude, (IA)³, a replacement weight).
        NeedsBase = "needs-base",
        /// A recognised algorithm lorascope does not analyse (OFT, BOFT, GLoRA).
        Unsupported = "unsupported",
        /// The two ΔW have different shapes.
        ShapeMismatch = "shape-mismatch",
        /// The factored SVD would exceed the analysis' size limits.
        TooLarge = "too-large",
        /// NaN/Inf or values beyond MAX_ABS_VALUE, or a numerical failure.
        BadValues = "bad-values",
        /// One ΔW is exactly zero: no direction to compare.
        ZeroDelta = "zero-delta",
        /// Its factors could not be built: a size limit or an unreadable tensor (the message,
        /// naming the file and module, in `detail`).
        Refused = "refused",
    }
}

/// A pair of modules left out of the comparison, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Skip {
    pub reason: NotCompared,
    pub detail: String,
}

impl Skip {
    fn new(reason: NotCompared, detail: impl Into<String>) -> Self {
        Skip { reason, detail: detail.into() }
    }
}

/// Principal angles between the top-k singular subspaces of the two ΔW on one side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subspace {
    /// min(top-k, rank of ΔA, rank of ΔB).
    pub k: usize,
    /// Cosines of the principal angles, descending.
    pub cosines: Vec<f64>,
    /// Mean squared cosine: the share of one k-dimensional subspace inside the other.
    pub overlap: f64,
    /// The overlap two independent random k-dimensional subspaces of this dimension have on
    /// average: k/dim.
    pub chance: f64,
}

/// ΔA against ΔB for one matched module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeltaComparison {
    pub norm_a: f64,
    pub norm_b: f64,
    /// ⟨ΔA, ΔB⟩_F / (‖ΔA‖‖ΔB‖).
    pub cosine: f64,
    /// Standard deviation of that cosine when one ΔW is independent and rotation-invariant:
    /// 1/√(m·n) (a coordinate of a uniform unit vector in m·n dimensions).
    pub cosine_chance: f64,
    /// Numerical ranks of ΔA and ΔB.
    pub rank_a: usize,
    pub rank_b: usize,
    pub left: Subspace,
    pub right: Subspace,
    /// ΔW's matrix shape (rows, columns).
    pub rows: usize,
    pub cols: usize,
}

/// Compare the ΔW of two modules changing the same weight, or say why they cannot be.
pub(crate) fn compare_modules(
    a: &LoraModule,
    b: &LoraModule,
    top_k: usize,
) -> std::result::Result<DeltaComparison, Skip> {
    if a.matrix_shape() != b.matrix_shape() {
        let detail = format!("ΔW is {:?} in A, {:?} in B", a.shape, b.shape);
        return Err(Skip::new(NotCompared::ShapeMismatch, detail));
    }
    compare_factors(&factors_of(a)?, &factors_of(b)?, top_k)
}

/// The factors of a module whose ΔW needs no base, or why there are none.
fn factors_of(m: &LoraModule) -> std::result::Result<Factors, Skip> {
    if m.needs_base() {
        let why = format!("module {}: a {} ΔW depends on the base weight", m.name, m.kind);
        return Err(Skip::new(NotCompared::NeedsBase, why));
    }
    if let Delta::Unsupported { algo, .. } = &m.delta {
        return Err(Skip::new(NotCompared::Unsupported, format!("module {}: {algo} is not analysed", m.name)));
    }
    if let Some((k, width)) = loha_beyond_exact_svd(m) {
        let why =
            format!("module {}: LoHa of rank {k} needs an SVD of width {width} (limit {MAX_EXACT_SVD_DIM})", m.name);
        return Err(Skip::new(NotCompared::TooLarge, why));
    }
    if let Err(e) = super::check_magnitudes(m, &[]) {
        return Err(skip_for(e));
    }
    let f = match m.factors() {
        Ok(Some(f)) => f,
        Ok(None) => return Err(Skip::new(NotCompared::NeedsBase, format!("module {}: no factors", m.name))),
        Err(e) => return Err(skip_for(e)),
    };
    if let Err(e) = super::check_finite(m, &f) {
        return Err(skip_for(e));
    }
    within_limits(&f).map_err(|why| Skip::new(NotCompared::TooLarge, format!("module {}: {why}", m.name)))?;
    Ok(f)
}

fn skip_for(e: Error) -> Skip {
    let reason = if matches!(e, Error::Values { .. }) { NotCompared::BadValues } else { NotCompared::Refused };
    Skip::new(reason, e.to_string())
}

/// The SVD with vectors must stay as small as the spectrum's: a core of at most MAX_CORE_RANK
/// for low-rank factors, at most MAX_EXACT_SVD_DIM wide and MAX_WORK_VALUES in all otherwise.
fn within_limits(f: &Factors) -> std::result::Result<(), String> {
    let (m, n) = f.shape();
    match f {
        Factors::LowRank(u, _) if u.ncols() > MAX_CORE_RANK => {
            Err(format!("rank {} is above the {MAX_CORE_RANK} lorascope analyses", u.ncols()))
        }
        Factors::LowRank(..) => Ok(()),
        _ if m.min(n) > MAX_EXACT_SVD_DIM || m.saturating_mul(n) > MAX_WORK_VALUES => {
            Err(format!("a {m}x{n} ΔW held whole is beyond the comparison's limits"))
        }
        _ => Ok(()),
    }
}

/// Cosine and principal angles of two factored ΔW of the same shape.
pub(crate) fn compare_factors(a: &Factors, b: &Factors, top_k: usize) -> std::result::Result<DeltaComparison, Skip> {
    let numeric = |e: Error| Skip::new(NotCompared::BadValues, e.to_string());
    let sa = svd_factors(a, true).map_err(numeric)?;
    let sb = svd_factors(b, true).map_err(numeric)?;
    let (norm_a, norm_b) = (norm(&sa.values), norm(&sb.values));
    let (rank_a, rank_b) = (numerical_rank(&sa.values), numerical_rank(&sb.values));
    if rank_a == 0 || rank_b == 0 {
        return Err(Skip::new(NotCompared::ZeroDelta, "ΔW is exactly zero in A or B"));
    }
    let ip = inner(a, b).ok_or_else(|| Skip::new(NotCompared::TooLarge, "the inner product needs ΔW held whole"))?;
    let cosine = (ip / (norm_a * norm_b)).clamp(-1.0, 1.0);
    let (rows, cols) = a.shape();
    let k = top_k.min(rank_a).min(rank_b);
    let side = |x: &Svd, y: &Svd, left: bool| -> std::result::Result<Subspace, Skip> {
        let (p, q) = if left { (x.u.as_ref(), y.u.as_ref()) } else { (x.v.as_ref(), y.v.as_ref()) };
        let (p, q) = p.zip(q).ok_or_else(|| Skip::new(NotCompared::BadValues, "no singular vectors"))?;
        principal(p, q, k).map_err(numeric)
    };
    let (left, right) = (side(&sa, &sb, true)?, side(&sa, &sb, false)?);
    let out = DeltaComparison {
        norm_a,
        norm_b,
        cosine,
        cosine_chance: 1.0 / ((rows as f64) * (cols as f64)).sqrt(),
        rank_a,
        rank_b,
        left,
        right,
        rows,
        cols,
    };
    let finite =
        [out.norm_a, out.norm_b, out.cosine, out.left.overlap, out.right.overlap].iter().all(|x| x.is_finite());
    if !finite {
        return Err(Skip::new(NotCompared::BadValues, "the comparison overflowed f64"));
    }
    Ok(out)
}

fn norm(values: &[f64]) -> f64 {
    values.iter().map(|s| s * s).sum::<f64>().sqrt()
}

fn numerical_rank(values: &[f64]) -> usize {
    let top = values.first().copied().unwrap_or(0.0);
    values.iter().filter(|&&s| top > 0.0 && s > top * RANK_TOLERANCE).count()
}

/// Principal angles between span(p[:, ..k]) and span(q[:, ..k]), both orthonormal columns.
fn principal(p: &DMatrix<f64>, q: &DMatrix<f64>, k: usize) -> Result<Subspace> {
    let dim = p.nrows();
    let m = p.columns(0, k).tr_mul(&q.columns(0, k));
    // Rounding can leave a cosine a hair above 1.
    let cosines: Vec<f64> = svd_dense(&m, false)?.values.into_iter().map(|c| c.min(1.0)).collect();
    let overlap = cosines.iter().map(|c| c * c).sum::<f64>() / k.max(1) as f64;
    Ok(Subspace { k, cosines, overlap, chance: k as f64 / dim.max(1) as f64 })
}

/// ⟨A, B⟩_F from the factors; `None` when it would need a dense matrix above MAX_WORK_VALUES.
fn inner(a: &Factors, b: &Factors) -> Option<f64> {
    match (a, b) {
        // tr((U_aᵀ U_b)(D_bᵀ D_a)) = Σ_ij (U_aᵀU_b)_ij (D_aᵀD_b)_ij: two r_a×r_b products.
        (Factors::LowRank(ua, da), Factors::LowRank(ub, db)) => Some(ua.tr_mul(ub).component_mul(&da.tr_mul(db)).sum()),
        // ⟨s·kron(A1, B1), t·kron(A2, B2)⟩ = s·t·⟨A1, A2⟩·⟨B1, B2⟩ when the parts have equal shapes.
        (Factors::Kron(a1, b1, s), Factors::Kron(a2, b2, t))
            if a1.shape() == a2.shape() && b1.shape() == b2.shape() =>
        {
            Some(s * t * inner(a1, a2)? * inner(b1, b2)?)
        }
        // ⟨X, U Dᵀ⟩ = Σ U ⊙ (X D): one m×r product.
        (Factors::Dense(x), Factors::LowRank(u, d)) | (Factors::LowRank(u, d), Factors::Dense(x)) => {
            Some(u.component_mul(&(x * d)).sum())
        }
        _ => {
            let (m, n) = a.shape();
            (m.saturating_mul(n) <= MAX_WORK_VALUES).then(|| a.dense().component_mul(&b.dense()).sum())
        }
    }
}

/// The comparison over all compared modules: the cosine of the two adapters as one vector (the
/// per-module cosines weighted by ‖ΔA_i‖‖ΔB_i‖), its chance level, and the energy-weighted
/// subspace overlaps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Aggregate {
    pub modules_compared: usize,
    /// Σ⟨ΔA_i, ΔB_i⟩ / √(Σ‖ΔA_i‖² · Σ‖ΔB_i‖²).
    pub cosine: Option<f64>,
    /// Its standard deviation for independent adapters:
    /// √(Σ ‖ΔA_i‖²‖ΔB_i‖²/(m_i n_i)) / √(Σ‖ΔA_i‖² · Σ‖ΔB_i‖²).
    pub cosine_chance: Option<f64>,
    /// |cosine| / cosine_chance: how many standard deviations above chance.
    pub cosine_z: Option<f64>,
    /// Energy-weighted (‖ΔA_i‖‖ΔB_i‖) mean overlap of the left and right subspaces, and the same
    /// mean of their chance levels.
    pub left_overlap: Option<f64>,
    pub left_chance: Option<f64>,
    pub right_overlap: Option<f64>,
    pub right_chance: Option<f64>,
}

pub(crate) fn aggregate(items: &[&DeltaComparison]) -> Aggregate {
    let sum = |f: &dyn Fn(&DeltaComparison) -> f64| items.iter().map(|d| f(d)).sum::<f64>();
    let (ea, eb) = (sum(&|d| d.norm_a * d.norm_a), sum(&|d| d.norm_b * d.norm_b));
    let denom = (ea * eb).sqrt();
    let weight = sum(&|d| d.norm_a * d.norm_b);
    let ok = |x: f64| x.is_finite().then_some(x);
    let usable = !items.is_empty() && denom > 0.0 && weight > 0.0;
    let by_energy = |f: &dyn Fn(&DeltaComparison) -> f64| {
        usable.then(|| sum(&|d| d.norm_a * d.norm_b * f(d)) / weight).and_then(ok)
    };
    let cosine = usable.then(|| (sum(&|d| d.norm_a * d.norm_b * d.cosine) / denom).clamp(-1.0, 1.0)).and_then(ok);
    let chance = usable
        .then(|| sum(&|d| (d.norm_a * d.norm_b).powi(2) / (d.rows as f64 * d.cols as f64)).sqrt() / denom)
        .and_then(ok);
    let z = cosine.zip(chance).and_then(|(c, s)| (s > 0.0).then(|| c.abs() / s)).and_then(ok);
    Aggregate {
        modules_compared: items.len(),
        cosine,
        cosine_chance: chance,
        cosine_z: z,
        left_overlap: by_energy(&|d| d.left.overlap),
        left_chance: by_energy(&|d| d.left.chance),
        right_overlap: by_energy(&|d| d.right.overlap),
        right_chance: by_energy(&|d| d.right.chance),
    }
}

/// The thresholds of the conclusion (reasons: docs/compare.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompareThresholds {
    /// `derived` by the cosine: |aggregate cosine| at least this (a quarter of either
    /// adapter's energy lies along the other)...
    pub min_cosine: f64,
    /// ...and at least this many chance standard deviations above zero.
    pub min_cosine_z: f64,
    /// `derived` by the subspaces: left and right energy-weighted overlaps at least this...
    pub min_overlap: f64,
    /// ...where chance alone would give at most this.
    pub max_overlap_chance: f64,
}

impl Default for CompareThresholds {
    fn default() -> Self {
        CompareThresholds { min_cosine: 0.5, min_cosine_z: 6.0, min_overlap: 0.8, max_overlap_chance: 0.25 }
    }
}

/// The conclusion and the evidence lines behind it. `identical` comes from the tensor bytes
/// (the caller's check); the rest from the aggregate.
pub(crate) fn conclude(
    identical: Option<String>,
    agg: &Aggregate,
    th: &CompareThresholds,
) -> (Conclusion, Vec<String>) {
    if let Some(why) = identical {
        return (Conclusion::Identical, vec![why]);
    }
    let mut why = vec![];
    let by_cosine = match (agg.cosine, agg.cosine_z) {
        (Some(c), Some(z)) => {
            let hit = c.abs() >= th.min_cosine && z >= th.min_cosine_z;
            why.push(format!(
                "aggregate cosine {c:.4} ({z:.1} chance standard deviations); derived needs |cosine| ≥ {} and ≥ {} \
                 standard deviations",
                th.min_cosine, th.min_cosine_z
            ));
            hit
        }
        _ => {
            why.push("no module could be compared (none in common, or none comparable without the base)".to_string());
            false
        }
    };
    let by_subspace = match (agg.left_overlap, agg.left_chance, agg.right_overlap, agg.right_chance) {
        (Some(lo), Some(lc), Some(ro), Some(rc)) => {
            why.push(format!(
                "top-k subspace overlap left {lo:.3} (chance {lc:.3}), right {ro:.3} (chance {rc:.3}); derived needs \
                 both ≥ {} with chance ≤ {}",
                th.min_overlap, th.max_overlap_chance
            ));
            lo.min(ro) >= th.min_overlap && lc.max(rc) <= th.max_overlap_chance
        }
        _ => false,
    };
    (if by_cosine || by_subspace { Conclusion::Derived } else { Conclusion::Unrelated }, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, r: usize, c: usize) -> DMatrix<f64> {
        DMatrix::from_fn(r, c, |_, _| rng.normal())
    }

    #[test]
    fn factored_inner_product_matches_the_dense_one() {
        let mut rng = Rng::new(7);
        let (ua, da, ub, db) =
            (random(&mut rng, 9, 3), random(&mut rng, 7, 3), random(&mut rng, 9, 2), random(&mut rng, 7, 2));
        let (a, b) = (Factors::LowRank(ua, da), Factors::LowRank(ub, db));
        let dense = a.dense().component_mul(&b.dense()).sum();
        assert!((inner(&a, &b).unwrap() - dense).abs() < 1e-10 * dense.abs().max(1.0));
        let mixed = inner(&Factors::Dense(a.dense()), &b).unwrap();
        assert!((mixed - dense).abs() < 1e-10 * dense.abs().max(1.0));
    }

    #[test]
    fn a_matrix_against_itself_has_cosine_one_and_full_overlap() {
        let mut rng = Rng::new(8);
        let a = Factors::LowRank(random(&mut rng, 20, 4), random(&mut rng, 12, 4));
        let c = compare_factors(&a, &a, 8).unwrap();
        assert!((c.cosine - 1.0).abs() < 1e-12);
        assert_eq!((c.left.k, c.rank_a), (4, 4));
        assert!((c.left.overlap - 1.0).abs() < 1e-9 && (c.right.overlap - 1.0).abs() < 1e-9);
        assert!((c.left.chance - 4.0 / 20.0).abs() < 1e-15);
    }

    #[test]
    fn a_zero_delta_is_not_compared() {
        let a = Factors::LowRank(DMatrix::zeros(5, 2), DMatrix::zeros(4, 2));
        assert_eq!(compare_factors(&a, &a, 4).unwrap_err().reason, NotCompared::ZeroDelta);
    }
}
