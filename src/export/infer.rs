//! Integer-only inference of an [`IntModel`]. The one float step is the images' entry onto the stem's
//! input grid; from there on every value is an integer:
//!
//! - a layer multiplies its i8 inputs by its i8 weights into i32 accumulators;
//! - each output channel is requantized in one fixed-point multiply-add that also adds its bias
//!   (kept to 32 fraction bits); a block's first layer lands on the second's input grid (ReLU =
//!   clamp at 0);
//! - the residual stream between blocks is i64 at 2^−[`STREAM_BITS`] of the next layer's input step,
//!   so that the next layer reads it with a rounding shift, and the shortcut joins it after its own
//!   fixed-point rescale;
//! - global average pooling is an integer sum and a rounding division, and the classifier's
//!   accumulators are requantized to one shared logit step.
//!
//! The stream's 32 fraction bits matter: float QAT networks of real images hit values within 10^-6
//! of a rounding point (flat image regions repeat one exact sum), and a coarser stream rounded those
//! across it, which then cascades through 4-bit layers.
//!
//! Activations are kept channels-last (NHWC), so that a convolution reads contiguous channels.

use super::fixed::{requant_row, FixedMul, NarrowRequant, Requant};
use super::int_model::{IntLayer, IntModel};
use super::kernel::{Kernel, PackedConv, OFFSET};
use rayon::prelude::*;

/// Fraction bits of the residual stream below the next layer's input step.
pub const STREAM_BITS: u32 = 32;

/// A layer ready to run: weights packed for [`PackedConv`], and the fixed-point requantization of
/// its output.
struct Compiled {
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    weights: PackedConv,
    /// Accumulator plus bias to the output's unit, per channel.
    requant: Vec<Requant>,
    /// The same in 64 bits, where every channel's bound allows it.
    narrow: Option<Vec<NarrowRequant>>,
    /// The input grid's levels (its clamp).
    levels: i32,
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
        let requant: Vec<Requant> =
            (0..s.out_ch).map(|c| Requant::new(layer.acc_step(c) / target.step, layer.bias[c], s.bias_bits)).collect();
        // |acc| ≤ taps · 128 · 127: inputs are at most 128 from zero, weights at most 127.
        let max_acc = (s.in_ch * s.kernel * s.kernel) as i64 * 128 * 127;
        let narrow = requant.iter().map(|q| q.narrow(max_acc)).collect::<Option<Vec<_>>>();
        Self {
            narrow,
            in_ch: s.in_ch,
            out_ch: s.out_ch,
            kernel: s.kernel,
            stride: s.stride,
            padding: s.padding,
            weights: PackedConv::new(&layer.weights, s.out_ch, s.in_ch, s.kernel * s.kernel),
            requant,
            levels: s.input.levels,
        }
    }

    /// Output side for an input side.
    fn out_side(&self, side: usize) -> usize {
        (side + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The layer's outputs (NHWC) from NHWC inputs of `n` images of `h`x`w`, stored offset by 128
    /// ([`OFFSET`]): `finish(row, scaled, out)` maps one output pixel's requantized channels to
    /// the output.
    fn run<T: Send + Copy + Default>(
        &self,
        x: &[u8],
        (n, h, w): (usize, usize, usize),
        finish: impl Fn(usize, &[i64], &mut [T]) + Sync,
    ) -> (Vec<T>, usize, usize) {
        let (oh, ow) = (self.out_side(h), self.out_side(w));
        let rows = n * oh * ow;
        let mut out = vec![T::default(); rows * self.out_ch];
        let kernel = Kernel::detect();
        // A zero border and channels padded to the kernel's multiple of 4.
        let (pad, cp) = (self.padding, self.weights.channels);
        let (ph, pw) = (h + 2 * pad, w + 2 * pad);
        let mut input = vec![OFFSET; n * ph * pw * cp];
        input.par_chunks_mut(ph * pw * cp).zip(x.par_chunks(h * w * self.in_ch)).for_each(|(dst, src)| {
            for (p, pixel) in src.chunks_exact(self.in_ch).enumerate() {
                let at = ((p / w + pad) * pw + p % w + pad) * cp;
                dst[at..at + self.in_ch].copy_from_slice(pixel);
            }
        });
        let tap_offsets: Vec<usize> =
            (0..self.kernel * self.kernel).map(|t| ((t / self.kernel) * pw + t % self.kernel) * cp).collect();
        let row_len = self.weights.row_len();
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * self.out_ch).enumerate().for_each(|(chunk, out)| {
            let first = chunk * ROWS;
            let count = out.len() / self.out_ch;
            let bases: Vec<usize> = (first..first + count)
                .map(|row| {
                    let (img, rest) = (row / (oh * ow), row % (oh * ow));
                    ((img * ph + (rest / ow) * self.stride) * pw + (rest % ow) * self.stride) * cp
                })
                .collect();
            let mut acc = vec![0i32; count * row_len];
            self.weights.run(kernel, &input, &bases, &tap_offsets, &mut acc);
            let mut scaled = vec![0i64; self.out_ch];
            for (r, (acc, out)) in acc.chunks_exact(row_len).zip(out.chunks_exact_mut(self.out_ch)).enumerate() {
                match &self.narrow {
                    Some(narrow) => requant_row(&acc[..self.out_ch], narrow, &mut scaled),
                    None => {
                        for ((v, &a), q) in scaled.iter_mut().zip(acc).zip(&self.requant) {
                            *v = q.apply(a);
                        }
                    }
                }
                finish(first + r, &scaled, out);
            }
        });
        (out, oh, ow)
    }
}

/// Which integer kernel the CPU runs (for `bench` and `eval`).
pub fn kernel_name() -> &'static str {
    Kernel::detect().name()
}

/// An integer model compiled for inference.
pub struct IntNetwork {
    stem: Compiled,
    stem_grid: crate::ops::cpu::quant::Grid,
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
        // A few images at a time: their activations stay in cache and the allocator reuses the same
        // buffers instead of faulting in fresh pages for every layer.
        const IMAGES: usize = 16;
        let len = shape.0 * shape.1 * shape.2;
        assert_eq!(images.len(), n * len);
        images
            .chunks(IMAGES * len)
            .flat_map(|chunk| self.forward_traced(chunk, chunk.len() / len, shape, &mut |_, _| {}))
            .collect()
    }

    /// [`IntNetwork::forward`], handing `trace` the residual stream (NHWC) after the stem and after
    /// every block with the real value of its unit.
    pub fn forward_traced(
        &self,
        images: &[f32],
        n: usize,
        (c, h, w): (usize, usize, usize),
        trace: &mut dyn FnMut(&[i64], f64),
    ) -> Vec<i32> {
        // Onto the stem's grid, channels last: the only float step.
        let mut x = vec![OFFSET; n * c * h * w];
        x.par_chunks_mut(c * h * w).zip(images.par_chunks(c * h * w)).for_each(|(dst, src)| {
            for ch in 0..c {
                for p in 0..h * w {
                    dst[p * c + ch] = offset(self.stem_grid.index(src[ch * h * w + p]) as i64);
                }
            }
        });
        let relu = |_: usize, scaled: &[i64], out: &mut [i64]| {
            for (o, &v) in out.iter_mut().zip(scaled) {
                *o = v.max(0);
            }
        };
        let (mut stream, mut sh, mut sw) = self.stem.run(&x, (n, h, w), relu);
        let mut channels = self.stem.out_ch;
        trace(&stream, self.stream_steps[0]);
        for (i, b) in self.blocks.iter().enumerate() {
            let levels = b.first.levels as i64;
            let input: Vec<u8> =
                stream.par_iter().map(|&v| offset(shift_round(v, STREAM_BITS).clamp(-levels, levels))).collect();
            let mid_levels = b.second.levels as i64;
            let (mid, mh, mw) = b.first.run(&input, (n, sh, sw), |_, scaled, out: &mut [u8]| {
                for (o, &v) in out.iter_mut().zip(scaled) {
                    *o = offset(v.clamp(0, mid_levels));
                }
            });
            let (oh, ow) = (b.second.out_side(mh), b.second.out_side(mw));
            let stride = b.first.stride;
            let (out_ch, in_ch) = (b.second.out_ch, channels);
            let residual = &stream;
            let shortcut = b.shortcut;
            let (next, _, _) = b.second.run(&mid, (n, mh, mw), |row, scaled, out: &mut [i64]| {
                // Option A: every `stride`-th pixel, channels past the input's zero.
                let (img, rest) = (row / (oh * ow), row % (oh * ow));
                let (y, x) = ((rest / ow) * stride, (rest % ow) * stride);
                let short = &residual[((img * sh + y) * sw + x) * in_ch..][..in_ch];
                for (ch, (o, &v)) in out.iter_mut().zip(scaled).enumerate() {
                    let join = if ch < in_ch { v + shortcut.apply(short[ch]) } else { v };
                    *o = join.max(0);
                }
            });
            debug_assert_eq!(next.len(), n * oh * ow * out_ch);
            (stream, sh, sw, channels) = (next, oh, ow, out_ch);
            trace(&stream, self.stream_steps[i + 1]);
        }
        // Global average pooling onto the classifier's grid.
        let levels = self.classifier_levels as i64;
        let divisor = ((sh * sw) as i64) << STREAM_BITS;
        let mut pooled = vec![OFFSET; n * channels];
        pooled.par_chunks_mut(channels).zip(stream.par_chunks(sh * sw * channels)).for_each(|(out, image)| {
            let mut sums = vec![0i64; channels];
            for pixel in image.chunks_exact(channels) {
                for (s, &v) in sums.iter_mut().zip(pixel) {
                    *s += v;
                }
            }
            for (o, &sum) in out.iter_mut().zip(&sums) {
                let q = (sum.abs() + divisor / 2) / divisor * sum.signum();
                *o = offset(q.clamp(-levels, levels));
            }
        });
        let (logits, _, _) = self.classifier.run(&pooled, (n, 1, 1), |_, scaled, out: &mut [i32]| {
            for (o, &v) in out.iter_mut().zip(scaled) {
                *o = v.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
            }
        });
        logits
    }
}

/// An input value (in −128..=127) as the kernels store it: offset by 128.
#[inline]
fn offset(v: i64) -> u8 {
    (v + OFFSET as i64) as u8
}

/// The index of the largest value of each row of `classes` values (the first on ties).
pub fn argmax_rows<T: PartialOrd + Copy>(values: &[T], classes: usize) -> Vec<usize> {
    values
        .chunks_exact(classes)
        .map(|row| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }))
        .collect()
}
