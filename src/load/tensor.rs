//! A tensor inside a memory-mapped adapter file, read on demand.

use std::sync::Arc;

use nalgebra::DMatrix;
use safetensors::Dtype;

use super::tensorfile::{dtype_name, FloatStats, TensorFile};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct TensorRef {
    pub file: Arc<TensorFile>,
    pub name: String,
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorRef({})", self.name)
    }
}

impl TensorRef {
    pub(crate) fn new(file: &Arc<TensorFile>, name: &str) -> Self {
        TensorRef { file: file.clone(), name: name.to_string() }
    }
    pub(crate) fn shape(&self) -> &[usize] {
        &self.file.tensors[&self.name].shape
    }
    pub(crate) fn dtype(&self) -> Dtype {
        self.file.tensors[&self.name].dtype
    }
    pub(crate) fn dtype_name(&self) -> String {
        dtype_name(self.dtype())
    }
    pub(crate) fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    /// NaN/Inf count, whether all are zero, and the count of finite values beyond ±`limit`,
    /// without converting the values.
    pub(crate) fn float_stats(&self, limit: f64) -> Result<FloatStats> {
        super::tensorfile::float_stats(self.file.raw(&self.name)?, self.dtype(), limit)
            .ok_or_else(|| self.err(format!("has dtype {}, not a float type", self.dtype_name())))
    }
    /// Sums over the finite values, for the value statistics.
    pub(crate) fn value_sums(&self) -> Result<super::tensorfile::ValueSums> {
        super::tensorfile::ValueSums::of(self.file.raw(&self.name)?, self.dtype())
            .ok_or_else(|| self.err(format!("has dtype {}, not a float type", self.dtype_name())))
    }
    pub(crate) fn values(&self) -> Result<Vec<f64>> {
        self.file.read_f64(&self.name)
    }
    /// Row-major data viewed as `[shape[0], prod(shape[1..])]`.
    pub(crate) fn as_2d(&self) -> Result<DMatrix<f64>> {
        let (rows, cols) = self.dims_2d();
        self.matrix(rows, cols)
    }
    /// `[shape[0], prod(shape[1..])]`.
    fn dims_2d(&self) -> (usize, usize) {
        let s = self.shape();
        (s.first().copied().unwrap_or(1), s.iter().skip(1).product())
    }
    /// The values, checked to fill a rows×cols matrix.
    fn values_for(&self, rows: usize, cols: usize) -> Result<Vec<f64>> {
        let v = self.values()?;
        if v.len() != rows * cols {
            return Err(self.err(format!("has {} values, expected {rows}x{cols}", v.len())));
        }
        Ok(v)
    }
    /// The transpose of `as_2d`, `[prod(shape[1..]), shape[0]]`: row-major data read as
    /// column-major, so no copy.
    pub(crate) fn as_2d_t(&self) -> Result<DMatrix<f64>> {
        let (rows, cols) = self.dims_2d();
        Ok(DMatrix::from_vec(cols, rows, self.values_for(rows, cols)?))
    }
    pub(crate) fn matrix(&self, rows: usize, cols: usize) -> Result<DMatrix<f64>> {
        Ok(DMatrix::from_row_slice(rows, cols, &self.values_for(rows, cols)?))
    }
    /// A scalar stored as a 0-d or 1-element tensor (kohya `.alpha`).
    pub(crate) fn scalar(&self) -> Result<f64> {
        let v = self.values()?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(self.err(format!("should be a scalar but has {} values", v.len()))),
        }
    }
    pub(crate) fn err(&self, reason: impl AsRef<str>) -> Error {
        Error::input(&self.file.path, format!("tensor {} {}", self.name, reason.as_ref()))
    }
}
