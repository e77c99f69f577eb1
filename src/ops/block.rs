//! A whole residual block in training (two convolution + batch-norm layers, the shortcut and the join)
//! as one differentiable op on the CPU.
//!
//! candle adds every gradient into a fresh zero tensor, on one thread. As two layer ops, a block costs
//! three such accumulations of its activations: the first layer's output, and the block input twice
//! (its first layer and its shortcut both read it). As one op, the block input gets one and the inner
//! activation none, and the shortcut's gradient is added inside, in parallel. The layers are either
//! kind of `conv_bn::FusedLayer` (batch norm kept, or folded into quantized weights). Values and gradients
//! are those of the two layer ops (tested against them, for both kinds).

use super::bn::Subsample;
use super::conv::Geometry;
use super::conv_bn::{saved, FusedLayer, Layer};
use super::fold_bn::FoldLayer;
use super::quant::{max_abs_par, Grid};
use super::{slice, with_slices};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// What the forward keeps for the backward, and its caller reads (the running averages and the
/// second layer's input scale).
#[derive(Debug)]
struct BlockSaved<S> {
    /// The first layer's output (the second's input).
    inner: Vec<f32>,
    first: S,
    second: S,
    /// The second layer's input quantizer, from the batch's max|inner|.
    grid: Option<Grid>,
    scale: f32,
}

/// Inputs: the block input (NCHW) and its parameters flattened into one vector: w1, γ1, β1, w2, γ2, β2
/// (a folded layer's w is W, which it quantizes itself).
struct BlockTrain<L: FusedLayer> {
    first: L,
    /// The second layer; its input grid is set in the forward, from the first layer's output.
    second: L,
    /// Grid steps per side of the second layer's input quantizer, when it has one.
    levels: Option<f32>,
    /// The shortcut when the block downsamples (None: identity).
    shortcut: Option<Subsample>,
    saved: Arc<Mutex<Option<BlockSaved<L::Saved>>>>,
}

impl<L: FusedLayer> BlockTrain<L> {
    /// (w1, [γ1; β1], w2, [γ2; β2]) from the flattened parameters.
    fn unpack<'a>(&self, params: &'a [f32]) -> [&'a [f32]; 4] {
        let weights = |g: Geometry| g.o * g.c * g.k * g.k;
        let (w1, rest) = params.split_at(weights(self.first.geometry()));
        let (gb1, rest) = rest.split_at(2 * self.first.channels());
        let (w2, gb2) = rest.split_at(weights(self.second.geometry()));
        [w1, gb1, w2, gb2]
    }

    /// (N, C, H, W) of the block input.
    fn input_dims(&self) -> (usize, usize, usize, usize) {
        let g = self.first.geometry();
        (g.n, g.c, g.h, g.w)
    }
}

impl<L: FusedLayer> CustomOp2 for BlockTrain<L> {
    fn name(&self) -> &'static str {
        "qat-block-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "block input")?;
        let [w1, gb1, w2, gb2] = self.unpack(slice(s2, l2, "block parameters")?);
        let (inner, first) = self.first.forward(x, w1, gb1, None);
        let scale = self.levels.map_or(0.0, |_| max_abs_par(&inner));
        let grid = self.levels.map(|levels| Grid::new(scale, levels));
        let subsampled = self.shortcut.as_ref().map(|s| s.forward(x, self.input_dims()));
        let shortcut = subsampled.as_deref().unwrap_or(x);
        let (out, second) = self.second.with_grid(grid).forward(&inner, w2, gb2, Some(shortcut));
        *saved(&self.saved)? = Some(BlockSaved { inner, first, second, grid, scale });
        let g = self.second.geometry();
        Ok((CpuStorage::F32(out), Shape::from((g.n, self.second.channels(), g.oh(), g.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = saved(&self.saved)?;
        let Some(s) = saved.as_ref() else { candle_core::bail!("residual block: backward before forward") };
        let want_dx = x.track_op();
        let (dx, dparams) = with_slices([grad, out, params, x], |[grad, out, params, x]| {
            let [w1, gb1, w2, gb2] = self.unpack(params);
            let (d_inner, dw2, dg2, db2, d_shortcut) =
                self.second.with_grid(s.grid).backward(&s.second, (grad, out), (&s.inner, w2, gb2), (true, want_dx));
            let d_inner = d_inner.unwrap_or_default();
            let (mut dx, dw1, dg1, db1, _) =
                self.first.backward(&s.first, (&d_inner, &s.inner), (x, w1, gb1), (want_dx, false));
            // The shortcut's gradient joins the first layer's, here and in parallel.
            if let (Some(dx), Some(d_shortcut)) = (dx.as_mut(), d_shortcut) {
                match &self.shortcut {
                    Some(sub) => sub.add_backward(&d_shortcut, self.input_dims(), dx),
                    None => dx.par_chunks_mut(16 * 1024).zip(d_shortcut.par_chunks(16 * 1024)).for_each(|(d, s)| {
                        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                    }),
                }
            }
            (dx, [dw1, dg1, db1, dw2, dg2, db2].concat())
        })?;
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dparams, params.shape(), dev)?)))
    }
}

/// What [`block_train_cpu`] returns besides the output: each layer's batch mean and biased variance,
/// and the batch max|·| of the second layer's input (its quantizer's scale; 0 without one).
#[derive(Debug)]
pub struct BlockStats {
    pub first: (Tensor, Tensor),
    pub second: (Tensor, Tensor),
    pub inner_scale: f32,
}

/// A residual block in training on the CPU: `relu(layer2(q2(layer1(q1(x)))) + shortcut(x))` with 3x3
/// convolution + batch-norm layers (the first with ReLU and stride `stride`), q1 on `grid` (when
/// given), q2 on a grid of `levels` steps per side scaled by the batch's max|input| (when given), and
/// the option-A shortcut. `first` and `second` are (weight, γ, β) of the two layers; with `fold` =
/// Some(weight levels of the two layers), batch norm is folded into weights that the layers quantize
/// themselves (None: float weights).
pub fn block_train_cpu(
    x: &Tensor,
    (first, second): ((&Tensor, &Tensor, &Tensor), (&Tensor, &Tensor, &Tensor)),
    stride: usize,
    (grid, levels): (Option<Grid>, Option<f32>),
    (eps, fold): (f64, Option<[Option<f32>; 2]>),
) -> Result<(Tensor, BlockStats)> {
    let g1 = super::conv::geometry(x, first.0, stride, 1)?;
    let o = g1.o;
    let g2 = Geometry { c: o, h: g1.oh(), w: g1.ow(), stride: 1, ..g1 };
    if second.0.dims() != [o, o, 3, 3] || g1.k != 3 {
        candle_core::bail!(
            "residual block: weights {:?} and {:?} are not two 3x3 layers",
            first.0.dims(),
            second.0.dims()
        );
    }
    let shortcut = (stride != 1 || g1.c != o).then_some(Subsample { stride, out_ch: o });
    let params =
        Tensor::cat(&[&first.0.flatten_all()?, first.1, first.2, &second.0.flatten_all()?, second.1, second.2], 0)?;
    let x = x.contiguous()?;
    if let Some([levels1, levels2]) = fold {
        let layer = |g, grid, relu, weight_levels| FoldLayer { g, grid, eps, relu, weight_levels };
        run(&x, &params, (layer(g1, grid, true, levels1), layer(g2, None, false, levels2)), levels, shortcut)
    } else {
        let layer = |g, grid, relu| Layer { g, grid, eps, relu };
        run(&x, &params, (layer(g1, grid, true), layer(g2, None, false)), levels, shortcut)
    }
}

/// Applies the block op of the two layers and reads back the statistics.
fn run<L: FusedLayer + 'static>(
    x: &Tensor,
    params: &Tensor,
    (first, second): (L, L),
    levels: Option<f32>,
    shortcut: Option<Subsample>,
) -> Result<(Tensor, BlockStats)> {
    let state = Arc::new(Mutex::new(None));
    let op = BlockTrain { first, second, levels, shortcut, saved: state.clone() };
    let out = x.apply_op2(params, op)?;
    let guard = saved(&state)?;
    let Some(s) = guard.as_ref() else { candle_core::bail!("residual block: the forward did not run") };
    let dev = x.device();
    let stats = |saved: &L::Saved| -> Result<(Tensor, Tensor)> {
        let (mean, var) = L::statistics(saved);
        Ok((Tensor::new(mean, dev)?, Tensor::new(var, dev)?))
    };
    Ok((out, BlockStats { first: stats(&s.first)?, second: stats(&s.second)?, inner_scale: s.scale }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv_bn::conv_bn_train_cpu;
    use crate::ops::testing::{gradient_gaps, max_diff, rand};
    use crate::ops::{max_abs, subsample};
    use candle_core::Var;

    /// With batch norm folded: output, statistics and all gradients against the two folded layer ops
    /// with the join (each quantizing its weight, on grids of different steps).
    #[test]
    fn folded_matches_two_folded_layer_ops() {
        use crate::ops::fold_bn::fold_conv_bn_train_cpu;
        for (n, c, h, w, o, stride) in [(2, 8, 6, 7, 8, 1), (2, 4, 7, 6, 8, 2)] {
            let var = |t: Tensor| Var::from_tensor(&t).unwrap();
            let x = var(rand(&[n, c, h, w], 1));
            let (w1, g1, b1) = (var(rand(&[o, c, 3, 3], 2)), var((rand(&[o], 3) + 1.5).unwrap()), var(rand(&[o], 4)));
            let (w2, g2, b2) = (var(rand(&[o, o, 3, 3], 5)), var((rand(&[o], 6) + 1.5).unwrap()), var(rand(&[o], 7)));
            let (levels1, levels2) = (Some(7.0), Some(3.0));
            let grid = Some(Grid::new(0.9, 7.0));
            let layers =
                ((w1.as_tensor(), g1.as_tensor(), b1.as_tensor()), (w2.as_tensor(), g2.as_tensor(), b2.as_tensor()));
            let fold = Some([levels1, levels2]);
            let (fused, stats) =
                block_train_cpu(x.as_tensor(), layers, stride, (grid, Some(7.0)), (1e-5, fold)).unwrap();

            let first = fold_conv_bn_train_cpu(
                x.as_tensor(),
                (w1.as_tensor(), levels1),
                (g1.as_tensor(), b1.as_tensor()),
                (stride, 1),
                grid,
                1e-5,
                true,
                None,
            );
            let (inner, m1, v1) = first.unwrap();
            let scale = max_abs(&inner, 1).unwrap().to_vec1::<f32>().unwrap()[0];
            let shortcut = if stride == 1 && c == o {
                x.as_tensor().clone()
            } else {
                subsample(x.as_tensor(), stride, o).unwrap()
            };
            let second = fold_conv_bn_train_cpu(
                &inner,
                (w2.as_tensor(), levels2),
                (g2.as_tensor(), b2.as_tensor()),
                (1, 1),
                Some(Grid::new(scale, 7.0)),
                1e-5,
                false,
                Some(&shortcut),
            );
            let (apart, m2, v2) = second.unwrap();
            let case = (n, c, h, w, o, stride);
            assert!(max_diff(&fused, &apart) < 1e-5, "{case:?}: {}", max_diff(&fused, &apart));
            for (a, b) in [(&stats.first.0, &m1), (&stats.first.1, &v1), (&stats.second.0, &m2), (&stats.second.1, &v2)]
            {
                assert!(max_diff(a, b) < 1e-5, "{case:?}");
            }
            let vars = [&x, &w1, &g1, &b1, &w2, &g2, &b2];
            for (i, gap) in gradient_gaps(&fused, &apart, &vars, 8).into_iter().enumerate() {
                assert!(gap < 1e-3, "{case:?} input {i}: {gap}");
            }
        }
    }

    /// Output, statistics, the second layer's input scale and all gradients against the two layer ops
    /// with the join, for identity and downsampling shortcuts, with and without input quantizers.
    #[test]
    fn matches_two_layer_ops() {
        for (n, c, h, w, o, stride, quant) in
            [(2, 8, 6, 7, 8, 1, false), (2, 8, 7, 6, 16, 2, false), (2, 8, 6, 6, 8, 1, true), (3, 4, 8, 5, 8, 2, true)]
        {
            let var = |t: Tensor| Var::from_tensor(&t).unwrap();
            let x = var(rand(&[n, c, h, w], 1));
            let (w1, g1, b1) = (var(rand(&[o, c, 3, 3], 2)), var((rand(&[o], 3) + 1.5).unwrap()), var(rand(&[o], 4)));
            let (w2, g2, b2) = (var(rand(&[o, o, 3, 3], 5)), var((rand(&[o], 6) + 1.5).unwrap()), var(rand(&[o], 7)));
            let grid = quant.then(|| Grid::new(0.9, 7.0));
            let levels = quant.then_some(7.0);
            let first = (w1.as_tensor(), g1.as_tensor(), b1.as_tensor());
            let second = (w2.as_tensor(), g2.as_tensor(), b2.as_tensor());
            let (fused, stats) =
                block_train_cpu(x.as_tensor(), (first, second), stride, (grid, levels), (1e-5, None)).unwrap();

            let (inner, m1, v1) =
                conv_bn_train_cpu(x.as_tensor(), first.0, (first.1, first.2), (stride, 1), grid, 1e-5, true, None)
                    .unwrap();
            let scale = max_abs(&inner, 1).unwrap().to_vec1::<f32>().unwrap()[0];
            let grid2 = levels.map(|l| Grid::new(scale, l));
            let shortcut = if stride == 1 && c == o {
                x.as_tensor().clone()
            } else {
                subsample(x.as_tensor(), stride, o).unwrap()
            };
            let (apart, m2, v2) =
                conv_bn_train_cpu(&inner, second.0, (second.1, second.2), (1, 1), grid2, 1e-5, false, Some(&shortcut))
                    .unwrap();
            let case = (n, c, h, w, o, stride, quant);
            assert!(max_diff(&fused, &apart) < 1e-5, "{case:?}: {}", max_diff(&fused, &apart));
            for (a, b) in [(&stats.first.0, &m1), (&stats.first.1, &v1), (&stats.second.0, &m2), (&stats.second.1, &v2)]
            {
                assert!(max_diff(a, b) < 1e-5, "{case:?}");
            }
            assert_eq!(stats.inner_scale, if quant { scale } else { 0.0 }, "{case:?}");
            let vars = [&x, &w1, &g1, &b1, &w2, &g2, &b2];
            for (i, gap) in gradient_gaps(&fused, &apart, &vars, 8).into_iter().enumerate() {
                assert!(gap < 1e-4, "{case:?} input {i}: {gap}");
            }
        }
    }
}
