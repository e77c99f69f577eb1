//! Small composable layers: a convolution with its batch norm (float or quantized, BN folded or kept)
//! and a linear classifier. Layers call [`crate::ops`] for the arithmetic.

use super::{Params, Role};
use crate::config::BnMode;
use crate::methods::quantization::{quantize_weight, weight_levels, ActQuant, FLOAT_BITS};
use crate::ops;
use candle_core::{Result, Tensor, Var};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Moves batch-norm running statistics toward a batch's; `count` values per channel went into the
/// batch statistics (the running variance is unbiased, as in PyTorch).
fn update_running(running_mean: &Var, running_var: &Var, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
    let m = BN_MOMENTUM;
    let unbias = count as f64 / (count.max(2) - 1) as f64;
    ops::ema_update(running_mean, mean, 1.0 - m, m, false)?;
    ops::ema_update(running_var, var, 1.0 - m, m * unbias, false)
}

/// How one layer is quantized.
#[derive(Debug, Clone)]
pub struct LayerQuant {
    pub weight_bits: u32,
    pub input: ActQuant,
}

impl LayerQuant {
    /// The quantizer of layer `name`, with `groups` input scales (1 = per tensor).
    fn new(params: &mut Params, name: &str, q: QuantSpec, groups: usize) -> Self {
        let ema = params.constant(&format!("{name}.act_scale"), &[groups], 0.0, Role::Buffer);
        Self { weight_bits: q.weight_bits, input: ActQuant::new(q.act_bits, q.ema_momentum, ema) }
    }
}

/// Quantization settings handed to a layer constructor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub weight_bits: u32,
    pub act_bits: u32,
    pub ema_momentum: f64,
    pub bn: BnMode,
}

/// A k×k convolution (no bias) followed by batch norm, optionally quantized and channel-pruned.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub name: String,
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub weight: Var,
    pub gamma: Var,
    pub beta: Var,
    pub running_mean: Var,
    pub running_var: Var,
    pub quant: Option<LayerQuant>,
    pub bn_mode: BnMode,
    /// Output channels kept by structured pruning (1) or removed (0), shaped (C); `None` = dense.
    pub keep: Option<Tensor>,
}

impl ConvBn {
    /// The quantizer of this layer's input, where its input is quantized (not float).
    fn input_quantizer(&self) -> Option<&ActQuant> {
        self.quant.as_ref().map(|q| &q.input).filter(|q| q.bits < FLOAT_BITS)
    }

    pub fn new(
        params: &mut Params,
        name: &str,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        quant: Option<QuantSpec>,
    ) -> Self {
        let fan_in = in_ch * kernel * kernel;
        let weight = params.kaiming(&format!("{name}.weight"), &[out_ch, in_ch, kernel, kernel], fan_in);
        let gamma = params.constant(&format!("{name}.bn.weight"), &[out_ch], 1.0, Role::NoDecay);
        let beta = params.constant(&format!("{name}.bn.bias"), &[out_ch], 0.0, Role::NoDecay);
        let running_mean = params.constant(&format!("{name}.bn.running_mean"), &[out_ch], 0.0, Role::Buffer);
        let running_var = params.constant(&format!("{name}.bn.running_var"), &[out_ch], 1.0, Role::Buffer);
        let bn_mode = quant.map(|q| q.bn).unwrap_or(BnMode::Keep);
        let quant = quant.map(|q| LayerQuant::new(params, name, q, 1));
        Self {
            name: name.to_string(),
            in_ch,
            out_ch,
            kernel,
            stride,
            padding: kernel / 2,
            weight,
            gamma,
            beta,
            running_mean,
            running_var,
            bn_mode,
            quant,
            keep: None,
        }
    }

    /// Convolution + batch norm (batch statistics in training, running ones in eval), then a ReLU if
    /// `relu` (fused into the batch norm where the kernels allow).
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.forward_then(x, train, relu, None)
    }

    /// `relu(batch_norm(conv(x)) + shortcut)`: the second layer of a residual block with the join. The
    /// join is fused into the layer's op (but for pruned layers and for training with BN folded): one
    /// op, one pass over memory and, in training, one autograd node fewer per block.
    pub fn forward_residual(&self, x: &Tensor, shortcut: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, false, Some(shortcut))
    }

    /// [`Self::forward`], then `relu(· + residual)` when there is a residual.
    fn forward_then(&self, x: &Tensor, train: bool, relu: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        // The input quantizer runs inside the convolution (one pass fewer than a separate fake-quant).
        let input_scale = match &self.quant {
            Some(q) => q.input.scale(x, train)?.map(|s| (s, q.input.levels())),
            None => None,
        };
        let input = input_scale.as_ref().map(|(scale, levels)| (scale, *levels));
        // The join fuses into the layer's op where nothing comes between the batch norm and the sum
        // (all but pruned layers).
        let fused = residual.filter(|_| self.keep.is_none());
        let geometry = (self.stride, self.padding);
        let w = self.weight.as_tensor();
        let out = match (&self.quant, self.bn_mode) {
            (Some(q), BnMode::Fold) => {
                // Jacob et al. 2018: BN folded into the weights, W_f = W·s with s = γ/σ, and the bias
                // β − s·μ, where (μ, σ) are the batch statistics of the float convolution in training
                // and the running ones in eval; W_f is quantized per output channel. Per-channel
                // quantization commutes with that per-channel scale (q(W·s) = s·q(W) exactly, rounding
                // being symmetric), so training runs conv(x, W) for the statistics and conv(x, q(W)),
                // scaled by s afterwards, for the output. The two convolutions (forward and input
                // gradient; the op computes one weight gradient over both) are why `fold` costs about
                // 1.5 times `keep`.
                if train {
                    let (gamma, beta) = (self.gamma.as_tensor(), self.beta.as_tensor());
                    let levels = weight_levels(q.weight_bits);
                    let (out, mean, var) =
                        ops::fold_conv_bn_train(x, (w, levels), (gamma, beta), geometry, input, BN_EPS, relu, fused)?;
                    let count = out.elem_count() / self.out_ch;
                    update_running(&self.running_mean, &self.running_var, &mean, &var, count)?;
                    out
                } else {
                    let (scale, shift) = self.eval_affine()?;
                    let folded = w.broadcast_mul(&scale.reshape((self.out_ch, 1, 1, 1))?)?;
                    let folded = quantize_weight(&folded, q.weight_bits)?;
                    let ones = Tensor::ones_like(&shift)?;
                    ops::conv2d_eval(x, &folded, geometry, input, (&ones, &shift), relu, fused)?
                }
            }
            (q, _) => {
                let w = match q {
                    Some(q) => quantize_weight(w, q.weight_bits)?,
                    None => w.clone(),
                };
                if train {
                    let (gamma, beta) = (self.gamma.as_tensor(), self.beta.as_tensor());
                    let (out, mean, var) =
                        ops::conv_bn_train(x, &w, (gamma, beta), geometry, input, BN_EPS, relu, fused)?;
                    let count = out.elem_count() / self.out_ch;
                    update_running(&self.running_mean, &self.running_var, &mean, &var, count)?;
                    out
                } else {
                    let (scale, shift) = self.eval_affine()?;
                    ops::conv2d_eval(x, &w, geometry, input, (&scale, &shift), relu, fused)?
                }
            }
        };
        let out = match &self.keep {
            Some(keep) => out.broadcast_mul(&keep.reshape((1, self.out_ch, 1, 1))?)?,
            None => out,
        };
        match residual {
            Some(r) if fused.is_none() => ops::add_relu(&out, r),
            _ => Ok(out),
        }
    }

    /// Eval-mode batch norm as a per-channel affine: (γ/σ, β − μ·γ/σ) with the running statistics.
    pub(crate) fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let (gamma, beta) = (self.gamma.as_tensor(), self.beta.as_tensor());
        ops::bn_eval_affine(gamma, beta, self.running_mean.as_tensor(), self.running_var.as_tensor(), BN_EPS)
    }

    /// Per-output-channel L1 norms of the weights (the pruning criterion).
    pub fn channel_l1(&self) -> Result<Vec<f32>> {
        self.weight.as_tensor().abs()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()
    }

    /// Which output channels structured pruning kept, where it pruned this layer.
    pub fn kept_mask(&self) -> Result<Option<Vec<bool>>> {
        match &self.keep {
            Some(mask) => Ok(Some(mask.to_vec1::<f32>()?.iter().map(|&k| k > 0.5).collect())),
            None => Ok(None),
        }
    }

    /// Number of kept output channels.
    pub fn kept_channels(&self) -> Result<usize> {
        Ok(match &self.keep {
            Some(k) => k.sum_all()?.to_scalar::<f32>()?.round() as usize,
            None => self.out_ch,
        })
    }
}

/// A chain of residual blocks, each `(first, second)` layer with its join, in training as one op
/// ([`ops::blocks_train`]), which spares candle its gradient accumulations inside the chain (all but
/// the chain input's). Applies on the CPU to 3x3 layers without a pruning mask, float or quantized,
/// with batch norm kept or folded (all alike); None elsewhere (the caller runs the layers one by one).
/// Updates the running statistics and the input-scale averages.
pub fn fused_blocks_train(blocks: &[(&ConvBn, &ConvBn)], x: &Tensor) -> Result<Option<Tensor>> {
    let Some(&(head, _)) = blocks.first() else { return Ok(None) };
    let folded = |l: &ConvBn| l.quant.is_some() && l.bn_mode == BnMode::Fold;
    let fits = |l: &ConvBn| l.kernel == 3 && l.keep.is_none() && folded(l) == folded(head);
    let cpu = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
    if !cpu || !blocks.iter().all(|(first, second)| fits(first) && fits(second) && second.stride == 1) {
        return Ok(None);
    }
    let input_scale = match &head.quant {
        Some(q) => q.input.scale(x, true)?.map(|s| (s, q.input.levels())),
        None => None,
    };
    let input = input_scale.as_ref().map(|(scale, levels)| (scale, *levels));
    // Quantized per output channel, straight-through; with BN folded, by the op itself (which runs the
    // float convolution for the statistics and the quantized one for the output).
    let weight = |l: &ConvBn| -> Result<Tensor> {
        let w = l.weight.as_tensor();
        match &l.quant {
            Some(q) if !folded(l) => quantize_weight(w, q.weight_bits),
            _ => Ok(w.clone()),
        }
    };
    let weights: Vec<(Tensor, Tensor)> =
        blocks.iter().map(|(first, second)| Ok((weight(first)?, weight(second)?))).collect::<Result<_>>()?;
    let params: Vec<ops::cpu::block::BlockParams> = blocks
        .iter()
        .zip(&weights)
        .map(|((first, second), (w1, w2))| ops::cpu::block::BlockParams {
            first: (w1, first.gamma.as_tensor(), first.beta.as_tensor()),
            second: (w2, second.gamma.as_tensor(), second.beta.as_tensor()),
            stride: first.stride,
            levels1: first.input_quantizer().map(|q| q.levels() as f32),
            levels2: second.input_quantizer().map(|q| q.levels() as f32),
            fold: folded(first).then(|| {
                [first, second].map(|l| l.quant.as_ref().and_then(|q| weight_levels(q.weight_bits)).map(|l| l as f32))
            }),
        })
        .collect();
    let (out, stats) = ops::blocks_train(x, &params, input, BN_EPS)?;
    for (i, ((first, second), s)) in blocks.iter().zip(&stats).enumerate() {
        update_running(&first.running_mean, &first.running_var, &s.first.0, &s.first.1, s.count)?;
        update_running(&second.running_mean, &second.running_var, &s.second.0, &s.second.1, s.count)?;
        // The chain input's scale was recorded by `scale` above.
        let scales = [(first, s.input_scale), (second, s.inner_scale)];
        for (layer, scale) in scales.into_iter().skip(usize::from(i == 0)) {
            if let Some(q) = layer.input_quantizer() {
                q.record(&Tensor::new(&[scale], x.device())?)?;
            }
        }
    }
    Ok(Some(out))
}

/// A fully connected classifier, optionally quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Var,
    pub bias: Var,
    pub quant: Option<LayerQuant>,
}

impl Linear {
    pub fn new(
        params: &mut Params,
        name: &str,
        in_features: usize,
        out_features: usize,
        quant: Option<QuantSpec>,
    ) -> Self {
        let weight = params.uniform(&format!("{name}.weight"), &[out_features, in_features], in_features, Role::Weight);
        let bias = params.uniform(&format!("{name}.bias"), &[out_features], in_features, Role::NoDecay);
        let quant = quant.map(|q| LayerQuant::new(params, name, q, 1));
        Self { in_features, out_features, weight, bias, quant }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.quant {
            Some(q) => {
                let x = q.input.forward(x, train)?;
                ops::linear(&x, &quantize_weight(self.weight.as_tensor(), q.weight_bits)?, self.bias.as_tensor())
            }
            None => ops::linear(x, self.weight.as_tensor(), self.bias.as_tensor()),
        }
    }
}

/// One classifier head per label with its own batch norm (the paper's change for multi-task QAT: the
/// normalisation is kept per AU so that each head learns its own input scaling). Every head sees the
/// same pooled features, so the batch statistics are shared and each head has its own affine
/// parameters, input quantizer and (quantized) weights.
#[derive(Debug, Clone)]
pub struct LabelHeads {
    pub labels: usize,
    pub features: usize,
    /// (L, F) per-head batch-norm scale and shift.
    pub gamma: Var,
    pub beta: Var,
    /// (F) running statistics of the shared features.
    pub running_mean: Var,
    pub running_var: Var,
    /// (L, F) weights and (L) biases.
    pub weight: Var,
    pub bias: Var,
    /// Weight bits and the input quantizer, with one moving scale per head (L).
    pub quant: Option<LayerQuant>,
}

impl LabelHeads {
    pub fn new(params: &mut Params, name: &str, features: usize, labels: usize, quant: Option<QuantSpec>) -> Self {
        Self {
            labels,
            features,
            gamma: params.constant(&format!("{name}.bn.weight"), &[labels, features], 1.0, Role::NoDecay),
            beta: params.constant(&format!("{name}.bn.bias"), &[labels, features], 0.0, Role::NoDecay),
            running_mean: params.constant(&format!("{name}.bn.running_mean"), &[features], 0.0, Role::Buffer),
            running_var: params.constant(&format!("{name}.bn.running_var"), &[features], 1.0, Role::Buffer),
            weight: params.uniform(&format!("{name}.weight"), &[labels, features], features, Role::Weight),
            bias: params.uniform(&format!("{name}.bias"), &[labels], features, Role::NoDecay),
            quant: quant.map(|q| LayerQuant::new(params, name, q, labels)),
        }
    }

    /// Logits (N, L) from pooled features (N, F).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (n, f) = x.dims2()?;
        let (mean, var) = if train {
            let mean = x.mean(0)?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?;
            update_running(&self.running_mean, &self.running_var, &mean, &var, n)?;
            (mean, var)
        } else {
            (self.running_mean.as_tensor().clone(), self.running_var.as_tensor().clone())
        };
        let xhat = x.broadcast_sub(&mean)?.broadcast_div(&(var + BN_EPS)?.sqrt()?)?; // (N, F)
        let l = self.labels;
        let z = xhat
            .unsqueeze(0)?
            .broadcast_mul(&self.gamma.as_tensor().unsqueeze(1)?)?
            .broadcast_add(&self.beta.as_tensor().unsqueeze(1)?)?; // (L, N, F)
        let (z, w) = match &self.quant {
            Some(q) => {
                (q.input.forward(&z.contiguous()?, train)?, quantize_weight(self.weight.as_tensor(), q.weight_bits)?)
            }
            None => (z, self.weight.as_tensor().clone()),
        };
        let y = z.broadcast_mul(&w.unsqueeze(1)?)?.sum(2)?; // (L, N)
        debug_assert_eq!(f, self.features);
        y.broadcast_add(&self.bias.as_tensor().unsqueeze(1)?)?.t()?.reshape((n, l))
    }
}
