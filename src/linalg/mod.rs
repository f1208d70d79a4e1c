//! Linear algebra on factored deltas: ΔW is kept as factors (low-rank product, Kronecker
//! product, or a small dense matrix) and its spectrum is computed from them.

use nalgebra::DMatrix;

use serde::{Deserialize, Serialize};

mod svd;
pub use svd::*;

/// A scaled ΔW in factored form.
#[derive(Debug, Clone)]
pub enum Factors {
    /// up `[m, k]` · down_tᵀ, with down_t `[n, k]` (scale already folded into `up`). Both
    /// factors are tall, so their QR or Gram needs no transposition of a wide matrix.
    LowRank(DMatrix<f64>, DMatrix<f64>),
    /// scale · kron(a, b).
    Kron(Box<Factors>, Box<Factors>, f64),
    /// A dense matrix.
    Dense(DMatrix<f64>),
}

impl Factors {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Factors::LowRank(u, dt) => (u.nrows(), dt.nrows()),
            Factors::Kron(a, b, _) => {
                let (p, q) = a.shape();
                let (r, s) = b.shape();
                (p * r, q * s)
            }
            Factors::Dense(d) => d.shape(),
        }
    }

    /// Form the dense matrix (tests, merging; never on the spectrum path).
    pub(crate) fn dense(&self) -> DMatrix<f64> {
        match self {
            Factors::LowRank(u, dt) => u * dt.transpose(),
            Factors::Kron(a, b, s) => a.dense().kronecker(&b.dense()) * *s,
            Factors::Dense(d) => d.clone(),
        }
    }
}

/// Row-wise Kronecker (face-splitting) product: row i of the result is kron(a[i,:], b[i,:]).
/// (A1·B1ᵀ) ⊙ (A2·B2ᵀ) = face_split_rows(A1, A2) · face_split_rows(B1, B2)ᵀ, so a Hadamard
/// product of two low-rank products is a low-rank product of rank ≤ r1·r2.
pub(crate) fn face_split_rows(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    assert_eq!(a.nrows(), b.nrows());
    let (ka, kb) = (a.ncols(), b.ncols());
    DMatrix::from_fn(a.nrows(), ka * kb, |i, c| a[(i, c / kb)] * b[(i, c % kb)])
}

/// The axis a weight-norm is taken along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormAxis {
    /// One norm per output row (PEFT DoRA, LyCORIS `wd_on_out`).
    Row,
    /// One norm per input column (ComfyUI / early LyCORIS `dora_scale`).
    Column,
}

/// DoRA: scale `w` so that its norm along `axis` equals the magnitude vector `m`.
pub(crate) fn dora_rescale(w: &DMatrix<f64>, m: &[f64], axis: NormAxis) -> std::result::Result<DMatrix<f64>, String> {
    let mut out = w.clone();
    match axis {
        NormAxis::Row => {
            if m.len() != w.nrows() {
                return Err(format!("has {} values, the weight has {} output rows", m.len(), w.nrows()));
            }
            for i in 0..w.nrows() {
                let norm = w.row(i).norm();
                let f = if norm > 0.0 { m[i] / norm } else { 0.0 };
                out.row_mut(i).scale_mut(f);
            }
        }
        NormAxis::Column => {
            // Conv weights are flattened [out, in·k]; the norm is per input channel, over all
            // outputs and kernel positions.
            if m.is_empty() || !w.ncols().is_multiple_of(m.len()) {
                return Err(format!("has {} values, the weight has {} input columns", m.len(), w.ncols()));
            }
            let per = w.ncols() / m.len();
            for c in 0..m.len() {
                let block = w.columns(c * per, per);
                let norm = block.norm();
                let f = if norm > 0.0 { m[c] / norm } else { 0.0 };
                out.columns_mut(c * per, per).scale_mut(f);
            }
        }
    }
    Ok(out)
}
