//! The quantized network evaluated in f64: what the fake-quant network computes, without the f32
//! rounding of the lab's own evaluation (whose Winograd and float sums put a few activations on the
//! other side of a rounding point). `eval --int` reports it beside both, so that a disagreement
//! between the integer model and the fake-quant one can be traced to whichever departs from it.
//!
//! It is written independently of [`super::infer`]: real-valued tensors and candle's f64
//! convolution, no fixed point.

use super::int_model::{InputGrid, IntLayer, IntModel};
use candle_core::{DType, Device, Result, Tensor, D};

/// The grid point of every value of `t` on `grid`: round(v / step), clamped to ±L (to [lo, L]),
/// halves away from zero, times the step.
fn quantize(t: &Tensor, grid: InputGrid, lo: f64) -> Result<Tensor> {
    let step = grid.step();
    let levels = grid.levels as f64;
    (t / step)?.round()?.clamp(lo, levels)? * step
}

/// The layer's real weights (out, in, k, k) and biases (out).
fn real(layer: &IntLayer, device: &Device) -> Result<(Tensor, Tensor)> {
    let s = &layer.shape;
    let per = s.in_ch * s.kernel * s.kernel;
    let w: Vec<f64> =
        layer.weights.iter().enumerate().map(|(i, &q)| q as f64 * layer.weight_step[i / per] as f64).collect();
    let fraction = 2f64.powi(s.bias_bits as i32);
    let b: Vec<f64> = layer.bias.iter().enumerate().map(|(c, &q)| q as f64 / fraction * layer.acc_step(c)).collect();
    Ok((Tensor::from_vec(w, (s.out_ch, s.in_ch, s.kernel, s.kernel), device)?, Tensor::from_vec(b, s.out_ch, device)?))
}

fn conv(x: &Tensor, layer: &IntLayer) -> Result<Tensor> {
    let (w, b) = real(layer, x.device())?;
    x.conv2d(&w, layer.shape.padding, layer.shape.stride, 1, 1)?.broadcast_add(&b.reshape((
        1,
        layer.shape.out_ch,
        1,
        1,
    ))?)
}

/// Option A: every `stride`-th pixel, and zero channels up to `out_ch`.
fn shortcut(x: &Tensor, stride: usize, out_ch: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let x = if stride == 1 {
        x.clone()
    } else {
        let rows = Tensor::arange_step(0u32, h as u32, stride as u32, x.device())?;
        let cols = Tensor::arange_step(0u32, w as u32, stride as u32, x.device())?;
        x.index_select(&rows, 2)?.index_select(&cols, 3)?
    };
    if out_ch == c {
        return Ok(x);
    }
    let zeros = Tensor::zeros((n, out_ch - c, x.dim(2)?, x.dim(3)?), DType::F64, x.device())?;
    Tensor::cat(&[&x, &zeros], 1)
}

/// Logits (n, classes) of `n` NCHW images of `(c, h, w)`, in f64.
pub fn logits(model: &IntModel, images: &[f32], n: usize, (c, h, w): (usize, usize, usize)) -> Result<Vec<f64>> {
    let device = Device::Cpu;
    // The images enter on the stem's grid as the float model puts them there (the one f32 step).
    let grid = model.stem.shape.input.grid();
    let x: Vec<f64> = images.iter().map(|&v| grid.index(v) as f64 * grid.step() as f64).collect();
    let x = Tensor::from_vec(x, (n, c, h, w), &device)?;
    let mut stream = conv(&x, &model.stem)?.relu()?;
    for [first, second] in &model.blocks {
        let input = quantize(&stream, first.shape.input, -(first.shape.input.levels as f64))?;
        let mid = quantize(&conv(&input, first)?, second.shape.input, 0.0)?;
        let join = (conv(&mid, second)? + shortcut(&stream, first.shape.stride, second.shape.out_ch)?)?;
        stream = join.relu()?;
    }
    let classifier = &model.classifier;
    let pooled = stream.mean(D::Minus1)?.mean(D::Minus1)?;
    let pooled = quantize(&pooled, classifier.shape.input, -(classifier.shape.input.levels as f64))?;
    let (w, b) = real(classifier, &device)?;
    let w = w.reshape((classifier.shape.out_ch, classifier.shape.in_ch))?;
    pooled.matmul(&w.t()?)?.broadcast_add(&b)?.flatten_all()?.to_vec1::<f64>()
}
