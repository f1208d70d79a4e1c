//! A weight matrix `[out, in]` kept as the base stores it, and the product `x·Wᵀ` on it: f32;
//! bf16/f16 (16-bit safetensors or GGUF F16/BF16 tensors), widened to f32 as it is read; or
//! GGUF quantised blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K… anything candle's `QTensor`
//! holds), multiplied by candle's quantised matmul (`QMatMul`, which quantises the activations
//! to the blocks' dot-product type as llama.cpp does). An 8B base thus costs what its file does
//! instead of 32 GB of f32 (issue #13).
//!
//! Every product goes through here, for the base and for the model with an adapter alike, so the
//! probe's gain compares like with like; the adapter's own terms run in f32 beside it (llama.rs).

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::{gemv, CResult};

/// How a weight is held.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32 `[out, in]`.
    F32(Tensor),
    /// bf16 or f16 `[out, in]`.
    Half(Tensor),
    /// Quantised blocks, rows of `in` values each.
    Quant(Arc<QTensor>),
}

/// Rows of x above which a 16-bit weight is widened to f32 whole for candle's matmul (its CPU
/// matmul has no bf16 kernel); at or below it, gemv.rs widens each row as it reads it.
const HALF_FEW_ROWS: usize = gemv::MAX_ROWS;

/// Rows of x above which a quantised weight is decoded to f32, a block of its rows at a time,
/// for candle's f32 matmul. candle's quantised CPU matmul pays per row of x: on the SmolLM2
/// demo, scoring (hundreds of rows) took 78 s through it and 5 s decoded, and decoding steps of
/// 13 continuations 84 s and 21 s. At a few rows (a 7B model's continuations, 3 rows a batch)
/// reading the compact blocks once beats writing them out as f32, and the quantised kernel stays.
const QUANT_FEW_ROWS: usize = 4;

/// Most bytes of one decoded block of a quantised weight's rows (f32).
const DECODED_BLOCK_BYTES: usize = 64 << 20;

impl Weight {
    /// `[out, in]`.
    pub fn dims(&self) -> CResult<(usize, usize)> {
        match self {
            Weight::F32(t) | Weight::Half(t) => t.dims2(),
            Weight::Quant(q) => q.shape().dims2(),
        }
    }

    /// The stored type in GGUF/safetensors terms (`f32`, `bf16`, `q4_0`…).
    pub fn stored(&self) -> String {
        match self {
            Weight::F32(_) => "f32".into(),
            Weight::Half(t) => format!("{:?}", t.dtype()).to_ascii_lowercase(),
            Weight::Quant(q) => format!("{:?}", q.dtype()).to_ascii_lowercase(),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(t) | Weight::Half(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_size_in_bytes(),
        }
    }

    /// `x` `[rows, in]` (f32) · Wᵀ → `[rows, out]` f32.
    pub fn matmul_t(&self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Weight::F32(w) => gemv::matmul_t(x, w),
            Weight::Half(w) => {
                if x.dim(0)? <= HALF_FEW_ROWS && !x.track_op() && w.is_contiguous() && w.device().is_cpu() {
                    gemv::few_rows_half(x, w)
                } else {
                    // One matrix widened at a time, dropped after the product.
                    x.matmul(&w.to_dtype(DType::F32)?.t()?)
                }
            }
            Weight::Quant(q) => {
                if x.dim(0)? > QUANT_FEW_ROWS && !x.track_op() {
                    decoded_product(q, x)
                } else {
                    QMatMul::QTensor(q.clone()).forward(&x.contiguous()?)
                }
            }
        }
    }

    /// The whole matrix as f32 (a copy for 16-bit and quantised weights: for merging one matrix
    /// and for tests, never for the whole model at once).
    pub fn to_f32(&self) -> CResult<Tensor> {
        match self {
            Weight::F32(t) => Ok(t.clone()),
            Weight::Half(t) => t.to_dtype(DType::F32),
            Weight::Quant(q) => q.dequantize(&Device::Cpu),
        }
    }

    /// Rows `ids` as f32 `[ids.len(), in]` (an embedding lookup). Quantised rows are decoded one
    /// at a time from their own blocks.
    pub fn rows(&self, ids: &[u32]) -> CResult<Tensor> {
        let (out, cols) = self.dims()?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= out) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {out}");
        }
        match self {
            Weight::F32(t) | Weight::Half(t) => {
                let idx = Tensor::new(ids, t.device())?;
                t.index_select(&idx, 0)?.to_dtype(DType::F32)
            }
            Weight::Quant(q) => {
                let dtype = q.dtype();
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let mut values = Vec::with_capacity(ids.len() * cols);
                for &i in ids {
                    let raw = &data[i as usize * row_bytes..(i as usize + 1) * row_bytes];
                    let row = qtensor_from_ggml(dtype, raw, vec![cols], &Device::Cpu)?;
                    values.extend(row.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
                }
                Tensor::from_vec(values, (ids.len(), cols), &Device::Cpu)
            }
        }
    }
}

/// `x·Wᵀ` for a quantised W decoded to f32 in blocks of rows of at most [`DECODED_BLOCK_BYTES`]
/// (the weights exactly as stored, activations unrounded: what transformers computes on a GGUF
/// it has dequantised), each block dropped after its product.
fn decoded_product(q: &QTensor, x: &Tensor) -> CResult<Tensor> {
    let (out, cols) = q.shape().dims2()?;
    let x = x.contiguous()?;
    let block = (DECODED_BLOCK_BYTES / (4 * cols).max(1)).clamp(1, out.max(1));
    // Rows are whole blocks in any 2-D QTensor; were they not, the matrix is decoded whole.
    let rb = match row_bytes(q.dtype(), cols) {
        Some(rb) if block < out => rb,
        _ => return x.matmul(&q.dequantize(&Device::Cpu)?.t()?),
    };
    let data = q.data()?;
    let mut parts = Vec::with_capacity(out.div_ceil(block));
    for r0 in (0..out).step_by(block) {
        let n = block.min(out - r0);
        let w = qtensor_from_ggml(q.dtype(), &data[r0 * rb..(r0 + n) * rb], vec![n, cols], &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        parts.push(x.matmul(&w.t()?)?);
    }
    Tensor::cat(&parts, 1)
}

/// Bytes of one row of `cols` values in `dtype`, or `None` when the row is not whole blocks.
pub(crate) fn row_bytes(dtype: GgmlDType, cols: usize) -> Option<usize> {
    cols.is_multiple_of(dtype.block_size()).then(|| cols / dtype.block_size() * dtype.type_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn half_products_match_the_widened_f32_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 64), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let h = w.to_dtype(dtype).unwrap();
            let wide = h.to_dtype(DType::F32).unwrap();
            for rows in [1, 5, 40] {
                let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
                let got = Weight::Half(h.clone()).matmul_t(&x).unwrap();
                let want = x.matmul(&wide.t().unwrap()).unwrap();
                assert!(max_diff(&got, &want) < 1e-3, "{dtype:?} rows {rows}");
            }
        }
    }

    #[test]
    fn many_rows_multiply_the_decoded_weights_in_blocks() {
        let dev = Device::Cpu;
        // 40 000 × 512 f32 is 78 MiB: two decoded blocks of at most 64 MiB.
        let w = Tensor::randn(0f32, 1.0, (40_000, 512), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let x = Tensor::randn(0f32, 1.0, (QUANT_FEW_ROWS + 1, 512), &dev).unwrap();
        let got = Weight::Quant(q.clone()).matmul_t(&x).unwrap();
        let want = x.matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
        // Few rows go through the quantised kernel (activations rounded to Q8): close, not equal.
        let few = x.narrow(0, 0, 2).unwrap();
        let k = Weight::Quant(q).matmul_t(&few).unwrap();
        let d = max_diff(&k, &want.narrow(0, 0, 2).unwrap());
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0 && d < 0.02 * scale, "{d} of {scale}");
    }

    #[test]
    fn quantised_rows_decode_as_the_whole_matrix_does() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (10, 64), &dev).unwrap();
        let q = Weight::Quant(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()));
        let whole = q.to_f32().unwrap();
        let picked = q.rows(&[7, 0, 7]).unwrap();
        let want = whole.index_select(&Tensor::new(&[7u32, 0, 7], &dev).unwrap(), 0).unwrap();
        assert_eq!(max_diff(&picked, &want), 0.0);
        assert!(q.rows(&[10]).is_err());
    }
}
