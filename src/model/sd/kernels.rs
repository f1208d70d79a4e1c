//! CPU kernels for the SD runtime's hot operations, where candle's CPU backend was 2.5–13×
//! slower than PyTorch on the same two cores (benches/image_probe.rs; docs/benchmarks.md):
//!
//! - stride-1 convolution as k² shifted matrix products over a zero-padded input: output pixel
//!   (y, x) of kernel tap (i, j) reads padded input (y + i, x + j), so with rows of the padded
//!   width every tap is one product W_ij [C_out × C_in] · X_shifted [C_in × B·H_p·W_p] whose
//!   right operand is the padded input itself at offset i·W_p + j — no im2col copy. The extra
//!   columns (W_p − W per row, the padding rows between images) are computed and dropped;
//! - group normalisation, optionally fused with the SiLU that follows it in every resnet, two
//!   passes per group with the statistics in f64;
//! - GEGLU, h·GELU(gate) over the two halves of the feed-forward's projection, with the exact
//!   (erf) GELU diffusers uses;
//! - attention softmax(q·kᵀ/√d)·v per head in blocks of query rows, the scores of one block
//!   (rows × keys) kept in cache and normalised in place, heads read in place from the
//!   `[B, N, H·d]` projections (as FlashAttention's tiling, Dao et al. 2022, with whole key rows
//!   per block so the softmax is exact in one pass).
//!
//! Each is a candle `CustomOp` on CPU f32 storage; the matrix products are the `gemm` crate's,
//! which candle itself uses. Callers use candle's own operations on other devices (nn.rs).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: the SD kernels take f32 tensors") };
    if !l.is_contiguous() {
        candle_core::bail!("{what}: the SD kernels take contiguous tensors");
    }
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// dst [m × n] (row stride `dst_rs`) := (accumulate ? dst : 0) + lhs [m × k] · rhs [k × n], each
/// operand given by its pointer and (row, column) strides.
///
/// Safety: every index the strides reach must lie inside the operands' allocations, and `dst`
/// must not overlap them.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Stride-1 convolution with zero padding, input `[B, C_in, H, W]`, weight `[C_out, C_in, k, k]`,
/// bias `[C_out]`; output `[B, C_out, H + 2p − k + 1, W + 2p − k + 1]`.
pub(crate) struct Conv {
    pub padding: usize,
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "sd-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32s(xs, xl, "conv input")?, f32s(ws, wl, "conv weight")?, f32s(bs, bl, "conv bias")?);
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, wcin, kh, kw) = wl.shape().dims4()?;
        let p = self.padding;
        if wcin != cin || kh != kw || bias.len() != cout || h + 2 * p < kh || wd + 2 * p < kw {
            candle_core::bail!("sd-conv2d: input {:?}, weight {:?}, bias {}", xl.dims(), wl.dims(), bias.len());
        }
        let k = kh;
        let (hp, wp) = (h + 2 * p, wd + 2 * p);
        let (oh, ow) = (hp - k + 1, wp - k + 1);
        let plane = hp * wp;
        // The padded input laid out channel-major, the batch inside each channel
        // ([C_in, B, H_p, W_p]), so one product per tap covers every image: its columns run
        // over all B planes of a channel (the rows between images are junk, dropped with the
        // extra columns). k spare values at the end: the last tap reads up to k − 2 past it.
        let mut xp = vec![0f32; cin * b * plane + k];
        xp[..cin * b * plane].par_chunks_mut(plane).enumerate().for_each(|(cb, dst)| {
            let (ci, bi) = (cb / b, cb % b);
            let src = &x[(bi * cin + ci) * h * wd..][..h * wd];
            for (y, row) in src.chunks(wd).enumerate() {
                let at = (y + p) * wp + p;
                dst[at..at + wd].copy_from_slice(row);
            }
        });
        let n = (b - 1) * plane + oh * wp;
        let mut outp = vec![0f32; cout * n];
        let (w_rs, w_cs) = (cin * k * k, k * k);
        for tap in 0..k * k {
            let (i, j) = (tap / k, tap % k);
            // SAFETY: dst is [cout × n] = outp; lhs reads w[co·w_rs + ci·w_cs + tap] < w.len();
            // rhs reads xp[ci·b·plane + i·wp + j + col], col < n, at most
            // cin·b·plane + k − 2 < xp.len() (see above).
            unsafe {
                matmul(
                    (cout, n, cin),
                    outp.as_mut_ptr(),
                    n,
                    tap > 0,
                    w.as_ptr().add(tap),
                    (w_rs, w_cs),
                    xp.as_ptr().add(i * wp + j),
                    (b * plane, 1),
                    threads(),
                );
            }
        }
        let mut out = vec![0f32; b * cout * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(bc, dst)| {
            let (bi, co) = (bc / cout, bc % cout);
            let bv = bias[co];
            let src = &outp[co * n + bi * plane..];
            for (drow, srow) in dst.chunks_mut(ow).zip(src.chunks(wp)) {
                for (d, s) in drow.iter_mut().zip(srow) {
                    *d = s + bv;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// exp(x) for f32 in straight-line arithmetic the compiler vectorises: x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r by Cephes' expf polynomial (relative error about 1e-7), 2^n from the
/// exponent bits. Inputs below −87.3 give 0 (as e^x underflows), above 88.7 give f32::MAX·2.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by the 1.5·2^23 trick (exact for |x·log2 e| < 2^22): the sum's low
    // mantissa bits are then the integer n itself, read without a float-to-int conversion.
    let t = x * LOG2E + 12_582_912.0;
    let ni = t.to_bits() as i32 - 0x4B40_0000;
    let n = t - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = r * r * p + r + 1.0;
    // 2^n: n + 127 in the exponent field; n ∈ [−126, 128] after the clamp, and 2^n is split
    // into 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋) so neither factor leaves the field (integer shifts, which
    // vectorise where `floor` is a library call).
    let half = ni >> 1;
    let two = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    er * two(half) * two(ni - half)
}

/// Lanes of the reductions below: independent partial maxima and sums, so the loops vectorise
/// (a single running f32 sum is a dependency chain the compiler may not reorder).
const LANES: usize = 16;

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them (checked once per call
/// at run time), else for the build's baseline: the same IEEE operations in every version
/// (Rust does not contract a·b + c into FMA), so the results do not depend on the CPU; only
/// the vector width does.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) {
            #[inline(always)]
            fn generic($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($a: $t),*) { generic($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) { generic($($a),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}

multiversion! {
/// Softmax of `row · scale` in place.
fn softmax_scaled(row: &mut [f32], scale: f32) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let max = chunks.remainder().iter().chain(&mx).fold(f32::NEG_INFINITY, |a, &s| if s > a { s } else { a });
    for s in row.iter_mut() {
        *s = exp((*s - max) * scale);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            sums[i] += c[i];
        }
    }
    let sum: f32 = chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}
}

/// Group normalisation of `[B, C, …]` with per-channel weight and bias, then SiLU when asked.
pub(crate) struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "sd-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32s(xs, xl, "group norm input")?, f32s(ws, wl, "weight")?, f32s(bs, bl, "bias")?);
        let dims = xl.dims();
        if dims.len() < 3 || dims[1] != w.len() || w.len() != bias.len() || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!("sd-group-norm: input {dims:?}, {} channels, {} groups", w.len(), self.groups);
        }
        let c = dims[1];
        let per_channel: usize = dims[2..].iter().product();
        let cpg = c / self.groups;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cpg * per_channel).zip(x.par_chunks(cpg * per_channel)).enumerate().for_each(
            |(bg, (dst, src))| {
                let len = src.len() as f64;
                let mean = src.iter().map(|&v| v as f64).sum::<f64>() / len;
                let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
                let inv = 1.0 / (var + self.eps).sqrt();
                let c0 = (bg % self.groups) * cpg;
                for (ci, (d, s)) in dst.chunks_mut(per_channel).zip(src.chunks(per_channel)).enumerate() {
                    let scale = (w[c0 + ci] as f64 * inv) as f32;
                    let shift = (bias[c0 + ci] as f64 - mean * w[c0 + ci] as f64 * inv) as f32;
                    affine(d, s, scale, shift, self.silu);
                }
            },
        );
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

multiversion! {
/// dst = s·scale + shift, then SiLU (y·σ(y)) when asked.
fn affine(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    if silu {
        for (d, s) in dst.iter_mut().zip(src) {
            let y = s * scale + shift;
            *d = y / (1.0 + exp(-y));
        }
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s * scale + shift;
        }
    }
}
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7 in exact arithmetic, 3.7e-7 measured
/// in f32 over [−3, 3]), in straight-line arithmetic.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6)
            * t
            * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

multiversion! {
/// dst = h · GELU(gate), GELU(x) = x·(1 + erf(x/√2))/2.
fn geglu_row(dst: &mut [f32], h: &[f32], gate: &[f32]) {
    for ((d, &h), &g) in dst.iter_mut().zip(h).zip(gate) {
        *d = h * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2)));
    }
}
}

/// diffusers' `GEGLU` after its projection: `[…, 2·D]` → first half · GELU(second half).
pub(crate) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sd-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "GEGLU input")?;
        let mut dims = l.dims().to_vec();
        let Some(last) = dims.last_mut().filter(|d| **d % 2 == 0 && **d > 0) else {
            candle_core::bail!("sd-geglu: input {:?} has no even last dimension", l.dims());
        };
        *last /= 2;
        let half = *last;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(half).zip(x.par_chunks(2 * half)).for_each(|(d, row)| {
            let (h, g) = row.split_at(half);
            geglu_row(d, h, g);
        });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Query rows per block of scores: 128 rows × 4096 keys (SD 1.5's largest self-attention) is
/// 2 MiB of f32, about a core's L2 cache; fewer rows make the products slower per value.
const QUERY_BLOCK: usize = 128;

/// softmax(q·kᵀ·scale)·v per head; q `[B, N, H·d]`, k and v `[B, M, H·d]`, output `[B, N, H·d]`.
pub(crate) struct Attention {
    pub heads: usize,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sd-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32s(qs, ql, "queries")?, f32s(ks, kl, "keys")?, f32s(vs, vl, "values")?);
        let (b, n, c) = ql.shape().dims3()?;
        let (kb, m, kc) = kl.shape().dims3()?;
        if kl.dims() != vl.dims() || kb != b || kc != c || !c.is_multiple_of(self.heads) || m == 0 {
            candle_core::bail!("sd-attention: q {:?}, k {:?}, v {:?}", ql.dims(), kl.dims(), vl.dims());
        }
        let d = c / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; b * n * c];
        let dst = SharedMut(out.as_mut_ptr());
        let blocks = n.div_ceil(QUERY_BLOCK);
        // Tasks (batch, head, query block) in a few contiguous runs, one scores buffer each
        // (rayon's for_each_init may call its init once per task).
        let tasks = b * self.heads * blocks;
        let runs = tasks.min(8 * rayon::current_num_threads().max(1));
        (0..runs).into_par_iter().for_each(|run| {
            let mut scores = vec![0f32; QUERY_BLOCK * m];
            for task in run * tasks / runs..(run + 1) * tasks / runs {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, hi) = (bh / self.heads, bh % self.heads);
                let r0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - r0);
                let qo = (bi * n + r0) * c + hi * d;
                let kvo = bi * m * c + hi * d;
                // SAFETY: q rows r0..r0+rows of head hi lie in q; kᵀ and v read m rows of width
                // d at stride c inside batch bi; scores holds rows × m; each task writes its
                // own rows × d block of out (disjoint across tasks).
                unsafe {
                    matmul(
                        (rows, m, d),
                        scores.as_mut_ptr(),
                        m,
                        false,
                        q.as_ptr().add(qo),
                        (c, 1),
                        k.as_ptr().add(kvo),
                        (1, c),
                        Parallelism::None,
                    );
                }
                for row in scores[..rows * m].chunks_mut(m) {
                    softmax_scaled(row, scale);
                }
                let o = dst.get();
                unsafe {
                    matmul(
                        (rows, d, m),
                        o.add(qo),
                        c,
                        false,
                        scores.as_ptr(),
                        (m, 1),
                        v.as_ptr().add(kvo),
                        (c, 1),
                        Parallelism::None,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_and_follow_the_definition() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let want: Vec<f64> = {
            let e: Vec<f64> = row.iter().map(|&s| (s as f64 * 0.5).exp()).collect();
            let t: f64 = e.iter().sum();
            e.iter().map(|v| v / t).collect()
        };
        softmax_scaled(&mut row, 0.5);
        for (a, b) in row.iter().zip(&want) {
            assert!((*a as f64 - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
    }

    #[test]
    fn erf_is_within_4e7_of_the_series() {
        // erf by its Maclaurin series in f64 (converges fast for |x| ≤ 3), and 1 beyond.
        let series = |x: f64| -> f64 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -300..=300 {
            let x = i as f64 * 0.01;
            assert!((erf(x as f32) as f64 - series(x)).abs() < 4e-7, "erf({x})");
        }
        assert!((erf(6.0) - 1.0).abs() < 1e-7 && (erf(-6.0) + 1.0).abs() < 1e-7);
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_library_exp() {
        let mut worst = 0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3;
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 2.5e-7, "relative error {worst:e}");
        assert!(exp(-200.0) < 1e-37 && exp(0.0) == 1.0);
    }
}
