//! SVD of factored matrices. ΔW = s·B·A is never formed: with QR(B) = Q_B R_B and
//! QR(Aᵀ) = Q_A R_A, ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small core gives ΔW's.
//! Cost O((m+n)r²) instead of O(mn·min(m,n)).

use nalgebra::{DMatrix, DVector};

use super::Factors;
use crate::error::{Error, Result};

/// Singular values (descending) and, when asked for, the singular vectors as columns.
#[derive(Debug, Clone)]
pub struct Svd {
    pub values: Vec<f64>,
    pub u: Option<DMatrix<f64>>,
    pub v: Option<DMatrix<f64>>,
}

/// Sort singular triplets by value, descending (nalgebra does not promise an order).
fn sorted(values: DVector<f64>, u: Option<DMatrix<f64>>, v_t: Option<DMatrix<f64>>) -> Svd {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let vals = idx.iter().map(|&i| values[i]).collect();
    let u = u.map(|u| DMatrix::from_fn(u.nrows(), idx.len(), |r, c| u[(r, idx[c])]));
    let v = v_t.map(|vt| DMatrix::from_fn(vt.ncols(), idx.len(), |r, c| vt[(idx[c], r)]));
    Svd { values: vals, u, v }
}

/// Dense SVD (for small cores, small Kronecker factors and tests). Refuses non-finite input
/// and gives up after a bounded number of sweeps: nalgebra's plain `svd` iterates without
/// limit, and values that overflow (a hostile file can store 3e38) would never converge.
pub(crate) fn svd_dense(a: &DMatrix<f64>, vectors: bool) -> Result<Svd> {
    if a.nrows() == 0 || a.ncols() == 0 {
        return Ok(Svd {
            values: vec![],
            u: vectors.then(|| DMatrix::zeros(a.nrows(), 0)),
            v: vectors.then(|| DMatrix::zeros(a.ncols(), 0)),
        });
    }
    if a.iter().any(|x| !x.is_finite()) {
        return Err(Error::Numeric("matrix has values that overflow f64 (or are NaN/Inf)".into()));
    }
    let max_iter = 1000 + 100 * a.nrows().max(a.ncols());
    let s = a
        .clone()
        .try_svd(vectors, vectors, f64::EPSILON, max_iter)
        .ok_or_else(|| Error::Numeric(format!("SVD did not converge in {max_iter} iterations")))?;
    Ok(sorted(s.singular_values, s.u, s.v_t))
}

/// `g = beta·g + XᵀX` for an m×k matrix X read in place through its strides (element (i, j)
/// at `x[i·rs + j·cs]`): one GEMM, no transposed copy. `g` is column-major k×k.
fn xtx_into(g: &mut DMatrix<f64>, x: &[f64], m: usize, k: usize, rs: usize, cs: usize, beta: f64) {
    assert!(g.shape() == (k, k) && (m == 0 || k == 0 || (m - 1) * rs + (k - 1) * cs < x.len()));
    if m == 0 || k == 0 {
        return;
    }
    // SAFETY: the assertion keeps every strided read inside `x`; `g` is k×k and does not
    // alias `x`. Xᵀ is X with its strides swapped.
    unsafe {
        matrixmultiply::dgemm(
            k,
            m,
            k,
            1.0,
            x.as_ptr(),
            cs as isize,
            rs as isize,
            x.as_ptr(),
            rs as isize,
            cs as isize,
            beta,
            g.as_mut_ptr(),
            1,
            k as isize,
        );
    }
}

/// xᵀx of a column-major matrix.
pub(crate) fn gram(x: &DMatrix<f64>) -> DMatrix<f64> {
    let (m, k) = x.shape();
    let mut g = DMatrix::zeros(k, k);
    xtx_into(&mut g, x.as_slice(), m, k, 1, m, 0.0);
    g
}

/// Rows per block when a Gram matrix is accumulated from a streamed factor: small enough for
/// the block to stay in L2, large enough for GEMM to run at speed.
const GRAM_BLOCK: usize = 1024;

/// xᵀx of a row-major `rows × k` matrix decoded block by block by `fill(row0, block)`, which
/// returns false to abandon (non-finite value). Never holds the whole factor in f64.
pub(crate) fn gram_streamed_rows(
    rows: usize,
    k: usize,
    mut fill: impl FnMut(usize, &mut [f64]) -> bool,
) -> Option<DMatrix<f64>> {
    let mut g = DMatrix::zeros(k, k);
    let mut buf = vec![0.0; GRAM_BLOCK * k];
    let mut r0 = 0;
    while r0 < rows {
        let n = GRAM_BLOCK.min(rows - r0);
        if !fill(r0, &mut buf[..n * k]) {
            return None;
        }
        // Row-major n×k block: X = block, strides (k, 1).
        xtx_into(&mut g, &buf[..n * k], n, k, k, 1, 1.0);
        r0 += n;
    }
    Some(g)
}

/// x·xᵀ of a row-major `k × cols` matrix decoded in column blocks by `fill(col0, ncols, block)`
/// (the block row-major `k × ncols`).
pub(crate) fn gram_streamed_cols(
    k: usize,
    cols: usize,
    mut fill: impl FnMut(usize, usize, &mut [f64]) -> bool,
) -> Option<DMatrix<f64>> {
    let mut g = DMatrix::zeros(k, k);
    let mut buf = vec![0.0; GRAM_BLOCK * k];
    let mut c0 = 0;
    while c0 < cols {
        let n = GRAM_BLOCK.min(cols - c0);
        if !fill(c0, n, &mut buf[..n * k]) {
            return None;
        }
        // Row-major k×n block B; the Gram B·Bᵀ is XᵀX with X = Bᵀ (n×k, strides (1, n)).
        xtx_into(&mut g, &buf[..n * k], n, k, 1, n, 1.0);
        c0 += n;
    }
    Some(g)
}

/// Upper-triangular R with RᵀR = g, if g is safely positive definite (see `cholesky_r`).
pub(crate) fn cholesky_upper(g: DMatrix<f64>) -> Option<DMatrix<f64>> {
    let l = g.cholesky()?.unpack();
    let d: Vec<f64> = l.diagonal().iter().map(|v| v.abs()).collect();
    let (lo, hi) = d.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
    (hi > 0.0 && lo >= 1e-3 * hi).then(|| l.transpose())
}

/// The R factor of a thin QR of a tall `x` by Cholesky of its Gram matrix (CholeskyQR):
/// one matrix product instead of Householder sweeps. `None` when the Gram matrix is not
/// safely positive definite (rank-deficient or ill-conditioned `x`): R from Cholesky carries
/// relative error about κ(x)²·ε, so beyond κ ≈ 10³ the caller uses Householder QR instead.
fn cholesky_r(x: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    if x.nrows() < x.ncols() {
        return None;
    }
    cholesky_upper(gram(x))
}

/// SVD of up·down_tᵀ (`up` `[m,k]`, `down_t` `[n,k]`) through QR of the two factors.
/// Singular values alone take CholeskyQR when both factors are well conditioned, Householder
/// QR otherwise; singular vectors always take Householder QR.
pub fn svd_low_rank(up: &DMatrix<f64>, down_t: &DMatrix<f64>, vectors: bool) -> Result<Svd> {
    if !vectors {
        if let (Some(rb), Some(ra)) = (cholesky_r(up), cholesky_r(down_t)) {
            return svd_dense(&(rb * ra.transpose()), false);
        }
    }
    let qr_b = up.clone().qr();
    let qr_a = down_t.clone().qr();
    let core = qr_b.r() * qr_a.r().transpose();
    let s = svd_dense(&core, vectors)?;
    if !vectors {
        return Ok(s);
    }
    let u = qr_b.q() * s.u.expect("asked for vectors");
    let v = qr_a.q() * s.v.expect("asked for vectors");
    Ok(Svd { values: s.values, u: Some(u), v: Some(v) })
}

/// Singular values of scale·kron(A, B): all products σ_i(A)·σ_j(B), times |scale|.
/// Vectors are the Kronecker products of the factors' vectors.
fn svd_kron(a: &Factors, b: &Factors, scale: f64, vectors: bool) -> Result<Svd> {
    let sa = svd_factors(a, vectors)?;
    let sb = svd_factors(b, vectors)?;
    let mut triples: Vec<(f64, usize, usize)> = vec![];
    for (i, x) in sa.values.iter().enumerate() {
        for (j, y) in sb.values.iter().enumerate() {
            triples.push((x * y * scale.abs(), i, j));
        }
    }
    triples.sort_by(|p, q| q.0.total_cmp(&p.0));
    let values = triples.iter().map(|t| t.0).collect();
    if !vectors {
        return Ok(Svd { values, u: None, v: None });
    }
    let kron_cols = |x: &DMatrix<f64>, y: &DMatrix<f64>, sign: f64| {
        let mut out = DMatrix::zeros(x.nrows() * y.nrows(), triples.len());
        for (c, &(_, i, j)) in triples.iter().enumerate() {
            let col = x.column(i).kronecker(&y.column(j)) * sign;
            out.set_column(c, &col);
        }
        out
    };
    let (ua, ub) = (sa.u.unwrap(), sb.u.unwrap());
    let (va, vb) = (sa.v.unwrap(), sb.v.unwrap());
    Ok(Svd { values, u: Some(kron_cols(&ua, &ub, scale.signum())), v: Some(kron_cols(&va, &vb, 1.0)) })
}

/// The SVD of a factored ΔW without forming it.
pub fn svd_factors(f: &Factors, vectors: bool) -> Result<Svd> {
    match f {
        Factors::LowRank(u, d) => svd_low_rank(u, d, vectors),
        Factors::Kron(a, b, s) => svd_kron(a, b, *s, vectors),
        Factors::Dense(m) => svd_dense(m, vectors),
    }
}

/// A linear operator known only through products (x ↦ Ax, x ↦ Aᵀx), for randomized SVD.
pub trait Operator: Sync {
    fn shape(&self) -> (usize, usize);
    fn apply(&self, x: &DMatrix<f64>) -> DMatrix<f64>;
    fn apply_t(&self, x: &DMatrix<f64>) -> DMatrix<f64>;
}

impl Operator for DMatrix<f64> {
    fn shape(&self) -> (usize, usize) {
        self.shape()
    }
    fn apply(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        self * x
    }
    fn apply_t(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        self.tr_mul(x)
    }
}

/// Randomized top-k SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with 5.1): Gaussian sketch
/// with `oversample` extra columns, `power_iters` subspace iterations re-orthonormalised by QR,
/// fixed seed.
pub fn randomized_svd(a: &dyn Operator, k: usize, oversample: usize, power_iters: usize, seed: u64) -> Result<Svd> {
    let (m, n) = a.shape();
    let l = (k + oversample).min(m.min(n));
    let mut rng = crate::rng::Rng::new(seed);
    let omega = DMatrix::from_fn(n, l, |_, _| rng.normal());
    let orth = |y: DMatrix<f64>| y.qr().q();
    let mut q = orth(a.apply(&omega));
    for _ in 0..power_iters {
        let z = orth(a.apply_t(&q));
        q = orth(a.apply(&z));
    }
    // B = Qᵀ A, computed as (Aᵀ Q)ᵀ.
    let b = a.apply_t(&q).transpose();
    let s = svd_dense(&b, true)?;
    let keep = k.min(s.values.len());
    let u = q * s.u.unwrap();
    Ok(Svd {
        values: s.values[..keep].to_vec(),
        u: Some(u.columns(0, keep).into_owned()),
        v: Some(s.v.unwrap().columns(0, keep).into_owned()),
    })
}
