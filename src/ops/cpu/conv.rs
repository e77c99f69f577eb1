//! A CPU convolution with its own backward, on the `gemm` crate.
//!
//! candle's CPU conv2d spends most of a training step around the GEMM (a naive `conv_transpose2d` for
//! the input gradient, element-by-element im2col copies). Here every image is handled by one thread:
//! im2col into a small per-thread buffer, then one single-threaded GEMM, so the batch is spread over
//! the cores with no synchronisation and the working set stays in cache.
//!
//! ```text
//! forward:        Y[n]  = W · col(X[n])                       (O×K)·(K×P)
//! input grad:     dX[n] = col2im(Wᵀ · dY[n])                  (K×O)·(O×P)
//! weight grad:    dW    = Σₙ dY[n] · col(X[n])ᵀ               (O×P)·(P×K)
//! ```
//! with K = C·k·k and P = OH·OW.
//!
//! Convolutions with 8+ channels and stride 1, or stride 2 with a 3x3 kernel (18 of ResNet-20's 19;
//! not the 3-channel stem) skip im2col altogether (`Shifted`): on an input padded to width Wp, the
//! im2col row of tap (ky, kx) is the padded plane itself, shifted by ky·Wp + kx. So the convolution is
//! k·k GEMMs that read the padded image in place, computed on a grid Wp wide whose few extra columns
//! are dropped; stride 2 becomes stride 1 over the image split into its four phases. That removes the
//! im2col and col2im copies (a fifth of a training step) and the weight gradient's second im2col;
//! their backward computes dX and dW in one pass over the images.
//!
//! On AVX-512 CPUs the k·k GEMMs become kernels of our own (`kernels`): the forward is one direct
//! kernel that keeps its outputs in registers across all taps; the stride-1 input gradient runs on
//! it too, as the forward convolution of dY with the weight turned by 180° (`Shifted::transposed`);
//! the stride-2 input gradient too, one phase of dX at a time (`PhaseGrad`); and the stride-1 weight
//! gradient on 16x16+ maps reads dY and the padded image in place. On maps up to 16 wide the direct
//! kernel's rows are tight (no padding column: it masks the taps that would cross a row's edge), so
//! it computes no dropped positions there.
//!
//! Stride-1 3x3 convolutions with 16+ channels on both sides run on Winograd's transforms instead
//! (`winograd`: forward, input gradient and weight gradient), on the wide layout: F(4x4, 3x3), 36
//! multiply-adds per 4x4 outputs where the direct kernel spends 144, a batch of images at a time
//! on the small maps (`Shifted::batch`); on maps up to 16x16 the weight gradient's transforms are
//! channels-last, its products on the direct kernel.

use super::bn;
use super::kernels;
use super::quant::{quantize_into, quantize_rows, Grid};
use super::winograd;
use super::{slice, with_slices, written};
pub use crate::ops::Geometry;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The CPU kernels' views of a convolution's shape.
impl Geometry {
    /// The output columns `lo..hi` whose tap `kx` falls inside the image: 0 <= ox·stride + kx − pad < w.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let ow = self.ow();
        let lo = self.pad.saturating_sub(kx).div_ceil(self.stride).min(ow);
        let hi = match (self.w + self.pad).checked_sub(kx + 1) {
            Some(last) => (last / self.stride + 1).min(ow),
            None => 0,
        };
        (lo, hi.max(lo))
    }
    /// Whether [`Shifted`] kernels handle this shape: stride 1, or stride 2 with a 3x3 kernel and
    /// padding 1 (ResNet's downsampling layers), and enough channels that the per-tap GEMMs (inner
    /// dimension C or O) keep the GEMM kernels busy.
    fn shifted(&self) -> bool {
        let stride = self.stride == 1 || (self.stride == 2 && self.k == 3 && self.pad == 1);
        stride && self.k > 1 && self.c >= 8 && self.o >= 8
    }
}

/// What the eval-mode convolution applies to each output channel while it writes it: `relu?(y·a + b)`
/// with (a, b) = (`scale[o]`, `shift[o]`) (the batch norm with running statistics, or folded BN's shift),
/// or `relu(y·a + b + r)` with `r` a residual block's shortcut, given to the op as a third input.
#[derive(Debug, Clone)]
pub struct Epilogue {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub relu: bool,
}

impl Epilogue {
    /// Applies the epilogue of channel `o` to `v`, adding `r` (the shortcut, or 0) before the ReLU.
    #[inline]
    fn apply(&self, o: usize, v: f32, r: f32) -> f32 {
        let v = v * self.scale[o] + self.shift[o] + r;
        // Not f32::max, which would turn a NaN into 0 and hide a diverging run.
        if self.relu && v < 0.0 {
            0.0
        } else {
            v
        }
    }
}

/// The convolution as k·k shifted GEMMs over a padded image (see the module docs).
///
/// Stride 1: an image is padded to `wp` = W + pad columns and H + 2·pad + 1 rows: the `pad` zero
/// columns before each row serve as the padding after the row above too (a tap's reads past a row's
/// end run into them), and the extra zero row keeps the shifted reads of the dropped columns inside the
/// plane. The output is computed on `q` = OH·wp positions, of which the last wp − OW of each row are
/// dropped. (wp = W + 2·pad where pad >= k, whose outputs would not fit.)
///
/// Stride 2 (3x3, pad 1) becomes stride 1 on the image split into its four phases (even/odd rows by
/// even/odd columns, each ⌈H/2⌉×⌈W/2⌉ padded by one zero row and column before): tap (ky, kx) reads
/// one phase, shifted by 0 or 1 row and column. The phases lie one after another, C planes each, so
/// a tap's shift includes its phase's offset and every kernel below runs unchanged.
struct Shifted {
    g: Geometry,
    /// The layer input's quantizer, applied while padding.
    grid: Option<Grid>,
    /// Zero rows and columns before a padded plane's image (pad, or 1 for the phases of stride 2).
    top: usize,
    wp: usize,
    plane: usize,
    q: usize,
    /// Whether the forward runs the direct AVX-512 kernel ([`kernels::direct`]) rather than k·k GEMMs.
    direct: bool,
    /// Rows exactly W wide, with no padding column: the direct kernel masks the taps that would read
    /// across a row's edge instead (3x3, stride 1, padding 1, small maps; see [`Shifted::new`]).
    tight: bool,
    /// Whether the forward runs Winograd's F(4x4, 3x3) ([`winograd`]) on the direct kernel instead.
    winograd: bool,
}

impl Shifted {
    /// The layout the forward and the input gradient use: tight rows where they save work.
    ///
    /// With a padding column, a grid of OH rows of W + 1 positions is computed in whole registers of
    /// 16: an 8x8 map costs 80 positions for 64 (72 rounded up), a 16x16 one 272 for 256. Tight rows
    /// compute 64 and 256, and the direct kernel zeroes the left column's taps in the grid's first
    /// column and the right column's in its last (masked loads, at no cost over plain ones).
    fn new(g: Geometry, grid: Option<Grid>) -> Self {
        let direct = kernels::available();
        let winograd = winograd::applies(&g);
        let tight = direct && !winograd && g.stride == 1 && g.k == 3 && g.pad == 1 && g.w <= TIGHT_MAX_WIDTH;
        Self { winograd, ..Self::with_rows(g, grid, direct, tight) }
    }

    /// The layout with a padding column between rows (the weight gradient's kernels read it).
    fn wide(g: Geometry, grid: Option<Grid>) -> Self {
        Self::with_rows(g, grid, kernels::available(), false)
    }

    fn with_rows(g: Geometry, grid: Option<Grid>, direct: bool, tight: bool) -> Self {
        let s = g.stride;
        let wp = match tight {
            true => g.w,
            // Stride 1: a row's left padding is the right padding of the row before.
            false if s == 1 && g.pad < g.k => g.w + g.pad,
            false => (g.w + 2 * g.pad).div_ceil(s),
        };
        let top = g.pad.div_ceil(s);
        // Tight: the rows above and below, and one value before the first row and after the last
        // (what the corner taps read).
        let plane = if tight { (g.h + 2) * wp + 2 } else { ((g.h + 2 * g.pad).div_ceil(s) + 1) * wp };
        Shifted { g, grid, top, wp, plane, q: g.oh() * wp, direct, tight, winograd: false }
    }

    /// The row width for the direct kernel's edge masks, in the tight layout.
    fn rows(&self) -> Option<usize> {
        self.tight.then_some(self.wp)
    }

    /// Offset of tap `t` = ky·k + kx in the padded planes: its phase's C planes, then the shift.
    fn shift(&self, t: usize) -> usize {
        let g = &self.g;
        // Input row s·oy + ky − pad lies in phase (ky − pad) mod s, at row oy + ⌊(ky − pad)/s⌋.
        let place = |k: usize| {
            let d = k as isize - g.pad as isize;
            let s = g.stride as isize;
            (d.rem_euclid(s) as usize, (d.div_euclid(s) + self.top as isize) as usize)
        };
        let ((a, dy), (b, dx)) = (place(t / g.k), place(t % g.k));
        (a * g.stride + b) * g.c * self.plane + dy * self.wp + dx
    }

    /// Where pixel (iy, ix) of channel c lies in the padded planes.
    fn position(&self, c: usize, iy: usize, ix: usize) -> usize {
        let s = self.g.stride;
        let phase = (iy % s) * s + ix % s;
        (phase * self.g.c + c) * self.plane + (iy / s + self.top) * self.wp + ix / s + self.top
    }

    /// The input gradient's convolution, when the direct kernel runs it: dX = conv(pad(dY), w′) with
    /// w′ the weight turned by 180° and its channels swapped, padded by k − 1 − pad (a stride-1
    /// convolution's transpose is again one). None where the gemm kernels run it instead.
    fn transposed(&self) -> Option<Shifted> {
        let g = &self.g;
        (self.direct && g.stride == 1 && g.pad < g.k).then(|| {
            let pad = g.k - 1 - g.pad;
            Shifted::new(Geometry { c: g.o, h: g.oh(), w: g.ow(), o: g.c, pad, ..*g }, None)
        })
    }

    /// Positions the forward computes per channel: the grid, rounded up to the direct kernel's tiles.
    fn positions(&self) -> usize {
        if self.direct {
            kernels::padded_positions(self.q)
        } else {
            self.q
        }
    }

    /// Length of the padded input buffer: C planes per phase, and the direct kernel's reads past the
    /// last one.
    fn padded_len(&self) -> usize {
        self.g.stride * self.g.stride * self.g.c * self.plane + self.positions() - self.q
    }

    /// Length of the forward's output buffer: O (whole blocks for the direct kernel) by positions.
    fn output_len(&self) -> usize {
        let rows = if self.direct { self.g.o.div_ceil(kernels::OB) * kernels::OB } else { self.g.o };
        rows * self.positions()
    }

    /// The OIHW weight (O, C, k, k) as [`Shifted::products`] reads it.
    fn forward_weight(&self, w: &[f32]) -> Vec<f32> {
        let g = &self.g;
        if self.winograd {
            winograd::weight(w, (g.o, g.c))
        } else if self.direct {
            kernels::blocked_weight(w, (g.o, g.c, g.k * g.k))
        } else {
            taps_first(w, g, false)
        }
    }

    /// Copies one CHW image (quantized, with a grid) inside the borders of `xpad` (C planes per phase).
    /// Only the image's own positions are written: the borders stay zero from the buffer's allocation,
    /// since nothing else writes to it.
    fn pad(&self, x: &[f32], xpad: &mut [f32]) {
        let g = &self.g;
        // Stride 2 quantizes a row here first, then splits it.
        let mut quantized = vec![0f32; if self.grid.is_some() && g.stride == 2 { g.w } else { 0 }];
        for (c, src) in x.chunks_exact(g.h * g.w).enumerate() {
            if let (1, Some(grid)) = (g.stride, self.grid) {
                quantize_rows(grid, src, (&mut xpad[self.position(c, 0, 0)..], g.w, self.wp));
                continue;
            }
            for (iy, row) in src.chunks_exact(g.w).enumerate() {
                let start = self.position(c, iy, 0);
                if g.stride == 1 {
                    xpad[start..start + g.w].copy_from_slice(row);
                    continue;
                }
                let row = match self.grid {
                    Some(grid) => {
                        quantize_into(grid, row, &mut quantized);
                        &quantized[..]
                    }
                    None => row,
                };
                // The even and odd columns go to two phases, the odd one's after.
                let (even, odd) = xpad.split_at_mut(self.position(c, iy, 1));
                kernels::split_row(row, &mut even[start..start + g.w.div_ceil(2)], &mut odd[..g.w / 2]);
            }
        }
    }

    /// The image's positions of the padded planes `xpad` (the inverse of [`Shifted::pad`], unquantized).
    fn unpad(&self, xpad: &[f32], x: &mut [MaybeUninit<f32>]) {
        let g = &self.g;
        for (c, dst) in x.chunks_exact_mut(g.h * g.w).enumerate() {
            for (iy, row) in dst.chunks_exact_mut(g.w).enumerate() {
                if g.stride == 1 {
                    let start = self.position(c, iy, 0);
                    row.iter_mut().zip(&xpad[start..start + g.w]).for_each(|(d, &v)| _ = d.write(v));
                    continue;
                }
                let (even, odd) = (&xpad[self.position(c, iy, 0)..], &xpad[self.position(c, iy, 1)..]);
                kernels::merge_row(&even[..g.w.div_ceil(2)], &odd[..g.w / 2], row);
            }
        }
    }

    /// Keeps the OH·OW valid positions of `ext` (planes of `stride` values, rows `wp` wide).
    fn crop(&self, ext: &[f32], stride: usize, rows: usize, cols: usize, out: &mut [MaybeUninit<f32>]) {
        for (src, dst) in ext.chunks(stride).zip(out.chunks_exact_mut(rows * cols)) {
            for (r, d) in src.chunks(self.wp).zip(dst.chunks_exact_mut(cols)) {
                d.iter_mut().zip(&r[..cols]).for_each(|(d, &v)| _ = d.write(v));
            }
        }
    }

    /// Images the forward computes together ([`Shifted::products`]): a Winograd batch, or one. Its
    /// buffers hold that many padded inputs, [`Shifted::padded_len`] apart, and output grids,
    /// [`Shifted::output_len`] apart.
    fn batch(&self) -> usize {
        if self.winograd {
            winograd::batch(self.g.h, self.g.w)
        } else {
            1
        }
    }

    /// Y\[n\] = Σ_t W_t · shift_t(Xpad\[n\]) for the [`Shifted::batch`] images padded in `xpad`, into
    /// their grids in `yext`: `w` as [`Shifted::forward_weight`] lays it out. Every image of the batch
    /// is computed: slots the caller did not fill this time hold finite values from before (or the
    /// allocation's zeros), whose outputs it does not read.
    fn products(&self, w: &[f32], xpad: &[f32], yext: &mut [f32]) {
        let g = &self.g;
        let (positions, images) = (self.positions(), self.batch());
        if self.winograd {
            let padded = (xpad, self.plane, self.wp, self.padded_len());
            winograd::forward(padded, (g.c, g.h, g.w, images), (w, g.o), (yext, positions, self.output_len()));
        } else if self.direct {
            let shifts: Vec<usize> = (0..g.k * g.k).map(|t| self.shift(t)).collect();
            // SAFETY: `direct` is set only where kernels::available() found AVX-512F.
            unsafe { kernels::direct((xpad, self.plane, g.c), &shifts, w, (yext, positions), self.q, self.rows()) };
        } else {
            for t in 0..g.k * g.k {
                let wt = &w[t * g.o * g.c..(t + 1) * g.o * g.c];
                // yext (O×Q) += W_t (O×C) · Xpad_t (C×Q)
                gemm_split(
                    g.o,
                    self.q,
                    g.c,
                    yext,
                    (self.q, 1),
                    wt,
                    (g.c, 1),
                    &xpad[self.shift(t)..],
                    (self.plane, 1),
                    t > 0,
                );
            }
        }
    }

    /// One image's output from its grid `yext`: cropped, or passed through the epilogue.
    fn finish(&self, yext: &[f32], y: &mut [MaybeUninit<f32>], epilogue: Option<(&Epilogue, Option<&[f32]>)>) {
        let g = &self.g;
        match epilogue {
            None => self.crop(yext, self.positions(), g.oh(), g.ow(), y),
            Some((e, residual)) => {
                let (oh, ow) = (g.oh(), g.ow());
                for (o, (src, dst)) in yext.chunks(self.positions()).zip(y.chunks_exact_mut(oh * ow)).enumerate() {
                    for (oy, (row, d)) in src.chunks(self.wp).zip(dst.chunks_exact_mut(ow)).enumerate() {
                        let r = residual.map(|r| &r[(o * oh + oy) * ow..][..ow]);
                        bn::affine_row(d, &row[..ow], r, (e.scale[o], e.shift[o]), e.relu);
                    }
                }
            }
        }
    }

    /// Buffers for [`Shifted::products`]: the batch's padded inputs and output grids.
    fn batch_buffers(&self) -> (Vec<f32>, Vec<f32>) {
        (vec![0f32; self.batch() * self.padded_len()], vec![0f32; self.batch() * self.output_len()])
    }

    /// dX\[n\] = crop(Σ_t shift_tᵀ(W_tᵀ · dYext)): `w_tco` is the weight as (tap, C, O).
    fn input_grad(&self, dy: &[f32], w_tco: &[f32], dyext: &mut [f32], dxpad: &mut [f32], dx: &mut [MaybeUninit<f32>]) {
        let g = &self.g;
        let (oh, ow) = (g.oh(), g.ow());
        dyext.fill(0.0);
        for (src, dst) in dy.chunks_exact(oh * ow).zip(dyext.chunks_exact_mut(self.q)) {
            for (row, out) in src.chunks_exact(ow).zip(dst.chunks_exact_mut(self.wp)) {
                out[..ow].copy_from_slice(row);
            }
        }
        dxpad.fill(0.0);
        for t in 0..g.k * g.k {
            let wt = &w_tco[t * g.o * g.c..(t + 1) * g.o * g.c];
            // dXpad_t (C×Q) += W_tᵀ (C×O) · dYext (O×Q)
            gemm_split(
                g.c,
                self.q,
                g.o,
                &mut dxpad[self.shift(t)..],
                (self.plane, 1),
                wt,
                (g.o, 1),
                dyext,
                (self.q, 1),
                true,
            );
        }
        self.unpad(dxpad, dx);
    }

    /// Whether the weight gradient runs [`kernels::weight_grad`], which reads dY on the output grid and
    /// the padded image in place (no transposition): stride 1 on maps of 16x16 and more, where it
    /// measured 3-13% faster than gemm and the 16x16 block. On the 8x8 maps and the stride-2 phases it
    /// measured 2-7% slower (more taps' rows than L1 holds), so those keep the transposed-dY path.
    fn direct_weight_grad(&self) -> bool {
        self.direct && self.g.stride == 1 && self.q >= 256 && kernels::weight_grad_fits(self.g.o, self.g.c)
    }

    /// Positions per channel of dY on the output grid for that kernel: the grid, rounded up to 16.
    fn grid16(&self) -> usize {
        self.q.next_multiple_of(kernels::LANES)
    }

    /// Images per call of that kernel: enough positions (~600) to make its final sums cheap, few enough
    /// that a tile's rows (8 rows per image) stay in L1 across the taps.
    fn images_per_call(&self) -> usize {
        (600 / self.grid16()).clamp(1, GROUP)
    }

    /// One image's dY (O planes of OH·OW) on the output grid (O rows of [`Shifted::grid16`], rows `wp`
    /// wide). The dropped columns and the tail are never written and stay zero from the allocation.
    fn spread(&self, dy: &[f32], dyext: &mut [f32]) {
        let (oh, ow) = (self.g.oh(), self.g.ow());
        for (src, dst) in dy.chunks_exact(oh * ow).zip(dyext.chunks_exact_mut(self.grid16())) {
            for (row, out) in src.chunks_exact(ow).zip(dst.chunks_mut(self.wp)) {
                out[..ow].copy_from_slice(row);
            }
        }
    }

    /// acc (tap, C, O) += Σ_q dYext[o, q] · shift_t(Xpad)[c, q] for one image.
    fn weight_grad(&self, x: &[f32], dy: &[f32], xpad: &mut [f32], dyt: &mut [f32], acc: &mut [f32]) {
        let g = &self.g;
        let (oh, ow) = (g.oh(), g.ow());
        self.pad(x, xpad);
        // dY transposed to (Q, O), so that the GEMM reads it in place. The dropped columns are never
        // written and stay zero from the buffer's allocation.
        for (o, plane) in dy.chunks_exact(oh * ow).enumerate() {
            for (oy, row) in plane.chunks_exact(ow).enumerate() {
                for (ox, v) in row.iter().enumerate() {
                    dyt[(oy * self.wp + ox) * g.o + o] = *v;
                }
            }
        }
        let sixteen = g.o == 16 && g.c.is_multiple_of(16) && self.direct;
        for t in 0..g.k * g.k {
            // acc_t (O×C, column-major) += dY (O×Q) · Xpad_tᵀ (Q×C)
            let acc_t = &mut acc[t * g.o * g.c..(t + 1) * g.o * g.c];
            let xs = &xpad[self.shift(t)..];
            if sixteen {
                // SAFETY: `direct` is set only where kernels::available() found AVX-512F.
                unsafe { kernels::weight_grad_o16(dyt, xs, self.plane, self.q, acc_t) };
            } else {
                gemm_split(g.o, g.c, self.q, acc_t, (1, g.o), dyt, (1, g.o), xs, (1, self.plane), true);
            }
        }
    }
}

/// How a shifted convolution's backward computes dX.
enum InputGrad {
    /// Stride 1 on the direct kernel or Winograd's: the forward convolution of dY with the turned
    /// weight (as the convolution reads it), a batch of images at a time.
    Transposed(Shifted, Vec<f32>),
    /// Stride 2 on the direct kernel, phase by phase.
    Phases(PhaseGrad),
    /// k·k GEMMs into the padded gradient, the weight as (tap, C, O).
    Gemm(Vec<f32>),
    /// dX is not wanted (the network's input).
    Skip,
}

/// The input gradient of a 3x3, stride-2, padding-1 convolution on the direct kernel. Input row
/// y = 2·oy + ky − 1, so dX's even rows (y = 2m) take dY row m through ky = 1, and its odd rows
/// (y = 2m + 1) take rows m + 1 (ky = 0) and m (ky = 2); columns alike. Each of dX's four phases
/// (even/odd rows x even/odd columns) is thus a stride-1 convolution of dY with 1, 2, 2 or 4 of the
/// taps, which the direct kernel runs like a forward (all 9·O multiply-adds of a phase's outputs in
/// registers) instead of nine GEMMs that each add into the whole padded gradient.
struct PhaseGrad {
    g: Geometry,
    /// dY padded with one zero column after each row and one zero row after the last.
    wp: usize,
    plane: usize,
    /// Per phase (py, px), in the order (0, 0), (0, 1), (1, 0), (1, 1): the taps' shifts in the
    /// padded dY and the weight as the kernel reads it (C outputs, O inputs).
    phases: Vec<(Vec<usize>, Vec<f32>)>,
}

impl PhaseGrad {
    /// For the layers it takes (3x3, stride 2, padding 1, AVX-512); None elsewhere.
    fn new(g: Geometry, w: &[f32]) -> Option<Self> {
        if !(kernels::available() && g.k == 3 && g.stride == 2 && g.pad == 1) {
            return None;
        }
        let wp = g.ow() + 1;
        let plane = (g.oh() + 1) * wp;
        // A phase's taps: (k, offset in dY) for even (ky = 1, row m) and odd (ky = 0, row m + 1;
        // ky = 2, row m) positions.
        let taps = |parity: usize| -> &[(usize, usize)] {
            if parity == 0 {
                &[(1, 0)]
            } else {
                &[(0, 1), (2, 0)]
            }
        };
        let phases = (0..4)
            .map(|phase| {
                let (py, px) = (phase / 2, phase % 2);
                let pairs: Vec<_> = taps(py)
                    .iter()
                    .flat_map(|&(ky, dy)| taps(px).iter().map(move |&(kx, dx)| (ky, dy, kx, dx)))
                    .collect();
                let shifts = pairs.iter().map(|&(_, dy, _, dx)| dy * wp + dx).collect();
                // (C, O, taps): dX channel c from dY channel o through tap (ky, kx) of w[o][c].
                let mut wt = vec![0f32; g.c * g.o * pairs.len()];
                for c in 0..g.c {
                    for o in 0..g.o {
                        for (t, &(ky, _, kx, _)) in pairs.iter().enumerate() {
                            wt[(c * g.o + o) * pairs.len() + t] = w[((o * g.c + c) * 3 + ky) * 3 + kx];
                        }
                    }
                }
                (shifts, kernels::blocked_weight(&wt, (g.c, g.o, pairs.len())))
            })
            .collect();
        Some(PhaseGrad { g, wp, plane, phases })
    }

    /// Positions each phase computes: OH rows of the padded width, in whole registers.
    fn positions(&self) -> usize {
        kernels::padded_positions(self.g.oh() * self.wp)
    }

    /// (padded dY, two phases' outputs) buffer lengths. The padded dY has room for the kernel's reads
    /// past its last plane (at most a tile, plus the largest shift).
    fn buffers(&self) -> (usize, usize) {
        (self.g.o * self.plane + kernels::LANES, 2 * self.g.c.div_ceil(kernels::OB) * kernels::OB * self.positions())
    }

    /// dX of one image from its dY (O planes of OH·OW).
    fn run(&self, dy: &[f32], dypad: &mut [f32], phase_out: &mut [f32], dx: &mut [MaybeUninit<f32>]) {
        let g = &self.g;
        let (oh, ow, positions) = (g.oh(), g.ow(), self.positions());
        // Only the image's positions are written: the zero column and row stay zero.
        for (src, dst) in dy.chunks_exact(oh * ow).zip(dypad.chunks_exact_mut(self.plane)) {
            for (row, out) in src.chunks_exact(ow).zip(dst.chunks_exact_mut(self.wp)) {
                out[..ow].copy_from_slice(row);
            }
        }
        let (even_cols, odd_cols) = phase_out.split_at_mut(phase_out.len() / 2);
        for (py, row_phases) in self.phases.chunks_exact(2).enumerate() {
            for ((shifts, w), out) in row_phases.iter().zip([&mut *even_cols, &mut *odd_cols]) {
                // SAFETY: PhaseGrad exists only where kernels::available() found AVX-512F.
                unsafe { kernels::direct((dypad, self.plane, g.o), shifts, w, (out, positions), oh * self.wp, None) };
            }
            // Row m of the two phases is dX row 2m + py, its even and odd columns.
            for (c, plane) in dx.chunks_exact_mut(g.h * g.w).enumerate() {
                for (m, row) in plane.chunks_exact_mut(g.w).skip(py).step_by(2).enumerate() {
                    let at = c * positions + m * self.wp;
                    kernels::merge_row(&even_cols[at..][..g.w.div_ceil(2)], &odd_cols[at..][..g.w / 2], row);
                }
            }
        }
    }
}

/// [`matmul`] in pieces of at most 48 columns of the column-major product: above that the gemm crate
/// copies the large operand into its own layout first, which costs as much as the shifted reads save.
#[allow(clippy::too_many_arguments)]
fn gemm_split(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) {
    const MAX: usize = 48;
    // gemm works on the column-major product: with a row-major dst it computes dstᵀ = rhsᵀ · lhsᵀ.
    let transposed = dst_cs < dst_rs;
    let cols = if transposed { m } else { n };
    for start in (0..cols).step_by(MAX) {
        let len = MAX.min(cols - start);
        if transposed {
            matmul(
                len,
                n,
                k,
                &mut dst[start * dst_rs..],
                (dst_rs, dst_cs),
                &lhs[start * lhs_rs..],
                (lhs_rs, lhs_cs),
                rhs,
                (rhs_rs, rhs_cs),
                accumulate,
            );
        } else {
            matmul(
                m,
                len,
                k,
                &mut dst[start * dst_cs..],
                (dst_rs, dst_cs),
                lhs,
                (lhs_rs, lhs_cs),
                &rhs[start * rhs_cs..],
                (rhs_rs, rhs_cs),
                accumulate,
            );
        }
    }
}

/// Unfolds one CHW image into `col`, a row-major (C·k·k) × (OH·OW) matrix.
fn im2col(x: &[f32], g: &Geometry, col: &mut [f32]) {
    let (oh, ow) = (g.oh(), g.ow());
    let p = oh * ow;
    for ci in 0..g.c {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut col[((ci * g.k + ky) * g.k + kx) * p..][..p];
                for oy in 0..oh {
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let (lo, hi) = g.valid_columns(kx);
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let start = lo * g.stride + kx - g.pad;
                    if g.stride == 1 {
                        out[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                    } else {
                        out[lo..hi].iter_mut().zip(src[start..].iter().step_by(g.stride)).for_each(|(o, &v)| *o = v);
                    }
                }
            }
        }
    }
}

/// Folds a (C·k·k) × (OH·OW) column matrix back into a CHW image, adding overlapping entries.
fn col2im(col: &[f32], g: &Geometry, x: &mut [f32]) {
    let (oh, ow) = (g.oh(), g.ow());
    let p = oh * ow;
    x.fill(0.0);
    for ci in 0..g.c {
        let plane = &mut x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &col[((ci * g.k + ky) * g.k + kx) * p..][..p];
                for oy in 0..oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let src = &row[oy * ow..(oy + 1) * ow];
                    let (lo, hi) = g.valid_columns(kx);
                    let start = lo * g.stride + kx - g.pad;
                    for (d, s) in dst[start..].iter_mut().step_by(g.stride).zip(&src[lo..hi]) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// dst (m×n) = lhs (m×k) · rhs (k×n), each given by its row and column strides; `accumulate` adds to dst.
///
/// The gemm crate copies ("packs") an operand whose elements are not laid out the way its kernels read
/// them; the callers pick strides so that the large operand is read in place.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) {
    debug_assert!(dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    debug_assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the slices cover every element the strides address (checked above in debug builds, and
    // by construction from the geometry), and dst does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The convolution of a batch: NCHW `x` (quantized onto `grid` first, when there is one) with OIHW `w`,
/// each output channel passed through `epilogue` when there is one.
pub(crate) fn forward(g: Geometry, grid: Option<Grid>, x: &[f32], w: &[f32], epilogue: Option<&Epilogue>) -> Vec<f32> {
    forward_then(g, grid, (x, w), epilogue.map(|e| (e, None)), |_| ()).0
}

/// The convolution of a batch as [`forward`] (no epilogue), and the per-channel mean and biased
/// variance of its first `channels` output channels (for batch norm; a folded layer needs only its
/// float half's). Each image's statistics are taken while its output is still in cache, and merged
/// exactly (Chan et al.): two passes over the output in memory fewer.
pub(crate) fn forward_moments(
    g: Geometry,
    grid: Option<Grid>,
    (x, w): (&[f32], &[f32]),
    channels: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let p = g.pixels();
    let (y, per_image) = forward_then(g, grid, (x, w), None, |yn| bn::image_moments(&yn[..channels * p], p));
    let (mean, var) = bn::merge_moments(&per_image, channels, p);
    (y, mean, var)
}

/// [`forward`] with the epilogue and the whole batch's shortcut, when there are, and `after` of each
/// image's output (O·OH·OW values), in image order.
fn forward_then<R: Send>(
    g: Geometry,
    grid: Option<Grid>,
    (x, w): (&[f32], &[f32]),
    epilogue: Option<(&Epilogue, Option<&[f32]>)>,
    after: impl Fn(&[f32]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let (kd, p) = (g.kdim(), g.pixels());
    let size = g.c * g.h * g.w;
    // The epilogue of image n, with its slice of the shortcut.
    let epilogue_of = |n: usize| epilogue.map(|(e, r)| (e, r.map(|r| &r[n * g.o * p..(n + 1) * g.o * p])));
    let mut per_image = Vec::new();
    if g.shifted() {
        let sh = Shifted::new(g, grid);
        let w_fwd = sh.forward_weight(w);
        let (batch, out) = (sh.batch(), g.o * p);
        let (padded_len, output_len) = (sh.padded_len(), sh.output_len());
        let y = written(g.n * out, |y| {
            let per_batch: Vec<Vec<R>> = y
                .par_chunks_mut(batch * out)
                .enumerate()
                .map_init(
                    || sh.batch_buffers(),
                    |(xpad, yext), (b, ys)| {
                        let first = b * batch;
                        for (i, xpad) in xpad.chunks_exact_mut(padded_len).take(ys.len() / out).enumerate() {
                            let n = first + i;
                            if let Some(next) = x.get((n + 1) * size..(n + 2) * size) {
                                kernels::prefetch(next);
                            }
                            sh.pad(&x[n * size..(n + 1) * size], xpad);
                        }
                        sh.products(&w_fwd, xpad, yext);
                        let outputs = ys.chunks_exact_mut(out).zip(yext.chunks_exact(output_len));
                        outputs
                            .enumerate()
                            .map(|(i, (yn, grid))| {
                                sh.finish(grid, yn, epilogue_of(first + i));
                                // SAFETY: Shifted::finish wrote every element of yn (O·OH·OW).
                                after(unsafe { std::slice::from_raw_parts(yn.as_ptr().cast::<f32>(), yn.len()) })
                            })
                            .collect()
                    },
                )
                .collect();
            per_image = per_batch.into_iter().flatten().collect();
        });
        return (y, per_image);
    }
    let mut y = vec![0f32; g.n * g.o * p];
    per_image = y
        .par_chunks_mut(g.o * p)
        .enumerate()
        .map_init(
            || (vec![0f32; kd * p], Vec::new()),
            |(col, buf), (n, yn)| {
                im2col(image(&x[n * size..(n + 1) * size], grid, buf), &g, col);
                matmul(g.o, p, kd, yn, (p, 1), w, (kd, 1), col, (p, 1), false);
                if let Some((e, residual)) = epilogue_of(n) {
                    for (o, plane) in yn.chunks_exact_mut(p).enumerate() {
                        match residual {
                            Some(r) => plane.iter_mut().zip(&r[o * p..]).for_each(|(v, &r)| *v = e.apply(o, *v, r)),
                            None => plane.iter_mut().for_each(|v| *v = e.apply(o, *v, 0.0)),
                        }
                    }
                }
                after(yn)
            },
        )
        .collect();
    (y, per_image)
}

/// The output gradient a backward reads: given whole, or computed image by image into a buffer of
/// O·OH·OW values (by a fused op, so that it is never written to memory whole and read back).
#[derive(Clone, Copy)]
pub(crate) enum OutputGrad<'a> {
    Given(&'a [f32]),
    PerImage(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// The widest maps that get tight rows ([`Shifted::new`]). 32x32 maps measured 0.98-0.99x with them
/// (1,024 positions make 21 tiles of 3 registers and a remainder, 1,056 make 22 whole tiles).
const TIGHT_MAX_WIDTH: usize = 16;

/// Images per group of the weight gradient: fixed groups summed in a fixed order give the same weights
/// for the same seed, however rayon schedules the work.
pub(crate) const GROUP: usize = 8;

/// Which weight a backward returns the gradient of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightGrad {
    /// The weight given (O output channels).
    Given,
    /// The parameter W of a weight stacked as [W; q(W)], with q straight-through (folded batch norm):
    /// dW = dW_top + dW_bottom, computed as one product of dY_top + dY_bottom (O/2 output channels)
    /// instead of two.
    StackedHalves,
}

/// dX (when `want_dx`) and dW (OIHW, of the weight `of` says) of a batch from dY, X (quantized onto
/// `grid` as in the forward) and the weight. With the shifted kernels both come from one pass over the
/// images, so each image's output gradient is read from memory once, for both.
pub(crate) fn backward(
    g: Geometry,
    grid: Option<Grid>,
    dy: OutputGrad,
    (x, w): (&[f32], &[f32]),
    want_dx: bool,
    of: WeightGrad,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let out = g.o * g.pixels();
    // The weight gradient's geometry: half the output channels for a stacked weight.
    let gw = match of {
        WeightGrad::Given => g,
        WeightGrad::StackedHalves => Geometry { o: g.o / 2, ..g },
    };
    let out_w = gw.o * g.pixels();
    if !g.shifted() {
        let whole = match dy {
            OutputGrad::Given(dy) => std::borrow::Cow::Borrowed(dy),
            OutputGrad::PerImage(image) => {
                let mut whole = vec![0f32; g.n * out];
                whole.par_chunks_mut(out).enumerate().for_each(|(n, d)| image(n, d));
                std::borrow::Cow::Owned(whole)
            }
        };
        let dx = want_dx.then(|| unfolded_input_grad(g, &whole, w));
        let dw = match of {
            WeightGrad::Given => unfolded_weight_grad(g, grid, &whole, x),
            WeightGrad::StackedHalves => {
                let mut summed = vec![0f32; g.n * out_w];
                summed.par_chunks_mut(out_w).zip(whole.par_chunks(out)).for_each(|(s, d)| add_halves(d, s));
                unfolded_weight_grad(gw, grid, &summed, x)
            }
        };
        return (dx, dw);
    }
    let sh = Shifted::new(g, grid);
    let size = g.c * g.h * g.w;
    let dx_path = InputGrad::new(&sh, w, want_dx);
    let dw_plan = WeightGradPlan::new(g, gw, grid);
    // One group of images: its partial dW, and its dX written into `dx` when given.
    let group = |grp: usize, mut dx: Option<&mut [MaybeUninit<f32>]>| {
        let mut acc = vec![0f32; dw_plan.acc_len()];
        let mut dw_path = dw_plan.path.with_buffers(&dw_plan);
        let mut dx_buffers = dx_path.buffers(&sh);
        let mut dy_image = match dy {
            OutputGrad::Given(_) => Vec::new(),
            OutputGrad::PerImage(_) => vec![0f32; out],
        };
        let mut dy_summed = match of {
            WeightGrad::Given => Vec::new(),
            WeightGrad::StackedHalves => vec![0f32; out_w],
        };
        let last = ((grp + 1) * GROUP).min(g.n) - 1;
        for (i, n) in (grp * GROUP..=last).enumerate() {
            // This image's input is read after its dX is computed, and the next image's given dY
            // after that: both are asked for now.
            kernels::prefetch(&x[n * size..(n + 1) * size]);
            if let OutputGrad::Given(dy) = dy {
                kernels::prefetch(dy.get((n + 1) * out..(n + 2) * out).unwrap_or_default());
            }
            let dyn_ = match dy {
                OutputGrad::Given(dy) => &dy[n * out..(n + 1) * out],
                OutputGrad::PerImage(image) => {
                    image(n, &mut dy_image);
                    &dy_image
                }
            };
            if let Some(dx) = dx.as_deref_mut() {
                dx_path.image(&sh, dyn_, (i, n == last), &mut dx_buffers, dx);
            }
            let dy_w = match of {
                WeightGrad::Given => dyn_,
                WeightGrad::StackedHalves => {
                    add_halves(dyn_, &mut dy_summed);
                    &dy_summed
                }
            };
            dw_path.image(&dw_plan, &x[n * size..(n + 1) * size], dy_w, (i, n == last), &mut acc);
        }
        acc
    };
    let groups = g.n.div_ceil(GROUP);
    let mut partials = Vec::new();
    let dx = want_dx.then(|| {
        written(g.n * size, |dx| {
            partials = dx.par_chunks_mut(GROUP * size).enumerate().map(|(grp, d)| group(grp, Some(d))).collect()
        })
    });
    if !want_dx {
        partials = (0..groups).into_par_iter().map(|grp| group(grp, None)).collect();
    }
    (dx, dw_plan.weight_grad(&partials))
}

impl InputGrad {
    /// The path for a shifted convolution's dX (`Skip` when it is not wanted): a forward convolution
    /// of dY on the direct kernel, phase by phase for stride 2, or shifted GEMMs with w as (tap, C, O).
    fn new(sh: &Shifted, w: &[f32], want_dx: bool) -> Self {
        let g = sh.g;
        match (want_dx, sh.transposed()) {
            (false, _) => InputGrad::Skip,
            (true, Some(t)) => {
                let w = t.forward_weight(&flipped(w, &g));
                InputGrad::Transposed(t, w)
            }
            (true, None) => match PhaseGrad::new(g, w) {
                Some(phases) => InputGrad::Phases(phases),
                None => InputGrad::Gemm(taps_first(w, &g, true)),
            },
        }
    }

    /// One group's scratch: (the padded dY, the computed dX before it is cropped).
    fn buffers(&self, sh: &Shifted) -> (Vec<f32>, Vec<f32>) {
        let (padded, computed) = match self {
            InputGrad::Skip => (0, 0),
            InputGrad::Transposed(t, _) => (t.batch() * t.padded_len(), t.batch() * t.output_len()),
            InputGrad::Phases(p) => p.buffers(),
            InputGrad::Gemm(_) => (sh.g.o * sh.q, sh.padded_len()),
        };
        (vec![0f32; padded], vec![0f32; computed])
    }

    /// dX of image `i` of its group from its dY, into the group's `dx` (`last`: the group's last image,
    /// which ends a batch of the transposed path).
    fn image(
        &self,
        sh: &Shifted,
        dy: &[f32],
        (i, last): (usize, bool),
        (padded, computed): &mut (Vec<f32>, Vec<f32>),
        dx: &mut [MaybeUninit<f32>],
    ) {
        let size = sh.g.c * sh.g.h * sh.g.w;
        match self {
            // A batch of images' dY padded one by one, their dX computed together.
            InputGrad::Transposed(t, w_dx) => {
                let (batch, padded_len) = (t.batch(), t.padded_len());
                let slot = i % batch;
                t.pad(dy, &mut padded[slot * padded_len..(slot + 1) * padded_len]);
                if slot + 1 == batch || last {
                    t.products(w_dx, padded, computed);
                    let images = dx[(i - slot) * size..(i + 1) * size].chunks_exact_mut(size);
                    for (dx, grid) in images.zip(computed.chunks_exact(t.output_len())) {
                        t.finish(grid, dx, None);
                    }
                }
            }
            InputGrad::Phases(p) => p.run(dy, padded, computed, &mut dx[i * size..(i + 1) * size]),
            InputGrad::Gemm(w_dx) => sh.input_grad(dy, w_dx, padded, computed, &mut dx[i * size..(i + 1) * size]),
            InputGrad::Skip => unreachable!("no dX buffer is given when dX is not wanted"),
        }
    }
}

/// What every group of a shifted backward shares for dW: the shapes, the layouts and the path.
struct WeightGradPlan {
    /// The batch's convolution.
    g: Geometry,
    /// The weight gradient's: `g` with dW's output channels (half of them for a stacked weight).
    gw: Geometry,
    /// The input's padded layout for `gw`.
    shw: Shifted,
    /// dY padded like the input (Winograd transforms its tiles like the input's).
    shdy: Shifted,
    /// The direct kernel's tap shifts in the padded input.
    shifts: Vec<usize>,
    /// Winograd's tiles per image, and the distances between the matrices (one per transformed value
    /// ξ) of an image's D (O rows) and V (C rows).
    tiles: usize,
    strides: (usize, usize),
    /// The path, without buffers (each group gets its own: [`WeightGradPath::with_buffers`]).
    path: WeightGradPath,
}

impl WeightGradPlan {
    fn new(g: Geometry, gw: Geometry, grid: Option<Grid>) -> Self {
        let shw = Shifted::wide(gw, grid);
        let tiles = winograd::tiles(g.h, g.w);
        let path = if winograd::weight_grad_channels_last(&gw) {
            WeightGradPath::ChannelsLast { xpad: Vec::new(), dy: Vec::new(), d: Vec::new(), v: Vec::new() }
        } else if winograd::weight_grad_in_lanes(&gw) && kernels::weight_grad_fits(gw.o, g.c) {
            WeightGradPath::Winograd { xpad: Vec::new(), dypad: Vec::new(), slots: Vec::new() }
        } else if shw.direct_weight_grad() {
            WeightGradPath::Direct { slots: Vec::new() }
        } else {
            WeightGradPath::Gemm { xpad: Vec::new(), dyt: Vec::new() }
        };
        Self {
            g,
            gw,
            shifts: (0..g.k * g.k).map(|t| shw.shift(t)).collect(),
            shdy: Shifted::wide(Geometry { c: gw.o, ..g }, None),
            shw,
            tiles,
            strides: (winograd::matrix_stride(gw.o, tiles), winograd::matrix_stride(g.c, tiles)),
            path,
        }
    }

    /// Whether the partial sums are Winograd products (rows (ξ, C)) rather than taps (rows (tap, C)).
    fn transformed(&self) -> bool {
        matches!(self.path, WeightGradPath::Winograd { .. } | WeightGradPath::ChannelsLast { .. })
    }

    /// Length of a group's partial dW: (ξ or tap, C) rows of O values.
    fn acc_len(&self) -> usize {
        let rows = if self.transformed() { winograd::VALUES } else { self.g.k * self.g.k };
        rows * self.g.c * self.gw.o
    }

    /// dW (OIHW) from the groups' partial sums.
    fn weight_grad(&self, partials: &[Vec<f32>]) -> Vec<f32> {
        let c = self.g.c;
        if self.transformed() {
            // Rows (ξ, C) -> (C, ξ), then each transformed product to its 3x3 kernel.
            let values = winograd::VALUES;
            winograd::weight_from_products(&sum_partials(partials, self.gw.o, |r| (r % c) * values + r / c))
        } else {
            // Rows (tap, C) -> OIHW's (C, tap).
            let taps = self.g.k * self.g.k;
            sum_partials(partials, self.gw.o, |r| (r % c) * taps + r / c)
        }
    }
}

/// How a shifted convolution's backward computes dW, with one group's buffers.
enum WeightGradPath {
    /// Winograd's transforms of the input and dY, tiles in the lanes, their products on
    /// [`kernels::weight_grad`] (the 32x32 maps; see [`winograd::weight_grad_in_lanes`]): the padded
    /// input and dY, and (D, V) of each image of one call.
    Winograd { xpad: Vec<f32>, dypad: Vec<f32>, slots: Vec<(Vec<f32>, Vec<f32>)> },
    /// Winograd's transforms channels-last, their products on the direct kernel (where a call fits the L2;
    /// see [`winograd::weight_grad_channels_last`]): the input padded by one pixel and dY, both
    /// channels-last, and every image's D and V side by side (one call per group).
    ChannelsLast { xpad: Vec<f32>, dy: Vec<f32>, d: Vec<f32>, v: Vec<f32> },
    /// [`kernels::weight_grad`] on dY and the padded input in place ([`Shifted::direct_weight_grad`]):
    /// (dY on the output grid, padded input) of each image of one call.
    Direct { slots: Vec<(Vec<f32>, Vec<f32>)> },
    /// k·k GEMMs on dY transposed ([`Shifted::weight_grad`]): the padded input and dY transposed.
    Gemm { xpad: Vec<f32>, dyt: Vec<f32> },
}

impl WeightGradPath {
    /// The same path with a group's buffers.
    fn with_buffers(&self, p: &WeightGradPlan) -> Self {
        let (g, gw, values) = (&p.g, &p.gw, winograd::VALUES);
        let slots = |n: usize, (a, b): (usize, usize)| (0..n).map(|_| (vec![0f32; a], vec![0f32; b])).collect();
        match self {
            // Enough tiles per call (~256) to make the kernel's final sums cheap.
            Self::Winograd { .. } => Self::Winograd {
                xpad: vec![0f32; p.shw.padded_len()],
                dypad: vec![0f32; p.shdy.padded_len()],
                slots: slots((256 / p.tiles).clamp(1, GROUP), (values * p.strides.0, values * p.strides.1)),
            },
            Self::ChannelsLast { .. } => {
                let (d, v) = winograd::cl_call_lens(gw);
                Self::ChannelsLast {
                    xpad: vec![0f32; (g.h + 2) * (g.w + 2) * g.c],
                    dy: vec![0f32; gw.o * g.pixels()],
                    d: vec![0f32; d],
                    v: vec![0f32; v],
                }
            }
            Self::Direct { .. } => {
                Self::Direct { slots: slots(p.shw.images_per_call(), (gw.o * p.shw.grid16(), p.shw.padded_len())) }
            }
            Self::Gemm { .. } => Self::Gemm { xpad: vec![0f32; p.shw.padded_len()], dyt: vec![0f32; p.shw.q * gw.o] },
        }
    }

    /// Adds image `i` of its group (`last`: the group's last, which ends every call) to the group's
    /// partial dW `acc`, from its input `x` and output gradient `dy`.
    fn image(&mut self, p: &WeightGradPlan, x: &[f32], dy: &[f32], (i, last): (usize, bool), acc: &mut [f32]) {
        let (g, gw) = (&p.g, &p.gw);
        match self {
            Self::Gemm { xpad, dyt } => p.shw.weight_grad(x, dy, xpad, dyt, acc),
            Self::Direct { slots } => {
                let slot = i % slots.len();
                let (dyext, xpad) = &mut slots[slot];
                p.shw.spread(dy, dyext);
                p.shw.pad(x, xpad);
                if slot + 1 == slots.len() || last {
                    let images: Vec<(&[f32], &[f32])> = slots[..=slot].iter().map(|(d, x)| (&d[..], &x[..])).collect();
                    let grid = (p.shw.plane, p.shw.grid16());
                    // SAFETY: `direct` (part of direct_weight_grad) is set only where
                    // kernels::available() found AVX-512F.
                    unsafe { kernels::weight_grad(&images, (gw.o, g.c), grid, &p.shifts, acc) };
                }
            }
            Self::ChannelsLast { xpad, dy: dy_cl, d, v } => {
                winograd::channels_last(x, (g.c, g.h, g.w), 1, xpad);
                winograd::channels_last(dy, (gw.o, g.h, g.w), 0, dy_cl);
                let calls = (i * p.tiles, GROUP * p.tiles);
                winograd::weight_grad_transforms_cl((xpad, dy_cl), (g.c, gw.o, g.h, g.w), calls, (v, d));
                if last {
                    winograd::weight_grad_products_cl((v, d), (g.c, gw.o), GROUP * p.tiles, acc);
                }
            }
            Self::Winograd { xpad, dypad, slots } => {
                let slot = i % slots.len();
                p.shw.pad(x, xpad);
                p.shdy.pad(dy, dypad);
                let (d, v) = &mut slots[slot];
                let padded = (&xpad[..], &dypad[..], p.shw.plane, p.shw.wp);
                winograd::weight_grad_transforms(padded, (g.c, gw.o, g.h, g.w), (v, d));
                if slot + 1 == slots.len() || last {
                    let (d_stride, v_stride) = p.strides;
                    for (xi, acc) in acc.chunks_exact_mut(g.c * gw.o).enumerate() {
                        let images: Vec<(&[f32], &[f32])> =
                            slots[..=slot].iter().map(|(d, v)| (&d[xi * d_stride..], &v[xi * v_stride..])).collect();
                        // SAFETY: the Winograd path is chosen only where winograd::applies, which needs
                        // kernels::available() (AVX-512F).
                        unsafe { kernels::weight_grad(&images, (gw.o, g.c), (p.tiles, p.tiles), &[0], acc) };
                    }
                }
            }
        }
    }
}

/// The sum of the groups' partial weight gradients, each laid out (K, O) (row r of O values), as
/// (O, K) with row r at column `column(r)`. Both steps run in parallel (they ran on the thread that
/// drives candle's autograd, with the workers idle: ~1.6% of a training step), and every element is
/// summed in group order, so the result does not depend on rayon's scheduling.
fn sum_partials(partials: &[Vec<f32>], o: usize, column: impl Fn(usize) -> usize + Sync) -> Vec<f32> {
    let len = partials.first().map_or(0, Vec::len);
    let mut sum = vec![0f32; len];
    sum.par_chunks_mut(4096).enumerate().for_each(|(i, chunk)| {
        for part in partials {
            chunk.iter_mut().zip(&part[i * 4096..]).for_each(|(a, b)| *a += b);
        }
    });
    let k = len / o;
    let mut dw = vec![0f32; len];
    dw.par_chunks_mut(k).enumerate().for_each(|(oi, row)| {
        for r in 0..k {
            row[column(r)] = sum[r * o + oi];
        }
    });
    dw
}

/// `sum[i] = dy[i] + dy[half + i]`: the output gradient of a stacked weight's two halves, summed (see
/// [`WeightGrad::StackedHalves`]).
fn add_halves(dy: &[f32], sum: &mut [f32]) {
    let (top, bottom) = dy.split_at(sum.len());
    sum.iter_mut().zip(top.iter().zip(bottom)).for_each(|(s, (a, b))| *s = a + b);
}

/// dX of a batch from dY and the weight, through im2col (the shapes [`Shifted`] does not take).
fn unfolded_input_grad(g: Geometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (kd, p) = (g.kdim(), g.pixels());
    let mut dx = vec![0f32; g.n * g.c * g.h * g.w];
    dx.par_chunks_mut(g.c * g.h * g.w).enumerate().for_each_init(
        || vec![0f32; kd * p],
        |dcol, (n, dxn)| {
            // dcol (K×P) = Wᵀ (K×O) · dY[n] (O×P)
            matmul(kd, p, g.o, dcol, (p, 1), w, (1, kd), &dy[n * g.o * p..(n + 1) * g.o * p], (p, 1), false);
            col2im(dcol, &g, dxn);
        },
    );
    dx
}

/// dW (OIHW) of a batch from dY and X (quantized onto `grid` as in the forward), through im2col.
fn unfolded_weight_grad(g: Geometry, grid: Option<Grid>, dy: &[f32], x: &[f32]) -> Vec<f32> {
    let (kd, p) = (g.kdim(), g.pixels());
    let size = g.c * g.h * g.w;
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(GROUP))
        .into_par_iter()
        .map(|grp| {
            // acc holds dWᵀ (K×O): stored column-major as the O×K product, so gemm reads colᵀ in
            // place and packs only the small dY (packing the K×P col would cost more than the GEMM).
            let mut acc = vec![0f32; kd * g.o];
            let (mut col, mut buf) = (vec![0f32; kd * p], Vec::new());
            for n in grp * GROUP..((grp + 1) * GROUP).min(g.n) {
                im2col(image(&x[n * size..(n + 1) * size], grid, &mut buf), &g, &mut col);
                // acc (O×K) += dY[n] (O×P) · colᵀ (P×K)
                let dyn_ = &dy[n * g.o * p..(n + 1) * g.o * p];
                matmul(g.o, kd, p, &mut acc, (1, g.o), dyn_, (p, 1), &col, (1, p), true);
            }
            acc
        })
        .collect();
    sum_partials(&partials, g.o, |r| r)
}

/// One image of `x`, quantized onto `grid` in `buf` when there is one.
fn image<'a>(x: &'a [f32], grid: Option<Grid>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match grid {
        None => x,
        Some(grid) => {
            buf.resize(x.len(), 0.0);
            quantize_into(grid, x, buf);
            buf
        }
    }
}

/// The forward op: the convolution of the input (fake-quantized on `grid` first, when there is one:
/// fused here, it costs nothing over the copy the convolution makes anyway) with the weight. Its
/// backward is [`backward`]; the input's gradient is straight-through.
struct Conv2d {
    g: Geometry,
    grid: Option<Grid>,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "qat-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = forward(self.g, self.grid, slice(s1, l1, "conv2d input")?, slice(s2, l2, "conv2d weight")?, None);
        Ok((CpuStorage::F32(y), Shape::from((self.g.n, self.g.o, self.g.oh(), self.g.ow()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The image itself needs no gradient: skip the input gradient of the first layer.
        let want_dx = x.track_op();
        let (dx, dw) = with_slices([grad, x, w], |[dy, x, w]| {
            backward(self.g, self.grid, OutputGrad::Given(dy), (x, w), want_dx, WeightGrad::Given)
        })?;
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// The eval-mode convolution with its per-channel epilogue; no backward (eval needs none). Inputs x and
/// w, and the shortcut as a third input when the epilogue joins one.
struct Conv2dEval {
    g: Geometry,
    grid: Option<Grid>,
    epilogue: Epilogue,
}

impl Conv2dEval {
    fn run(&self, x: &[f32], w: &[f32], residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let y = forward_then(self.g, self.grid, (x, w), Some((&self.epilogue, residual)), |_| ()).0;
        Ok((CpuStorage::F32(y), Shape::from((self.g.n, self.g.o, self.g.oh(), self.g.ow()))))
    }
}

impl CustomOp2 for Conv2dEval {
    fn name(&self) -> &'static str {
        "qat-conv2d-eval"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(slice(s1, l1, "conv2d input")?, slice(s2, l2, "conv2d weight")?, None)
    }
}

impl CustomOp3 for Conv2dEval {
    fn name(&self) -> &'static str {
        "qat-conv2d-eval-join"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let residual = slice(s3, l3, "shortcut")?;
        self.run(slice(s1, l1, "conv2d input")?, slice(s2, l2, "conv2d weight")?, Some(residual))
    }
}

/// `relu?(conv2d(q(x), w)·scale[o] + shift[o])` on the CPU, without gradient: the eval-mode layer, with
/// the affine and the ReLU applied while the convolution writes its output; with a residual,
/// `relu(conv2d(q(x), w)·scale[o] + shift[o] + residual)` (a residual block's join, fused too).
pub fn conv2d_eval_cpu(
    x: &Tensor,
    w: &Tensor,
    (stride, pad): (usize, usize),
    grid: Option<Grid>,
    epilogue: Epilogue,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let g = geometry(x, w, stride, pad)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match residual {
        None => x.apply_op2_no_bwd(&w, &Conv2dEval { g, grid, epilogue }),
        Some(r) => {
            let out_dims = [g.n, g.o, g.oh(), g.ow()];
            if r.dims() != out_dims {
                candle_core::bail!("residual join: shortcut is {:?}, the layer's output {out_dims:?}", r.dims());
            }
            let epilogue = Epilogue { relu: true, ..epilogue };
            x.apply_op3_no_bwd(&w, &r.detach().contiguous()?, &Conv2dEval { g, grid, epilogue })
        }
    }
}

/// The weight of a stride-1 convolution's input gradient, as a convolution of dY: OIHW (O, C, k, k) to
/// (C, O, k, k), each kernel turned by 180°.
fn flipped(w: &[f32], g: &Geometry) -> Vec<f32> {
    let taps = g.k * g.k;
    let mut out = vec![0f32; w.len()];
    for (o, per_o) in w.chunks_exact(g.c * taps).enumerate() {
        for (c, kernel) in per_o.chunks_exact(taps).enumerate() {
            let dst = &mut out[(c * g.o + o) * taps..][..taps];
            dst.iter_mut().zip(kernel.iter().rev()).for_each(|(d, &v)| *d = v);
        }
    }
    out
}

/// The OIHW weight with the taps first: (tap, O, C), or (tap, C, O) when `c_major`.
fn taps_first(w: &[f32], g: &Geometry, c_major: bool) -> Vec<f32> {
    let taps = g.k * g.k;
    let mut out = vec![0f32; w.len()];
    for (i, v) in w.iter().enumerate() {
        let (o, c, t) = (i / (g.c * taps), (i / taps) % g.c, i % taps);
        let j = if c_major { (t * g.c + c) * g.o + o } else { (t * g.o + o) * g.c + c };
        out[j] = *v;
    }
    out
}

/// The geometry of NCHW `x` convolved with OIHW `w` (square kernel).
pub(crate) fn geometry(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Geometry> {
    Geometry::of(x.shape(), w.shape(), stride, pad)
}

/// Convolution of contiguous f32 NCHW `x` (fake-quantized onto `grid` first, with a straight-through
/// gradient, when there is one) with OIHW `w` on the CPU, differentiable.
pub fn conv2d_cpu(x: &Tensor, w: &Tensor, stride: usize, pad: usize, grid: Option<Grid>) -> Result<Tensor> {
    let g = geometry(x, w, stride, pad)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d { g, grid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, rand};
    use candle_core::Var;

    /// Values and both gradients against candle's reference conv2d, on odd shapes, strides and padding,
    /// with the AVX-512 kernels (where the CPU has them) and with the portable ones.
    #[test]
    fn matches_candle_reference_values_and_gradients() {
        check_against_candle();
        kernels::portable(check_against_candle);
    }

    fn check_against_candle() {
        for (n, c, h, w, o, k, stride, pad) in [
            (2, 3, 8, 8, 4, 3, 1, 1),
            (3, 5, 7, 9, 6, 3, 2, 1),
            (1, 2, 5, 5, 3, 1, 1, 0),
            (2, 4, 6, 5, 2, 3, 1, 0),
            (2, 3, 9, 9, 4, 5, 2, 2),
            (1, 1, 3, 3, 1, 3, 3, 1),
            // The shifted (≥ 8 channels) kernels, with more than 48 channels on either side; stride 2
            // on even and odd sizes (the phase split).
            (2, 8, 8, 8, 8, 3, 2, 1),
            (2, 9, 7, 9, 10, 3, 2, 1),
            (1, 16, 5, 7, 32, 3, 2, 1),
            (2, 8, 7, 9, 10, 3, 1, 1),
            (3, 9, 6, 5, 8, 3, 1, 0),
            (2, 8, 9, 9, 12, 5, 1, 2),
            (2, 64, 8, 8, 50, 3, 1, 1),
            (1, 50, 5, 6, 64, 3, 1, 1),
            // 16 output channels: the 16x16 weight-gradient block (on AVX-512 CPUs).
            (2, 16, 6, 7, 16, 3, 1, 1),
            (1, 32, 5, 5, 16, 3, 1, 1),
            // Tight rows (maps up to 16 wide) with the direct kernel's narrower tail tiles (64
            // positions: 2 + 2 registers; 49: 2 + 2; 112: 3 + 2 + 2; 48: 3), rows of 1 and 2 (every
            // position in the first or last column), and channels that fill no whole block; then 17
            // wide, the widest layout again (4·18 = 72 positions: 3 + 2).
            (2, 12, 8, 8, 20, 3, 1, 1),
            (1, 8, 7, 7, 8, 3, 1, 1),
            (1, 8, 8, 14, 8, 3, 1, 1),
            (1, 8, 3, 16, 16, 3, 1, 1),
            (2, 8, 5, 1, 8, 3, 1, 1),
            (1, 8, 3, 2, 8, 3, 1, 1),
            (1, 8, 4, 17, 8, 3, 1, 1),
            // The direct weight-gradient kernel (stride 1, 256+ grid positions), several images per call.
            (3, 16, 16, 16, 8, 3, 1, 1),
            (1, 8, 14, 18, 12, 3, 1, 1),
            (1, 9, 4, 14, 13, 3, 1, 1),
            // Shapes Winograd's rules turn down in part (on AVX-512 CPUs): heights 2 and 6 (no whole
            // 4x4 tiles: the direct kernel), and 8x8 and 4x16 maps whose channels are not in 16s
            // (the forward on Winograd, the weight gradient not), with output channels that fill no
            // whole block.
            (1, 32, 8, 8, 34, 3, 1, 1),
            (2, 33, 4, 16, 32, 3, 1, 1),
            (1, 32, 2, 32, 35, 3, 1, 1),
            (1, 32, 6, 64, 32, 3, 1, 1),
            (3, 32, 8, 8, 36, 3, 1, 1),
            (2, 36, 4, 16, 32, 3, 1, 1),
            // Winograd's F(4x4, 3x3) (16+ channels, maps 16k wide): rows of 4, 8 and 16 tiles, a
            // whole block of 64 tiles and 96 (a partial second block), odd channel counts.
            (2, 16, 16, 16, 16, 3, 1, 1),
            (1, 17, 16, 32, 20, 3, 1, 1),
            (1, 16, 12, 64, 18, 3, 1, 1),
            (1, 32, 32, 32, 33, 3, 1, 1),
            (1, 16, 32, 48, 24, 3, 1, 1),
            // F(4x4, 3x3) on maps 8 wide (2x2 blocks of tiles), images in batches of 8: one image
            // (7 slots unused), 9 (a whole batch and a partial one), 16 high.
            (1, 16, 8, 8, 16, 3, 1, 1),
            (9, 24, 8, 8, 17, 3, 1, 1),
            (2, 16, 16, 8, 20, 3, 1, 1),
            // The channels-last weight gradient (maps up to 16x16, channels in 16s): 8 images a call,
            // and a partial group of one image.
            (9, 32, 8, 8, 16, 3, 1, 1),
            (9, 16, 16, 16, 32, 3, 1, 1),
        ] {
            let x = Var::from_tensor(&rand(&[n, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&rand(&[o, c, k, k], 2)).unwrap();
            let ours = conv2d_cpu(x.as_tensor(), wt.as_tensor(), stride, pad, None).unwrap();
            let reference = x.as_tensor().conv2d(wt.as_tensor(), pad, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            // Winograd's F(4x4, 3x3) rounds to ~1e-5 of the output's scale (its transforms multiply
            // by up to 8 and 25; 2e-4 on outputs up to 17 with 64 channels, against float64).
            let scale = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let shape = (n, c, h, w, o, k, stride, pad);
            assert!(max_diff(&ours, &reference) < 3e-5 * scale(&reference), "forward {shape:?}");
            let up = rand(ours.dims(), 3);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                assert!(max_diff(a, b) < (3e-5 * scale(b)).max(1e-3), "gradient {shape:?}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn the_image_gets_no_gradient_work() {
        let x = rand(&[2, 3, 6, 6], 1);
        let wt = Var::from_tensor(&rand(&[4, 3, 3, 3], 2)).unwrap();
        let y = conv2d_cpu(&x, wt.as_tensor(), 1, 1, None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(wt.as_tensor()).is_some());
    }
}
