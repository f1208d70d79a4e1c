//! SVD of factored matrices. ΔW = s·B·A is never formed: with QR(B) = Q_B R_B and
//! QR(Aᵀ) = Q_A R_A, ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small core gives ΔW's.
//! Cost O((m+n)r²) instead of O(mn·min(m,n)).

use nalgebra::{DMatrix, DVector};

use super::Factors;

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

/// Dense SVD (for small cores, small Kronecker factors and tests).
pub fn svd_dense(a: &DMatrix<f64>, vectors: bool) -> Svd {
    if a.nrows() == 0 || a.ncols() == 0 {
        return Svd {
            values: vec![],
            u: vectors.then(|| DMatrix::zeros(a.nrows(), 0)),
            v: vectors.then(|| DMatrix::zeros(a.ncols(), 0)),
        };
    }
    let s = a.clone().svd(vectors, vectors);
    sorted(s.singular_values, s.u, s.v_t)
}

/// SVD of up·down (`up` `[m,k]`, `down` `[k,n]`) through QR of the factors.
pub fn svd_low_rank(up: &DMatrix<f64>, down: &DMatrix<f64>, vectors: bool) -> Svd {
    let qr_b = up.clone().qr();
    let qr_a = down.transpose().qr();
    let core = qr_b.r() * qr_a.r().transpose();
    let s = svd_dense(&core, vectors);
    if !vectors {
        return s;
    }
    let u = qr_b.q() * s.u.expect("asked for vectors");
    let v = qr_a.q() * s.v.expect("asked for vectors");
    Svd { values: s.values, u: Some(u), v: Some(v) }
}

/// Singular values of scale·kron(A, B): all products σ_i(A)·σ_j(B), times |scale|.
/// Vectors are the Kronecker products of the factors' vectors.
fn svd_kron(a: &Factors, b: &Factors, scale: f64, vectors: bool) -> Svd {
    let sa = svd_factors(a, vectors);
    let sb = svd_factors(b, vectors);
    let mut triples: Vec<(f64, usize, usize)> = vec![];
    for (i, x) in sa.values.iter().enumerate() {
        for (j, y) in sb.values.iter().enumerate() {
            triples.push((x * y * scale.abs(), i, j));
        }
    }
    triples.sort_by(|p, q| q.0.total_cmp(&p.0));
    let values = triples.iter().map(|t| t.0).collect();
    if !vectors {
        return Svd { values, u: None, v: None };
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
    Svd { values, u: Some(kron_cols(&ua, &ub, scale.signum())), v: Some(kron_cols(&va, &vb, 1.0)) }
}

/// The SVD of a factored ΔW without forming it.
pub fn svd_factors(f: &Factors, vectors: bool) -> Svd {
    match f {
        Factors::LowRank(u, d) => svd_low_rank(u, d, vectors),
        Factors::Kron(a, b, s) => svd_kron(a, b, *s, vectors),
        Factors::Dense(m) => svd_dense(m, vectors),
    }
}

/// A linear operator known only through products (x ↦ Ax, x ↦ Aᵀx): a base weight, or
/// W + B·A without forming the sum.
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

/// W + up·down, applied without forming the sum.
pub struct PlusLowRank<'a> {
    pub w: &'a DMatrix<f64>,
    pub up: &'a DMatrix<f64>,
    pub down: &'a DMatrix<f64>,
}

impl Operator for PlusLowRank<'_> {
    fn shape(&self) -> (usize, usize) {
        self.w.shape()
    }
    fn apply(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        self.w * x + self.up * (self.down * x)
    }
    fn apply_t(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        self.w.tr_mul(x) + self.down.tr_mul(&self.up.tr_mul(x))
    }
}

/// Randomized top-k SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with 5.1): Gaussian sketch
/// with `oversample` extra columns, `power_iters` subspace iterations re-orthonormalised by QR,
/// fixed seed.
pub fn randomized_svd(a: &dyn Operator, k: usize, oversample: usize, power_iters: usize, seed: u64) -> Svd {
    let (m, n) = a.shape();
    let l = (k + oversample).min(m.min(n));
    let mut rng = crate::fixtures::Rng::new(seed);
    let omega = DMatrix::from_fn(n, l, |_, _| rng.normal());
    let orth = |y: DMatrix<f64>| y.qr().q();
    let mut q = orth(a.apply(&omega));
    for _ in 0..power_iters {
        let z = orth(a.apply_t(&q));
        q = orth(a.apply(&z));
    }
    // B = Qᵀ A, computed as (Aᵀ Q)ᵀ.
    let b = a.apply_t(&q).transpose();
    let s = svd_dense(&b, true);
    let keep = k.min(s.values.len());
    let u = q * s.u.unwrap();
    Svd {
        values: s.values[..keep].to_vec(),
        u: Some(u.columns(0, keep).into_owned()),
        v: Some(s.v.unwrap().columns(0, keep).into_owned()),
    }
}
