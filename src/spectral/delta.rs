//! ΔW of a loaded module, built from its stored factors: the factored form the spectrum takes
//! (low-rank product, Kronecker product, or a small dense matrix, with Tucker cores folded into
//! the down factor and LoHa's Hadamard product written as a face-splitting product), the dense
//! ΔW for merging and for the kinds that depend on the base weight (DoRA, (IA)³, replacements),
//! and the streamed Gram route for plain LoRA. Formulas and sources: docs/spectrum.md.

use nalgebra::DMatrix;

use crate::error::{Error, Result};
use crate::linalg::{self, Factors};
use crate::load::{Delta, KronPart, LoraModule, TensorRef};

/// ΔW of a module from its stored tensors, implemented for [`LoraModule`]: a trait, so the
/// loader stays free of numerics while call sites still read `module.factors()`.
pub trait DeltaW {
    /// The scaled ΔW in factored form (scale folded in), or `None` when it needs the base or is
    /// not supported. The dense matrix is never formed here.
    fn factors(&self) -> Result<Option<Factors>>;

    /// The dense ΔW `[out, in·kh·kw]`: for tests, merging, and the kinds whose ΔW depends on
    /// the base weight (DoRA, (IA)³, replacements). `base` is the flattened base weight.
    fn dense_delta(&self, base: Option<&DMatrix<f64>>) -> Result<DMatrix<f64>>;

    /// Singular values of a plain LoRA's ΔW straight from the stored factors: Gram matrices
    /// accumulated block by block while decoding (no f64 copy of the factors), Cholesky, and
    /// the SVD of the r×r core. `None` when this route does not apply (Tucker core, DoRA,
    /// other kinds) or is not safe (ill-conditioned or non-finite factors); the caller then
    /// takes `factors()`, which uses Householder QR and reports bad values.
    fn fast_singular_values(&self) -> Option<Vec<f64>>;

    /// The factors of ΔW without its DoRA magnitude rescaling (the LoRA part B·A).
    fn factors_ignoring_magnitude(&self) -> Result<Option<Factors>>;
}

impl DeltaW for LoraModule {
    fn factors(&self) -> Result<Option<Factors>> {
        if self.magnitude.is_some() {
            return Ok(None);
        }
        let (m, n) = self.matrix_shape();
        Ok(Some(match &self.delta {
            Delta::LowRank { up, down, mid, transposed } => {
                let (u, d) = low_rank_pair(up, down, mid.as_ref())?;
                let (mut u, d) = if *transposed { (d, u) } else { (u, d) };
                u.scale_mut(self.scale);
                Factors::LowRank(u, d)
            }
            Delta::Hadamard { w1a, w1b, w2a, w2b, t1, t2 } => {
                let (u1, d1) = hada_pair(w1a, w1b, t1.as_ref())?;
                let (u2, d2) = hada_pair(w2a, w2b, t2.as_ref())?;
                let k = u1.ncols() * u2.ncols();
                if k >= m.min(n) {
                    // The face-splitting factors would be wider than ΔW itself: form ΔW.
                    within_budget(self, m.saturating_mul(n))?;
                    let w = (&u1 * d1.transpose()).component_mul(&(&u2 * d2.transpose())) * self.scale;
                    Factors::Dense(w)
                } else {
                    within_budget(self, k.saturating_mul(m + n))?;
                    if k > MAX_CORE_RANK {
                        return Err(
                            self.error(format!("LoHa rank {k} is above the {MAX_CORE_RANK} lorascope analyses"))
                        );
                    }
                    let mut up = linalg::face_split_rows(&u1, &u2);
                    up.scale_mut(self.scale);
                    Factors::LowRank(up, linalg::face_split_rows(&d1, &d2))
                }
            }
            Delta::Kronecker { w1, w2 } => {
                let a = kron_part(w1)?;
                let b = kron_part(w2)?;
                Factors::Kron(Box::new(a), Box::new(b), self.scale)
            }
            Delta::Diff { diff, .. } => Factors::Dense(diff.matrix(m, n)? * self.scale),
            Delta::Replace { .. } | Delta::Ia3 { .. } | Delta::Unsupported { .. } => return Ok(None),
        }))
    }

    fn dense_delta(&self, base: Option<&DMatrix<f64>>) -> Result<DMatrix<f64>> {
        let (m, n) = self.matrix_shape();
        within_budget(self, m.saturating_mul(n))?;
        let need_base = || {
            base.ok_or_else(|| {
                Error::Usage(format!(
                    "module {}: ΔW of a {} module depends on the base weight; give --base",
                    self.name,
                    self.kind.as_str()
                ))
            })
        };
        if let Some(w) = base {
            if w.shape() != (m, n) {
                return Err(Error::Internal(format!(
                    "module {}: base weight is {}x{}, ΔW is {m}x{n}",
                    self.name,
                    w.nrows(),
                    w.ncols()
                )));
            }
        }
        let plain = match &self.delta {
            Delta::Replace { weight } => weight.matrix(m, n)? - need_base()?,
            Delta::Ia3 { weight, on_input } => {
                let w = need_base()?;
                let v = weight.values()?;
                let axis_len = if *on_input { self.shape.get(1).copied().unwrap_or(0) } else { m };
                if v.len() != axis_len || axis_len == 0 {
                    return Err(weight.err(format!(
                        "has {} values, the weight's {} axis has {axis_len}",
                        v.len(),
                        if *on_input { "input" } else { "output" }
                    )));
                }
                let per_in = n / axis_len;
                let mut d = w.clone();
                for j in 0..n {
                    for i in 0..m {
                        d[(i, j)] *= if *on_input { v[j / per_in] } else { v[i] };
                    }
                }
                d
            }
            Delta::Unsupported { algo, .. } => {
                return Err(self.error(format!("{algo} is recognised but not supported yet")))
            }
            _ => match self.factors_ignoring_magnitude()? {
                Some(f) => f.dense(),
                None => unreachable!("every other kind has factors"),
            },
        };
        match &self.magnitude {
            None => Ok(plain),
            Some(mag) => {
                let w = need_base()?;
                let merged = w + &plain;
                let mvec = mag.tensor.values()?;
                let scaled = linalg::dora_rescale(&merged, &mvec, mag.axis).map_err(|e| mag.tensor.err(e))?;
                Ok(scaled - w)
            }
        }
    }

    fn fast_singular_values(&self) -> Option<Vec<f64>> {
        let Delta::LowRank { up, down, mid: None, .. } = &self.delta else { return None };
        if self.magnitude.is_some() {
            return None;
        }
        let (us, ds) = (up.shape(), down.shape());
        let (m, k, n) = (us[0], ds[0], ds.iter().skip(1).product::<usize>());
        if m < k || n < k || k == 0 {
            return None;
        }
        let (ub, db) = (up.file.raw(&up.name).ok()?, down.file.raw(&down.name).ok()?);
        let (ud, dd) = (up.dtype(), down.dtype());
        let (usz, dsz) = (ud.bitsize() / 8, dd.bitsize() / 8);
        let mut scratch = Vec::new();
        // A block with a value beyond ±MAX_ABS_VALUE (or NaN/Inf) stops this route; the caller's
        // value check then refuses the module.
        let within = |v: &[f64]| v.iter().all(|x| within_abs_limit(*x));
        let g_up = linalg::gram_streamed_rows(m, k, |r0, buf| {
            let start = r0 * k * usz;
            crate::load::tensorfile::decode_into(&ub[start..start + buf.len() * usz], ud, buf, &mut scratch)
                && within(buf)
        })?;
        let g_down = linalg::gram_streamed_cols(k, n, |c0, nc, buf| {
            (0..k).all(|i| {
                let row = &mut buf[i * nc..(i + 1) * nc];
                let start = (i * n + c0) * dsz;
                crate::load::tensorfile::decode_into(&db[start..start + nc * dsz], dd, row, &mut scratch) && within(row)
            })
        })?;
        let (rb, ra) = (linalg::cholesky_upper(g_up)?, linalg::cholesky_upper(g_down)?);
        let core = rb * ra.transpose() * self.scale;
        linalg::svd_dense(&core, false).ok().map(|s| s.values)
    }

    fn factors_ignoring_magnitude(&self) -> Result<Option<Factors>> {
        let mut plain = self.clone();
        plain.magnitude = None;
        plain.factors()
    }
}

/// Refuse analyses whose intermediate matrices would be absurdly large: a hostile file can
/// declare factors whose products are far bigger than the file.
fn within_budget(m: &LoraModule, values: usize) -> Result<()> {
    if values > MAX_WORK_VALUES {
        return Err(m.error(format!("analysing it would need {values} intermediate values (limit {MAX_WORK_VALUES})")));
    }
    Ok(())
}

/// Largest intermediate matrix (in values) an analysis may build: 2²⁵ f64 = 256 MiB, several
/// times what the largest real modules need (an SDXL LoHa at rank 64 builds ≈ 2²⁴).
pub(crate) const MAX_WORK_VALUES: usize = 1 << 25;
/// Largest rank of a factored ΔW (the side of the core matrix whose dense SVD is taken); a
/// LoHa of rank 64 reaches 64² = 4096.
pub(crate) const MAX_CORE_RANK: usize = 4096;

/// Largest magnitude of a stored value, and of a module's scale, that the analysis accepts. A
/// module with a larger one (or a NaN/Inf scale) is refused by `spectrum` and flagged
/// `extreme-values` by `scan` (docs/scan.md). Trained adapters hold values below 10³; f16 cannot
/// exceed 65504. Within ±10¹⁵ no f64 intermediate of the base-free analysis can overflow: the
/// largest, a LoHa's dense ΔW entries scale·(r₁·10³⁰)·(r₂·10³⁰) = 10⁷⁵·r₁r₂, squared and summed
/// over the ≤ 2²⁵ entries MAX_WORK_VALUES allows, stay below 10²⁰⁰ for any r₁·r₂ ≤ 10¹⁸ a file
/// can hold (f64 holds 1.8·10³⁰⁸).
pub(crate) const MAX_ABS_VALUE: f64 = 1e15;

/// Whether `x` is within ±[`MAX_ABS_VALUE`] (false for NaN).
pub(crate) fn within_abs_limit(x: f64) -> bool {
    matches!(x.abs().partial_cmp(&MAX_ABS_VALUE), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal))
}

/// Widest SVD (min(m, n, r₁·r₂)) a LoHa's exact spectrum may take: with r₁·r₂ ≥ min(m, n) ΔW is
/// formed whole, else its face-splitting factors are r₁·r₂ wide; either way the SVD costs
/// O(max(m, n)·width²). 2048 takes a few seconds; a 3.6 MB file asking for width 5792 took
/// 137 CPU-seconds and 0.8 GB. Above it the module's spectrum is not computed and its capacity
/// is the rank bound (route `rank-bound`, with a warning). SDXL LoHa at rank 64 needs 1280.
pub(crate) const MAX_EXACT_SVD_DIM: usize = 2048;

/// For a LoHa whose exact spectrum would need an SVD wider than [`MAX_EXACT_SVD_DIM`]: its
/// r₁·r₂ and the SVD's width min(m, n, r₁·r₂), the largest rank ΔW can have.
pub(crate) fn loha_beyond_exact_svd(m: &LoraModule) -> Option<(usize, usize)> {
    let Delta::Hadamard { w1b, w2b, .. } = &m.delta else { return None };
    let k = w1b.shape().first()?.saturating_mul(*w2b.shape().first()?);
    let (rows, cols) = m.matrix_shape();
    let width = rows.min(cols).min(k);
    (width > MAX_EXACT_SVD_DIM).then_some((k, width))
}

/// up `[out, r]` and downᵀ `[in·kh·kw, r]` of a (possibly Tucker, possibly conv) LoRA.
fn low_rank_pair(up: &TensorRef, down: &TensorRef, mid: Option<&TensorRef>) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let u = up.as_2d()?;
    let dt = down.as_2d_t()?;
    match mid {
        None => Ok((u, dt)),
        Some(t) => Ok((u, tucker_down_t(t, &dt)?)),
    }
}

/// LoHa pair (up, downᵀ): without Tucker, `a` is `[out, r]`; with Tucker core t
/// `[r, r, kh, kw]`, `a` is `[r, out]` and ΔW[p, q, h, w] = Σ_ij t[i,j,h,w]·a[i,p]·b[j,q].
fn hada_pair(a: &TensorRef, b: &TensorRef, t: Option<&TensorRef>) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    match t {
        None => Ok((a.as_2d()?, b.as_2d_t()?)),
        Some(t) => Ok((a.as_2d_t()?, tucker_down_t(t, &b.as_2d_t()?)?)),
    }
}

/// Fold a Tucker core into the (transposed) down factor:
/// out[(q,h,w), i] = Σ_j t[i,j,h,w]·downᵀ[q,j].
fn tucker_down_t(t: &TensorRef, down_t: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    let s = t.shape();
    if s.len() < 2 || s[1] != down_t.ncols() {
        return Err(t.err(format!("Tucker core shape {s:?} does not fit the down factor (rank {})", down_t.ncols())));
    }
    let (r1, r2) = (s[0], s[1]);
    let k: usize = s[2..].iter().product();
    let n_in = down_t.nrows();
    let size = n_in.saturating_mul(k).saturating_mul(r1);
    if size > MAX_WORK_VALUES {
        return Err(t.err(format!("folding this Tucker core would need {size} values (limit {MAX_WORK_VALUES})")));
    }
    let tv = t.values()?;
    let mut out = DMatrix::zeros(n_in * k, r1);
    for i in 0..r1 {
        for j in 0..r2 {
            for hw in 0..k {
                let c = tv[(i * r2 + j) * k + hw];
                if c == 0.0 {
                    continue;
                }
                for q in 0..n_in {
                    out[(q * k + hw, i)] += c * down_t[(q, j)];
                }
            }
        }
    }
    Ok(out)
}

fn kron_part(p: &KronPart) -> Result<Factors> {
    Ok(match p {
        KronPart::Full(t) => Factors::Dense(t.as_2d()?),
        KronPart::Product { a, b, t: None } => Factors::LowRank(a.as_2d()?, b.as_2d_t()?),
        KronPart::Product { a, b, t: Some(t) } => Factors::LowRank(a.as_2d_t()?, tucker_down_t(t, &b.as_2d_t()?)?),
    })
}
