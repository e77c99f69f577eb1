//! The hot tensor operations, in one place: models call layers, layers call these. A faster kernel for
//! one op (a custom CPU convolution, a CUDA path) replaces it here without touching any model.
//!
//! Every op here is differentiable through candle's autograd. Each chooses among three paths: the
//! CPU kernels ([`cpu`]: f32 on the CPU), the GPU's (`gpu`, in a `--features cuda` build: cuBLAS and
//! our CUDA kernels, an op per layer step), or a composite of candle ops for anything else. Both
//! kernel sets share [`Geometry`].

pub mod cpu;
mod geometry;
#[cfg(feature = "cuda")]
pub mod gpu;

pub use cpu::quant::Grid;
pub use geometry::Geometry;

use candle_core::{DType, Result, Tensor, D};
use cpu::{block, bn, conv, conv_bn, fold_bn, quant};

/// True when `x` is an f32 tensor on a CUDA device and this build has the GPU kernels (`gpu`).
fn on_gpu(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return gpu::on_gpu(x);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// Runs a GPU op, which exists only in a `cuda` build ([`on_gpu`] is false in any other, so the
/// error arm is never taken).
macro_rules! gpu {
    ($op:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(feature = "cuda")]
        {
            gpu::$op($($arg),*)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ($($arg),*);
            Err(candle_core::Error::Msg("the GPU ops need a build with --features cuda".into()))
        }
    }};
}

/// Whether an input quantizer, if any, has one scale (the fused GPU convolutions need one).
fn one_scale(input: Option<(&Tensor, f64)>) -> bool {
    input.is_none_or(|(scale, _)| scale.elem_count() == 1)
}

/// 2-D convolution of NCHW `x` with OIHW `w` (square kernel, same stride and padding on both axes).
/// On the CPU our own kernels ([`conv`]); on an NVIDIA GPU in a `cuda` build our CUDA ops (`gpu`);
/// elsewhere (other devices or dtypes) an unfold + one large matmul ([`conv2d_unfold`]), since
/// candle's own convolution backward is a naive kernel on GPUs.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        conv::conv2d_cpu(x, w, stride, padding, None)
    } else if on_gpu(x) {
        gpu!(conv2d(x, w, stride, padding, None::<(&Tensor, f64)>))
    } else {
        conv2d_unfold(x, w, stride, padding)
    }
}

/// [`conv2d`] of `x`, fake-quantized first when `input` = Some((scale, levels)), i.e.
/// `conv2d(fake_quant(x, scale, levels), w)` with the same straight-through gradient. On the CPU (one
/// scale) the quantization happens inside the convolution's own copy of its input, so it costs no pass
/// of its own.
pub fn conv2d_quantized(
    x: &Tensor,
    w: &Tensor,
    (stride, padding): (usize, usize),
    input: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    if let Some(grid) = cpu_grid(x, input)? {
        return conv::conv2d_cpu(x, w, stride, padding, grid);
    }
    if on_gpu(x) && one_scale(input) {
        return gpu!(conv2d(x, w, stride, padding, input));
    }
    match input {
        Some((scale, levels)) => conv2d(&fake_quant(x, scale, levels)?, w, stride, padding),
        None => conv2d(x, w, stride, padding),
    }
}

/// Convolution from differentiable tensor ops only, for any device: the k·k shifted (and strided)
/// views of the padded input are stacked into an im2col matrix (K = C·k·k rows, one column per output
/// pixel of the batch) and multiplied by the weights in a single GEMM. Autograd derives the backward:
/// two more GEMMs and the views' scatter.
pub fn conv2d_unfold(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w.dims4()?;
    let oh = (h + 2 * padding - k) / stride + 1;
    let ow = (wd + 2 * padding - k) / stride + 1;
    let xp = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?.pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    // Rows/columns ky, ky+s, ..., as a view: narrow to s·out and keep every s-th by a reshape.
    let take = |t: &Tensor, dim: usize, start: usize, out: usize| -> Result<Tensor> {
        if stride == 1 {
            return t.narrow(dim, start, out);
        }
        let len = t.dim(dim)?;
        let span = (stride * out).min(len - start);
        let t = t.narrow(dim, start, span)?;
        let t = if span < stride * out { t.pad_with_zeros(dim, 0, stride * out - span)? } else { t };
        let mut shape = t.dims().to_vec();
        shape[dim] = out;
        shape.insert(dim + 1, stride);
        t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
    };
    let mut views = Vec::with_capacity(k * k);
    for ky in 0..k {
        let rows = take(&xp, 2, ky, oh)?;
        for kx in 0..k {
            views.push(take(&rows, 3, kx, ow)?);
        }
    }
    // (N, C, k·k, OH, OW) -> (C·k·k, N·OH·OW)
    let cols = Tensor::stack(&views, 2)?.reshape((n, c * k * k, oh * ow))?.transpose(0, 1)?.contiguous()?;
    let cols = cols.reshape((c * k * k, n * oh * ow))?;
    let y = w.reshape((o, c * k * k))?.matmul(&cols)?; // (O, N·P)
    y.reshape((o, n, oh, ow))?.transpose(0, 1)?.contiguous()
}

/// A moving average in place: `run ← run·keep + value·take`, or `run ← value` where `restart` and
/// the average has not started yet (is not > 0). One kernel on a GPU; element-wise ops elsewhere.
pub fn ema_update(run: &candle_core::Var, value: &Tensor, keep: f64, take: f64, restart: bool) -> Result<()> {
    let value = value.detach();
    if on_gpu(run) && on_gpu(&value) {
        return gpu!(ema_in_place(run.as_tensor(), &value, keep, take, restart));
    }
    let blended = ((run.as_tensor() * keep)? + (&value * take)?)?;
    let updated = if restart { run.as_tensor().gt(0f64)?.where_cond(&blended, &value)? } else { blended };
    run.set(&updated)
}

/// Eval batch norm as a per-channel affine: (γ/√(var + ε), β − mean·γ/√(var + ε)) from the running
/// statistics. One kernel on a GPU.
pub fn bn_eval_affine(
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if on_gpu(gamma) {
        return gpu!(bn_eval_affine(gamma, beta, mean, var, eps));
    }
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let shift = (beta - (mean * &scale)?)?;
    Ok((scale, shift))
}

/// The most GPU memory the process has held at once on CUDA device `ordinal`, in bytes (None in a
/// build without CUDA, or where the driver does not say).
pub fn gpu_peak_memory(ordinal: usize) -> Option<u64> {
    #[cfg(feature = "cuda")]
    return gpu::peak_memory(ordinal);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        None
    }
}

/// The CUDA device `ordinal` (the GPU ops' settings; an error in a build without CUDA).
pub fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    gpu!(device(ordinal))
}

/// `x @ w^T + b` for a batch of row vectors.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Per-channel mean and biased variance of NCHW `x` over batch and space, each shaped (C);
/// differentiable (the folded-BN path trains through them).
pub fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return bn::moments_cpu(x);
    }
    if on_gpu(x) {
        return gpu!(channel_stats(x));
    }
    let c = x.dim(1)?;
    // (N, C, H*W) -> mean over N and H*W.
    let flat = x.transpose(0, 1)?.flatten_from(1)?; // (C, N*H*W)
    let mean = flat.mean(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean.reshape((c, 1))?)?;
    let var = centred.sqr()?.mean(D::Minus1)?;
    Ok((mean, var))
}

/// Training-mode batch norm of NCHW `x` with batch statistics, optionally fused with a ReLU; returns
/// the output and the (detached) batch mean and biased variance for the running averages.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return bn::batch_norm_train_cpu(x, gamma, beta, eps, relu);
    }
    if on_gpu(x) {
        return gpu!(batch_norm_train(x, gamma, beta, eps, relu));
    }
    let (mean, var) = channel_stats(x)?;
    let scale = (gamma / (&var + eps)?.sqrt()?)?;
    let shift = (beta - (&mean * &scale)?)?;
    let y = channel_affine(x, &scale, &shift, relu)?;
    Ok((y, mean.detach(), var.detach()))
}

/// For ops with a CPU kernel that quantizes the input itself: `Some(grid)` (the grid, or None when the
/// input is not quantized) when `x` is f32 on the CPU and the input scale is per tensor; None when the
/// composite must run instead.
fn cpu_grid(x: &Tensor, input: Option<(&Tensor, f64)>) -> Result<Option<Option<quant::Grid>>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    Ok(match input {
        None => Some(None),
        Some((scale, levels)) if scale.elem_count() == 1 => {
            Some(Some(quant::Grid::new(scale.flatten_all()?.to_vec1::<f32>()?[0], levels as f32)))
        }
        Some(_) => None,
    })
}

/// [`cpu_grid`], for ops that also take a residual: None where the residual cannot join on the CPU.
fn fused_grid(
    x: &Tensor,
    input: Option<(&Tensor, f64)>,
    residual: Option<&Tensor>,
) -> Result<Option<Option<quant::Grid>>> {
    if residual.is_some_and(|r| r.dtype() != DType::F32 || !r.device().is_cpu()) {
        return Ok(None);
    }
    cpu_grid(x, input)
}

/// Convolution, then training-mode batch norm, then a ReLU when `relu`, or `relu(· + residual)` when
/// there is a residual (a residual block's join); the input fake-quantized first when `input` =
/// Some((scale, levels)). Returns the output and the batch mean and biased variance. One fused op on the
/// CPU ([`conv_bn`]: the convolution's output never becomes an autograd node, nor does the batch norm's
/// before the join), the composite of [`conv2d_quantized`], [`batch_norm_train`] and [`add_relu`]
/// elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (stride, padding): (usize, usize),
    input: Option<(&Tensor, f64)>,
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(grid) = fused_grid(x, input, residual)? {
        return conv_bn::conv_bn_train_cpu(x, w, (gamma, beta), (stride, padding), grid, eps, relu, residual);
    }
    let y = conv2d_quantized(x, w, (stride, padding), input)?;
    let (y, mean, var) = batch_norm_train(&y, gamma, beta, eps, relu && residual.is_none())?;
    match residual {
        Some(r) => Ok((add_relu(&y, r)?, mean, var)),
        None => Ok((y, mean, var)),
    }
}

/// A chain of residual blocks in training as one op on the CPU ([`block`]): each two 3x3 convolution +
/// batch-norm layers (the first with ReLU and the block's stride), the option-A shortcut and the join;
/// the chain's input fake-quantized when `input` = Some((scale, levels)), each later block's on its
/// `levels1` steps scaled by the batch's max|input|, and each block's second layer's on its `levels2`
/// steps scaled by the batch's max|input|. With `fold`, batch norm is folded into weights that the op
/// quantizes (as [`fold_conv_bn_train`]). Returns the output and each block's batch statistics (of
/// the float convolutions when folded) and input scales. f32 on the CPU only (callers fall back to
/// the layer ops elsewhere).
pub fn blocks_train(
    x: &Tensor,
    blocks: &[block::BlockParams],
    input: Option<(&Tensor, f64)>,
    eps: f64,
) -> Result<(Tensor, Vec<block::BlockStats>)> {
    let Some(grid) = cpu_grid(x, input)? else {
        candle_core::bail!("the fused residual blocks run on f32 CPU tensors only")
    };
    block::blocks_train_cpu(x, blocks, grid, eps)
}

/// The training step of a quantized layer with batch norm folded into its weights (Jacob et al. 2018):
/// `relu?(conv(x, q(w))·s + β − μ·s)`, or `relu(· + residual)` when there is a residual, with (μ, σ²)
/// the batch statistics of the float `conv(x, w)` and s = γ/√(σ² + eps); q quantizes per output
/// channel on `weight_levels` steps per side (None: float weights; λ = max|w_o|, straight-through), and
/// the input is fake-quantized first when `input` = Some((scale, levels)). Returns the output and the
/// float convolution's batch mean and biased variance. One fused op on the CPU ([`fold_bn`]: both
/// convolutions as one over the stacked weights [w; q(w)]), the separate ops elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn fold_conv_bn_train(
    x: &Tensor,
    (w, weight_levels): (&Tensor, Option<f64>),
    (gamma, beta): (&Tensor, &Tensor),
    (stride, padding): (usize, usize),
    input: Option<(&Tensor, f64)>,
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(grid) = fused_grid(x, input, residual)? {
        let geometry = (stride, padding);
        return fold_bn::fold_conv_bn_train_cpu(
            x,
            (w, weight_levels.map(|l| l as f32)),
            (gamma, beta),
            geometry,
            grid,
            eps,
            relu,
            residual,
        );
    }
    let y_float = conv2d_quantized(x, w, (stride, padding), input)?;
    let w_quantized = match weight_levels {
        Some(levels) => fake_quant_weight(w, levels)?,
        None => w.clone(),
    };
    let y_quant = conv2d_quantized(x, &w_quantized, (stride, padding), input)?;
    let (mean, var) = channel_stats(&y_float)?;
    let scale = (gamma / (&var + eps)?.sqrt()?)?;
    let shift = (beta - (&mean * &scale)?)?;
    let y = channel_affine(&y_quant, &scale, &shift, relu && residual.is_none())?;
    let y = match residual {
        Some(r) => add_relu(&y, r)?,
        None => y,
    };
    Ok((y, mean.detach(), var.detach()))
}

/// Eval-mode convolution then `x·scale[o] + shift[o]` (batch norm with running statistics, or folded
/// BN's shift), then a ReLU when `relu`, or `relu(· + residual)` when there is a residual (a residual
/// block's join); the input fake-quantized first when `input` = Some((scale, levels)). No gradient: on
/// the CPU the affine, the join and the ReLU are applied while the convolution writes its output
/// ([`conv::conv2d_eval_cpu`]), a pass or two over memory fewer per layer.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_eval(
    x: &Tensor,
    w: &Tensor,
    (stride, padding): (usize, usize),
    input: Option<(&Tensor, f64)>,
    (scale, shift): (&Tensor, &Tensor),
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(grid) = fused_grid(x, input, residual)? {
        let epilogue = conv::Epilogue { scale: scale.to_vec1::<f32>()?, shift: shift.to_vec1::<f32>()?, relu };
        return conv::conv2d_eval_cpu(&x.detach(), &w.detach(), (stride, padding), grid, epilogue, residual);
    }
    if on_gpu(x) && one_scale(input) {
        return gpu!(conv2d_eval(x, w, (stride, padding), input, (scale, shift), relu, residual));
    }
    let y = conv2d_quantized(&x.detach(), &w.detach(), (stride, padding), input)?;
    let y = channel_affine(&y.detach(), &scale.detach(), &shift.detach(), relu && residual.is_none())?;
    match residual {
        Some(r) => add_relu(&y, &r.detach()),
        None => Ok(y),
    }
}

/// Every `stride`-th pixel of NCHW `x`, with zero channels appended up to `out_ch` (≥ C): the option-A
/// shortcut of a downsampling residual block. One op each way on the CPU ([`bn::subsample_cpu`]).
pub fn subsample(x: &Tensor, stride: usize, out_ch: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if out_ch < c {
        candle_core::bail!("shortcut: {out_ch} output channels cannot hold the input's {c}");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return bn::subsample_cpu(x, stride, out_ch);
    }
    if on_gpu(x) {
        return gpu!(subsample(x, stride, out_ch));
    }
    let rows = Tensor::arange_step(0u32, h as u32, stride as u32, x.device())?;
    let cols = Tensor::arange_step(0u32, w as u32, stride as u32, x.device())?;
    let y = x.index_select(&rows, 2)?.index_select(&cols, 3)?;
    if out_ch == c {
        return Ok(y);
    }
    let zeros = Tensor::zeros((n, out_ch - c, h.div_ceil(stride), w.div_ceil(stride)), y.dtype(), y.device())?;
    Tensor::cat(&[&y, &zeros], 1)
}

/// `relu(a + b)`: the residual join of a ResNet block. NaN propagates (a diverging run must show it).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && a.dims() == b.dims() {
        return bn::add_relu_cpu(a, b);
    }
    if on_gpu(a) && on_gpu(b) && a.dims() == b.dims() {
        return gpu!(add_relu(a, b));
    }
    (a + b)?.relu()
}

/// `x * scale[c] + shift[c]` on NCHW `x`, followed by a ReLU when `relu`; `scale`, `shift` shaped (C).
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return bn::channel_affine_cpu(x, scale, shift, relu);
    }
    if on_gpu(x) {
        return gpu!(channel_affine(x, scale, shift, relu, None::<&Tensor>));
    }
    let c = x.dim(1)?;
    let y = x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// max|x| over everything (`groups` = 1, shape (1)) or over each index of the leading dimension
/// (shape (`groups`)): the scale of a fake-quantizer, in one pass and no copy on the CPU.
pub fn max_abs(x: &Tensor, groups: usize) -> Result<Tensor> {
    let x = x.detach();
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return quant::max_abs_cpu(&x, groups);
    }
    if on_gpu(&x) {
        return gpu!(max_abs(&x, groups));
    }
    let abs = x.abs()?;
    if groups == 1 {
        abs.max_all()?.reshape(1)
    } else {
        abs.reshape((groups, ()))?.max(1)
    }
}

/// Rounds `x` onto the symmetric grid of `levels` = 2^(b-1)-1 steps per side of `scale` (λ):
/// `round(clamp(x, -λ, λ) · levels/λ) · λ/levels`. `scale` broadcasts against `x`.
/// The value only: its gradient is zero almost everywhere (see [`fake_quant`]).
pub fn quantize(x: &Tensor, scale: &Tensor, levels: f64) -> Result<Tensor> {
    let scale = scale.clamp(1e-8f32, f32::MAX)?;
    let neg = scale.neg()?;
    let clamped = x.broadcast_maximum(&neg)?.broadcast_minimum(&scale)?;
    let step = (scale / levels)?;
    clamped.broadcast_div(&step)?.round()?.broadcast_mul(&step)
}

/// Quantization with the straight-through estimator: the forward value is [`quantize`]'s, the gradient
/// with respect to `x` is the incoming gradient unchanged (`x + (q(x) - x).detach()`).
pub fn fake_quant(x: &Tensor, scale: &Tensor, levels: f64) -> Result<Tensor> {
    let per_tensor_or_leading = scale.elem_count() == 1 || scale.elem_count() == x.dim(0)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && per_tensor_or_leading {
        return quant::fake_quant_cpu(x, scale, levels);
    }
    if on_gpu(x) && per_tensor_or_leading {
        return gpu!(fake_quant(x, scale, levels));
    }
    let q = quantize(x, scale, levels)?;
    x + (q - x)?.detach()
}

/// Per-output-channel scales max|W_o| of a weight tensor (O, ...), shaped (O, 1, ..., 1) to broadcast.
pub fn weight_scales(w: &Tensor) -> Result<Tensor> {
    let o = w.dim(0)?;
    let mut shape = vec![o];
    shape.extend(std::iter::repeat_n(1, w.rank() - 1));
    max_abs(w, o)?.reshape(shape)
}

/// `w` fake-quantized per output channel on `levels` steps per side of λ_o = max|W_o| (the scales
/// taken as constants), with a straight-through gradient.
pub fn fake_quant_weight(w: &Tensor, levels: f64) -> Result<Tensor> {
    fake_quant(w, &weight_scales(&w.detach())?, levels)
}

/// Mean cross-entropy between logits (N, C) and soft targets (N, C).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (targets * log_p)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// Numerically stable mean binary cross-entropy on logits: max(z,0) - z·y + log(1 + e^-|z|),
/// weighted by `mask` (1 = label known, 0 = unknown), averaged over known labels.
pub fn masked_bce_with_logits(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let relu = logits.relu()?;
    let log1p = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let per = ((relu - (logits * targets)?)? + log1p)?;
    let known = mask.sum_all()?.to_dtype(DType::F32)?.clamp(1f32, f32::MAX)?;
    (per * mask)?.sum_all()?.div(&known)
}

/// Inputs and comparisons shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// A deterministic tensor with values in [-1, 1).
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> =
            (0..n).map(|i| (((i as u64 * 2654435761 + seed * 40503) % 1000) as f32 / 500.0) - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// For each of `vars`, the largest difference between its gradients through `ours` and through
    /// `reference` (two computations of one value), both backpropagated from the same random
    /// upstream gradient.
    pub fn gradient_gaps(ours: &Tensor, reference: &Tensor, vars: &[&candle_core::Var], seed: u64) -> Vec<f32> {
        let up = rand(ours.dims(), seed);
        let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|v| max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap())).collect()
    }

    /// The variables of a 3x3 conv + batch-norm layer test: x (n, c, h, w), the weight (o, c, 3, 3),
    /// γ (around 1.5), β, and a shortcut shaped like the output of stride `stride` with padding 1.
    pub fn conv_bn_vars((n, c, h, w, o, stride): (usize, usize, usize, usize, usize, usize)) -> [candle_core::Var; 5] {
        let var = |t: Tensor| candle_core::Var::from_tensor(&t).unwrap();
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        [
            var(rand(&[n, c, h, w], 1)),
            var(rand(&[o, c, 3, 3], 2)),
            var((rand(&[o], 3) + 1.5).unwrap()),
            var(rand(&[o], 4)),
            var(rand(&[n, o, oh, ow], 6)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn unfold_conv_matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        for (n, c, h, w, o, k, stride, pad) in
            [(2, 3, 8, 8, 4, 3, 1, 1), (2, 3, 9, 7, 5, 3, 2, 1), (1, 2, 5, 5, 3, 1, 1, 0)]
        {
            let xd: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let wd: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 53 % 89) as f32 / 44.0) - 1.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(xd, (n, c, h, w), &dev).unwrap()).unwrap();
            let wt = Var::from_tensor(&Tensor::from_vec(wd, (o, c, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d_unfold(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let refr = x.as_tensor().conv2d(wt.as_tensor(), pad, stride, 1, 1).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert_eq!(ours.dims(), refr.dims());
            assert!(diff(&ours, &refr) < 1e-4);
            let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = refr.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                assert!(diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-2);
            }
        }
    }

    #[test]
    fn channel_stats_match_a_direct_computation() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..2 * 3 * 2 * 2).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data.clone(), (2, 3, 2, 2), &dev).unwrap();
        let (m, v) = channel_stats(&x).unwrap();
        let m = m.to_vec1::<f32>().unwrap();
        let v = v.to_vec1::<f32>().unwrap();
        for c in 0..3 {
            let vals: Vec<f32> =
                (0..2).flat_map(|n| (0..4).map(move |p| (n, p))).map(|(n, p)| data[n * 12 + c * 4 + p]).collect();
            let mean = vals.iter().sum::<f32>() / 8.0;
            let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 8.0;
            assert!((m[c] - mean).abs() < 1e-5 && (v[c] - var).abs() < 1e-5);
        }
    }

    #[test]
    fn bce_is_stable_for_large_logits() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[100f32, -100.0, 0.0]], &dev).unwrap();
        let y = Tensor::new(&[[1f32, 0.0, 1.0]], &dev).unwrap();
        let m = Tensor::new(&[[1f32, 1.0, 1.0]], &dev).unwrap();
        let l = masked_bce_with_logits(&z, &y, &m).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - (2f32.ln() / 3.0)).abs() < 1e-5, "{l}");
        let m = Tensor::new(&[[1f32, 1.0, 0.0]], &dev).unwrap();
        let l = masked_bce_with_logits(&z, &y, &m).unwrap().to_scalar::<f32>().unwrap();
        assert!(l.abs() < 1e-6, "unknown labels are masked out: {l}");
    }

    #[test]
    fn fused_fake_quant_matches_the_composite_values() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..6 * 50).map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0).collect();
        let x = Tensor::from_vec(data, (6, 50), &dev).unwrap();
        let per_row = Tensor::new(&[0.5f32, 1.0, 1.5, 2.0, 0.1, 3.0], &dev).unwrap().reshape((6, 1)).unwrap();
        for (scale, levels) in [(per_row, 7.0), (Tensor::new(&[1.2f32], &dev).unwrap(), 127.0)] {
            let fused = quant::fake_quant_cpu(&x, &scale, levels).unwrap();
            let composite = quantize(&x, &scale, levels).unwrap();
            let d = (fused - composite).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    /// The fused input quantizer equals a separate fake-quant: values, and both gradients (the input's
    /// straight through), for the shifted kernels and the im2col ones (stride 2, 3 channels).
    #[test]
    fn conv_with_quantized_input_equals_fake_quant_then_conv() {
        let dev = Device::Cpu;
        for (n, c, h, w, o, stride) in
            [(2, 8, 7, 9, 10, 1), (2, 3, 9, 8, 4, 2), (1, 16, 6, 6, 16, 1), (2, 8, 9, 8, 12, 2)]
        {
            let xd: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 / 40.0) - 1.2).collect();
            let wd: Vec<f32> = (0..o * c * 9).map(|i| ((i * 53 % 89) as f32 / 44.0) - 1.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(xd, (n, c, h, w), &dev).unwrap()).unwrap();
            let wt = Var::from_tensor(&Tensor::from_vec(wd, (o, c, 3, 3), &dev).unwrap()).unwrap();
            let scale = Tensor::new(&[1.7f32], &dev).unwrap();
            let fused = conv2d_quantized(x.as_tensor(), wt.as_tensor(), (stride, 1), Some((&scale, 7.0))).unwrap();
            let apart = conv2d(&fake_quant(x.as_tensor(), &scale, 7.0).unwrap(), wt.as_tensor(), stride, 1).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&fused, &apart) < 1e-5);
            let up = fused.ones_like().unwrap().affine(0.5, 0.25).unwrap();
            let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (apart * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                assert!(diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-4);
            }
        }
    }

    /// The eval convolution with its fused affine (+ ReLU) equals conv2d then channel_affine, for both
    /// convolution kernels, with and without input quantization.
    #[test]
    fn eval_conv_equals_conv_then_affine() {
        use testing::{max_diff, rand};
        let dev = Device::Cpu;
        for (c, o, stride, relu, quantized, join) in [
            (8, 10, 1, true, false, false),
            (3, 4, 2, false, true, false),
            (16, 16, 1, true, true, false),
            (8, 10, 1, false, false, true),
            (3, 4, 2, false, true, true),
            (16, 8, 2, false, false, true),
        ] {
            let x = rand(&[2, c, 7, 9], 1);
            let w = rand(&[o, c, 3, 3], 2);
            let scale = rand(&[o], 3);
            let shift = rand(&[o], 4);
            let (oh, ow) = ((7 - 1) / stride + 1, (9 - 1) / stride + 1);
            let shortcut = rand(&[2, o, oh, ow], 5);
            let residual = join.then_some(&shortcut);
            let s = Tensor::new(&[0.9f32], &dev).unwrap();
            let input = quantized.then_some((&s, 7.0));
            let fused = conv2d_eval(&x, &w, (stride, 1), input, (&scale, &shift), relu, residual).unwrap();
            let y = conv2d_quantized(&x, &w, (stride, 1), input).unwrap();
            let apart = channel_affine(&y, &scale, &shift, relu).unwrap();
            let apart = match residual {
                Some(r) => add_relu(&apart, r).unwrap(),
                None => apart,
            };
            assert!(max_diff(&fused, &apart) < 1e-5, "{:?}", (c, o, stride, relu, quantized, join));
        }
    }

    /// The CPU shortcut op against candle's index_select + cat, values and gradient, on odd sizes.
    #[test]
    fn subsample_matches_candle() {
        use testing::{max_diff, rand};
        for (n, c, h, w, stride, out_ch) in
            [(2, 3, 7, 9, 2, 5), (1, 4, 8, 8, 2, 4), (2, 2, 5, 6, 3, 3), (1, 3, 4, 4, 1, 6)]
        {
            let x = Var::from_tensor(&rand(&[n, c, h, w], 1)).unwrap();
            let ours = subsample(x.as_tensor(), stride, out_ch).unwrap();
            let rows = Tensor::arange_step(0u32, h as u32, stride as u32, x.device()).unwrap();
            let cols = Tensor::arange_step(0u32, w as u32, stride as u32, x.device()).unwrap();
            let y = x.as_tensor().index_select(&rows, 2).unwrap().index_select(&cols, 3).unwrap();
            let zeros = Tensor::zeros((n, out_ch - c, y.dim(2).unwrap(), y.dim(3).unwrap()), y.dtype(), y.device());
            let reference = Tensor::cat(&[&y, &zeros.unwrap()], 1).unwrap();
            let case = (n, c, h, w, stride, out_ch);
            assert_eq!(ours.dims(), reference.dims(), "{case:?}");
            assert_eq!(max_diff(&ours, &reference), 0.0, "{case:?}");
            let up = rand(ours.dims(), 2);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            assert_eq!(max_diff(a, b), 0.0, "{case:?}");
        }
    }

    #[test]
    fn max_abs_matches_candle_per_tensor_and_per_group() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..3 * 40_000).map(|i| ((i * 7919 % 100_003) as f32 / 25_000.0) - 2.1).collect();
        let x = Tensor::from_vec(data, (3, 200, 200), &dev).unwrap();
        let all = max_abs(&x, 1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(all, vec![x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()]);
        let per = max_abs(&x, 3).unwrap().to_vec1::<f32>().unwrap();
        let want = x.abs().unwrap().flatten_from(1).unwrap().max(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(per, want);
        let nan = Tensor::new(&[1f32, f32::NAN, -3.0], &dev).unwrap();
        assert!(max_abs(&nan, 1).unwrap().to_vec1::<f32>().unwrap()[0].is_nan(), "a NaN is not hidden");
    }

    #[test]
    fn fake_quant_gradient_is_the_incoming_gradient() {
        let dev = Device::Cpu;
        let x = Var::new(&[0.33f32, -0.71, 1.5, -2.0], &dev).unwrap();
        let s = Tensor::new(&[1.0f32], &dev).unwrap();
        let y = fake_quant(x.as_tensor(), &s, 7.0).unwrap();
        let upstream = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &dev).unwrap();
        let grads = (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![1.0, 2.0, 3.0, 4.0]);
    }
}
