//! A convolution followed by training-mode batch norm (and a ReLU), as one differentiable op on the CPU.
//!
//! As two ops, candle's autograd keeps the convolution's output as a graph node: in the backward its
//! gradient is accumulated into a fresh zero tensor (two more passes over memory) before the
//! convolution's own backward reads it. Fused, the batch-norm gradient of that output is a private
//! buffer handed straight to the convolution kernels. Values and gradients are those of
//! `batch_norm_train(conv2d(x, w))` (tested against it).

use super::bn::{self, Stats};
use super::conv::{self, Geometry};
use super::quant::Grid;
use super::{slice, with_slices};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// What the forward keeps for the backward: the convolution's output and the batch statistics.
#[derive(Debug)]
struct Saved {
    conv_out: Vec<f32>,
    stats: Stats,
    var: Vec<f32>,
}

/// Inputs: x (NCHW), w (OIHW), and γ and β stacked as a (2, O) tensor.
struct ConvBnTrain {
    g: Geometry,
    grid: Option<Grid>,
    eps: f64,
    relu: bool,
    /// Shared with the caller, which reads the batch statistics for the running averages.
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ConvBnTrain {
    /// (N, O, OH·OW) of the output.
    fn out_dims(&self) -> (usize, usize, usize) {
        (self.g.n, self.g.o, self.g.oh() * self.g.ow())
    }
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "qat-conv-bn-train"
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
        let (x, w, gb) = (slice(s1, l1, "conv input")?, slice(s2, l2, "conv weight")?, slice(s3, l3, "gamma/beta")?);
        let o = self.g.o;
        let conv_out = conv::forward(self.g, self.grid, x, w, None);
        let d = self.out_dims();
        let (mean, var) = bn::moments(&conv_out, d);
        let stats = Stats { invstd: bn::invstd(&var, self.eps), mean, relu: self.relu };
        let out = bn::normalize(&conv_out, d, &stats, &gb[..o], &gb[o..]);
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? =
            Some(Saved { conv_out, stats, var });
        Ok((CpuStorage::F32(out), Shape::from((self.g.n, o, self.g.oh(), self.g.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        let Some(saved) = saved.as_ref() else { candle_core::bail!("conv + batch norm: backward before forward") };
        let (g, o) = (self.g, self.g.o);
        // The image itself needs no gradient: skip the input gradient of the first layer.
        let want_dx = x.track_op();
        let (dx, dw, dgamma, dbeta) = with_slices([grad, out, gb, w, x], |[grad, out, gb, w, x]| {
            let (d_conv, dgamma, dbeta) =
                bn::backward((grad, &saved.conv_out, out), self.out_dims(), &saved.stats, &gb[..o]);
            let (dx, dw) = conv::backward(g, self.grid, &d_conv, x, w, want_dx);
            (dx, dw, dgamma, dbeta)
        })?;
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        let mut dgb = dgamma;
        dgb.extend(dbeta);
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), dev)?), Some(Tensor::from_vec(dgb, (2, o), dev)?)))
    }
}

/// `relu?(batch_norm(conv2d(q(x), w)))` in training mode on the CPU (x quantized onto `grid` first
/// when there is one, straight-through); returns the output and the batch mean and biased variance.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train_cpu(
    x: &Tensor,
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (stride, pad): (usize, usize),
    grid: Option<Grid>,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = conv::geometry(x, w, stride, pad)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain { g, grid, eps, relu, saved: saved.clone() };
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    let out = x.contiguous()?.apply_op3(&w.contiguous()?, &gb, op)?;
    let guard = saved.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
    let Some(saved) = guard.as_ref() else { candle_core::bail!("conv + batch norm: the forward did not run") };
    let mean = Tensor::new(saved.stats.mean.as_slice(), x.device())?;
    let var = Tensor::new(saved.var.as_slice(), x.device())?;
    Ok((out, mean, var))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, rand};
    use candle_core::Var;

    /// Values, statistics and all four gradients against the two ops it fuses, for both convolution
    /// kernels (shifted: stride 1 with 8+ channels; im2col otherwise), with and without ReLU and input
    /// quantization.
    #[test]
    fn matches_conv_then_batch_norm() {
        for (n, c, h, w, o, stride, relu, quant) in [
            (2, 8, 7, 9, 10, 1, true, false),
            (3, 3, 8, 8, 4, 2, false, false),
            (2, 16, 6, 6, 16, 1, false, true),
            (2, 4, 9, 7, 8, 2, true, true),
        ] {
            let x = Var::from_tensor(&rand(&[n, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&rand(&[o, c, 3, 3], 2)).unwrap();
            let gamma = Var::from_tensor(&(rand(&[o], 3) + 1.5).unwrap()).unwrap();
            let beta = Var::from_tensor(&rand(&[o], 4)).unwrap();
            let grid = quant.then(|| Grid::new(0.8, 7.0));
            let (fused, mean, var) = conv_bn_train_cpu(
                x.as_tensor(),
                wt.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                (stride, 1),
                grid,
                1e-5,
                relu,
            )
            .unwrap();
            let conv = conv::conv2d_cpu(x.as_tensor(), wt.as_tensor(), stride, 1, grid).unwrap();
            let (apart, mean2, var2) =
                bn::batch_norm_train_cpu(&conv, gamma.as_tensor(), beta.as_tensor(), 1e-5, relu).unwrap();
            let case = (n, c, h, w, o, stride, relu, quant);
            assert!(max_diff(&fused, &apart) < 1e-5, "{case:?}");
            assert!(max_diff(&mean, &mean2) < 1e-6 && max_diff(&var, &var2) < 1e-6, "{case:?}");
            let up = rand(fused.dims(), 5);
            let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (apart * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt, &gamma, &beta] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_diff(a, b) < 1e-4, "{case:?}: {}", max_diff(a, b));
            }
        }
    }
}
