//! Direct stride-1 convolution on AVX-512, for the CPUs that have it (kernels.rs falls back to
//! shifted `gemm` products elsewhere).
//!
//! The formulation is kernels.rs's: over the zero-padded input laid out `[C_in, B·H_p·W_p]`,
//! output column `n` (a pixel in padded-width rows) of tap (i, j) reads input column
//! `n + i·W_p + j`, so
//!
//!   out[co, n] = bias[co] + Σ_ci Σ_tap W[co, ci, tap] · xp[ci, n + off(tap)].
//!
//! `gemm` computes each tap's product by first packing its right operand, and with as few as
//! 128 output rows every packed value is used for only 128 multiply-adds, so packing costs about
//! as much as the arithmetic (docs/benchmarks.md). Here a register tile of 8 output channels ×
//! 48 columns (24 of the 32 vector registers) accumulates over every (c_in, tap) pair reading
//! the padded input where it lies — three unaligned vector loads and eight broadcast weights
//! per 24 fused multiply-adds — and the weights in their stored `[C_out, C_in, k, k]` order (the
//! eight rows are eight sequential streams), so nothing is packed or copied. The loops around it
//! block the work for cache as direct convolutions do (Zhang, Low & Franchetti, "High
//! performance zero-memory overhead direct convolutions", ICML 2018): 64 output channels × 192
//! columns per task, input channels in chunks of 64, so one chunk's weights (147 KiB), input
//! (≤ 64 × (192 + 2·W_p + 2) floats) and the task's sums (48 KiB, its own buffer) stay in a
//! core's L2 cache while every register tile of the task reuses them. A task ends by copying its
//! output pixels (the columns that are not padding) to their place in `[B, C_out, oh, ow]`, so
//! the padded-width products never exist as a whole feature map.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_storeu_ps};

use rayon::prelude::*;

/// Columns of one register tile: three vectors of 16 lanes.
pub(super) const TILE_COLUMNS: usize = 48;
const VECTORS: usize = TILE_COLUMNS / 16;
/// Output channels of one register tile.
const TILE_ROWS: usize = 8;
/// Output channels and columns of one task, input channels per accumulation pass.
const TASK_ROWS: usize = 64;
const TASK_COLUMNS: usize = 4 * TILE_COLUMNS;
const CHANNEL_CHUNK: usize = 64;

/// Whether this CPU runs the direct convolution.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where the output columns (pixels in padded-width rows, images `plane` floats apart) land:
/// column `n` is pixel (y, x) of image `n / plane`, at `(n % plane) / wp`, `n % wp`; only
/// `y < oh`, `x < ow` of the `images` images are outputs, written to `[images, cout, oh, ow]`.
pub(super) struct OutputGeometry {
    pub images: usize,
    pub plane: usize,
    pub wp: usize,
    pub oh: usize,
    pub ow: usize,
}

/// What one direct convolution reads and writes.
pub(super) struct Direct<'a> {
    /// The padded input, `cin` channels `channel_stride` floats apart, with at least
    /// `TILE_COLUMNS + max(offsets)` readable floats past the last output column of the last
    /// channel (see [`Direct::slack`]).
    pub xp: &'a [f32],
    pub channel_stride: usize,
    /// `[cout, cin, k, k]`, as stored.
    pub w: &'a [f32],
    pub bias: &'a [f32],
    pub cin: usize,
    pub cout: usize,
    /// Input offset of each tap, `i·W_p + j` in (i, j) order.
    pub offsets: &'a [usize],
    /// Output columns to compute (a multiple of [`TILE_COLUMNS`]).
    pub columns: usize,
    pub output: OutputGeometry,
}

impl Direct<'_> {
    /// Readable floats the input needs past channel `cin − 1`'s start + `columns`.
    pub(super) fn slack(offsets: &[usize]) -> usize {
        offsets.iter().max().copied().unwrap_or(0) + TILE_COLUMNS
    }

    /// `[images, cout, oh, ow]`, bias included. The caller checks [`available`] first.
    pub(super) fn run(&self) -> Vec<f32> {
        let (cout, n, g) = (self.cout, self.columns, &self.output);
        assert!(available() && n.is_multiple_of(TILE_COLUMNS), "direct convolution: AVX-512 and whole tiles");
        let kk = self.offsets.len();
        assert!(self.w.len() == cout * self.cin * kk && self.bias.len() == cout);
        let last = (self.cin - 1) * self.channel_stride + n + Self::slack(self.offsets);
        assert!(self.xp.len() >= last, "direct convolution: input without its slack");
        assert!(g.ow <= g.wp && g.oh * g.wp <= g.plane && (g.images - 1) * g.plane + g.oh * g.wp <= n);
        let len = g.images * cout * g.oh * g.ow;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = super::kernels::SharedMut(out.as_mut_ptr());
        let (row_tasks, col_tasks) = (cout.div_ceil(TASK_ROWS), n.div_ceil(TASK_COLUMNS));
        (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
            let (r0, c0) = ((t / col_tasks) * TASK_ROWS, (t % col_tasks) * TASK_COLUMNS);
            let (rows, cols) = (TASK_ROWS.min(cout - r0), TASK_COLUMNS.min(n - c0));
            // The task's sums, accumulated over the input-channel chunks in cache.
            let mut sums = vec![0f32; TASK_ROWS * TASK_COLUMNS];
            // SAFETY: the task writes rows 0..rows × columns 0..cols of `sums`; reads stay
            // inside xp (checked above) and w.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.task(sums.as_mut_ptr(), r0, rows, c0, cols)
            }
            // SAFETY: each output element is the one column n = image·plane + y·wp + x < n
            // (asserted above), which lies in exactly one task's columns: tasks write
            // disjoint elements of `out`, all inside its capacity.
            unsafe { self.store(&sums, dst.get(), r0, rows, c0, cols) }
        });
        // SAFETY: every element below `len` was written by the task owning its column.
        unsafe { out.set_len(len) };
        out
    }

    /// Copies the output pixels among a task's columns from its sums to `[images, cout, oh,
    /// ow]`, in runs of consecutive pixels of one row.
    unsafe fn store(&self, sums: &[f32], out: *mut f32, r0: usize, rows: usize, c0: usize, cols: usize) {
        let g = &self.output;
        let end = c0 + cols;
        let mut col = c0;
        while col < end {
            let (image, rem) = (col / g.plane, col % g.plane);
            let (y, x) = (rem / g.wp, rem % g.wp);
            if image >= g.images {
                break;
            }
            if y >= g.oh {
                col = (image + 1) * g.plane;
                continue;
            }
            if x >= g.ow {
                col += g.wp - x;
                continue;
            }
            let run = (g.ow - x).min(end - col);
            for r in 0..rows {
                let src = &sums[r * TASK_COLUMNS + (col - c0)..][..run];
                let at = ((image * self.cout + r0 + r) * g.oh + y) * g.ow + x;
                std::ptr::copy_nonoverlapping(src.as_ptr(), out.add(at), run);
            }
            col += run;
        }
    }

    /// One task: input channels in chunks, every register tile of the task per chunk, into
    /// `sums` (`[TASK_ROWS × TASK_COLUMNS]`, the task's first row and column at its start).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn task(&self, sums: *mut f32, r0: usize, rows: usize, c0: usize, cols: usize) {
        let kk = self.offsets.len();
        for ci0 in (0..self.cin).step_by(CHANNEL_CHUNK) {
            let chunk = CHANNEL_CHUNK.min(self.cin - ci0);
            let first = ci0 == 0;
            for col in (c0..c0 + cols).step_by(TILE_COLUMNS) {
                let mut co = r0;
                while co < r0 + rows {
                    let m = (r0 + rows - co).min(TILE_ROWS);
                    let m = if m >= 8 {
                        8
                    } else if m >= 4 {
                        4
                    } else if m >= 2 {
                        2
                    } else {
                        1
                    };
                    let t = Tile {
                        x: self.xp.as_ptr().add(ci0 * self.channel_stride + col),
                        channel_stride: self.channel_stride,
                        offsets: self.offsets,
                        w: self.w.as_ptr().add(co * self.cin * kk + ci0 * kk),
                        w_row: self.cin * kk,
                        channels: chunk,
                        out: sums.add((co - r0) * TASK_COLUMNS + (col - c0)),
                        out_row: TASK_COLUMNS,
                        bias: first.then(|| self.bias.as_ptr().add(co)),
                    };
                    match m {
                        8 => t.run::<8>(),
                        4 => t.run::<4>(),
                        2 => t.run::<2>(),
                        _ => t.run::<1>(),
                    }
                    co += m;
                }
            }
        }
    }
}

/// One register tile's operands, pointers at its first input channel, output channel and
/// column.
struct Tile<'a> {
    x: *const f32,
    channel_stride: usize,
    offsets: &'a [usize],
    w: *const f32,
    w_row: usize,
    channels: usize,
    out: *mut f32,
    out_row: usize,
    /// The bias of the tile's rows on the first chunk (the accumulators start from it); later
    /// chunks start from the partial sums already in `out`.
    bias: Option<*const f32>,
}

impl Tile<'_> {
    /// M output channels × [`TILE_COLUMNS`]: M·3 accumulators in registers over the chunk's
    /// channels and taps.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const M: usize>(&self) {
        let kk = self.offsets.len();
        let mut acc: [[__m512; VECTORS]; M] = [[_mm512_set1_ps(0.0); VECTORS]; M];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, lane) in a.iter_mut().enumerate() {
                *lane = match self.bias {
                    Some(b) => _mm512_set1_ps(*b.add(r)),
                    None => _mm512_loadu_ps(self.out.add(r * self.out_row + 16 * v)),
                };
            }
        }
        for ci in 0..self.channels {
            let x = self.x.add(ci * self.channel_stride);
            let w = self.w.add(ci * kk);
            for (tap, &off) in self.offsets.iter().enumerate() {
                let mut xs = [_mm512_set1_ps(0.0); VECTORS];
                for (v, xv) in xs.iter_mut().enumerate() {
                    *xv = _mm512_loadu_ps(x.add(off + 16 * v));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w.add(r * self.w_row + tap));
                    for (lane, xv) in a.iter_mut().zip(&xs) {
                        *lane = _mm512_fmadd_ps(wv, *xv, *lane);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, lane) in a.iter().enumerate() {
                _mm512_storeu_ps(self.out.add(r * self.out_row + 16 * v), *lane);
            }
        }
    }
}
