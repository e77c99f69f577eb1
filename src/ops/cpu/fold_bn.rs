//! The training step of a quantized convolution with batch norm folded into its weights (Jacob et al.
//! 2018), as one differentiable op on the CPU.
//!
//! The method needs two convolutions of the same input: the float one, whose batch statistics (μ, σ²)
//! give the fold, and the one with quantized weights, whose output is scaled:
//! `out = relu?(conv(x, q(W))·s + β − μ·s)` with `s = γ/√(σ² + ε)`, or `relu(· + shortcut)` with a
//! residual join. As separate ops that is two convolutions (each padding the input), a moments op, an
//! affine op and, in the backward, candle's gradient accumulation for every intermediate. Here the two
//! weights are stacked, [W; q(W)], into one convolution of 2·O output channels: one pass over the input,
//! one kernel call per image, and in the backward one transposed convolution for dX. The op quantizes
//! the weight itself (per output channel, straight-through), so that the weight gradient, which is the
//! sum of the two halves' (dW = dY_f ⋆ X + dY_q ⋆ X), is one product of (dY_f + dY_q) with the input
//! instead of two. Values and gradients are those of the separate ops (tested).

use super::bn;
use super::conv::{self, Geometry};
use super::conv_bn::{train_layer, FusedLayer, LayerGrads};
use super::quant::{max_abs_slice, quantize_into, Grid};
use super::written;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// What a folded layer's forward keeps for its backward.
#[derive(Debug)]
pub(super) struct FoldSaved {
    /// The stacked weight [W; q(W)].
    weights: Vec<f32>,
    /// The stacked convolution's output: per image, O float channels, then O quantized ones.
    stacked: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    invstd: Vec<f32>,
}

/// One folded-BN training layer on slices (what the fused ops run): the convolution over the stacked
/// weights [W; q(W)], the fold with the float half's statistics, and a ReLU or the join.
#[derive(Debug, Clone, Copy)]
pub(super) struct FoldLayer {
    /// The layer's geometry (O output channels; the convolution runs over 2·O).
    pub g: Geometry,
    pub grid: Option<Grid>,
    pub eps: f64,
    pub relu: bool,
    /// Grid steps per side of the weight's quantizer (None: float weights, q(W) = W).
    pub weight_levels: Option<f32>,
}

impl FoldLayer {
    /// The geometry of the stacked convolution.
    fn stacked(&self) -> Geometry {
        Geometry { o: 2 * self.g.o, ..self.g }
    }

    /// [W; q(W)], with q per output channel on the grid of λ = max|W_o| (the values of
    /// `ops::fake_quant_weight`, here on slices inside the op).
    fn stack(&self, w: &[f32]) -> Vec<f32> {
        let mut stacked = [w, w].concat();
        if let Some(levels) = self.weight_levels {
            let per_channel = w.len() / self.g.o;
            for (src, dst) in w.chunks_exact(per_channel).zip(stacked[w.len()..].chunks_exact_mut(per_channel)) {
                quantize_into(Grid::new(max_abs_slice(src), levels), src, dst);
            }
        }
        stacked
    }
}

/// The per-channel fold: s = γ·σ⁻¹ and shift = β − μ·s.
fn fold(gb: &[f32], mean: &[f32], invstd: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let o = mean.len();
    (0..o).map(|c| (gb[c] * invstd[c], gb[o + c] - mean[c] * gb[c] * invstd[c])).unzip()
}

impl FusedLayer for FoldLayer {
    const NAME: &'static str = "qat-fold-conv-bn-train";
    type Saved = FoldSaved;

    fn geometry(&self) -> Geometry {
        self.g
    }

    fn channels(&self) -> usize {
        self.g.o
    }

    fn with_grid(self, grid: Option<Grid>) -> Self {
        FoldLayer { grid, ..self }
    }

    fn statistics(saved: &FoldSaved) -> (&[f32], &[f32]) {
        (&saved.mean, &saved.var)
    }

    fn forward(&self, x: &[f32], w: &[f32], gb: &[f32], residual: Option<&[f32]>) -> (Vec<f32>, FoldSaved) {
        let (o, p) = (self.channels(), self.g.oh() * self.g.ow());
        let weights = self.stack(w);
        // The statistics of the float half fold the batch norm (the quantized half's are not taken).
        let (stacked, mean, var) = conv::forward_moments(self.stacked(), self.grid, (x, &weights), o);
        let invstd = bn::invstd(&var, self.eps);
        let (scale, shift) = fold(gb, &mean, &invstd);
        // With a join, the ReLU follows the sum: the backward masks by the output all the same.
        let relu = self.relu || residual.is_some();
        let out = written(self.g.n * o * p, |out| {
            out.par_chunks_mut(o * p).enumerate().for_each(|(n, out_n)| {
                let quantized = &stacked[(2 * n + 1) * o * p..(2 * n + 2) * o * p];
                for (c, (dst, src)) in out_n.chunks_exact_mut(p).zip(quantized.chunks_exact(p)).enumerate() {
                    let r = residual.map(|r| &r[(n * o + c) * p..][..p]);
                    bn::affine_row(dst, src, r, (scale[c], shift[c]), relu);
                }
            })
        });
        (out, FoldSaved { weights, stacked, mean, var, invstd })
    }

    fn backward(
        &self,
        saved: &FoldSaved,
        (grad, out): (&[f32], &[f32]),
        (x, _, gb): (&[f32], &[f32], &[f32]),
        (want_dx, residual): (bool, bool),
    ) -> LayerGrads {
        let (n, o, p) = (self.g.n, self.channels(), self.g.oh() * self.g.ow());
        let relu = self.relu || residual;
        let masked = |g: f32, y: f32| if relu && y <= 0.0 { 0.0 } else { g };
        // Per image and channel: Σ g′ and Σ g′·y_q (g′ the masked gradient), merged in image order;
        // g′ itself is the shortcut's gradient.
        let sums_of = |n: usize, mut shortcut: Option<&mut [std::mem::MaybeUninit<f32>]>| -> Vec<(f64, f64)> {
            (0..o)
                .map(|c| {
                    let at = (n * o + c) * p..(n * o + c + 1) * p;
                    let (g, y) = (&grad[at.clone()], &out[at]);
                    let yq = &saved.stacked[((2 * n + 1) * o + c) * p..][..p];
                    if let Some(d) = shortcut.as_deref_mut() {
                        let d = &mut d[c * p..(c + 1) * p];
                        d.iter_mut().zip(g.iter().zip(y)).for_each(|(d, (&g, &y))| _ = d.write(masked(g, y)));
                    }
                    bn::lane_sums(g, y, yq, |g, y, yq| {
                        let g = masked(g, y);
                        (g, g * yq)
                    })
                })
                .collect()
        };
        let mut d_shortcut = None;
        let per_image: Vec<Vec<(f64, f64)>> = if residual {
            let mut per_image = Vec::new();
            d_shortcut = Some(written(n * o * p, |d| {
                per_image = d.par_chunks_mut(o * p).enumerate().map(|(i, d)| sums_of(i, Some(d))).collect()
            }));
            per_image
        } else {
            (0..n).into_par_iter().map(|i| sums_of(i, None)).collect()
        };
        let total = |c: usize| per_image.iter().fold((0f64, 0f64), |(a, b), m| (a + m[c].0, b + m[c].1));
        let (scale, _) = fold(gb, &saved.mean, &saved.invstd);
        let count = (n * p) as f32;
        // out = y_q·s + β − μ·s, s = γ·(σ² + ε)^(−1/2): dβ = Σg′, ds = Σg′·y_q − μ·Σg′, dγ = ds·σ⁻¹,
        // dμ = −s·Σg′, dσ² = −ds·s·σ⁻²/2; then through μ and σ² to y_f: dy_f = dμ/M + dσ²·2(y_f − μ)/M,
        // and dy_q = g′·s.
        let (mut dgamma, mut dbeta, mut c_mean, mut c_dev) =
            (vec![0f32; o], vec![0f32; o], vec![0f32; o], vec![0f32; o]);
        for c in 0..o {
            let (a, b) = total(c);
            let (a, b) = (a as f32, b as f32);
            let (mu, is) = (saved.mean[c], saved.invstd[c]);
            let ds = b - mu * a;
            dbeta[c] = a;
            dgamma[c] = ds * is;
            c_mean[c] = -scale[c] * a / count;
            c_dev[c] = -ds * scale[c] * is * is / count;
        }
        let image = |i: usize, dy: &mut [f32]| {
            let (float, quant) = dy.split_at_mut(o * p);
            for c in 0..o {
                let yf = &saved.stacked[(2 * i * o + c) * p..][..p];
                let (k0, k1, mu) = (c_mean[c], c_dev[c], saved.mean[c]);
                float[c * p..(c + 1) * p].iter_mut().zip(yf).for_each(|(d, &y)| *d = k0 + k1 * (y - mu));
                let at = (i * o + c) * p..(i * o + c + 1) * p;
                bn::masked_row(&mut quant[c * p..(c + 1) * p], (&grad[at.clone()], &out[at]), scale[c], relu);
            }
        };
        let dy = conv::OutputGrad::PerImage(&image);
        let halves = conv::WeightGrad::StackedHalves;
        let (dx, dw) = conv::backward(self.stacked(), self.grid, dy, (x, &saved.weights), want_dx, halves);
        (dx, dw, dgamma, dbeta, d_shortcut)
    }
}

/// The folded-BN training layer on the CPU: `relu?(conv(q(x), q(w))·s + β − μ·s)`, or `relu(· +
/// residual)`, with (μ, σ²) the batch statistics of `conv(q(x), w)` and s = γ/√(σ² + ε); the weight
/// quantized per output channel on `weight_levels` steps per side (None: float), straight-through, and
/// x onto `grid` first when there is one (straight-through). Returns the output and the batch mean and
/// biased variance of the float convolution.
#[allow(clippy::too_many_arguments)]
pub fn fold_conv_bn_train_cpu(
    x: &Tensor,
    (w, weight_levels): (&Tensor, Option<f32>),
    (gamma, beta): (&Tensor, &Tensor),
    (stride, pad): (usize, usize),
    grid: Option<Grid>,
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = conv::geometry(x, w, stride, pad)?;
    train_layer(x, w, (gamma, beta), residual, FoldLayer { g, grid, eps, relu, weight_levels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{conv_bn_vars, gradient_gaps, max_diff};
    use crate::ops::{add_relu, channel_affine, channel_stats, conv2d_quantized, fake_quant, max_abs};

    /// Values, statistics and all gradients against the separate ops of the fold (two convolutions,
    /// channel statistics, the affine and the join), with a quantized weight from a straight-through
    /// fake-quant, on the shifted and im2col kernels, with and without ReLU, join and input quantization.
    #[test]
    fn matches_the_separate_ops() {
        for (n, c, h, w, o, stride, relu, quant, join) in [
            (2, 8, 7, 9, 10, 1, true, false, false),
            (3, 3, 8, 8, 4, 2, false, true, false),
            (2, 16, 6, 6, 16, 1, false, true, true),
            (2, 8, 9, 7, 8, 2, false, false, true),
            // Winograd's kernels (8x8 in batches, 16x16), the channels-last weight gradient: the
            // stacked weight's gradient in one product.
            (2, 32, 8, 8, 32, 1, true, true, true),
            (2, 16, 16, 16, 16, 1, true, true, false),
        ] {
            let [x, wt, gamma, beta, shortcut] = conv_bn_vars((n, c, h, w, o, stride));
            let residual = join.then_some(shortcut.as_tensor());
            let s = Tensor::new(&[0.8f32], x.device()).unwrap();
            let input = quant.then_some((&s, 7.0));
            let grid = quant.then(|| Grid::new(0.8, 7.0));
            let scales = max_abs(wt.as_tensor(), o).unwrap().reshape((o, 1, 1, 1)).unwrap();
            let wq = fake_quant(wt.as_tensor(), &scales, 7.0).unwrap();
            let (gamma_t, beta_t) = (gamma.as_tensor(), beta.as_tensor());
            let (fused, mean, var) = fold_conv_bn_train_cpu(
                x.as_tensor(),
                (wt.as_tensor(), Some(7.0)),
                (gamma_t, beta_t),
                (stride, 1),
                grid,
                1e-5,
                relu,
                residual,
            )
            .unwrap();
            let y_float = conv2d_quantized(x.as_tensor(), wt.as_tensor(), (stride, 1), input).unwrap();
            let y_quant = conv2d_quantized(x.as_tensor(), &wq, (stride, 1), input).unwrap();
            let (mean2, var2) = channel_stats(&y_float).unwrap();
            let scale = (gamma_t / (&var2 + 1e-5).unwrap().sqrt().unwrap()).unwrap();
            let shift = (beta_t - (&mean2 * &scale).unwrap()).unwrap();
            let apart = channel_affine(&y_quant, &scale, &shift, relu && !join).unwrap();
            let apart = match residual {
                Some(r) => add_relu(&apart, r).unwrap(),
                None => apart,
            };
            let case = (n, c, h, w, o, stride, relu, quant, join);
            assert!(max_diff(&fused, &apart) < 1e-4, "{case:?}: {}", max_diff(&fused, &apart));
            assert!(max_diff(&mean, &mean2) < 1e-5 && max_diff(&var, &var2) < 1e-4, "{case:?}");
            let vars = [&x, &wt, &gamma, &beta, &shortcut];
            for (i, gap) in gradient_gaps(&fused, &apart, &vars[..if join { 5 } else { 4 }], 5).into_iter().enumerate()
            {
                assert!(gap < 1e-3, "{case:?} input {i}: {gap}");
            }
        }
    }
}
