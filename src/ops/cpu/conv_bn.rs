//! A convolution followed by training-mode batch norm (and a ReLU, or a residual block's join
//! `relu(· + shortcut)`), as one differentiable op on the CPU.
//!
//! As separate ops, candle's autograd keeps every intermediate output as a graph node: in the backward
//! its gradient is accumulated into a fresh zero tensor (two more passes over memory) before the next
//! op's backward reads it. Fused, the batch-norm gradient of the convolution's output is a private
//! buffer handed straight to the convolution kernels, and the join needs no pass of its own. Values
//! and gradients are those of `add_relu(batch_norm_train(conv2d(x, w)), shortcut)` (tested against
//! them).

use super::bn::{self, Stats};
use super::conv::{self, Geometry};
use super::quant::Grid;
use super::{slice, with_slices};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};

/// What a layer's forward keeps for its backward: the convolution's output and the batch statistics.
#[derive(Debug)]
pub(super) struct Saved {
    conv_out: Vec<f32>,
    stats: Stats,
    /// The biased batch variance (for the running average).
    var: Vec<f32>,
}

/// A layer's gradients: dx (when wanted), dw, dγ, dβ, and the shortcut's (with a join).
pub(super) type LayerGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// A training layer on slices that the fused ops run and chain: convolution + batch norm, kept
/// ([`Layer`]) or folded into quantized weights (`fold_bn::FoldLayer`), then a ReLU or the join.
pub(super) trait FusedLayer: Copy + Send + Sync {
    /// The op's name (for candle and error messages).
    const NAME: &'static str;
    /// What the forward keeps for the backward.
    type Saved: Send + Sync + std::fmt::Debug;
    /// The geometry of the layer's convolution.
    fn geometry(&self) -> Geometry;
    /// The layer's output channels (the length of γ and β).
    fn channels(&self) -> usize;
    /// The layer with its input quantized onto `grid`.
    fn with_grid(self, grid: Option<Grid>) -> Self;
    /// The batch mean and biased variance the forward normalised with.
    fn statistics(saved: &Self::Saved) -> (&[f32], &[f32]);
    /// `relu?(bn(conv(x, w)))`, or `relu(bn(conv(x, w)) + residual)`, with `gb` = [γ; β].
    fn forward(&self, x: &[f32], w: &[f32], gb: &[f32], residual: Option<&[f32]>) -> (Vec<f32>, Self::Saved);
    /// The gradients from the output and its gradient.
    fn backward(
        &self,
        saved: &Self::Saved,
        out: (&[f32], &[f32]),
        inputs: (&[f32], &[f32], &[f32]),
        flags: (bool, bool),
    ) -> LayerGrads;
}

/// One convolution + batch-norm layer in training, on slices: what the fused ops run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layer {
    pub g: Geometry,
    /// The input's quantizer, when there is one.
    pub grid: Option<Grid>,
    pub eps: f64,
    pub relu: bool,
}

impl Layer {
    /// (N, O, OH·OW) of the output.
    fn dims(&self) -> (usize, usize, usize) {
        (self.g.n, self.g.o, self.g.oh() * self.g.ow())
    }
}

impl FusedLayer for Layer {
    const NAME: &'static str = "qat-conv-bn-train";
    type Saved = Saved;

    fn geometry(&self) -> Geometry {
        self.g
    }

    fn channels(&self) -> usize {
        self.g.o
    }

    fn with_grid(self, grid: Option<Grid>) -> Self {
        Layer { grid, ..self }
    }

    fn statistics(saved: &Saved) -> (&[f32], &[f32]) {
        (&saved.stats.mean, &saved.var)
    }

    fn forward(&self, x: &[f32], w: &[f32], gb: &[f32], residual: Option<&[f32]>) -> (Vec<f32>, Saved) {
        let o = self.g.o;
        let (conv_out, mean, var) = conv::forward_moments(self.g, self.grid, (x, w), o);
        // With a join, the ReLU follows the sum: the backward masks by the output all the same.
        let stats = Stats { invstd: bn::invstd(&var, self.eps), mean, relu: self.relu || residual.is_some() };
        let out = bn::normalize(&conv_out, self.dims(), &stats, (&gb[..o], &gb[o..]), residual);
        (out, Saved { conv_out, stats, var })
    }

    fn backward(
        &self,
        saved: &Saved,
        (grad, out): (&[f32], &[f32]),
        (x, w, gb): (&[f32], &[f32], &[f32]),
        (want_dx, residual): (bool, bool),
    ) -> LayerGrads {
        let (d, stats, o) = (self.dims(), &saved.stats, self.g.o);
        let (gamma, beta) = (&gb[..o], &gb[o..]);
        // Without a join the ReLU's decisions are recomputed from the saved convolution output (one
        // plane fewer to read per pass); after a join, where they depend on the shortcut too, they
        // are read from the output.
        let affine: Vec<(f32, f32)> = (0..o).map(|ch| stats.affine(ch, gamma, beta)).collect();
        let relu = if residual { bn::Relu::Output(out) } else { bn::Relu::Input(&affine) };
        let grad_conv = (grad, &saved.conv_out[..]);
        // The sums first (one pass, which also writes d(relu(a + b))/db: the gradient where the output
        // is positive); then the convolution's backward takes each image's batch-norm input gradient
        // straight from here, never written to memory whole.
        let (dbeta, dgamma, d_shortcut) = bn::grad_sums(grad_conv, relu, d, stats, residual);
        let image = |n: usize, d_conv: &mut [f32]| {
            bn::image_input_grad(n, grad_conv, relu, d, stats, gamma, (&dbeta, &dgamma), d_conv)
        };
        let (dx, dw) = conv::backward(
            self.g,
            self.grid,
            conv::OutputGrad::PerImage(&image),
            (x, w),
            want_dx,
            conv::WeightGrad::Given,
        );
        (dx, dw, dgamma, dbeta, d_shortcut)
    }
}

/// The kinds of training layer `bench --ops` times on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerKind {
    Float,
    /// Batch norm kept after a convolution of 4-bit inputs.
    QuantKeep,
    /// Batch norm folded into 4-bit weights, 4-bit inputs (two convolutions by definition).
    QuantFold,
}

/// One forward and backward (dX, dW, dγ, dβ) of a convolution + batch norm + ReLU training layer of
/// `kind` on slices, from the output gradient `grad`: what `bench --ops` times per layer.
pub(crate) fn layer_round_trip(kind: LayerKind, g: Geometry, (x, w, gb, grad): (&[f32], &[f32], &[f32], &[f32])) {
    fn run<L: FusedLayer>(layer: L, (x, w, gb, grad): (&[f32], &[f32], &[f32], &[f32])) {
        // The stem's input is the image: no input gradient is computed for it.
        let want_dx = layer.geometry().c != 3;
        let (out, saved) = layer.forward(x, w, gb, None);
        drop(layer.backward(&saved, (grad, &out), (x, w, gb), (want_dx, false)));
    }
    let (eps, relu, four_bits) = (1e-5, true, 7.0);
    let grid = Some(Grid::new(1.0, four_bits));
    let inputs = (x, w, gb, grad);
    match kind {
        LayerKind::Float => run(Layer { g, grid: None, eps, relu }, inputs),
        LayerKind::QuantKeep => run(Layer { g, grid, eps, relu }, inputs),
        LayerKind::QuantFold => {
            run(super::fold_bn::FoldLayer { g, grid, eps, relu, weight_levels: Some(four_bits) }, inputs)
        }
    }
}

/// A [`FusedLayer`] as one differentiable op. Inputs: x (NCHW), w (OIHW; a folded layer quantizes
/// it itself), γ, β and the shortcut, packed as [`Inputs`] says.
struct LayerOp<L: FusedLayer> {
    layer: L,
    inputs: Inputs,
    /// Shared with the caller, which reads the batch statistics for the running averages.
    saved: Arc<Mutex<Option<L::Saved>>>,
}

impl<L: FusedLayer> CustomOp3 for LayerOp<L> {
    fn name(&self) -> &'static str {
        L::NAME
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
        let x = slice(s1, l1, "conv input")?;
        let (w, gb, residual) =
            self.inputs.unpack(slice(s2, l2, "conv parameters")?, slice(s3, l3, "conv parameters")?);
        let (out, state) = self.layer.forward(x, w, gb, residual);
        *saved(&self.saved)? = Some(state);
        let g = self.layer.geometry();
        Ok((CpuStorage::F32(out), Shape::from((g.n, self.layer.channels(), g.oh(), g.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = saved(&self.saved)?;
        let Some(saved) = saved.as_ref() else { candle_core::bail!("{}: backward before forward", L::NAME) };
        // The image itself needs no gradient: skip the input gradient of the first layer.
        let flags = (x.track_op(), self.inputs.residual);
        let (dx, dw, dgamma, dbeta, d_shortcut) =
            with_slices([grad, out, second, third, x], |[grad, out, second, third, x]| {
                let (w, gb, _) = self.inputs.unpack(second, third);
                self.layer.backward(saved, (grad, out), (x, w, gb), flags)
            })?;
        self.inputs.gradients((x, second, third), dx, (dw, dgamma, dbeta), d_shortcut)
    }
}

/// Runs `layer` on x with weight `w`, γ, β and the shortcut as one op;
/// returns the output and the batch mean and biased variance it normalised with.
pub(super) fn train_layer<L: FusedLayer + 'static>(
    x: &Tensor,
    w: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    residual: Option<&Tensor>,
    layer: L,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (g, channels) = (layer.geometry(), layer.channels());
    let state = Arc::new(Mutex::new(None));
    let inputs = Inputs { residual: residual.is_some(), channels };
    let op = LayerOp { layer, inputs, saved: state.clone() };
    let x = x.contiguous()?;
    let out = match residual {
        None => x.apply_op3(&w.contiguous()?, &Tensor::stack(&[gamma, beta], 0)?, op)?,
        Some(r) => {
            let dims = [g.n, channels, g.oh(), g.ow()];
            if r.dims() != dims {
                candle_core::bail!("residual join: shortcut is {:?}, the layer's output {dims:?}", r.dims());
            }
            let params = Tensor::cat(&[&w.flatten_all()?, gamma, beta], 0)?;
            x.apply_op3(&params, &r.contiguous()?, op)?
        }
    };
    let guard = saved(&state)?;
    let Some(saved) = guard.as_ref() else { candle_core::bail!("{}: the forward did not run", L::NAME) };
    let (mean, var) = L::statistics(saved);
    Ok((out, Tensor::new(mean, x.device())?, Tensor::new(var, x.device())?))
}

/// How a fused conv + batch-norm op's three inputs carry its five: (x, w, [γ; β]) without a residual
/// join, and (x, [w, γ, β] flattened, shortcut) with one.
#[derive(Debug, Clone, Copy)]
struct Inputs {
    residual: bool,
    /// Output channels (the length of γ and β).
    channels: usize,
}

impl Inputs {
    /// (w, γ and β as one slice, shortcut) from the op's second and third inputs.
    fn unpack<'a>(&self, second: &'a [f32], third: &'a [f32]) -> (&'a [f32], &'a [f32], Option<&'a [f32]>) {
        if self.residual {
            let (w, gb) = second.split_at(second.len() - 2 * self.channels);
            (w, gb, Some(third))
        } else {
            (second, third, None)
        }
    }

    /// The op's three input gradients, packed like its inputs, from those of x, w, γ, β and the
    /// shortcut.
    fn gradients(
        &self,
        (x, second, third): (&Tensor, &Tensor, &Tensor),
        dx: Option<Vec<f32>>,
        (mut dw, dgamma, dbeta): (Vec<f32>, Vec<f32>, Vec<f32>),
        d_shortcut: Option<Vec<f32>>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        if self.residual {
            dw.extend(dgamma);
            dw.extend(dbeta);
            let d_shortcut = d_shortcut.map(|v| Tensor::from_vec(v, third.shape(), dev)).transpose()?;
            return Ok((dx, Some(Tensor::from_vec(dw, second.shape(), dev)?), d_shortcut));
        }
        let mut dgb = dgamma;
        dgb.extend(dbeta);
        let dgb = Tensor::from_vec(dgb, (2, self.channels), dev)?;
        Ok((dx, Some(Tensor::from_vec(dw, second.shape(), dev)?), Some(dgb)))
    }
}

/// What a fused op's forward saved, for its backward and its caller (the running averages).
pub(super) fn saved<T>(saved: &Mutex<Option<T>>) -> Result<MutexGuard<'_, Option<T>>> {
    saved.lock().map_err(|_| candle_core::Error::Msg("a fused op's saved state: poisoned lock".into()))
}

/// `relu?(batch_norm(conv2d(q(x), w)))` in training mode on the CPU, or `relu(batch_norm(..) +
/// residual)` with a residual (x quantized onto `grid` first when there is one, straight-through);
/// returns the output and the batch mean and biased variance.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train_cpu(
    x: &Tensor,
    w: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (stride, pad): (usize, usize),
    grid: Option<Grid>,
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = conv::geometry(x, w, stride, pad)?;
    train_layer(x, w, (gamma, beta), residual, Layer { g, grid, eps, relu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{conv_bn_vars, gradient_gaps, max_diff};

    /// Values, statistics and all gradients against the ops it fuses, for both convolution kernels
    /// (shifted: stride 1 with 8+ channels; im2col otherwise), with and without ReLU, residual join and
    /// input quantization.
    #[test]
    fn matches_conv_then_batch_norm() {
        for (n, c, h, w, o, stride, relu, quant, join) in [
            (2, 8, 7, 9, 10, 1, true, false, false),
            (3, 3, 8, 8, 4, 2, false, false, false),
            (2, 16, 6, 6, 16, 1, false, true, false),
            (2, 4, 9, 7, 8, 2, true, true, false),
            (2, 8, 7, 9, 10, 1, false, false, true),
            (2, 4, 9, 7, 8, 2, false, true, true),
        ] {
            let [x, wt, gamma, beta, shortcut] = conv_bn_vars((n, c, h, w, o, stride));
            let residual = join.then_some(shortcut.as_tensor());
            let grid = quant.then(|| Grid::new(0.8, 7.0));
            let (gamma_t, beta_t) = (gamma.as_tensor(), beta.as_tensor());
            let (fused, mean, var) = conv_bn_train_cpu(
                x.as_tensor(),
                wt.as_tensor(),
                (gamma_t, beta_t),
                (stride, 1),
                grid,
                1e-5,
                relu,
                residual,
            )
            .unwrap();
            let conv = conv::conv2d_cpu(x.as_tensor(), wt.as_tensor(), stride, 1, grid).unwrap();
            let (apart, mean2, var2) = bn::batch_norm_train_cpu(&conv, gamma_t, beta_t, 1e-5, relu).unwrap();
            let apart = match residual {
                Some(r) => (apart + r).unwrap().relu().unwrap(),
                None => apart,
            };
            let case = (n, c, h, w, o, stride, relu, quant, join);
            assert!(max_diff(&fused, &apart) < 1e-5, "{case:?}");
            assert!(max_diff(&mean, &mean2) < 1e-6 && max_diff(&var, &var2) < 1e-6, "{case:?}");
            let vars = [&x, &wt, &gamma, &beta, &shortcut];
            for gap in gradient_gaps(&fused, &apart, &vars[..if join { 5 } else { 4 }], 5) {
                assert!(gap < 1e-4, "{case:?}: {gap}");
            }
        }
    }
}
