//! y = x·Wᵀ for a few rows of x (greedy decoding: one row per sequence). candle's matmul packs
//! W before every product, which for a handful of rows costs more than the product itself;
//! here each row of W is read once and dotted with every row of x, in parallel over W's rows.
//! The result is the same sum in another order (f32 rounding differs in the last bits). A bf16
//! or f16 W is widened row by row as it is read (`few_rows_half`).

use candle_core::Tensor;
use rayon::prelude::*;

use super::{with_f32, CResult};

/// Rows of x at or below which the few-row path is used.
pub(crate) const MAX_ROWS: usize = 16;

/// `x` `[rows, in]` · `w`ᵀ (`w` `[out, in]`) → `[rows, out]`. Few rows on the CPU take the path
/// below, but only where nothing upstream needs gradients (it has no backward pass); everything
/// else goes to candle's matmul.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if x.dim(0)? <= MAX_ROWS && !x.track_op() && w.is_contiguous() && w.device().is_cpu() {
        few_rows(x, w)
    } else {
        x.matmul(&w.t()?)
    }
}

/// The few-row product; `w` contiguous f32 on the CPU.
fn few_rows(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    if inp != w_in {
        candle_core::bail!("matmul_t: x has {inp} columns, w has {w_in}");
    }
    let x = x.contiguous()?;
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    // yᵀ `[out, rows]`, filled block by block of W's rows.
    let mut yt = vec![0f32; out * rows];
    with_f32(w, |wv| {
        yt.par_chunks_mut(rows * 64).enumerate().for_each(|(blk, dst)| {
            for (k, cell) in dst.chunks_mut(rows).enumerate() {
                let o = blk * 64 + k;
                let wrow = &wv[o * inp..(o + 1) * inp];
                for (r, c) in cell.iter_mut().enumerate() {
                    *c = dot(&xv[r * inp..(r + 1) * inp], wrow);
                }
            }
        })
    })?;
    untranspose(&yt, rows, out, x.device())
}

/// The few-row product on a bf16 or f16 `w` (contiguous, CPU): each row of W is widened to f32
/// into a buffer of the thread that reads it, then dotted like an f32 row.
pub(crate) fn few_rows_half(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    if inp != w_in {
        candle_core::bail!("matmul_t: x has {inp} columns, w has {w_in}");
    }
    let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut yt = vec![0f32; out * rows];
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("the weight is not in CPU memory") };
    let Some((from, _)) = layout.contiguous_offsets() else { candle_core::bail!("the weight is not contiguous") };
    let mut fill = |widen: &(dyn Fn(usize, &mut [f32]) + Sync)| {
        yt.par_chunks_mut(rows * 64).enumerate().for_each(|(blk, dst)| {
            let mut wrow = vec![0f32; inp];
            for (k, cell) in dst.chunks_mut(rows).enumerate() {
                widen(blk * 64 + k, &mut wrow);
                for (r, c) in cell.iter_mut().enumerate() {
                    *c = dot(&xv[r * inp..(r + 1) * inp], &wrow);
                }
            }
        })
    };
    match w.dtype() {
        candle_core::DType::BF16 => {
            let v = &cpu.as_slice::<half::bf16>()?[from..];
            fill(&|o, buf| v[o * inp..(o + 1) * inp].convert_to_f32_slice(buf));
        }
        candle_core::DType::F16 => {
            let v = &cpu.as_slice::<half::f16>()?[from..];
            fill(&|o, buf| v[o * inp..(o + 1) * inp].convert_to_f32_slice(buf));
        }
        other => candle_core::bail!("few_rows_half: weight dtype {other:?} is not 16-bit"),
    }
    untranspose(&yt, rows, out, x.device())
}

/// `[out, rows]` → `[rows, out]` tensor.
fn untranspose(yt: &[f32], rows: usize, out: usize, dev: &candle_core::Device) -> CResult<Tensor> {
    let mut y = vec![0f32; rows * out];
    for o in 0..out {
        for r in 0..rows {
            y[r * out + o] = yt[o * rows + r];
        }
    }
    Tensor::from_vec(y, (rows, out), dev)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_plain(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // The same loop, compiled with 8-wide fused multiply-adds.
    dot_plain(a, b)
}

#[inline(always)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_matmul() {
        let dev = candle_core::Device::Cpu;
        for (rows, inp, out) in [(1, 37, 130), (8, 576, 200), (3, 16, 65)] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let a = few_rows(&x, &w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = x.matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-3, "{rows}x{inp}x{out}: {diff}");
        }
    }
}
