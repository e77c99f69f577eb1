//! Integer-only inference of an [`IntModel`]. The one float step is the images' entry onto the stem's
//! input grid; from there on every value is an integer:
//!
//! - a layer multiplies its i8 inputs by its i8 weights into i32 accumulators (plus the i32 bias);
//! - a block's first layer requantizes to the second's input grid (ReLU = clamp at 0) by a
//!   fixed-point multiplier per channel;
//! - the residual stream between blocks is i32 at 2^−[`STREAM_BITS`] of the next layer's input step,
//!   so that the next layer reads it with a rounding shift, and the shortcut joins it after its own
//!   fixed-point rescale;
//! - global average pooling is an integer sum and a rounding division, and the classifier's
//!   accumulators are requantized to one shared logit step.
//!
//! Activations are kept channels-last (NHWC), so that a convolution is rows of dot products.

use super::fixed::FixedMul;
use super::int_model::{IntLayer, IntModel};
use multiversion::multiversion;
use rayon::prelude::*;

/// Fraction bits of the residual stream below the next layer's input step.
pub const STREAM_BITS: u32 = 16;

/// A layer ready to run: weights reordered to (out, ky, kx, in) and padded to a multiple of 64
/// taps, and the fixed-point multipliers of its output.
struct Compiled {
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Taps per output channel, padded.
    taps: usize,
    weights: Vec<i8>,
    bias: Vec<i32>,
    /// Accumulator to the output's unit, per channel.
    out_mul: Vec<FixedMul>,
    /// The input grid's levels (its clamp).
    levels: i32,
    /// The biases' fraction bits: accumulators are shifted up by as many before the bias joins.
    bias_bits: u32,
}

/// Where a layer's output goes.
#[derive(Clone, Copy)]
struct Target {
    /// The real value of one output unit.
    step: f64,
}

impl Compiled {
    fn new(layer: &IntLayer, target: Target) -> Self {
        let s = &layer.shape;
        let k2 = s.kernel * s.kernel;
        let taps = (s.in_ch * k2).div_ceil(64) * 64;
        let mut weights = vec![0i8; s.out_ch * taps];
        for o in 0..s.out_ch {
            for c in 0..s.in_ch {
                for t in 0..k2 {
                    weights[o * taps + t * s.in_ch + c] = layer.weights[(o * s.in_ch + c) * k2 + t];
                }
            }
        }
        let fraction = 2f64.powi(s.bias_bits as i32);
        let out_mul = (0..s.out_ch).map(|c| FixedMul::new(layer.acc_step(c) / fraction / target.step)).collect();
        Self {
            in_ch: s.in_ch,
            out_ch: s.out_ch,
            kernel: s.kernel,
            stride: s.stride,
            padding: s.padding,
            taps,
            weights,
            bias: layer.bias.clone(),
            out_mul,
            levels: s.input.levels,
            bias_bits: s.bias_bits,
        }
    }

    /// Output side for an input side.
    fn out_side(&self, side: usize) -> usize {
        (side + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The layer's requantized outputs (NHWC) from NHWC i8 inputs of `n` images of `h`x`w`:
    /// `epilogue(row, channel, value)` maps each channel's scaled accumulator to the output.
    fn run<T: Send + Copy + Default>(
        &self,
        x: &[i8],
        (n, h, w): (usize, usize, usize),
        epilogue: impl Fn(usize, usize, i64) -> T + Sync,
    ) -> (Vec<T>, usize, usize) {
        let (oh, ow) = (self.out_side(h), self.out_side(w));
        let rows = n * oh * ow;
        let mut out = vec![T::default(); rows * self.out_ch];
        const ROWS: usize = 32;
        out.par_chunks_mut(ROWS * self.out_ch).enumerate().for_each(|(chunk, out)| {
            let first = chunk * ROWS;
            let count = out.len() / self.out_ch;
            let mut patch = vec![0i8; count * self.taps];
            for r in 0..count {
                self.gather(x, (h, w), (oh, ow), first + r, &mut patch[r * self.taps..(r + 1) * self.taps]);
            }
            let mut acc = vec![0i32; self.out_ch];
            for r in 0..count {
                dot_rows(&patch[r * self.taps..(r + 1) * self.taps], &self.weights, &mut acc);
                for (c, (&a, o)) in acc.iter().zip(&mut out[r * self.out_ch..(r + 1) * self.out_ch]).enumerate() {
                    *o = epilogue(
                        first + r,
                        c,
                        self.out_mul[c].apply(((a as i64) << self.bias_bits) + self.bias[c] as i64),
                    );
                }
            }
        });
        (out, oh, ow)
    }

    /// The input patch of output row `row` (image, y, x), taps in (ky, kx, c) order, zeros outside.
    fn gather(&self, x: &[i8], (h, w): (usize, usize), (oh, ow): (usize, usize), row: usize, patch: &mut [i8]) {
        let (img, rest) = (row / (oh * ow), row % (oh * ow));
        let (oy, ox) = (rest / ow, rest % ow);
        let c = self.in_ch;
        for ky in 0..self.kernel {
            for kx in 0..self.kernel {
                let dst = &mut patch[(ky * self.kernel + kx) * c..(ky * self.kernel + kx + 1) * c];
                let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    dst.fill(0);
                } else {
                    let at = ((img * h + iy as usize) * w + ix as usize) * c;
                    dst.copy_from_slice(&x[at..at + c]);
                }
            }
        }
    }
}

/// `acc[o] = Σ_k patch[k]·weights[o·K + k]` over i8, in i32. Compiled for AVX-512 VNNI (where LLVM
/// turns the widening multiply-adds into `vpdpwssd`), AVX-512 BW and AVX2, chosen once at run time;
/// portable code elsewhere.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512vnni",
    "x86_64+avx512f+avx512bw+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn dot_rows(patch: &[i8], weights: &[i8], acc: &mut [i32]) {
    let k = patch.len();
    for (o, a) in acc.iter_mut().enumerate() {
        let w = &weights[o * k..(o + 1) * k];
        let mut lanes = [0i32; 32];
        for (pc, wc) in patch.chunks_exact(64).zip(w.chunks_exact(64)) {
            for i in 0..64 {
                lanes[i % 32] += pc[i] as i16 as i32 * wc[i] as i16 as i32;
            }
        }
        *a = lanes.iter().sum();
    }
}

/// Which integer kernel the CPU runs (for `bench` and `eval`).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw") {
            return "AVX-512 VNNI";
        }
        if std::is_x86_feature_detected!("avx512bw") {
            return "AVX-512 BW";
        }
        if std::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
    }
    "portable"
}

/// An integer model compiled for inference.
pub struct IntNetwork {
    stem: Compiled,
    stem_levels: i32,
    stem_grid: crate::ops::quant::Grid,
    blocks: Vec<CompiledBlock>,
    classifier: Compiled,
    classifier_levels: i32,
    /// The real value of one unit of the integer logits.
    logit_step: f64,
    /// The real value of one unit of the stream after the stem and after each block.
    stream_steps: Vec<f64>,
}

struct CompiledBlock {
    first: Compiled,
    second: Compiled,
    /// Stream units of the block's input to those of its output.
    shortcut: FixedMul,
}

/// Rounding (half away from zero) right shift.
#[inline]
fn shift_round(v: i64, bits: u32) -> i64 {
    let half = 1i64 << (bits - 1);
    if v >= 0 {
        (v + half) >> bits
    } else {
        -((-v + half) >> bits)
    }
}

impl IntNetwork {
    pub fn new(model: &IntModel) -> Self {
        let fine = (1u64 << STREAM_BITS) as f64;
        // The stream after the stem and after each block, in units of the next reader's step / 2^F.
        let readers: Vec<&IntLayer> =
            model.blocks.iter().map(|[first, _]| first).chain(std::iter::once(&model.classifier)).collect();
        let stream_step: Vec<f64> = readers.iter().map(|l| l.shape.input.step() / fine).collect();
        let stem = Compiled::new(&model.stem, Target { step: stream_step[0] });
        let blocks = model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, [first, second])| CompiledBlock {
                first: Compiled::new(first, Target { step: second.shape.input.step() }),
                second: Compiled::new(second, Target { step: stream_step[i + 1] }),
                shortcut: FixedMul::new(stream_step[i] / stream_step[i + 1]),
            })
            .collect();
        let acc_max = (0..model.classes()).map(|c| model.classifier.acc_step(c)).fold(0f64, f64::max);
        let logit_step = acc_max / 256.0;
        Self {
            stem,
            stem_levels: model.stem.shape.input.levels,
            stem_grid: model.stem.shape.input.grid(),
            blocks,
            classifier: Compiled::new(&model.classifier, Target { step: logit_step }),
            classifier_levels: model.classifier.shape.input.levels,
            logit_step,
            stream_steps: stream_step,
        }
    }

    /// The real value of one unit of [`IntNetwork::forward`]'s logits.
    pub fn logit_step(&self) -> f64 {
        self.logit_step
    }

    /// Integer logits (n, classes) of `n` NCHW float images of `(c, h, w)`.
    pub fn forward(&self, images: &[f32], n: usize, shape: (usize, usize, usize)) -> Vec<i32> {
        self.forward_traced(images, n, shape, &mut |_, _| {})
    }

    /// [`IntNetwork::forward`], handing `trace` the residual stream (NHWC) after the stem and after
    /// every block with the real value of its unit.
    pub fn forward_traced(
        &self,
        images: &[f32],
        n: usize,
        (c, h, w): (usize, usize, usize),
        trace: &mut dyn FnMut(&[i32], f64),
    ) -> Vec<i32> {
        // Onto the stem's grid, channels last: the only float step.
        let mut x = vec![0i8; n * c * h * w];
        x.par_chunks_mut(c * h * w).zip(images.par_chunks(c * h * w)).for_each(|(dst, src)| {
            for ch in 0..c {
                for p in 0..h * w {
                    dst[p * c + ch] = self.stem_grid.index(src[ch * h * w + p]) as i8;
                }
            }
        });
        debug_assert!(self.stem_levels <= 127);
        let (mut stream, mut sh, mut sw) = self.stem.run(&x, (n, h, w), |_, _, v| v.max(0) as i32);
        let mut channels = self.stem.out_ch;
        trace(&stream, self.stream_steps[0]);
        for (i, b) in self.blocks.iter().enumerate() {
            let levels = b.first.levels as i64;
            let input: Vec<i8> =
                stream.par_iter().map(|&v| shift_round(v as i64, STREAM_BITS).clamp(-levels, levels) as i8).collect();
            let mid_levels = b.second.levels as i64;
            let (mid, mh, mw) = b.first.run(&input, (n, sh, sw), |_, _, v| v.clamp(0, mid_levels) as i8);
            let (oh, ow) = (b.second.out_side(mh), b.second.out_side(mw));
            let stride = b.first.stride;
            let (out_ch, in_ch) = (b.second.out_ch, channels);
            let residual = &stream;
            let shortcut = b.shortcut;
            let (next, _, _) = b.second.run(&mid, (n, mh, mw), |row, ch, v| {
                // Option A: every `stride`-th pixel, channels past the input's zero.
                let short = if ch < in_ch {
                    let (img, rest) = (row / (oh * ow), row % (oh * ow));
                    let (y, x) = ((rest / ow) * stride, (rest % ow) * stride);
                    shortcut.apply(residual[((img * sh + y) * sw + x) * in_ch + ch] as i64)
                } else {
                    0
                };
                (v + short).max(0).clamp(0, i32::MAX as i64) as i32
            });
            debug_assert_eq!(next.len(), n * oh * ow * out_ch);
            (stream, sh, sw, channels) = (next, oh, ow, out_ch);
            trace(&stream, self.stream_steps[i + 1]);
        }
        // Global average pooling onto the classifier's grid.
        let levels = self.classifier_levels as i64;
        let divisor = ((sh * sw) as i64) << STREAM_BITS;
        let pooled: Vec<i8> = (0..n * channels)
            .map(|i| {
                let (img, ch) = (i / channels, i % channels);
                let sum: i64 = (0..sh * sw).map(|p| stream[(img * sh * sw + p) * channels + ch] as i64).sum();
                let q = (sum.abs() + divisor / 2) / divisor * sum.signum();
                q.clamp(-levels, levels) as i8
            })
            .collect();
        let (logits, _, _) =
            self.classifier.run(&pooled, (n, 1, 1), |_, _, v| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
        logits
    }
}

/// The index of the largest value of each row of `classes` values (the first on ties).
pub fn argmax_rows<T: PartialOrd + Copy>(values: &[T], classes: usize) -> Vec<usize> {
    values
        .chunks_exact(classes)
        .map(|row| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }))
        .collect()
}
