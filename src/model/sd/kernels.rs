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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::direct;

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

/// Runs `f` on one of rayon's worker threads (at once when already on one). A forward pass is
/// hundreds of parallel operations; started from a thread outside the pool, each of them hands
/// its work to the pool and puts the caller to sleep until it is done — a wake-up and a sleep
/// per operation, which on the micro fixture cost more than the arithmetic (perf: a third of
/// the UNet's time in futex and scheduler calls). From a worker, operations split onto the
/// other workers and the calling thread works on its share.
pub(crate) fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Convolution with zero padding, input `[B, C_in, H, W]`, weight `[C_out, C_in, k, k]`, bias
/// `[C_out]`; output `[B, C_out, (H + 2p + e − k)/s + 1, (W + 2p + e − k)/s + 1]` (e: `pad_end`).
pub(crate) struct Conv {
    pub padding: usize,
    /// Zero rows and columns after the last, on top of `padding` (an asymmetric pad).
    pub pad_end: usize,
    pub stride: usize,
    /// The direct convolution (direct.rs) where the CPU has AVX-512; false forces the shifted
    /// `gemm` products (tests compare the two).
    pub direct: bool,
}

/// Bytes of output and input columns one task of the convolution keeps in cache while its k²
/// products accumulate (about a core's L2): a 128-channel layer at 512×512 then runs in tiles
/// of ~1500 pixels instead of streaming its whole output through memory k² times.
const CONV_TILE_BYTES: usize = 1536 << 10;

/// Output columns per task: what fits [`CONV_TILE_BYTES`] for `rows` floats per column, at
/// least 256 (smaller products lose more to packing than they gain in cache).
fn tile_columns(rows: usize) -> usize {
    (CONV_TILE_BYTES / (4 * rows.max(1))).max(256)
}

impl Conv {
    /// The geometry of this convolution of input `xd` by weight `wd` with `nb` biases.
    fn geometry(&self, xd: &[usize], wd: &[usize], nb: usize) -> Result<ConvGeometry> {
        let bad = || candle_core::Error::Msg(format!("sd-conv2d: input {xd:?}, weight {wd:?}, bias {nb}"));
        let (&[b, cin, h, w], &[cout, wcin, kh, kw]) = (xd, wd) else { return Err(bad()) };
        let (p, st) = (self.padding, self.stride);
        let (hp, wp) = (h + 2 * p + self.pad_end, w + 2 * p + self.pad_end);
        if wcin != cin || kh != kw || nb != cout || hp < kh || wp < kw || st == 0 {
            return Err(bad());
        }
        if cin == 0 || kh == 0 || h == 0 || w == 0 {
            candle_core::bail!("sd-conv2d: zero-size input {xd:?} or weight {wd:?}");
        }
        Ok(ConvGeometry { b, cin, cout, k: kh, hp, wp, stride: st })
    }

    /// The geometry of this convolution of `x` (dims `xd`) by a weight of dims `wd` with `nb`
    /// biases, and the padded input (None when there is nothing to compute: no image or no
    /// output channel, which the layouts of the products do not allow).
    fn prepare(&self, x: &[f32], xd: &[usize], wd: &[usize], nb: usize) -> Result<(ConvGeometry, Option<Vec<f32>>)> {
        let geo = self.geometry(xd, wd, nb)?;
        let xp = (geo.b > 0 && geo.cout > 0).then(|| geo.padded(x, xd[2], xd[3], self.padding));
        Ok((geo, xp))
    }

    /// The products over the padded input.
    fn products(&self, geo: &ConvGeometry, xp: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        if geo.stride == 1 {
            geo.shifted_products(xp, w, bias, self.direct && direct::available())
        } else {
            geo.gathered_products(xp, w, bias)
        }
    }

    /// The convolution of `x` (CPU, f32) by `weight` and `bias`, consuming `x`: its memory is
    /// released, when no other tensor shares it, as soon as its padded copy exists, so the
    /// layer holds the padded input and the output but not the input besides (at a VAE's
    /// 128 channels × 512², one 134 MB feature map less at the encode's peak).
    pub(crate) fn run_owned(&self, x: Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (geo, xp) = {
            let (xs, xl) = x.storage_and_layout();
            let Storage::Cpu(xs) = &*xs else { candle_core::bail!("sd-conv2d: run_owned takes a CPU tensor") };
            self.prepare(f32s(xs, xl, "conv input")?, xl.dims(), weight.dims(), bias.elem_count())?
        };
        let device = x.device().clone();
        drop(x);
        let Some(xp) = xp else { return Tensor::zeros(geo.out_dims(), DType::F32, &device) };
        let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (Storage::Cpu(ws), Storage::Cpu(bs)) = (&*ws, &*bs) else {
            candle_core::bail!("sd-conv2d: weight and bias must be on the CPU")
        };
        let out = self.products(&geo, &xp, f32s(ws, wl, "conv weight")?, f32s(bs, bl, "conv bias")?);
        drop(xp);
        Tensor::from_vec(out, geo.out_dims(), &device)
    }
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
        let (geo, xp) = self.prepare(x, xl.dims(), wl.dims(), bias.len())?;
        let shape = Shape::from(geo.out_dims());
        let Some(xp) = xp else { return Ok((CpuStorage::F32(vec![]), shape)) };
        Ok((CpuStorage::F32(self.products(&geo, &xp, w, bias)), shape))
    }
}

/// Sizes of one convolution, over the padded input.
struct ConvGeometry {
    b: usize,
    cin: usize,
    cout: usize,
    k: usize,
    hp: usize,
    wp: usize,
    stride: usize,
}

impl ConvGeometry {
    /// `[B, C_out, oh, ow]`.
    fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.b, self.cout, self.oh(), self.ow())
    }
    fn oh(&self) -> usize {
        (self.hp - self.k) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.wp - self.k) / self.stride + 1
    }
    fn plane(&self) -> usize {
        self.hp * self.wp
    }

    /// The padded input laid out channel-major, the batch inside each channel
    /// ([C_in, B, H_p, W_p]), so a stride-1 product per tap covers every image: its columns run
    /// over all B planes of a channel (the rows between images are junk, dropped with the
    /// extra columns). Spare values at the end: the last tap of the shifted products reads up
    /// to k − 2 past it, the direct convolution up to two of its tiles further.
    fn padded(&self, x: &[f32], h: usize, wd: usize, p: usize) -> Vec<f32> {
        let (b, plane, wp) = (self.b, self.plane(), self.wp);
        let mut xp = vec![0f32; self.cin * b * plane + self.k + 2 * direct::TILE_COLUMNS];
        xp[..self.cin * b * plane].par_chunks_mut(plane).enumerate().for_each(|(cb, dst)| {
            let (ci, bi) = (cb / b, cb % b);
            let src = &x[(bi * self.cin + ci) * h * wd..][..h * wd];
            for (y, row) in src.chunks(wd).enumerate() {
                let at = (y + p) * wp + p;
                dst[at..at + wd].copy_from_slice(row);
            }
        });
        xp
    }

    /// Stride 1: output pixel (y, x) of tap (i, j) reads padded (y + i, x + j), so with rows of
    /// the padded width each tap is one product whose right operand is the padded input at
    /// offset i·W_p + j. The columns are split in tiles (one task each, products single-threaded)
    /// so a tile's output stays in cache across its k² accumulations.
    fn shifted_products(&self, xp: &[f32], w: &[f32], bias: &[f32], direct: bool) -> Vec<f32> {
        let (b, cin, cout, k, wp, plane) = (self.b, self.cin, self.cout, self.k, self.wp, self.plane());
        let oh = self.oh();
        let n = (b - 1) * plane + oh * wp;
        if direct {
            let offsets: Vec<usize> = (0..k * k).map(|tap| (tap / k) * wp + tap % k).collect();
            let columns = n.next_multiple_of(direct::TILE_COLUMNS);
            let output = direct::OutputGeometry { images: b, plane, wp, oh, ow: self.ow() };
            let d = direct::Direct {
                xp,
                channel_stride: b * plane,
                w,
                bias,
                cin,
                cout,
                offsets: &offsets,
                columns,
                output,
            };
            return d.run();
        }
        let mut outp = vec![0f32; cout * n];
        // Tiles in parallel with single-threaded products when there are enough of them;
        // otherwise (small feature maps, wide layers) one tile with the product threaded.
        let (mut tile, mut par) = (tile_columns(cin + cout), Parallelism::None);
        if n.div_ceil(tile) < 4 * rayon::current_num_threads() {
            (tile, par) = (n, threads());
        }
        let dst = SharedMut(outp.as_mut_ptr());
        (0..n.div_ceil(tile)).into_par_iter().for_each(|t| {
            let (c0, cols) = (t * tile, tile.min(n - t * tile));
            for tap in 0..k * k {
                let (i, j) = (tap / k, tap % k);
                // SAFETY: dst is columns c0..c0+cols of the [cout × n] outp (tiles disjoint);
                // lhs reads w[co·cin·k² + ci·k² + tap] < w.len(); rhs reads
                // xp[ci·b·plane + i·wp + j + col], col < n, at most cin·b·plane + k − 2 <
                // xp.len() (see `padded`).
                unsafe {
                    matmul(
                        (cout, cols, cin),
                        dst.get().add(c0),
                        n,
                        tap > 0,
                        w.as_ptr().add(tap),
                        (cin * k * k, k * k),
                        xp.as_ptr().add(i * wp + j + c0),
                        (b * plane, 1),
                        par,
                    );
                }
            }
        });
        self.unpadded(&outp, n, bias)
    }

    /// `[B, C_out, oh, ow]` from products `[C_out × n]` over padded-width rows (the extra
    /// columns dropped), adding the bias.
    fn unpadded(&self, outp: &[f32], n: usize, bias: &[f32]) -> Vec<f32> {
        let (b, cout, wp, plane) = (self.b, self.cout, self.wp, self.plane());
        let (oh, ow) = (self.oh(), self.ow());
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
        out
    }

    /// Any stride: tiles of output rows, each gathering its patches into [C_in·k² × pixels]
    /// (rows in the weight's own (c_in, i, j) order) for one product with the weight as stored,
    /// accumulated onto the bias.
    fn gathered_products(&self, xp: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let (b, cin, cout, k, wp, plane, st) =
            (self.b, self.cin, self.cout, self.k, self.wp, self.plane(), self.stride);
        let (oh, ow) = (self.oh(), self.ow());
        let kk = cin * k * k;
        let rows_per = (tile_columns(kk + cout) / ow).max(1);
        let mut out = vec![0f32; b * cout * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(bc, row)| row.fill(bias[bc % cout]));
        let dst = SharedMut(out.as_mut_ptr());
        let tiles = oh.div_ceil(rows_per);
        (0..b * tiles).into_par_iter().for_each(|t| {
            let (bi, y0) = (t / tiles, (t % tiles) * rows_per);
            let rows = rows_per.min(oh - y0);
            let cols = rows * ow;
            let mut col = vec![0f32; kk * cols];
            for ci in 0..cin {
                let src = &xp[(ci * b + bi) * plane..][..plane];
                for tap in 0..k * k {
                    let (i, j) = (tap / k, tap % k);
                    let dst_row = &mut col[(ci * k * k + tap) * cols..][..cols];
                    for (r, d) in dst_row.chunks_mut(ow).enumerate() {
                        let line = &src[((y0 + r) * st + i) * wp + j..];
                        for (x, v) in d.iter_mut().enumerate() {
                            *v = line[x * st];
                        }
                    }
                }
            }
            // SAFETY: dst is rows y0..y0+rows of every output channel of image bi (tiles
            // disjoint), row stride oh·ow; lhs is the [cout × kk] weight; rhs the [kk × cols]
            // gather.
            unsafe {
                matmul(
                    (cout, cols, kk),
                    dst.get().add(bi * cout * oh * ow + y0 * ow),
                    oh * ow,
                    true,
                    w.as_ptr(),
                    (kk, 1),
                    col.as_ptr(),
                    (cols, 1),
                    Parallelism::None,
                );
            }
        });
        out
    }
}

/// exp(x) for f32 in straight-line arithmetic the compiler vectorises: x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r by Cephes' expf polynomial (relative error about 1e-7), 2^n from the
/// exponent bits. Inputs are clamped to [−87.3, 88.7]: below, the result is e^−87.3 ≈ 1.2e-38
/// (not 0); above, e^88.7 ≈ 3.3e38.
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
        if x.is_empty() {
            return Ok((CpuStorage::F32(vec![]), xl.shape().clone()));
        }
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

/// How [`Add`]'s second operand spreads over the first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Spread {
    /// The same shape: element by element.
    Same,
    /// A row `[N]` added to every row of `[…, N]` (a linear layer's bias).
    Rows,
    /// One value per plane of `[B, C, H, W]`, `[B·C]` or `[C]` (the projected time embedding
    /// added to a resnet's feature map).
    Planes,
}

/// (a + b) / divisor with `b` spread over `a` as [`Spread`] says (divided, as diffusers divides
/// by `output_scale_factor`, so the results are torch's to the bit). candle's own binary operations
/// run on a second thread pool of candle's beside rayon's, whose idle thread keeps polling
/// after each operation: on two cores, a third of the micro VAE's time went to it and to
/// waiting on it. Chunks of [`ADD_CHUNK`] values are the parallel tasks, so small tensors are
/// added on the calling thread alone.
pub(crate) struct Add {
    pub spread: Spread,
    pub divisor: f32,
}

const ADD_CHUNK: usize = 1 << 18;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "sd-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(s1, l1, "sum's first operand")?, f32s(s2, l2, "sum's second operand")?);
        let dims = l1.dims();
        // Values of `a` that share one value of `b` (Planes), or b's period (Rows).
        let group = match self.spread {
            Spread::Same if b.len() == a.len() => 1,
            Spread::Rows if dims.last().is_some_and(|&n| n == b.len()) => b.len(),
            Spread::Planes if dims.len() == 4 && !b.is_empty() && (dims[0] * dims[1]).is_multiple_of(b.len()) => {
                dims[2] * dims[3]
            }
            _ => candle_core::bail!("sd-add: {:?} and {:?} do not spread as {:?}", dims, l2.dims(), self.spread),
        };
        let mut out: Vec<f32> = Vec::with_capacity(a.len());
        let chunk = if group == 0 { ADD_CHUNK } else { ADD_CHUNK.next_multiple_of(group) };
        let (spread, div) = (self.spread, self.divisor);
        out.spare_capacity_mut().par_chunks_mut(chunk).zip(a.par_chunks(chunk)).enumerate().for_each(
            |(i, (dst, a))| {
                let start = i * chunk;
                match spread {
                    Spread::Same => add_into(dst, a, &b[start..start + a.len()], div),
                    Spread::Rows => {
                        for (d, a) in dst.chunks_mut(group).zip(a.chunks(group)) {
                            add_into(d, a, b, div);
                        }
                    }
                    Spread::Planes => {
                        for (p, (d, a)) in dst.chunks_mut(group).zip(a.chunks(group)).enumerate() {
                            add_value(d, a, b[(start / group + p) % b.len()], div);
                        }
                    }
                }
            },
        );
        // SAFETY: the chunks cover all a.len() values of the capacity and each wrote its own.
        unsafe { out.set_len(a.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

multiversion! {
/// dst = (a + b) / div.
fn add_into(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], b: &[f32], div: f32) {
    let pairs = dst.iter_mut().zip(a).zip(b);
    if div == 1.0 {
        pairs.for_each(|((d, &a), &b)| _ = d.write(a + b));
    } else {
        pairs.for_each(|((d, &a), &b)| _ = d.write((a + b) / div));
    }
}
}

multiversion! {
/// dst = (a + v) / div.
fn add_value(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], v: f32, div: f32) {
    let pairs = dst.iter_mut().zip(a);
    if div == 1.0 {
        pairs.for_each(|(d, &a)| _ = d.write(a + v));
    } else {
        pairs.for_each(|(d, &a)| _ = d.write((a + v) / div));
    }
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
        if b == 0 || n == 0 || c == 0 {
            return Ok((CpuStorage::F32(vec![]), ql.shape().clone()));
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
    use candle_core::{Device, Module, Tensor};

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    /// max |a − b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn convolutions_match_candles_for_every_stride_padding_and_kernel() {
        // (batch, c_in, c_out, side, k, padding, stride, end padding); (1, 4, 4, 640, …) is
        // large enough for the tiled path on a 2-core machine (its columns exceed 4 tiles per
        // thread).
        let cases = [
            (2, 5, 7, 9, 3, 1, 1, 0),
            (3, 4, 6, 8, 1, 0, 1, 0),
            (1, 3, 8, 11, 3, 0, 2, 0),
            (2, 6, 4, 10, 3, 1, 2, 0),
            (1, 2, 3, 7, 3, 2, 1, 0),
            (1, 4, 4, 640, 3, 1, 1, 0),
            (0, 4, 4, 8, 3, 1, 1, 0),
            // Direct convolution: more than one task of rows (64) and of columns (192), input
            // channels in two chunks (64), every register-tile height (8, 4, 2, 1) at the end.
            (2, 70, 79, 15, 3, 1, 1, 0),
            (1, 130, 9, 6, 1, 0, 1, 0),
            // diffusers' (0, 1, 0, 1) pad before a padding-0 stride-2 downsampler, on even
            // and odd sides; and an end pad on the stride-1 paths.
            (2, 6, 5, 10, 3, 0, 2, 1),
            (1, 9, 4, 7, 3, 0, 2, 1),
            (2, 5, 9, 8, 3, 1, 1, 1),
            // Stride 2 with more than 64 channels each way, odd sides.
            (2, 70, 66, 13, 3, 1, 2, 0),
        ];
        for (i, &(b, cin, cout, side, k, p, st, e)) in cases.iter().enumerate() {
            let x = randn(i as u64, &[b, cin, side, side]);
            let w = randn(100 + i as u64, &[cout, cin, k, k]);
            let bias = randn(200 + i as u64, &[cout]);
            let padded = x.pad_with_zeros(3, 0, e).unwrap().pad_with_zeros(2, 0, e).unwrap();
            let want =
                padded.conv2d(&w, p, st, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            // The direct convolution only where this CPU has AVX-512 (else both are the gemm path).
            for direct in [false, true] {
                let op = Conv { padding: p, pad_end: e, stride: st, direct };
                let ours = x.apply_op3_no_bwd(&w, &bias, &op).unwrap();
                // The consuming form (Conv2d::forward_owned) computes the same values.
                let owned = op.run_owned(x.clone(), &w, &bias).unwrap();
                assert_eq!(owned.dims(), ours.dims());
                if b == 0 {
                    assert_eq!(ours.dims(), want.dims(), "an empty batch");
                    continue;
                }
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(flat(&owned), flat(&ours), "case {i}: run_owned");
                assert!(rel(&ours, &want) < 1e-5, "case {i}, direct {direct}: {}", rel(&ours, &want));
            }
        }
    }

    #[test]
    fn sums_equal_candles_broadcast_additions_to_the_bit() {
        // Shapes below ADD_CHUNK (one task) and above it (two).
        for (i, dims) in [[2usize, 6, 5, 7], [3, 40, 64, 48]].iter().enumerate() {
            let (n, c, w) = (dims[0], dims[1], dims[3]);
            let a = randn(10 + i as u64, dims);
            let same = randn(20 + i as u64, dims);
            let add =
                |b: &Tensor, spread: Spread, divisor: f32| a.apply_op2_no_bwd(b, &Add { spread, divisor }).unwrap();
            let exact = |x: &Tensor, y: &Tensor| {
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap() == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(exact(&add(&same, Spread::Same, 1.0), &(&a + &same).unwrap()));
            // A true division, as diffusers divides by output_scale_factor (candle's `/ 3.0`
            // multiplies by the reciprocal, which differs in the last bit).
            let (av, sv) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let divided: Vec<f32> = av.iter().zip(&sv).map(|(x, y)| (x + y) / 3.0).collect();
            let got = add(&same, Spread::Same, 3.0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, divided);
            let row = randn(30 + i as u64, &[w]);
            assert!(exact(&add(&row, Spread::Rows, 1.0), &a.broadcast_add(&row).unwrap()));
            let per_image = randn(40 + i as u64, &[n, c]);
            let want = a.broadcast_add(&per_image.reshape((n, c, 1, 1)).unwrap()).unwrap();
            assert!(exact(&add(&per_image, Spread::Planes, 1.0), &want));
            let shared = randn(50 + i as u64, &[1, c]);
            let want = a.broadcast_add(&shared.reshape((1, c, 1, 1)).unwrap()).unwrap();
            assert!(exact(&add(&shared, Spread::Planes, 1.0), &want));
        }
        let a = randn(1, &[2, 3]);
        assert!(a.apply_op2_no_bwd(&randn(2, &[4]), &Add { spread: Spread::Rows, divisor: 1.0 }).is_err());
        assert!(a.apply_op2_no_bwd(&randn(2, &[2, 2]), &Add { spread: Spread::Same, divisor: 1.0 }).is_err());
    }

    #[test]
    fn group_norm_with_and_without_silu_matches_candles() {
        let x = randn(1, &[2, 8, 5, 6]);
        let (w, b) = (randn(2, &[8]), randn(3, &[8]));
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap().forward(&x).unwrap();
        let plain = x.apply_op3_no_bwd(&w, &b, &GroupNorm { groups: 4, eps: 1e-5, silu: false }).unwrap();
        assert!(rel(&plain, &reference) < 1e-5);
        let silu = x.apply_op3_no_bwd(&w, &b, &GroupNorm { groups: 4, eps: 1e-5, silu: true }).unwrap();
        assert!(rel(&silu, &candle_nn::ops::silu(&reference).unwrap()) < 1e-5);
    }

    #[test]
    fn attention_and_geglu_match_their_definitions() {
        // 2 heads of 3 over 200 queries (two blocks, the second partial) and 7 keys.
        let (q, k, v) = (randn(1, &[2, 200, 6]), randn(2, &[2, 7, 6]), randn(3, &[2, 7, 6]));
        let ours = q.apply_op3_no_bwd(&k, &v, &Attention { heads: 2 }).unwrap();
        let head = |t: &Tensor, h: usize| t.narrow(2, 3 * h, 3).unwrap().contiguous().unwrap();
        let mut outs = vec![];
        for h in 0..2 {
            let s = (head(&q, h).matmul(&head(&k, h).t().unwrap()).unwrap() / 3f64.sqrt()).unwrap();
            outs.push(candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&head(&v, h)).unwrap());
        }
        assert!(rel(&ours, &Tensor::cat(&outs, 2).unwrap()) < 1e-5);
        let x = randn(4, &[3, 5, 8]);
        let want = (x.narrow(2, 0, 4).unwrap() * x.narrow(2, 4, 4).unwrap().gelu_erf().unwrap()).unwrap();
        assert!(rel(&x.apply_op1_no_bwd(&Geglu).unwrap(), &want) < 1e-5);
    }

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
