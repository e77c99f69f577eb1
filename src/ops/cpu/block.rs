//! Residual blocks in training (each two convolution + batch-norm layers, the shortcut and the join),
//! a chain of them as one differentiable op on the CPU.
//!
//! candle adds every gradient into a fresh zero tensor, on the thread that drives autograd, while
//! the workers wait. As two layer ops, a block costs three such accumulations of its activations: the
//! first layer's output, and the block input twice (its first layer and its shortcut both read it).
//! As one op per block, one: the block input's, which is the previous block's output. As one op for
//! the chain, only the chain input gets one; each block hands its input gradient straight to the
//! block before, and the shortcut's gradient is added inside, in parallel. The layers are either kind
//! of `conv_bn::FusedLayer` (batch norm kept, or folded into quantized weights). Values and gradients
//! are those of the layer ops (tested against them, for both kinds).

use super::bn::Subsample;
use super::conv::Geometry;
use super::conv_bn::{FusedLayer, Layer};
use super::fold_bn::FoldLayer;
use super::quant::{max_abs_par, Grid};
use super::{slice, with_slices};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// One block of the chain, as the op runs it.
#[derive(Debug, Clone, Copy)]
struct BlockSpec<L: FusedLayer> {
    /// The first layer; for the chain's first block with its input grid set, for the others without
    /// (the forward sets it from the batch's max|input| on `levels1` steps).
    first: L,
    /// The second layer; its input grid is set in the forward, from the first layer's output.
    second: L,
    /// Grid steps per side of the first layer's input quantizer (blocks after the chain's first).
    levels1: Option<f32>,
    /// Grid steps per side of the second layer's input quantizer, when it has one.
    levels2: Option<f32>,
    /// The shortcut when the block downsamples (None: identity).
    shortcut: Option<Subsample>,
}

impl<L: FusedLayer> BlockSpec<L> {
    /// The lengths of w1, [γ1; β1], w2 and [γ2; β2] in the op's flattened parameters.
    fn sizes(&self) -> [usize; 4] {
        let weights = |g: Geometry| g.o * g.c * g.k * g.k;
        let (first, second) = (self.first, self.second);
        [weights(first.geometry()), 2 * first.channels(), weights(second.geometry()), 2 * second.channels()]
    }

    /// Values of this block's parameters in the op's flattened parameters.
    fn param_len(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// (w1, [γ1; β1], w2, [γ2; β2]) from this block's slice of the flattened parameters.
    fn unpack<'a>(&self, params: &'a [f32]) -> [&'a [f32]; 4] {
        let [w1, gb1, w2, _] = self.sizes();
        let (w1, rest) = params.split_at(w1);
        let (gb1, rest) = rest.split_at(gb1);
        let (w2, gb2) = rest.split_at(w2);
        [w1, gb1, w2, gb2]
    }

    /// (N, C, H, W) of the block input.
    fn input_dims(&self) -> (usize, usize, usize, usize) {
        let g = self.first.geometry();
        (g.n, g.c, g.h, g.w)
    }
}

/// What the forward keeps of one block for the backward, and its caller reads (the running averages
/// and the input scales).
#[derive(Debug)]
struct BlockSaved<L: FusedLayer> {
    /// The block's input, the previous block's output (empty for the chain's first block: the op's
    /// input).
    input: Vec<f32>,
    /// The first layer's output (the second's input).
    inner: Vec<f32>,
    /// The two layers with the input grids they ran with.
    layers: (L, L),
    first: L::Saved,
    second: L::Saved,
    /// max|input| and max|inner| of the batch (the quantizers' scales; 0 where there is none).
    input_scale: f32,
    inner_scale: f32,
}

/// A chain of residual blocks as one op. Inputs: the chain's input (NCHW) and every block's
/// parameters flattened into one vector, block after block: w1, γ1, β1, w2, γ2, β2 (a folded layer's
/// w is W, which it quantizes itself).
struct BlocksTrain<L: FusedLayer> {
    blocks: Vec<BlockSpec<L>>,
    saved: Arc<Mutex<Option<Vec<BlockSaved<L>>>>>,
}

impl<L: FusedLayer> BlocksTrain<L> {
    /// Where each block's parameters start in the flattened parameters.
    fn offsets(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .scan(0, |at, b| {
                let start = *at;
                *at += b.param_len();
                Some(start)
            })
            .collect()
    }
}

impl<L: FusedLayer> CustomOp2 for BlocksTrain<L> {
    fn name(&self) -> &'static str {
        "qat-blocks-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "block input")?;
        let params = slice(s2, l2, "block parameters")?;
        let mut saved = Vec::with_capacity(self.blocks.len());
        // The current block's input once past the first (which reads the op's input in place).
        let mut input = Vec::new();
        for (i, (b, at)) in self.blocks.iter().zip(self.offsets()).enumerate() {
            let [w1, gb1, w2, gb2] = b.unpack(&params[at..]);
            let x_i: &[f32] = if i == 0 { x } else { &input };
            let (first, input_scale) = match b.levels1 {
                Some(levels) if i > 0 => {
                    let scale = max_abs_par(x_i);
                    (b.first.with_grid(Some(Grid::new(scale, levels))), scale)
                }
                _ => (b.first, 0.0),
            };
            let (inner, first_saved) = first.forward(x_i, w1, gb1, None);
            let inner_scale = b.levels2.map_or(0.0, |_| max_abs_par(&inner));
            let second = b.second.with_grid(b.levels2.map(|levels| Grid::new(inner_scale, levels)));
            let subsampled = b.shortcut.as_ref().map(|s| s.forward(x_i, b.input_dims()));
            let shortcut = subsampled.as_deref().unwrap_or(x_i);
            let (out, second_saved) = second.forward(&inner, w2, gb2, Some(shortcut));
            saved.push(BlockSaved {
                input: std::mem::replace(&mut input, out),
                inner,
                layers: (first, second),
                first: first_saved,
                second: second_saved,
                input_scale,
                inner_scale,
            });
        }
        *super::conv_bn::saved(&self.saved)? = Some(saved);
        let Some(last) = self.blocks.last() else { candle_core::bail!("residual blocks: an empty chain") };
        let g = last.second.geometry();
        Ok((CpuStorage::F32(input), Shape::from((g.n, last.second.channels(), g.oh(), g.ow()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = super::conv_bn::saved(&self.saved)?;
        let Some(saved) = saved.as_ref() else { candle_core::bail!("residual blocks: backward before forward") };
        let want_dx = x.track_op();
        let offsets = self.offsets();
        let (dx, dparams) = with_slices([grad, out, params, x], |[grad, out, params, x]| {
            let mut dparams = vec![0f32; params.len()];
            // The gradient of the current block's output, from the block after it.
            let mut d_out = std::borrow::Cow::Borrowed(grad);
            for i in (0..self.blocks.len()).rev() {
                let (b, s) = (&self.blocks[i], &saved[i]);
                let [w1, gb1, w2, gb2] = b.unpack(&params[offsets[i]..]);
                let x_i: &[f32] = if i == 0 { x } else { &s.input };
                let out_i: &[f32] = saved.get(i + 1).map_or(out, |next| &next.input);
                let (first, second) = s.layers;
                let (d_inner, dw2, dg2, db2, d_shortcut) =
                    second.backward(&s.second, (&d_out, out_i), (&s.inner, w2, gb2), (true, true));
                let d_inner = d_inner.unwrap_or_default();
                let want = i > 0 || want_dx;
                let (mut dx, dw1, dg1, db1, _) =
                    first.backward(&s.first, (&d_inner, &s.inner), (x_i, w1, gb1), (want, false));
                // The shortcut's gradient joins the first layer's, here and in parallel.
                if let (Some(dx), Some(d_shortcut)) = (dx.as_mut(), d_shortcut) {
                    match &b.shortcut {
                        Some(sub) => sub.add_backward(&d_shortcut, b.input_dims(), dx),
                        None => {
                            dx.par_chunks_mut(16 * 1024).zip(d_shortcut.par_chunks(16 * 1024)).for_each(|(d, s)| {
                                d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                            })
                        }
                    }
                }
                let grads = [dw1, dg1, db1, dw2, dg2, db2].concat();
                dparams[offsets[i]..offsets[i] + grads.len()].copy_from_slice(&grads);
                d_out = std::borrow::Cow::Owned(dx.unwrap_or_default());
            }
            (want_dx.then(|| d_out.into_owned()), dparams)
        })?;
        let dev = x.device();
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(dparams, params.shape(), dev)?)))
    }
}

/// What [`blocks_train_cpu`] returns of each block besides the output: each layer's batch mean and
/// biased variance over `count` values per channel, and the batch max|·| of the block's input (its
/// first layer's quantizer's scale, for blocks after the first; 0 otherwise) and of the second
/// layer's input (0 without a quantizer).
#[derive(Debug)]
pub struct BlockStats {
    pub first: (Tensor, Tensor),
    pub second: (Tensor, Tensor),
    pub count: usize,
    pub input_scale: f32,
    pub inner_scale: f32,
}

/// One residual block of [`blocks_train_cpu`]: the (weight, γ, β) of its two 3x3 layers, the first's
/// stride, its quantizers' steps per side (the first layer's input, for blocks after the first; the
/// second layer's input), and, with batch norm folded, its weights' (None: float weights).
#[derive(Debug, Clone, Copy)]
pub struct BlockParams<'a> {
    pub first: (&'a Tensor, &'a Tensor, &'a Tensor),
    pub second: (&'a Tensor, &'a Tensor, &'a Tensor),
    pub stride: usize,
    pub levels1: Option<f32>,
    pub levels2: Option<f32>,
    pub fold: Option<[Option<f32>; 2]>,
}

/// A chain of residual blocks in training on the CPU, each `relu(layer2(q2(layer1(q1(x)))) +
/// shortcut(x))` with 3x3 convolution + batch-norm layers (the first with ReLU and the block's stride),
/// the option-A shortcut, q1 on `grid` for the first block (when given) and on its `levels1` steps
/// scaled by the batch's max|input| for the others, and q2 on `levels2` steps scaled by the batch's
/// max|inner|. Batch norm is folded into weights the layers quantize themselves where `fold` is Some
/// (all blocks alike). One op: candle adds no gradient into a fresh tensor between the blocks.
pub fn blocks_train_cpu(
    x: &Tensor,
    blocks: &[BlockParams],
    grid: Option<Grid>,
    eps: f64,
) -> Result<(Tensor, Vec<BlockStats>)> {
    let Some(folded) = blocks.first().map(|b| b.fold.is_some()) else {
        candle_core::bail!("residual blocks: an empty chain")
    };
    if blocks.iter().any(|b| b.fold.is_some() != folded) {
        candle_core::bail!("residual blocks: a chain mixes folded and kept batch norm");
    }
    let mut geometries = Vec::with_capacity(blocks.len());
    let mut dims = x.dims4()?;
    for b in blocks {
        let (n, c, h, w) = dims;
        let o = b.first.0.dim(0)?;
        let g1 = Geometry { n, c, h, w, o, k: 3, stride: b.stride, pad: 1 };
        let g2 = Geometry { c: o, h: g1.oh(), w: g1.ow(), stride: 1, ..g1 };
        if b.first.0.dims() != [o, c, 3, 3] || b.second.0.dims() != [o, o, 3, 3] {
            candle_core::bail!(
                "residual block: weights {:?} and {:?} are not two 3x3 layers on {c} channels",
                b.first.0.dims(),
                b.second.0.dims()
            );
        }
        let shortcut = (b.stride != 1 || c != o).then_some(Subsample { stride: b.stride, out_ch: o });
        geometries.push((g1, g2, shortcut));
        dims = (n, o, g2.h, g2.w);
    }
    let mut flat = Vec::with_capacity(6 * blocks.len());
    for b in blocks {
        flat.extend([b.first.0.flatten_all()?, b.first.1.clone(), b.first.2.clone()]);
        flat.extend([b.second.0.flatten_all()?, b.second.1.clone(), b.second.2.clone()]);
    }
    let params = Tensor::cat(&flat, 0)?;
    let x = x.contiguous()?;
    // The blocks' specs, with `layer(block, geometry, input grid, relu, which layer)`.
    fn specs<L: FusedLayer>(
        blocks: &[BlockParams],
        geometries: &[(Geometry, Geometry, Option<Subsample>)],
        grid: Option<Grid>,
        layer: impl Fn(usize, Geometry, Option<Grid>, bool, usize) -> L,
    ) -> Vec<BlockSpec<L>> {
        blocks
            .iter()
            .zip(geometries)
            .enumerate()
            .map(|(i, (b, &(g1, g2, shortcut)))| BlockSpec {
                first: layer(i, g1, if i == 0 { grid } else { None }, true, 0),
                second: layer(i, g2, None, false, 1),
                levels1: b.levels1,
                levels2: b.levels2,
                shortcut,
            })
            .collect()
    }
    if folded {
        let levels = |i: usize, which: usize| blocks[i].fold.and_then(|f| f[which]);
        let layer = |i, g, grid, relu, which| FoldLayer { g, grid, eps, relu, weight_levels: levels(i, which) };
        run(&x, &params, specs(blocks, &geometries, grid, layer))
    } else {
        let layer = |_, g, grid, relu, _| Layer { g, grid, eps, relu };
        run(&x, &params, specs(blocks, &geometries, grid, layer))
    }
}

/// Applies the chain op and reads back the statistics.
fn run<L: FusedLayer + 'static>(
    x: &Tensor,
    params: &Tensor,
    blocks: Vec<BlockSpec<L>>,
) -> Result<(Tensor, Vec<BlockStats>)> {
    // Values per channel of each block's statistics: its output's N·OH·OW.
    let counts: Vec<usize> = blocks.iter().map(|b| b.second.geometry()).map(|g| g.n * g.oh() * g.ow()).collect();
    let state = Arc::new(Mutex::new(None));
    let out = x.apply_op2(params, BlocksTrain { blocks, saved: state.clone() })?;
    let guard = super::conv_bn::saved(&state)?;
    let Some(saved) = guard.as_ref() else { candle_core::bail!("residual blocks: the forward did not run") };
    let dev = x.device();
    let stats = |s: &L::Saved| -> Result<(Tensor, Tensor)> {
        let (mean, var) = L::statistics(s);
        Ok((Tensor::new(mean, dev)?, Tensor::new(var, dev)?))
    };
    saved
        .iter()
        .zip(counts)
        .map(|(s, count)| {
            Ok(BlockStats {
                first: stats(&s.first)?,
                second: stats(&s.second)?,
                count,
                input_scale: s.input_scale,
                inner_scale: s.inner_scale,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(|stats| (out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::conv_bn::conv_bn_train_cpu;
    use crate::ops::testing::{gradient_gaps, max_diff, rand};
    use crate::ops::{max_abs, subsample};
    use candle_core::Var;

    type Triple<'a> = (&'a Tensor, &'a Tensor, &'a Tensor);

    /// One block as a chain of one.
    fn block_train_cpu(
        x: &Tensor,
        (first, second): (Triple, Triple),
        stride: usize,
        (grid, levels2): (Option<Grid>, Option<f32>),
        (eps, fold): (f64, Option<[Option<f32>; 2]>),
    ) -> Result<(Tensor, BlockStats)> {
        let block = BlockParams { first, second, stride, levels1: None, levels2, fold };
        let (out, mut stats) = blocks_train_cpu(x, &[block], grid, eps)?;
        Ok((out, stats.remove(0)))
    }

    /// A chain of three blocks (the second downsampling) against the blocks one op each, with each
    /// later block's input quantized on the batch's max|input|: output, statistics, scales and all
    /// gradients, with batch norm kept and folded, with and without quantizers.
    #[test]
    fn chain_matches_one_block_at_a_time() {
        for (fold, quant) in [(false, false), (false, true), (true, true)] {
            let var = |t: Tensor| Var::from_tensor(&t).unwrap();
            let (n, c, h, w) = (2, 8, 6, 7);
            let x = var(rand(&[n, c, h, w], 1));
            let shapes = [(8, 8, 1), (8, 16, 2), (16, 16, 1)];
            let vars: Vec<[Var; 6]> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(ci, o, _))| {
                    let seed = 10 * i as u64;
                    [
                        var(rand(&[o, ci, 3, 3], seed + 2)),
                        var((rand(&[o], seed + 3) + 1.5).unwrap()),
                        var(rand(&[o], seed + 4)),
                        var(rand(&[o, o, 3, 3], seed + 5)),
                        var((rand(&[o], seed + 6) + 1.5).unwrap()),
                        var(rand(&[o], seed + 7)),
                    ]
                })
                .collect();
            let levels = quant.then_some(7.0);
            let fold = fold.then_some([Some(7.0), Some(3.0)]);
            let grid = quant.then(|| Grid::new(0.9, 7.0));
            let params: Vec<BlockParams> = vars
                .iter()
                .zip(shapes)
                .map(|(v, (_, _, stride))| BlockParams {
                    first: (v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor()),
                    second: (v[3].as_tensor(), v[4].as_tensor(), v[5].as_tensor()),
                    stride,
                    levels1: levels,
                    levels2: levels,
                    fold,
                })
                .collect();
            let (chained, stats) = blocks_train_cpu(x.as_tensor(), &params, grid, 1e-5).unwrap();

            let mut apart = x.as_tensor().clone();
            for (i, p) in params.iter().enumerate() {
                let scale = max_abs(&apart, 1).unwrap().to_vec1::<f32>().unwrap()[0];
                let grid = if i == 0 { grid } else { levels.map(|l| Grid::new(scale, l)) };
                let (out, s) =
                    block_train_cpu(&apart, (p.first, p.second), p.stride, (grid, p.levels2), (1e-5, p.fold)).unwrap();
                let case = (fold, quant, i);
                for (a, b) in [(&stats[i].first.0, &s.first.0), (&stats[i].second.1, &s.second.1)] {
                    assert!(max_diff(a, b) < 1e-5, "{case:?}");
                }
                assert_eq!(stats[i].inner_scale, s.inner_scale, "{case:?}");
                assert_eq!(stats[i].count, out.elem_count() / out.dim(1).unwrap(), "{case:?}");
                assert_eq!(stats[i].input_scale, if i > 0 && quant { scale } else { 0.0 }, "{case:?}");
                apart = out;
            }
            assert!(max_diff(&chained, &apart) < 1e-5, "{fold:?} {quant}: {}", max_diff(&chained, &apart));
            let all: Vec<&Var> = std::iter::once(&x).chain(vars.iter().flatten()).collect();
            for (i, gap) in gradient_gaps(&chained, &apart, &all, 8).into_iter().enumerate() {
                assert!(gap < 1e-4, "{fold:?} {quant} input {i}: {gap}");
            }
        }
    }

    /// With batch norm folded: output, statistics and all gradients against the two folded layer ops
    /// with the join (each quantizing its weight, on grids of different steps).
    #[test]
    fn folded_matches_two_folded_layer_ops() {
        use crate::ops::cpu::fold_bn::fold_conv_bn_train_cpu;
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
