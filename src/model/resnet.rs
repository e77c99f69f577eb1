//! CIFAR ResNets of He et al. 2016 (section 4.2): a 3x3 stem, three stages of n BasicBlocks with
//! 16/32/64 channels (times a width multiplier), parameter-free shortcuts (option A: subsample and
//! zero-pad channels), global average pooling and one linear layer. n = 1, 2, 3 gives ResNet-8/14/20.

use super::layers::{fused_blocks_train, ConvBn, LabelHeads, Linear, QuantSpec};
use super::{Cost, Params};
use crate::config::{Arch, BnMode, DropoutPosition, PruneCriterion};
use crate::methods::pruning::channel_mask;
use crate::ops;
use candle_core::{Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// A residual block: two 3x3 ConvBn, ReLU, and an identity (or option-A) shortcut.
#[derive(Debug, Clone)]
pub struct Block {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
}

impl Block {
    /// `relu(conv2(conv1(x)) + shortcut(x))`: in training as one op where it applies
    /// ([`fused_blocks_train`]), else layer by layer.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            if let Some(out) = fused_blocks_train(&[(&self.conv1, &self.conv2)], x)? {
                return Ok(out);
            }
        }
        self.forward_layers(x, train)
    }

    /// The block layer by layer.
    fn forward_layers(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let r = self.conv1.forward(x, train, true)?;
        self.conv2.forward_residual(&r, &shortcut(x, self.conv1.stride, self.conv2.out_ch)?, train)
    }
}

/// What a network is built for.
#[derive(Debug, Clone, Copy)]
pub struct NetSpec {
    pub arch: Arch,
    pub width: f64,
    /// Input (channels, height, width).
    pub input: [usize; 3],
    /// Number of outputs (classes, or labels for multi-label heads).
    pub outputs: usize,
    /// One batch-normalised head per label (multi-label data under QAT with `bn = keep`).
    pub per_label_heads: bool,
}

impl NetSpec {
    /// Channels of the three stages: 16/32/64 times the width multiplier.
    pub fn widths(&self) -> [usize; 3] {
        let ch = |base: usize| ((base as f64 * self.width).round() as usize).max(1);
        [ch(16), ch(32), ch(64)]
    }

    /// The network's size before it is built: its trainable parameters (as [`ResNet::cost`] counts
    /// them, unpruned) and the floats of every convolution's output for one image, the unit in which
    /// a batch's activations are counted.
    pub fn size(&self) -> NetSize {
        let [in_ch, mut h, mut w] = self.input;
        let widths = self.widths();
        let conv = |in_ch: usize, out_ch: usize| out_ch * in_ch * 9 + 2 * out_ch;
        let stem = widths[0] * h * w;
        let mut size =
            NetSize { params: conv(in_ch, widths[0]), conv_outputs_per_image: stem, largest_output_per_image: stem };
        let mut prev = widths[0];
        for (stage, &out_ch) in widths.iter().enumerate() {
            for b in 0..self.arch.blocks_per_stage() {
                if stage > 0 && b == 0 {
                    (h, w) = (h.div_ceil(2), w.div_ceil(2));
                }
                size.params += conv(prev, out_ch) + conv(out_ch, out_ch);
                size.conv_outputs_per_image += 2 * out_ch * h * w;
                size.largest_output_per_image = size.largest_output_per_image.max(out_ch * h * w);
                prev = out_ch;
            }
        }
        let head_norm = if self.per_label_heads { 2 * prev * self.outputs } else { 0 };
        size.params += prev * self.outputs + self.outputs + head_norm;
        size
    }
}

/// The layers that methods wire into a network: quantizers for the inner layers and for the first
/// and last ones, and dropout. The default is the float network.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Wiring {
    pub inner_quant: Option<QuantSpec>,
    pub edge_quant: Option<QuantSpec>,
    pub dropout: Option<(f64, DropoutPosition)>,
}

/// What [`NetSpec::size`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSize {
    pub params: usize,
    pub conv_outputs_per_image: usize,
    /// Floats of the largest single convolution output for one image.
    pub largest_output_per_image: usize,
}

/// The classifier: one linear layer, or one normalised head per label.
#[derive(Debug, Clone)]
pub enum Head {
    Linear(Linear),
    PerLabel(LabelHeads),
}

/// The network with its parameters.
#[derive(Debug)]
pub struct ResNet {
    pub spec: NetSpec,
    pub params: Params,
    pub stem: ConvBn,
    pub blocks: Vec<Block>,
    pub head: Head,
    dropout: Option<(f64, DropoutPosition)>,
    /// Behind a lock (used by one thread at a time) so that the network is Sync: training steps run
    /// on a rayon worker ([`crate::threads::compute`]).
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl ResNet {
    /// Builds the network for `spec` with the layers the run's methods ask for (quantizers, dropout).
    pub fn new(spec: NetSpec, wiring: &Wiring, device: &Device, seed: u64) -> Self {
        let mut params = Params::new(device.clone(), seed);
        let (inner, edge, dropout) = (wiring.inner_quant, wiring.edge_quant, wiring.dropout);
        let widths = spec.widths();
        let stem = ConvBn::new(&mut params, "stem", spec.input[0], widths[0], 3, 1, edge);
        let mut blocks = Vec::new();
        let mut in_ch = widths[0];
        for (stage, &out_ch) in widths.iter().enumerate() {
            for b in 0..spec.arch.blocks_per_stage() {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("stage{}.block{}", stage + 1, b + 1);
                let conv1 = ConvBn::new(&mut params, &format!("{name}.conv1"), in_ch, out_ch, 3, stride, inner);
                let conv2 = ConvBn::new(&mut params, &format!("{name}.conv2"), out_ch, out_ch, 3, 1, inner);
                blocks.push(Block { conv1, conv2 });
                in_ch = out_ch;
            }
        }
        let head = if spec.per_label_heads {
            Head::PerLabel(LabelHeads::new(&mut params, "heads", in_ch, spec.outputs, edge))
        } else {
            Head::Linear(Linear::new(&mut params, "fc", in_ch, spec.outputs, edge))
        };
        Self {
            spec,
            params,
            stem,
            blocks,
            head,
            dropout,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xd20)),
        }
    }

    /// Logits (N, outputs) for a batch of NCHW images.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem.forward(x, train, true)?;
        let dropout_after_blocks = match self.dropout {
            Some((p, DropoutPosition::Blocks)) => Some(p),
            _ => None,
        };
        // In training without dropout between them, all blocks as one op where it applies.
        let fused = match (train, dropout_after_blocks) {
            (true, None) => {
                let chain: Vec<_> = self.blocks.iter().map(|b| (&b.conv1, &b.conv2)).collect();
                fused_blocks_train(&chain, &h)?
            }
            _ => None,
        };
        match fused {
            Some(out) => h = out,
            None => {
                for block in &self.blocks {
                    h = block.forward(&h, train)?;
                    if let Some(p) = dropout_after_blocks {
                        h = self.drop(&h, p, train)?;
                    }
                }
            }
        }
        let mut pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        if let Some((p, DropoutPosition::Classifier)) = self.dropout {
            pooled = self.drop(&pooled, p, train)?;
        }
        match &self.head {
            Head::Linear(fc) => fc.forward(&pooled, train),
            Head::PerLabel(heads) => heads.forward(&pooled, train),
        }
    }

    /// Inverted dropout with our own seeded mask, so runs are reproducible.
    fn drop(&self, x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        if !train || p <= 0.0 {
            return Ok(x.clone());
        }
        let scale = (1.0 / (1.0 - p)) as f32;
        // A poisoned lock only means another step panicked mid-draw; the generator is still usable.
        let mut rng = self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner());
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random_bool(p) { 0.0 } else { scale }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }

    /// Layers that structured pruning may shrink: the inner convolution of every block. The stem and
    /// classifier (first and last layers) and the residual stream's channels are left whole.
    pub fn prunable(&self) -> impl Iterator<Item = &ConvBn> {
        self.blocks.iter().map(|b| &b.conv1)
    }

    /// Removes `ratio` of the output channels of every prunable layer by L1 norm; returns the channels
    /// kept per layer.
    pub fn prune(&mut self, ratio: f64, criterion: PruneCriterion) -> Result<Vec<usize>> {
        let device = self.params.device.clone();
        let mut kept = Vec::new();
        for block in &mut self.blocks {
            let keep = channel_mask(&block.conv1.channel_l1()?, ratio, criterion);
            kept.push(keep.iter().filter(|k| **k).count());
            let mask: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            block.conv1.keep = Some(Tensor::new(mask, &device)?);
        }
        Ok(kept)
    }

    /// Writes the weights, with the pruning masks as `keep.{i}` (block i), to a safetensors file,
    /// atomically: what `export` and `eval` rebuild the network from.
    pub fn save_weights(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let mut map = self.params.tensors()?;
        for (i, block) in self.blocks.iter().enumerate() {
            if let Some(keep) = &block.conv1.keep {
                map.insert(format!("keep.{i}"), keep.clone());
            }
        }
        super::save_tensors(&map, path)
    }

    /// Sets what [`ResNet::save_weights`] wrote (read back as `map`, from `what`) into a network built
    /// from the same spec and wiring.
    pub fn set_weights(&mut self, map: &std::collections::HashMap<String, Tensor>, what: &str) -> anyhow::Result<()> {
        self.params.set(map, what)?;
        let device = self.params.device.clone();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.conv1.keep = map.get(&format!("keep.{i}")).map(|k| k.to_device(&device)).transpose()?;
        }
        Ok(())
    }

    /// Puts what training changes into a checkpoint: every tensor, the pruning masks and the dropout
    /// generator's position.
    pub fn save_state(&self, state: &mut super::State) -> anyhow::Result<()> {
        self.params.save_state(state)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if let Some(keep) = &block.conv1.keep {
                state.put_tensor(&format!("keep.{i}"), keep)?;
            }
        }
        let position = self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()).get_word_pos();
        state.put("dropout_rng", &position.to_string())
    }

    /// Restores what [`ResNet::save_state`] kept into a network built from the same spec and wiring.
    pub fn restore_state(&mut self, state: &super::State) -> anyhow::Result<()> {
        self.params.restore_state(state)?;
        let device = self.params.device.clone();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let name = format!("keep.{i}");
            block.conv1.keep = if state.has_tensor(&name) { Some(state.tensor(&name, &device)?) } else { None };
        }
        let position: String = state.get("dropout_rng")?;
        let position = position.parse().map_err(|_| anyhow::anyhow!("the checkpoint's dropout_rng is not a number"))?;
        self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()).set_word_pos(position);
        Ok(())
    }

    /// Parameters and multiply-accumulates per image that still affect the output (pruned channels
    /// and the input slices of the next layer that read them are not counted).
    pub fn cost(&self) -> Result<Cost> {
        let [_, mut h, mut w] = self.spec.input;
        let mut cost = Cost::default();
        let mut conv = |c: &ConvBn, in_ch: usize, out_ch: usize, h: &mut usize, w: &mut usize| {
            *h = h.div_ceil(c.stride);
            *w = w.div_ceil(c.stride);
            let k2 = c.kernel * c.kernel;
            cost.params += out_ch * in_ch * k2 + 2 * out_ch;
            cost.macs += out_ch * in_ch * k2 * *h * *w;
        };
        conv(&self.stem, self.stem.in_ch, self.stem.out_ch, &mut h, &mut w);
        for b in &self.blocks {
            let mid = b.conv1.kept_channels()?;
            conv(&b.conv1, b.conv1.in_ch, mid, &mut h, &mut w);
            conv(&b.conv2, mid, b.conv2.out_ch, &mut h, &mut w);
        }
        let (features, outputs, per_label) = match &self.head {
            Head::Linear(fc) => (fc.in_features, fc.out_features, false),
            Head::PerLabel(h) => (h.features, h.labels, true),
        };
        cost.params += features * outputs + outputs + if per_label { 2 * features * outputs } else { 0 };
        cost.macs += features * outputs;
        Ok(cost)
    }

    /// Whether batch norm is folded into quantized weights.
    pub fn bn_folded(&self) -> bool {
        self.stem.quant.is_some() && self.stem.bn_mode == BnMode::Fold
    }
}

/// Option-A shortcut: identity, or for a strided block every other pixel with zero channels appended.
fn shortcut(x: &Tensor, stride: usize, out_ch: usize) -> Result<Tensor> {
    if stride == 1 && x.dim(1)? == out_ch {
        return Ok(x.clone());
    }
    ops::subsample(x, stride, out_ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Quantization, Regularizer};

    fn spec(arch: Arch, width: f64) -> NetSpec {
        NetSpec { arch, width, input: [3, 32, 32], outputs: 10, per_label_heads: false }
    }

    #[test]
    fn resnet20_has_the_published_parameter_count() {
        // He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (269,722 with BN affine and the classifier).
        let net = ResNet::new(spec(Arch::Resnet20, 1.0), &Wiring::default(), &Device::Cpu, 0);
        assert_eq!(net.params.trainable_count(), 269_722);
        assert_eq!(net.cost().unwrap().params, 269_722);
        assert_eq!(net.blocks.len(), 9);
        // ~40.8M MACs per 32x32 image.
        let macs = net.cost().unwrap().macs;
        assert!((40_000_000..42_000_000).contains(&macs), "{macs}");
        let r8 = ResNet::new(spec(Arch::Resnet8, 1.0), &Wiring::default(), &Device::Cpu, 0);
        assert_eq!(r8.params.trainable_count(), 75_290);
    }

    #[test]
    fn size_counts_what_the_built_network_has() {
        // ResNet-20 on 32x32: the stem and 6 convs of 16x32x32, 6 of 32x16x16, 6 of 64x8x8.
        let r20 = spec(Arch::Resnet20, 1.0).size();
        let expected = NetSize {
            params: 269_722,
            conv_outputs_per_image: 7 * 16_384 + 6 * 8_192 + 6 * 4_096,
            largest_output_per_image: 16_384,
        };
        assert_eq!(r20, expected);
        // Odd sides round up at each stride, as the convolutions do; per-label heads add their norms.
        let odd = NetSpec { arch: Arch::Resnet8, width: 0.5, input: [3, 9, 7], outputs: 4, per_label_heads: true };
        assert_eq!(odd.size().conv_outputs_per_image, 3 * 8 * 63 + 2 * 16 * 5 * 4 + 2 * 32 * 3 * 2);
        let reg = Regularizer::Quantization(Quantization {
            weight_bits: 4,
            act_bits: 4,
            first_last_bits: 8,
            bn: BnMode::Keep,
            ema_momentum: 0.9,
        });
        for (mut s, reg) in [(odd, reg), (spec(Arch::Resnet14, 1.5), Regularizer::None)] {
            let wiring = crate::methods::wiring(&reg, &mut s);
            let net = ResNet::new(s, &wiring, &Device::Cpu, 0);
            assert_eq!(s.size().params, net.cost().unwrap().params, "{s:?}");
        }
    }

    #[test]
    fn forward_shapes_for_odd_and_small_inputs() {
        for input in [[1, 8, 8], [3, 9, 7]] {
            let net = ResNet::new(
                NetSpec { arch: Arch::Resnet8, width: 0.5, input, outputs: 4, per_label_heads: false },
                &Wiring::default(),
                &Device::Cpu,
                0,
            );
            let x = Tensor::zeros((2, input[0], input[1], input[2]), candle_core::DType::F32, &Device::Cpu).unwrap();
            assert_eq!(net.forward(&x, true).unwrap().dims(), &[2, 4]);
            assert_eq!(net.forward(&x, false).unwrap().dims(), &[2, 4]);
        }
    }

    #[test]
    fn pruning_removes_channels_parameters_and_macs() {
        let mut net = ResNet::new(spec(Arch::Resnet20, 1.0), &Wiring::default(), &Device::Cpu, 0);
        let before = net.cost().unwrap();
        let kept = net.prune(0.75, PruneCriterion::LowestL1).unwrap();
        assert_eq!(kept, vec![4, 4, 4, 8, 8, 8, 16, 16, 16]);
        let after = net.cost().unwrap();
        assert!(after.params < before.params / 2, "{before:?} -> {after:?}");
        assert!(after.macs < before.macs / 2);
        // The removed channels really output zero.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let h = net.stem.forward(&x, false, true).unwrap();
        let mid = net.blocks[0].conv1.forward(&h, false, true).unwrap();
        let per_channel = mid.abs().unwrap().sum((0, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(per_channel.iter().filter(|v| **v == 0.0).count(), 12);
    }

    #[test]
    fn quantized_fold_and_keep_run_forward_and_backward() {
        for bn in [BnMode::Fold, BnMode::Keep] {
            let reg = Regularizer::Quantization(Quantization {
                weight_bits: 4,
                act_bits: 4,
                first_last_bits: 8,
                bn,
                ema_momentum: 0.9,
            });
            let mut spec =
                NetSpec { arch: Arch::Resnet8, width: 0.5, input: [3, 8, 8], outputs: 10, per_label_heads: false };
            let wiring = crate::methods::wiring(&reg, &mut spec);
            let net = ResNet::new(spec, &wiring, &Device::Cpu, 1);
            let x = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &Device::Cpu).unwrap();
            let y = net.forward(&x, true).unwrap();
            let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            let g = grads.get(net.stem.weight.as_tensor()).expect("stem weight gets a gradient");
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
            let eval = net.forward(&x, false).unwrap();
            assert!(eval.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
        }
    }
}
