//! The integer model of a QAT network: integer weights at their bit width with per-channel steps,
//! batch norm folded into those steps and into fixed-point biases, and the moving-average scales of every
//! layer's input. Written as one safetensors file whose size is the model's real compressed size.

use super::pack::{pack, packed_len, unpack};
use crate::config::BnMode;
use crate::model::layers::{ConvBn, LayerQuant, Linear};
use crate::model::resnet::Head;
use crate::model::ResNet;
use crate::ops::cpu::quant::Grid;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The key of the layout JSON in the file's metadata.
const LAYOUT_KEY: &str = "qat-lab.int-model";
/// Version of the layout; a reader refuses others.
const FORMAT: u32 = 1;

/// A layer's input grid: scale λ (the eval moving average of max|X|) and L steps per side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputGrid {
    pub scale: f32,
    pub levels: i32,
}

impl InputGrid {
    /// The grid the float model quantizes this input on.
    pub fn grid(&self) -> Grid {
        Grid::new(self.scale, self.levels as f32)
    }

    /// The real value of one step, as the float model computes it.
    pub fn step(&self) -> f64 {
        self.grid().step() as f64
    }
}

/// Shape and quantization of one layer; its integers are in [`IntLayer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    pub name: String,
    pub in_ch: usize,
    pub out_ch: usize,
    /// 1 for the classifier.
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub weight_bits: u32,
    pub input: InputGrid,
    /// Fraction bits of the biases below the accumulator unit: with 4-bit inputs and weights one
    /// accumulator unit is a sizeable share of the next layer's step, and a bias rounded to whole
    /// units would move outputs across its rounding points.
    pub bias_bits: u32,
}

/// A convolution (or the classifier, a 1x1 "convolution" of the pooled features) in integers.
#[derive(Debug, Clone, PartialEq)]
pub struct IntLayer {
    pub shape: LayerShape,
    /// (out, in, k, k) weights in −L..=L.
    pub weights: Vec<i8>,
    /// The real value of one weight step per output channel, batch norm's scale γ/σ included.
    pub weight_step: Vec<f32>,
    /// Per output channel, in accumulator units (input step × weight step) / 2^`bias_bits`.
    pub bias: Vec<i64>,
}

impl IntLayer {
    /// The real value of one accumulator unit of output channel `c`.
    pub fn acc_step(&self, c: usize) -> f64 {
        self.shape.input.step() * self.weight_step[c] as f64
    }
}

/// What the file's metadata says about the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Layout {
    format: u32,
    arch: String,
    classes: usize,
    layers: Vec<LayerShape>,
}

/// A ResNet in integers: the stem, the residual blocks (two layers each) and the classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct IntModel {
    pub arch: String,
    pub stem: IntLayer,
    pub blocks: Vec<[IntLayer; 2]>,
    pub classifier: IntLayer,
}

impl IntModel {
    /// The integer form of a trained QAT network in eval mode. Refuses networks with a float layer,
    /// per-label heads, or an input quantizer that never saw a training batch.
    pub fn from_network(net: &ResNet, arch: &str) -> Result<Self> {
        let Head::Linear(fc) = &net.head else {
            bail!("this run has one classifier head per label (multi-label QAT with bn = keep), which the integer exporter does not support; export --format onnx gives its float graph")
        };
        let stem = conv_layer(&net.stem, None)?;
        let mut blocks = Vec::new();
        for block in &net.blocks {
            let keep = block.conv1.kept_mask()?;
            let mut first = conv_layer(&block.conv1, None)?;
            let second = conv_layer(&block.conv2, keep.as_deref())?;
            if let Some(keep) = &keep {
                first = keep_outputs(first, keep);
            }
            blocks.push([first, second]);
        }
        let classifier = linear_layer(fc)?;
        Ok(Self { arch: arch.to_string(), stem, blocks, classifier })
    }

    /// Every layer in order: stem, blocks, classifier.
    pub fn layers(&self) -> impl Iterator<Item = &IntLayer> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flatten()).chain(std::iter::once(&self.classifier))
    }

    /// Number of output classes.
    pub fn classes(&self) -> usize {
        self.classifier.shape.out_ch
    }

    /// Input channels of the images.
    pub fn input_channels(&self) -> usize {
        self.stem.shape.in_ch
    }

    /// Weights of every layer (the parameters that remain after pruning, without the per-channel
    /// scales and biases).
    pub fn weight_count(&self) -> usize {
        self.layers().map(|l| l.weights.len()).sum()
    }

    /// The file's bytes: packed weights, per-channel steps (f32) and biases (i64), and the layout.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<u8>, Dtype, usize)> = Vec::new();
        for l in self.layers() {
            let name = &l.shape.name;
            let packed = pack(&l.weights, l.shape.weight_bits);
            let n = packed.len();
            tensors.push((format!("{name}.weight"), packed, Dtype::U8, n));
            let steps: Vec<u8> = l.weight_step.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{name}.weight_step"), steps, Dtype::F32, l.weight_step.len()));
            let bias: Vec<u8> = l.bias.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{name}.bias"), bias, Dtype::I64, l.bias.len()));
        }
        let layout = Layout {
            format: FORMAT,
            arch: self.arch.clone(),
            classes: self.classes(),
            layers: self.layers().map(|l| l.shape.clone()).collect(),
        };
        let views = tensors
            .iter()
            .map(|(name, data, dtype, n)| Ok((name.clone(), TensorView::new(*dtype, vec![*n], data)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta = HashMap::from([(LAYOUT_KEY.to_string(), serde_json::to_string(&layout)?)]);
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    /// Reads a file written by [`IntModel::to_bytes`]; `what` names it in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let not_ours = || format!("{what} is not a qat-lab integer model (write one with `qat-lab export runs/<id>`)");
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{e}")).with_context(not_ours)?;
        let layout = meta.metadata().as_ref().and_then(|m| m.get(LAYOUT_KEY)).with_context(not_ours)?;
        let layout: Layout = serde_json::from_str(layout).with_context(not_ours)?;
        if layout.format != FORMAT {
            bail!(
                "{what} is integer model format {}, this qat-lab reads format {FORMAT}: export the run again",
                layout.format
            );
        }
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{what}: {e}"))?;
        let tensor = |name: &str, dtype: Dtype| -> Result<&[u8]> {
            let t = file
                .tensor(name)
                .map_err(|_| anyhow!("{what} has no tensor `{name}`: the file is damaged, export the run again"))?;
            if t.dtype() != dtype {
                bail!("{what}: `{name}` is {:?}, expected {dtype:?}", t.dtype());
            }
            Ok(t.data())
        };
        let mut layers = Vec::new();
        for shape in layout.layers {
            let name = &shape.name;
            let n = shape.out_ch * shape.in_ch * shape.kernel * shape.kernel;
            let bytes = tensor(&format!("{name}.weight"), Dtype::U8)?;
            let weights = unpack(bytes, shape.weight_bits, n).with_context(|| {
                format!(
                    "{what}: `{name}.weight` holds {} bytes, but {n} weights of {} bits pack into {}",
                    bytes.len(),
                    shape.weight_bits,
                    packed_len(n, shape.weight_bits)
                )
            })?;
            let words = |name: &str, dtype, width: usize| -> Result<Vec<&[u8]>> {
                let data = tensor(name, dtype)?;
                if data.len() != width * shape.out_ch {
                    bail!("{what}: `{name}` holds {} values, expected {}", data.len() / width, shape.out_ch);
                }
                Ok(data.chunks_exact(width).collect())
            };
            let weight_step = words(&format!("{name}.weight_step"), Dtype::F32, 4)?
                .into_iter()
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            let bias = words(&format!("{name}.bias"), Dtype::I64, 8)?
                .into_iter()
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            layers.push(IntLayer { shape, weights, weight_step, bias });
        }
        if layers.len() < 2 || (layers.len() - 2) % 2 != 0 {
            bail!("{what} holds {} layers; a ResNet has a stem, two layers per block and a classifier", layers.len());
        }
        let classifier = layers.pop().expect("checked");
        let mut rest = layers.into_iter();
        let stem = rest.next().expect("checked");
        let mut blocks = Vec::new();
        while let (Some(a), Some(b)) = (rest.next(), rest.next()) {
            blocks.push([a, b]);
        }
        let model = Self { arch: layout.arch, stem, blocks, classifier };
        model.check_chain().with_context(|| format!("{what} is not a consistent network"))?;
        Ok(model)
    }

    /// Every layer reads what the one before it writes.
    fn check_chain(&self) -> Result<()> {
        let mut channels = self.stem.shape.out_ch;
        for [first, second] in &self.blocks {
            if first.shape.in_ch != channels
                || second.shape.in_ch != first.shape.out_ch
                || second.shape.out_ch < channels
            {
                bail!("block `{}` does not fit the layer before it", first.shape.name);
            }
            channels = second.shape.out_ch;
        }
        if self.classifier.shape.in_ch != channels {
            bail!("the classifier reads {} features, the last block writes {channels}", self.classifier.shape.in_ch);
        }
        Ok(())
    }

    /// Writes the model atomically to `path`; returns its size in bytes.
    pub fn write(&self, path: &Path) -> Result<usize> {
        let bytes = self.to_bytes()?;
        crate::runs::write_atomic(path, &bytes)?;
        Ok(bytes.len())
    }

    /// Reads a model written by [`IntModel::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }
}

/// The quantizer of a layer, refusing float layers and untrained scales.
fn quantizer<'a>(quant: &'a Option<LayerQuant>, name: &str) -> Result<(&'a LayerQuant, InputGrid)> {
    let q = quant.as_ref().with_context(|| format!("layer `{name}` is float: only quantization-aware runs have an integer model (export --format onnx gives a float run's graph)"))?;
    if q.weight_bits >= 32 || q.input.bits >= 32 {
        bail!("layer `{name}` keeps float weights or inputs (32 bits): set regularizer.first_last_bits to 8 or less for an integer model");
    }
    if q.weight_bits > 8 || q.input.bits > 8 {
        bail!("layer `{name}` uses more than 8 bits, which the integer model does not hold");
    }
    let scale = q.input.ema.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    match scale.as_slice() {
        [s] if s.is_finite() && *s > 0.0 => Ok((q, InputGrid { scale: *s, levels: q.input.levels() as i32 })),
        [_] => bail!("layer `{name}`'s input scale was never trained (the run ended before its first batch)"),
        _ => bail!("layer `{name}` has one input scale per head, which the integer model does not hold"),
    }
}

/// Per output channel of (out, rest) weights: their indices on the channel's grid λ = max|W_c| and
/// the grid's step, as the float model's per-channel fake-quantization computes them.
fn quantize_per_channel(w: &[f32], out: usize, bits: u32) -> (Vec<i8>, Vec<f32>) {
    let levels = crate::methods::quantization::levels(bits) as f32;
    let per = w.len() / out;
    let mut q = Vec::with_capacity(w.len());
    let mut steps = Vec::with_capacity(out);
    for row in w.chunks_exact(per) {
        let grid = Grid::new(crate::ops::cpu::quant::max_abs_slice(row), levels);
        q.extend(row.iter().map(|&v| grid.index(v) as i8));
        steps.push(grid.step());
    }
    (q, steps)
}

/// A convolution with its batch norm in integers. `kept_inputs`: the input channels that survive
/// pruning of the layer before (the weights' scales still come from every input channel, as in
/// training).
fn conv_layer(layer: &ConvBn, kept_inputs: Option<&[bool]>) -> Result<IntLayer> {
    let (q, input) = quantizer(&layer.quant, &layer.name)?;
    let (scale, shift) = layer.eval_affine()?;
    let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
    let out = layer.out_ch;
    let w = layer.weight.as_tensor();
    let (weights, weight_step) = match layer.bn_mode {
        BnMode::Fold => {
            // As the float model's eval: W·(γ/σ), then quantized per channel.
            let folded =
                w.broadcast_mul(&candle_core::Tensor::new(scale.as_slice(), w.device())?.reshape((out, 1, 1, 1))?)?;
            quantize_per_channel(&folded.flatten_all()?.to_vec1::<f32>()?, out, q.weight_bits)
        }
        BnMode::Keep => {
            let (weights, steps) = quantize_per_channel(&w.flatten_all()?.to_vec1::<f32>()?, out, q.weight_bits);
            (weights, steps.iter().zip(&scale).map(|(s, a)| s * a).collect())
        }
    };
    let shape = LayerShape {
        name: layer.name.clone(),
        in_ch: layer.in_ch,
        out_ch: out,
        kernel: layer.kernel,
        stride: layer.stride,
        padding: layer.padding,
        weight_bits: q.weight_bits,
        input,
        bias_bits: 0,
    };
    let layer = with_bias(shape, weights, weight_step, &shift);
    Ok(match kept_inputs {
        Some(keep) => keep_inputs(layer, keep),
        None => layer,
    })
}

fn linear_layer(fc: &Linear) -> Result<IntLayer> {
    let (q, input) = quantizer(&fc.quant, "fc")?;
    let (weights, weight_step) =
        quantize_per_channel(&fc.weight.as_tensor().flatten_all()?.to_vec1::<f32>()?, fc.out_features, q.weight_bits);
    let shape = LayerShape {
        name: "fc".into(),
        in_ch: fc.in_features,
        out_ch: fc.out_features,
        kernel: 1,
        stride: 1,
        padding: 0,
        weight_bits: q.weight_bits,
        input,
        bias_bits: 0,
    };
    Ok(with_bias(shape, weights, weight_step, &fc.bias.as_tensor().to_vec1::<f32>()?))
}

/// Most fraction bits a bias keeps: enough that its rounding (2^−33 accumulator units) stays far
/// below the float model's own rounding error.
const MAX_BIAS_BITS: u32 = 32;

/// The layer with its real biases in accumulator units / 2^bias_bits, with as many fraction bits
/// (up to 32) as the i64 range allows.
fn with_bias(shape: LayerShape, weights: Vec<i8>, weight_step: Vec<f32>, bias: &[f32]) -> IntLayer {
    let mut layer = IntLayer { shape, weights, weight_step, bias: Vec::new() };
    let units: Vec<f64> = bias.iter().enumerate().map(|(c, &b)| b as f64 / layer.acc_step(c)).collect();
    let largest = units.iter().fold(0f64, |m, u| m.max(u.abs()));
    let bits = (0..=MAX_BIAS_BITS).rev().find(|&b| largest * 2f64.powi(b as i32) < 2f64.powi(62)).unwrap_or(0);
    layer.shape.bias_bits = bits;
    layer.bias = units.iter().map(|u| (u * 2f64.powi(bits as i32)).round() as i64).collect();
    layer
}

/// Only the output channels where `keep` is true.
fn keep_outputs(mut layer: IntLayer, keep: &[bool]) -> IntLayer {
    let per = layer.weights.len() / layer.shape.out_ch;
    layer.weights = layer
        .weights
        .chunks_exact(per)
        .zip(keep)
        .filter(|(_, k)| **k)
        .flat_map(|(row, _)| row.iter().copied())
        .collect();
    layer.weight_step = kept(&layer.weight_step, keep);
    layer.bias = kept(&layer.bias, keep);
    layer.shape.out_ch = layer.weight_step.len();
    layer
}

/// The values where `keep` is true.
fn kept<T: Copy>(values: &[T], keep: &[bool]) -> Vec<T> {
    keep.iter().zip(values).filter(|(k, _)| **k).map(|(_, v)| *v).collect()
}

/// Only the input channels where `keep` is true.
fn keep_inputs(mut layer: IntLayer, keep: &[bool]) -> IntLayer {
    let k2 = layer.shape.kernel * layer.shape.kernel;
    layer.weights = layer
        .weights
        .chunks_exact(k2)
        .enumerate()
        .filter(|(i, _)| keep[i % layer.shape.in_ch])
        .flat_map(|(_, taps)| taps.iter().copied())
        .collect();
    layer.shape.in_ch = keep.iter().filter(|k| **k).count();
    layer
}
