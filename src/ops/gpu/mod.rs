//! The hot ops on an NVIDIA GPU (`--features cuda`): our kernels (`kernels.cu`, built to PTX by
//! build.rs) and cuBLAS, as candle custom ops with their own backward.
//!
//! Why not candle's own CUDA ops: its convolution backward is a naive kernel (the issue measured 810 ms
//! for one 16-channel layer), and composing batch norm, the join or Adam from element-wise tensor ops
//! costs one launch, one allocation and one pass over memory per operation (ResNet-20 trained at 0.10x
//! PyTorch that way). Here a convolution is im2col + one strided-batched GEMM (one GEMM per image, one
//! launch), its input gradient a batched GEMM + col2im, its weight gradient one GEMM over the whole
//! batch (the forward's im2col matrix, kept, against dY in channel-major order); batch norm (with its
//! ReLU), the join, fake-quantization and an Adam step are one kernel each, and every per-channel
//! reduction is two (partial sums over hundreds of blocks, then their sum).
//!
//! The GEMMs use TF32 tensor cores, as PyTorch's cuDNN convolutions do by default
//! (`torch.backends.cudnn.allow_tf32`); `QAT_LAB_TF32=0` asks for full f32.

use super::Geometry;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::sys as driver;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp3, Layout, Result, Shape, Tensor};
use driver::CUmemPool_attribute as pool_attribute;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/qat_kernels.ptx"));

/// Threads per block of the element-wise kernels and of the reductions (a power of two: `max_abs`
/// halves it in its tree; at most 1024, its shared array).
const THREADS: u32 = 256;

/// Launch configuration of an element-wise kernel over `len` values (grid-stride loops cover the rest).
fn elementwise(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A (pixel blocks, `planes`, `images`) grid over NCHW planes of `p` pixels (see kernels.cu).
fn planes(p: usize, planes: usize, images: usize) -> Result<LaunchConfig> {
    let threads = p.next_multiple_of(32).min(THREADS as usize);
    if planes > 65_535 || images > 65_535 || p * planes * images >= 1 << 31 {
        candle_core::bail!(
            "a {images}x{planes}x{p} tensor is over the GPU kernels' limits (2^31 values, 65535 planes)"
        );
    }
    let grid = (p.div_ceil(threads) as u32, planes as u32, images as u32);
    Ok(LaunchConfig { grid_dim: grid, block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 })
}

/// `len` as the kernels' 32-bit count.
fn count(len: usize) -> Result<i32> {
    i32::try_from(len)
        .map_err(|_| candle_core::Error::Msg(format!("{len} values are over the GPU kernels' 2^31 limit")))
}

/// A (blocks, groups) grid of reduction blocks.
fn reduction(blocks: usize, groups: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, groups as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// How a per-channel reduction over N images splits the batch: (images per block, blocks per
/// channel), for about four blocks per multiprocessor of an H100 (132) in all.
fn batch_split(n: usize, c: usize) -> (usize, usize) {
    let per = n.div_ceil((528 / c.max(1)).clamp(1, n.max(1)));
    (per, n.div_ceil(per))
}

/// Runs a per-channel reduction kernel `name` on the (blocks, C) grid of [`batch_split`], then
/// `finish_sums`: a (2, C) result ([mean; var] with `moments`, else the two sums).
macro_rules! channel_reduction {
    ($dev:expr, $name:expr, (n: $n:expr, c: $c:expr, p: $p:expr), moments: $moments:expr, [$($arg:expr),+], [$($tail:expr),*]) => {{
        let (n, c, p) = ($n, $c, $p);
        let (per, blocks) = batch_split(n, c);
        // SAFETY: f64 has no invalid bit patterns; the kernel writes every partial.
        let mut partial = unsafe { $dev.alloc::<f64>(2 * c * blocks)? };
        let d = [n, c, p, per].map(|v| v as i32);
        launch!($dev, $name, reduction(blocks, c), $($arg),+, &mut partial, ..d $(, $tail)*);
        let mut out = alloc($dev, 2 * c)?;
        let (c32, blocks32, total, moments) = (d[1], blocks as i32, (n * p) as f64, $moments as i32);
        launch!($dev, "finish_sums", elementwise(c), &partial, &mut out, &c32, &blocks32, &total, &moments);
        out
    }};
}

/// Launches kernel `name` of our module with the arguments given, each pushed by reference; `..d`
/// pushes every element of the array `d` in turn (a kernel's integer dimensions).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:tt)+) => {{
        let cfg = $cfg;
        let func = $dev.get_or_load_custom_func($name, "qat_lab", PTX)?;
        let mut builder = func.builder();
        push_args!(builder; $($arg)+);
        // SAFETY: the kernels read and write within the lengths passed beside each buffer.
        unsafe { builder.launch(cfg) }.w()?;
    }};
}

/// The arguments of [`launch!`], pushed onto a kernel's launch builder in order.
macro_rules! push_args {
    ($builder:ident;) => {};
    ($builder:ident; ..$dims:expr $(, $($rest:tt)*)?) => {
        for v in $dims.iter() {
            $builder.arg(v);
        }
        push_args!($builder; $($($rest)*)?);
    };
    ($builder:ident; $arg:expr $(, $($rest:tt)*)?) => {
        $builder.arg($arg);
        push_args!($builder; $($($rest)*)?);
    };
}

/// The contiguous f32 data of a GPU op input.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what} must be contiguous") };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// An uninitialised device buffer of `len` floats (every kernel here writes all of its output).
fn alloc(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: f32 has no invalid bit patterns, and each caller's kernel writes every element.
    unsafe { dev.alloc::<f32>(len) }
}

/// The read lock on a tensor an op keeps beside its inputs (batch statistics, γ, ...), held while the
/// kernel's view of it ([`held_view`]) is alive.
type Held<'a> = (candle_core::StorageRef<'a>, &'a Layout);

fn hold(t: &Tensor) -> Held<'_> {
    t.storage_and_layout()
}

/// The contiguous f32 data of a held tensor.
fn held_view<'a>((storage, layout): &'a Held<'_>, what: &str) -> Result<CudaView<'a, f32>> {
    let candle_core::Storage::Cuda(s) = &**storage else { candle_core::bail!("{what} must be on the GPU") };
    view(s, layout, what)
}

fn tf32() -> bool {
    static TF32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TF32.get_or_init(|| std::env::var("QAT_LAB_TF32").map(|v| v != "0").unwrap_or(true))
}

/// One strided-batched GEMM in cuBLAS's column-major terms: C_i = op(A_i)·op(B_i), i < batch, with
/// op(A) m×k, op(B) k×n, C m×n; `t` = (transpose A, transpose B); strides in elements (0 = shared).
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &CudaDevice,
    t: (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda, stride_a): (&CudaView<'_, f32>, usize, usize),
    (b, ldb, stride_b): (&CudaView<'_, f32>, usize, usize),
    (c, ldc, stride_c): (&mut CudaSlice<f32>, usize, usize),
    batch: usize,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let op = |t: bool| if t { cublas::cublasOperation_t::CUBLAS_OP_T } else { cublas::cublasOperation_t::CUBLAS_OP_N };
    let compute = if tf32() {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let (alpha, beta) = (1f32, 0f32);
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pc, _gc) = c.device_ptr_mut(&stream);
    let f32t = cublas::cudaDataType_t::CUDA_R_32F;
    // SAFETY: the pointers are live device buffers of the sizes the callers' shapes give.
    unsafe {
        candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op(t.0),
            op(t.1),
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            pa as *const _,
            f32t,
            lda as i32,
            stride_a as i64,
            pb as *const _,
            f32t,
            ldb as i32,
            stride_b as i64,
            &beta as *const f32 as *const _,
            pc as *mut _,
            f32t,
            ldc as i32,
            stride_c as i64,
            batch as i32,
            compute,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// The device pointer of an optional input (0 for none: the kernels test for null).
fn optional_ptr(v: Option<&CudaView<'_, f32>>, dev: &CudaDevice) -> u64 {
    v.map(|v| v.device_ptr(&dev.cuda_stream()).0).unwrap_or(0)
}

/// One op of this module: its name, its CUDA forward over `N` inputs, and for a differentiable op the
/// gradients of its inputs. [`Gpu`] makes it a candle custom op.
trait GpuOp<const N: usize>: Send + Sync {
    const NAME: &'static str;

    fn forward(&self, inputs: [(&CudaStorage, &Layout); N]) -> Result<(CudaStorage, Shape)>;

    /// The inputs' gradients from the inputs, the output and its gradient (None: no gradient).
    fn backward(&self, _inputs: [&Tensor; N], _out: &Tensor, _grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        candle_core::bail!("{} is not differentiable", Self::NAME)
    }
}

/// A [`GpuOp`] as candle's `CustomOp1/2/3` (whose CPU forward is an error: on the CPU the dispatch in
/// `ops` runs the CPU kernels instead).
struct Gpu<T>(T);

fn gpu_only(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name} is a GPU op (the CPU has its own kernels in ops::conv and ops::bn)"))
}

impl<T: GpuOp<1>> CustomOp1 for Gpu<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(gpu_only(T::NAME))
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.forward([(s, l)])
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [d] = self.0.backward([arg], res, grad)?;
        Ok(d)
    }
}

impl<T: GpuOp<2>> CustomOp2 for Gpu<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(gpu_only(T::NAME))
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.forward([(s1, l1), (s2, l2)])
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.0.backward([a, b], res, grad)?;
        Ok((da, db))
    }
}

impl<T: GpuOp<3>> CustomOp3 for Gpu<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(gpu_only(T::NAME))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.0.forward([(s1, l1), (s2, l2), (s3, l3)])
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.0.backward([a, b, c], res, grad)?;
        Ok((da, db, dc))
    }
}

/// The GPU's use of a convolution's shape.
impl Geometry {
    /// The im2col matrix of `x`, (C·k·k) × (N·P), quantized on the way when `quant` =
    /// Some((scale, levels)).
    fn im2col(
        &self,
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        quant: Option<(&CudaView<'_, f32>, f32)>,
    ) -> Result<CudaSlice<f32>> {
        let mut col = alloc(dev, self.n * self.kdim() * self.pixels())?;
        let qscale = optional_ptr(quant.map(|q| q.0), dev);
        let levels = quant.map(|q| q.1).unwrap_or(0.0);
        let d = [self.c, self.h, self.w, self.k, self.stride, self.pad, self.oh(), self.ow()].map(|v| v as i32);
        let cfg = planes(self.pixels(), self.kdim(), self.n)?;
        launch!(dev, "im2col", cfg, x, &mut col, ..d, &qscale, &levels);
        Ok(col)
    }
}

/// conv2d(x, w) (with the input fake-quantized on `levels` steps of a scale given as a third input,
/// straight-through, when `levels` > 0).
struct Conv {
    stride: usize,
    pad: usize,
    levels: f32,
    /// The forward's im2col matrix, kept for the weight gradient (the backward takes it): one im2col
    /// per layer and step fewer, for ~0.9 GB of GPU memory over ResNet-20 at batch 128. An op that
    /// no backward will see (eval, no gradient) is dropped with its matrix right after the forward.
    col: Saved,
}

/// A buffer one op's forward leaves for its backward.
type Saved = std::sync::Mutex<Option<CudaSlice<f32>>>;

/// The lock of a [`Saved`] buffer.
fn saved(buffer: &Saved) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<f32>>>> {
    buffer.lock().map_err(|_| candle_core::Error::Msg("a GPU op's saved buffer: a poisoned lock".into()))
}

impl Conv {
    fn new(stride: usize, pad: usize, levels: f32) -> Self {
        Self { stride, pad, levels, col: Saved::default() }
    }

    fn run(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        scale: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::of(x.1.shape(), w.1.shape(), self.stride, self.pad)?;
        let dev = &x.0.device;
        let (xv, wv) = (view(x.0, x.1, "conv input")?, view(w.0, w.1, "conv weight")?);
        let sv = scale.map(|(s, l)| view(s, l, "input scale")).transpose()?;
        let col = g.im2col(dev, &xv, sv.as_ref().map(|s| (s, self.levels)))?;
        let (p, rows) = (g.pixels(), g.kdim());
        let mut y = alloc(dev, g.n * g.o * p)?;
        // Per image, row-major Y (O×P) = W (O×K) · col_n (K×P, row stride N·P); column-major:
        // Yᵀ = col_nᵀ · Wᵀ.
        gemm(
            dev,
            (false, false),
            (p, g.o, rows),
            (&col.as_view(), g.n * p, p),
            (&wv, rows, 0),
            (&mut y, p, g.o * p),
            g.n,
        )?;
        *saved(&self.col)? = Some(col);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((g.n, g.o, g.oh(), g.ow()))))
    }

    fn gradients(&self, x: &Tensor, w: &Tensor, scale: Option<&Tensor>, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let dx = grad.apply_op2_no_bwd(w, &Gpu(ConvInputGrad { stride: self.stride, pad: self.pad, h, w: wd }))?;
        let k = w.dim(2)?;
        let col = saved(&self.col)?.take();
        let dw_op = ConvWeightGrad { stride: self.stride, pad: self.pad, k, levels: self.levels, col: Saved::new(col) };
        let dw = match scale {
            Some(s) => x.apply_op3_no_bwd(&grad, s, &Gpu(dw_op))?,
            None => x.apply_op2_no_bwd(&grad, &Gpu(dw_op))?,
        };
        Ok((dx, dw))
    }
}

impl GpuOp<2> for Conv {
    const NAME: &'static str = "qat-gpu-conv";
    fn forward(&self, [(x, lx), (w, lw)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        self.run((x, lx), (w, lw), None)
    }
    fn backward(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let (dx, dw) = self.gradients(x, w, None, grad)?;
        Ok([Some(dx), Some(dw)])
    }
}

impl GpuOp<3> for Conv {
    const NAME: &'static str = "qat-gpu-conv-quantized";
    fn forward(&self, [(x, lx), (w, lw), (s, ls)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        self.run((x, lx), (w, lw), Some((s, ls)))
    }
    fn backward(&self, [x, w, s]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let (dx, dw) = self.gradients(x, w, Some(s), grad)?;
        Ok([Some(dx), Some(dw), None])
    }
}

/// dX of a convolution from dY and W: per image col = Wᵀ·dY, then col2im.
struct ConvInputGrad {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl GpuOp<2> for ConvInputGrad {
    const NAME: &'static str = "qat-gpu-conv-input-grad";
    fn forward(&self, [(dy, ldy), (w, lw)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let (n, o, oh, ow) = ldy.shape().dims4()?;
        let (_, c, k, _) = lw.shape().dims4()?;
        let g = Geometry { n, c, h: self.h, w: self.w, o, k, stride: self.stride, pad: self.pad };
        if (g.oh(), g.ow()) != (oh, ow) {
            candle_core::bail!("conv input grad: a {oh}x{ow} gradient does not match a {}x{} input", self.h, self.w);
        }
        let dev = &dy.device;
        let (dyv, wv) = (view(dy, ldy, "conv grad")?, view(w, lw, "conv weight")?);
        let (p, rows) = (g.pixels(), g.kdim());
        let mut col = alloc(dev, n * rows * p)?;
        // Per image, row-major col (K×P) = Wᵀ (K×O) · dY (O×P); column-major: colᵀ = dYᵀ · W.
        gemm(dev, (false, true), (p, rows, o), (&dyv, p, o * p), (&wv, rows, 0), (&mut col, p, rows * p), n)?;
        let mut dx = alloc(dev, n * c * self.h * self.w)?;
        let d = [c, self.h, self.w, k, self.stride, self.pad, oh, ow].map(|v| v as i32);
        launch!(dev, "col2im", planes(self.h * self.w, c, n)?, &col, &mut dx, ..d);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), Shape::from((n, c, self.h, self.w))))
    }
}

/// dW of a convolution from X (quantized again when `levels` > 0, with the scale as third input) and
/// dY: one GEMM over the whole batch, dW = dY·colᵀ, with dY in channel-major order and the
/// forward's im2col matrix when it kept one.
struct ConvWeightGrad {
    stride: usize,
    pad: usize,
    k: usize,
    levels: f32,
    /// The forward's im2col matrix of X, when it kept one (else it is built again).
    col: Saved,
}

impl ConvWeightGrad {
    fn run(
        &self,
        x: (&CudaStorage, &Layout),
        dy: (&CudaStorage, &Layout),
        scale: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, h, w) = x.1.shape().dims4()?;
        let (_, o, _, _) = dy.1.shape().dims4()?;
        let g = Geometry { n, c, h, w, o, k: self.k, stride: self.stride, pad: self.pad };
        let dev = &x.0.device;
        let (xv, dyv) = (view(x.0, x.1, "conv input")?, view(dy.0, dy.1, "conv grad")?);
        let sv = scale.map(|(s, l)| view(s, l, "input scale")).transpose()?;
        let kept = saved(&self.col)?.take();
        let col = match kept {
            Some(col) if col.len() == n * g.kdim() * g.pixels() => col,
            _ => g.im2col(dev, &xv, sv.as_ref().map(|s| (s, self.levels)))?,
        };
        let (p, rows) = (g.pixels(), g.kdim());
        // dY as (O) × (N·P), then one GEMM over the whole batch: row-major dW (O×K) = dY (O×NP) ·
        // colᵀ (NP×K); column-major: dWᵀ = col · dYᵀ.
        let mut dy_t = alloc(dev, n * o * p)?;
        let p32 = count(p)?;
        launch!(dev, "channel_major", planes(p, o, n)?, &dyv, &mut dy_t, &p32);
        let mut dw = alloc(dev, o * rows)?;
        let np = n * p;
        gemm(
            dev,
            (true, false),
            (rows, o, np),
            (&col.as_view(), np, 0),
            (&dy_t.as_view(), np, 0),
            (&mut dw, rows, 0),
            1,
        )?;
        Ok((CudaStorage::wrap_cuda_slice(dw, dev.clone()), Shape::from((o, c, self.k, self.k))))
    }
}

impl GpuOp<2> for ConvWeightGrad {
    const NAME: &'static str = "qat-gpu-conv-weight-grad";
    fn forward(&self, [(x, lx), (dy, ldy)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        self.run((x, lx), (dy, ldy), None)
    }
}

impl GpuOp<3> for ConvWeightGrad {
    const NAME: &'static str = "qat-gpu-conv-weight-grad-quantized";
    fn forward(&self, [(x, lx), (dy, ldy), (s, ls)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        self.run((x, lx), (dy, ldy), Some((s, ls)))
    }
}

/// The input quantizer of a GPU convolution as (its one-element scale, steps per side); the kernels
/// quantize with one scale (`super::conv2d_quantized` takes other scales through a separate
/// fake-quant).
fn one_scale(input: Option<(&Tensor, f64)>) -> Result<Option<(Tensor, f32)>> {
    let Some((scale, levels)) = input else { return Ok(None) };
    if scale.elem_count() != 1 {
        candle_core::bail!("a GPU convolution quantizes its input with one scale, not {}", scale.elem_count());
    }
    Ok(Some((scale.detach().flatten_all()?.contiguous()?, levels as f32)))
}

/// 2-D convolution on the GPU, the input fake-quantized first when `input` = Some((scale, levels))
/// with a one-element scale (straight-through, as [`super::fake_quant`]).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize, input: Option<(&Tensor, f64)>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match one_scale(input)? {
        Some((scale, levels)) => x.apply_op3(&w, &scale, Gpu(Conv::new(stride, padding, levels))),
        None => x.apply_op2(&w, Gpu(Conv::new(stride, padding, 0.0))),
    }
}

/// Output channels per block of the direct eval convolution, and input channels per shared-memory
/// chunk (CONV_OT and CONV_CC in kernels.cu).
const CONV_OT: usize = 16;
const CONV_CC: usize = 8;
/// Shared memory a block may take without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// An eval convolution with its epilogue as one direct kernel (`conv_eval`): no im2col matrix
/// written and read back, no separate affine pass, exact f32 arithmetic. No gradient.
struct ConvEval {
    stride: usize,
    pad: usize,
    /// The input's quantizer (a one-element scale, and its steps per side), if any.
    quant: Option<(Tensor, f32)>,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
    residual: Option<Tensor>,
}

impl ConvEval {
    /// (tile width, tile height, shared-memory bytes) of a block for a k×k kernel on an oh×ow output.
    fn tile(&self, k: usize, (oh, ow): (usize, usize)) -> (usize, usize, usize) {
        let (tw, th) = (ow.min(16), oh.min(16));
        let (ih, iw) = ((th - 1) * self.stride + k, (tw - 1) * self.stride + k);
        (tw, th, 4 * CONV_CC * (ih * iw + k * k * CONV_OT))
    }
}

impl GpuOp<2> for ConvEval {
    const NAME: &'static str = "qat-gpu-conv-eval";
    fn forward(&self, [(x, lx), (w, lw)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::of(lx.shape(), lw.shape(), self.stride, self.pad)?;
        let Geometry { n, c, h, w: wd, o, k, .. } = g;
        let (oh, ow) = (g.oh(), g.ow());
        let (tw, th, shared) = self.tile(k, (oh, ow));
        let dev = &x.device;
        let (xv, wv) = (view(x, lx, "conv input")?, view(w, lw, "conv weight")?);
        let (scale, shift) = (hold(&self.scale), hold(&self.shift));
        let (sv, bv) = (held_view(&scale, "scale")?, held_view(&shift, "shift")?);
        let quant = self.quant.as_ref().map(|q| hold(&q.0));
        let qv = quant.as_ref().map(|q| held_view(q, "input scale")).transpose()?;
        let residual = self.residual.as_ref().map(hold);
        let rv = residual.as_ref().map(|r| held_view(r, "residual")).transpose()?;
        if sv.len() != o || bv.len() != o || rv.as_ref().is_some_and(|r| r.len() != n * o * oh * ow) {
            candle_core::bail!("conv eval: the epilogue does not fit a {n}x{o}x{oh}x{ow} output");
        }
        let (qscale, residual) = (optional_ptr(qv.as_ref(), dev), optional_ptr(rv.as_ref(), dev));
        let levels = self.quant.as_ref().map(|q| q.1).unwrap_or(0.0);
        let mut y = alloc(dev, n * o * oh * ow)?;
        let tiles = ow.div_ceil(tw) * oh.div_ceil(th);
        if o.div_ceil(CONV_OT) > 65_535 || n > 65_535 {
            candle_core::bail!("conv eval: {o} channels or {n} images are over the grid's limits");
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, o.div_ceil(CONV_OT) as u32, n as u32),
            block_dim: ((tw * th) as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let d = [c, h, wd, o, k, self.stride, self.pad, oh, ow, tw, th].map(|v| v as i32);
        let relu = self.relu as i32;
        launch!(dev, "conv_eval", cfg, &xv, &wv, &sv, &bv, &residual, &mut y, ..d, &qscale, &levels, &relu);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((n, o, oh, ow))))
    }
}

/// An eval convolution and its epilogue (`x·scale[o] + shift[o]`, then `relu(· + residual)` with a
/// residual, else a ReLU when `relu`), the input fake-quantized first when `input` = Some((scale,
/// levels)) with a one-element scale: one direct kernel where its tile fits in shared memory (every
/// 3x3 layer), im2col + GEMM + the epilogue kernel otherwise. No gradient.
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
    let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
    let op = ConvEval {
        stride,
        pad: padding,
        quant: one_scale(input)?,
        scale: scale.detach().contiguous()?,
        shift: shift.detach().contiguous()?,
        relu,
        residual: residual.map(|r| r.detach().contiguous()).transpose()?,
    };
    let g = Geometry::of(x.shape(), w.shape(), stride, padding)?;
    if op.tile(g.k, (g.oh(), g.ow())).2 <= SHARED_LIMIT {
        return x.apply_op2_no_bwd(&w, &Gpu(op));
    }
    let y = conv2d(&x, &w, stride, padding, input)?;
    channel_affine(&y, &op.scale, &op.shift, relu, op.residual.as_ref())
}

/// (N, C, P) of an NCHW layout.
fn ncp(l: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    Ok((n, c, h * w))
}

/// Per-channel [mean; biased variance] of NCHW `x`, shaped (2, C). Differentiable (the folded-BN
/// path trains through the statistics); batch norm itself uses [`BnTrain`]'s own backward.
struct Moments;

impl GpuOp<1> for Moments {
    const NAME: &'static str = "qat-gpu-moments";
    fn forward(&self, [(x, l)]: [(&CudaStorage, &Layout); 1]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(l)?;
        let dev = &x.device;
        let xv = view(x, l, "batch-norm input")?;
        let out = channel_reduction!(dev, "channel_sums", (n: n, c: c, p: p), moments: true, [&xv], []);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, c))))
    }
    fn backward(&self, [x]: [&Tensor; 1], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(x.apply_op3_no_bwd(res, &grad.contiguous()?, &Gpu(MomentsGrad))?)])
    }
}

/// The input gradient of [`Moments`] from (X, [mean; var], [d mean; d var]): d mean/dx = 1/M,
/// d var/dx = 2(x − mean)/M.
struct MomentsGrad;

impl GpuOp<3> for MomentsGrad {
    const NAME: &'static str = "qat-gpu-moments-grad";
    fn forward(&self, [(x, lx), (s, ls), (g, lg)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(lx)?;
        let dev = &x.device;
        let (xv, sv, gv) = (view(x, lx, "input")?, view(s, ls, "statistics")?, view(g, lg, "gradient")?);
        if sv.len() != 2 * c || gv.len() != 2 * c {
            candle_core::bail!("moments gradient: {c} channels, {} statistics, {} gradients", sv.len(), gv.len());
        }
        let mut dx = alloc(dev, n * c * p)?;
        let p32 = p as i32;
        launch!(dev, "moments_grad", planes(p, c, n)?, &xv, &sv, &gv, &mut dx, &p32);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), lx.shape().clone()))
    }
}

/// Per-channel mean and biased variance of NCHW `x`, each shaped (C); differentiable.
pub fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = x.contiguous()?.apply_op1(Gpu(Moments))?;
    Ok((m.get(0)?, m.get(1)?))
}

/// Training batch norm with the batch statistics `stats` ([mean; var], computed beforehand and
/// treated as functions of x in the backward), then a ReLU when `relu`.
struct BnTrain {
    stats: Tensor,
    eps: f32,
    relu: bool,
}

impl GpuOp<3> for BnTrain {
    const NAME: &'static str = "qat-gpu-batch-norm";
    fn forward(&self, [(x, lx), (g, lg), (b, lb)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(lx)?;
        let dev = &x.device;
        let (xv, gv, bv) = (view(x, lx, "batch-norm input")?, view(g, lg, "γ")?, view(b, lb, "β")?);
        let mut y = alloc(dev, n * c * p)?;
        let d = [n, c, p].map(|v| v as i32);
        let relu = self.relu as i32;
        let stats = hold(&self.stats);
        let sv = held_view(&stats, "batch statistics")?;
        launch!(dev, "bn_forward", planes(p, c, n)?, &xv, &sv, &gv, &bv, &mut y, &d[2], &self.eps, &relu);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lx.shape().clone()))
    }
    fn backward(&self, [x, gamma, _beta]: [&Tensor; 3], y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let grad = grad.contiguous()?;
        let sums = grad.apply_op3_no_bwd(
            x,
            y,
            &Gpu(BnGradSums { stats: self.stats.clone(), eps: self.eps, relu: self.relu }),
        )?;
        let op = BnInputGrad {
            stats: self.stats.clone(),
            gamma: gamma.contiguous()?,
            sums: sums.clone(),
            eps: self.eps,
            relu: self.relu,
        };
        let dx = grad.apply_op3_no_bwd(x, y, &Gpu(op))?;
        Ok([Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)])
    }
}

/// Per channel [Σ g·x̂; Σ g] (dγ; dβ) of a batch norm, from (dY, X, Y).
struct BnGradSums {
    stats: Tensor,
    eps: f32,
    relu: bool,
}

impl GpuOp<3> for BnGradSums {
    const NAME: &'static str = "qat-gpu-batch-norm-grad-sums";
    fn forward(&self, [(dy, ldy), (x, lx), (y, ly)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(lx)?;
        let dev = &x.device;
        let (dyv, xv, yv) = (view(dy, ldy, "gradient")?, view(x, lx, "input")?, view(y, ly, "output")?);
        let relu = self.relu as i32;
        let stats = hold(&self.stats);
        let sv = held_view(&stats, "batch statistics")?;
        let out = channel_reduction!(dev, "bn_grad_sums", (n: n, c: c, p: p), moments: false, [&dyv, &xv, &yv, &sv], [&self.eps, &relu]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, c))))
    }
}

/// The batch-norm input gradient from (dY, X, Y) and the sums of [`BnGradSums`].
struct BnInputGrad {
    stats: Tensor,
    gamma: Tensor,
    sums: Tensor,
    eps: f32,
    relu: bool,
}

impl GpuOp<3> for BnInputGrad {
    const NAME: &'static str = "qat-gpu-batch-norm-input-grad";
    fn forward(&self, [(dy, ldy), (x, lx), (y, ly)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(lx)?;
        let dev = &x.device;
        let (dyv, xv, yv) = (view(dy, ldy, "gradient")?, view(x, lx, "input")?, view(y, ly, "output")?);
        let mut dx = alloc(dev, n * c * p)?;
        let d = [n, c, p].map(|v| v as i32);
        let relu = self.relu as i32;
        let (stats, gamma, sums) = (hold(&self.stats), hold(&self.gamma), hold(&self.sums));
        let (sv, gv) = (held_view(&stats, "batch statistics")?, held_view(&gamma, "γ")?);
        let uv = held_view(&sums, "gradient sums")?;
        launch!(
            dev,
            "bn_input_grad",
            planes(p, c, n)?,
            &dyv,
            &xv,
            &yv,
            &sv,
            &gv,
            &uv,
            &mut dx,
            &d[2],
            &self.eps,
            &relu
        );
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), lx.shape().clone()))
    }
}

/// Training batch norm of NCHW `x` with batch statistics (then a ReLU when `relu`): one kernel for
/// the statistics, one for the normalisation; two for the backward. Returns (y, mean, var).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&Gpu(Moments))?;
    let op = BnTrain { stats: stats.clone(), eps: eps as f32, relu };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Gpu(op))?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// `x·scale[c] + shift[c]`, then `relu(· + residual)` with a residual, else a ReLU when `relu`.
/// Differentiable without a residual (the folded-BN training path; backward: [`AffineGrad`]).
struct ChannelAffine {
    relu: bool,
    residual: Option<Tensor>,
}

impl GpuOp<3> for ChannelAffine {
    const NAME: &'static str = "qat-gpu-channel-affine";
    fn forward(&self, [(x, lx), (s, ls), (b, lb)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(lx)?;
        let dev = &x.device;
        let (xv, sv, bv) = (view(x, lx, "input")?, view(s, ls, "scale")?, view(b, lb, "shift")?);
        let mut y = alloc(dev, n * c * p)?;
        let d = [n, c, p].map(|v| v as i32);
        let relu = self.relu as i32;
        let residual = self.residual.as_ref().map(hold);
        let rv = residual.as_ref().map(|r| held_view(r, "residual")).transpose()?;
        let residual = optional_ptr(rv.as_ref(), dev);
        launch!(dev, "channel_affine", planes(p, c, n)?, &xv, &sv, &bv, &residual, &mut y, &d[2], &relu);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lx.shape().clone()))
    }
    fn backward(&self, [x, scale, _shift]: [&Tensor; 3], y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        if self.residual.is_some() {
            candle_core::bail!("the GPU channel affine with a residual is an eval op (no backward)");
        }
        let grad = grad.contiguous()?;
        let sums = grad.apply_op3_no_bwd(x, y, &Gpu(AffineGrad { relu: self.relu, sums: true }))?;
        let dx = grad.apply_op3_no_bwd(y, &scale.contiguous()?, &Gpu(AffineGrad { relu: self.relu, sums: false }))?;
        Ok([Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)])
    }
}

/// The backward of [`ChannelAffine`] (no residual), g being dY masked by the ReLU when there is one:
/// with `sums`, [Σ g·x; Σ g] per channel (d scale; d shift) from (dY, X, Y); otherwise dX = g·scale
/// from (dY, Y, scale).
struct AffineGrad {
    relu: bool,
    sums: bool,
}

impl GpuOp<3> for AffineGrad {
    const NAME: &'static str = "qat-gpu-channel-affine-grad";
    fn forward(&self, [(dy, ldy), (a, la), (b, lb)]: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
        let (n, c, p) = ncp(ldy)?;
        let dev = &dy.device;
        let (dyv, av, bv) = (view(dy, ldy, "gradient")?, view(a, la, "input")?, view(b, lb, "input")?);
        let relu = self.relu as i32;
        if self.sums {
            let out = channel_reduction!(dev, "affine_grad_sums", (n: n, c: c, p: p), moments: false, [&dyv, &av, &bv], [&relu]);
            return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, c))));
        }
        if bv.len() != c {
            candle_core::bail!("channel affine gradient: {c} channels, {} scales", bv.len());
        }
        let mut dx = alloc(dev, n * c * p)?;
        let p32 = p as i32;
        launch!(dev, "affine_input_grad", planes(p, c, n)?, &dyv, &av, &bv, &mut dx, &p32, &relu);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), ldy.shape().clone()))
    }
}

/// `x·scale[c] + shift[c]` on NCHW `x`, then a ReLU when `relu` or `relu(· + residual)` with a
/// residual (the eval epilogue: one kernel). Differentiable when there is no residual.
pub fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = ChannelAffine { relu, residual: residual.map(|r| r.contiguous()).transpose()? };
    let (x, scale, shift) = (x.contiguous()?, scale.contiguous()?, shift.contiguous()?);
    if op.residual.is_some() {
        x.apply_op3_no_bwd(&scale, &shift, &Gpu(op))
    } else {
        x.apply_op3(&scale, &shift, Gpu(op))
    }
}

/// `relu(a + b)`, the residual join; its backward is one masking kernel shared by both inputs.
struct AddRelu;

impl GpuOp<2> for AddRelu {
    const NAME: &'static str = "qat-gpu-add-relu";
    fn forward(&self, [(a, la), (b, lb)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let dev = &a.device;
        let (av, bv) = (view(a, la, "join input")?, view(b, lb, "shortcut")?);
        let mut y = alloc(dev, av.len())?;
        let len = count(av.len())?;
        launch!(dev, "add_relu", elementwise(av.len()), &av, &bv, &mut y, &len);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), la.shape().clone()))
    }
    fn backward(&self, [_a, _b]: [&Tensor; 2], y: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let g = grad.contiguous()?.apply_op2_no_bwd(y, &Gpu(ReluGrad))?;
        Ok([Some(g.clone()), Some(g)])
    }
}

/// The ReLU's backward from (dY, Y).
struct ReluGrad;

impl GpuOp<2> for ReluGrad {
    const NAME: &'static str = "qat-gpu-relu-grad";
    fn forward(&self, [(g, lg), (y, ly)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let dev = &g.device;
        let (gv, yv) = (view(g, lg, "gradient")?, view(y, ly, "output")?);
        let mut out = alloc(dev, gv.len())?;
        let len = count(gv.len())?;
        launch!(dev, "relu_grad", elementwise(gv.len()), &yv, &gv, &mut out, &len);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lg.shape().clone()))
    }
}

/// `relu(a + b)` on the GPU.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("join: {:?} and {:?} differ", a.dims(), b.dims());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Gpu(AddRelu))
}

/// Fake-quantization with one scale per group of the leading dimension (or one for all), straight
/// through in the backward.
struct FakeQuant {
    levels: f32,
}

impl GpuOp<2> for FakeQuant {
    const NAME: &'static str = "qat-gpu-fake-quant";
    fn forward(&self, [(x, lx), (s, ls)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let dev = &x.device;
        let (xv, sv) = (view(x, lx, "input")?, view(s, ls, "scale")?);
        if sv.is_empty() || xv.len() % sv.len() != 0 {
            candle_core::bail!("fake-quant: {} values cannot be split into {} scale groups", xv.len(), sv.len());
        }
        let mut y = alloc(dev, xv.len())?;
        let (len, per) = (count(xv.len())?, (xv.len() / sv.len()) as i32);
        launch!(dev, "fake_quant", elementwise(xv.len()), &xv, &sv, &mut y, &len, &per, &self.levels);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lx.shape().clone()))
    }
    fn backward(&self, [_x, _s]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        Ok([Some(grad.clone()), None])
    }
}

/// [`super::fake_quant`] on the GPU (one scale, or one per index of the leading dimension).
pub fn fake_quant(x: &Tensor, scale: &Tensor, levels: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&scale.detach().flatten_all()?.contiguous()?, Gpu(FakeQuant { levels: levels as f32 }))
}

/// max|x| per group of the leading dimension (NaN wins).
struct MaxAbs {
    groups: usize,
}

impl GpuOp<1> for MaxAbs {
    const NAME: &'static str = "qat-gpu-max-abs";
    fn forward(&self, [(x, l)]: [(&CudaStorage, &Layout); 1]) -> Result<(CudaStorage, Shape)> {
        let dev = &x.device;
        let xv = view(x, l, "input")?;
        if self.groups == 0 || xv.len() % self.groups != 0 {
            candle_core::bail!("max_abs: {} values cannot be split into {} groups", xv.len(), self.groups);
        }
        let per = xv.len() / self.groups;
        // Blocks of at least 4096 values, at most 256 per group; a second pass over a large group's
        // block maxima.
        let chunk = per.div_ceil(256).max(4096);
        let blocks = per.div_ceil(chunk).max(1);
        let mut out = alloc(dev, self.groups)?;
        if blocks == 1 {
            let (per32, chunk32) = (count(per)?, count(chunk)?);
            launch!(dev, "max_abs", reduction(1, self.groups), &xv, &mut out, &per32, &chunk32);
        } else {
            let mut partial = alloc(dev, blocks * self.groups)?;
            let (per32, chunk32, blocks32) = (count(per)?, count(chunk)?, blocks as i32);
            launch!(dev, "max_abs", reduction(blocks, self.groups), &xv, &mut partial, &per32, &chunk32);
            launch!(dev, "max_abs", reduction(1, self.groups), &partial, &mut out, &blocks32, &blocks32);
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(self.groups)))
    }
}

/// [`super::max_abs`] on the GPU: one kernel (two for a group of more than 4096 values), no copy to
/// the host.
pub fn max_abs(x: &Tensor, groups: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Gpu(MaxAbs { groups }))
}

/// The option-A shortcut: every `stride`-th pixel, zero channels appended up to `out_ch`.
struct Subsample {
    stride: usize,
    out_ch: usize,
}

impl Subsample {
    /// (N, C, H, W, output channels, OH, OW, stride) of an input layout.
    fn dims(&self, l: &Layout) -> Result<[usize; 8]> {
        let (n, c, h, w) = l.shape().dims4()?;
        if self.out_ch < c {
            candle_core::bail!("shortcut: {} output channels cannot hold the input's {c}", self.out_ch);
        }
        let (oh, ow) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
        Ok([n, c, h, w, self.out_ch, oh, ow, self.stride])
    }
}

impl GpuOp<1> for Subsample {
    const NAME: &'static str = "qat-gpu-subsample";
    fn forward(&self, [(x, l)]: [(&CudaStorage, &Layout); 1]) -> Result<(CudaStorage, Shape)> {
        let dev = &x.device;
        let xv = view(x, l, "input")?;
        let [n, c, h, w, out_ch, oh, ow, stride] = self.dims(l)?;
        let mut y = alloc(dev, n * out_ch * oh * ow)?;
        let d = [c, h, w, oh, ow, stride].map(|v| v as i32);
        launch!(dev, "subsample", planes(oh * ow, out_ch, n)?, &xv, &mut y, ..d);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((n, self.out_ch, oh, ow))))
    }
    fn backward(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let op =
            SubsampleGrad { forward: Subsample { stride: self.stride, out_ch: self.out_ch }, input: x.shape().clone() };
        Ok([Some(grad.contiguous()?.apply_op1_no_bwd(&Gpu(op))?)])
    }
}

struct SubsampleGrad {
    forward: Subsample,
    input: Shape,
}

impl GpuOp<1> for SubsampleGrad {
    const NAME: &'static str = "qat-gpu-subsample-grad";
    fn forward(&self, [(g, l)]: [(&CudaStorage, &Layout); 1]) -> Result<(CudaStorage, Shape)> {
        let dev = &g.device;
        let gv = view(g, l, "gradient")?;
        let [n, c, h, w, out_ch, oh, ow, stride] = self.forward.dims(&Layout::contiguous(self.input.clone()))?;
        if gv.len() != n * out_ch * oh * ow {
            candle_core::bail!("shortcut gradient: {} values for a {n}x{out_ch}x{oh}x{ow} output", gv.len());
        }
        let mut dx = alloc(dev, self.input.elem_count())?;
        let d = [h, w, out_ch, oh, ow, stride].map(|v| v as i32);
        launch!(dev, "subsample_grad", planes(h * w, c, n)?, &gv, &mut dx, ..d);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), self.input.clone()))
    }
}

/// [`super::subsample`] on the GPU: one kernel each way.
pub fn subsample(x: &Tensor, stride: usize, out_ch: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gpu(Subsample { stride, out_ch }))
}

/// One Adam step on a parameter, in place: the moments `state` ([m; v], 2·len) and the parameter
/// `theta` from its gradient. The kernel also writes `state`, which candle hands an in-place op as an
/// input only; that is sound here because every op runs on the device's one stream, in order.
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub step_size: f32,
    pub bc2: f32,
    pub eps: f32,
    pub decay: f32,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "qat-gpu-adam"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        Err(gpu_only(std::any::type_name::<Self>()))
    }
    fn cuda_fwd(
        &self,
        theta: &mut CudaStorage,
        lt: &Layout,
        state: &CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let dev = theta.device.clone();
        let Some((a, b)) = lt.contiguous_offsets() else {
            candle_core::bail!("adam: the parameter must be contiguous")
        };
        let len = b - a;
        let (sv, gv) = (view(state, ls, "adam state")?, view(g, lg, "gradient")?);
        if sv.len() != 2 * len || gv.len() != len {
            candle_core::bail!("adam: {len} parameters, {} state values and {} gradients", sv.len(), gv.len());
        }
        let stream = dev.cuda_stream();
        let (state_ptr, _guard) = sv.device_ptr(&stream);
        let (m, v) = (state_ptr, state_ptr + (len * std::mem::size_of::<f32>()) as u64);
        let mut t = theta.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let len32 = count(len)?;
        launch!(
            dev,
            "adam",
            elementwise(len),
            &mut t,
            &m,
            &v,
            &gv,
            &len32,
            &self.beta1,
            &self.beta2,
            &self.step_size,
            &self.bc2,
            &self.eps,
            &self.decay
        );
        Ok(())
    }
}

/// A moving average updated in place from `value` (one kernel; see [`super::ema_update`]).
struct Ema {
    keep: f32,
    take: f32,
    restart: bool,
}

/// [`super::ema_update`] on the GPU.
pub fn ema_in_place(run: &Tensor, value: &Tensor, keep: f64, take: f64, restart: bool) -> Result<()> {
    run.inplace_op2(&value.contiguous()?, &Ema { keep: keep as f32, take: take as f32, restart })
}

impl candle_core::InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "qat-gpu-ema"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        Err(gpu_only(std::any::type_name::<Self>()))
    }
    fn cuda_fwd(&self, run: &mut CudaStorage, lr: &Layout, value: &CudaStorage, lv: &Layout) -> Result<()> {
        let dev = run.device.clone();
        let Some((a, b)) = lr.contiguous_offsets() else { candle_core::bail!("ema: the average must be contiguous") };
        let vv = view(value, lv, "new value")?;
        if vv.len() != b - a {
            candle_core::bail!("ema: {} averages, {} values", b - a, vv.len());
        }
        let mut r = run.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let (len, restart) = (count(b - a)?, self.restart as i32);
        launch!(dev, "ema", elementwise(b - a), &mut r, &vv, &len, &self.keep, &self.take, &restart);
        Ok(())
    }
}

/// The CUDA device `ordinal` for training on one thread:
/// - cudarc's per-buffer event tracking (an event recorded per kernel argument, for ordering across
///   streams) is turned off, since every op of a run is issued from its one worker thread to one
///   stream, in order (`QAT_LAB_CUDA_EVENTS=1` keeps it);
/// - the device's memory pool keeps what is freed (its release threshold is raised from 0), as
///   PyTorch's caching allocator does, instead of handing it back to the driver at every
///   synchronisation (once per training step, when the loss is read) and mapping it again.
pub fn device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    if let candle_core::Device::Cuda(d) = &device {
        if std::env::var("QAT_LAB_CUDA_EVENTS").map(|v| v != "1").unwrap_or(true) {
            // SAFETY: nothing has been allocated on this device yet, and all its work is issued from
            // the thread that uses it, to its stream (see above).
            unsafe { d.disable_event_tracking() };
        }
    }
    if let Some(pool) = memory_pool(ordinal) {
        let mut keep_all = u64::MAX;
        // SAFETY: a live pool handle, and the attribute's value is a u64 as the driver API says.
        let status = unsafe {
            driver::cuMemPoolSetAttribute(
                pool,
                pool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep_all as *mut u64).cast(),
            )
        };
        if status != driver::CUresult::CUDA_SUCCESS {
            eprintln!("qat-lab: the GPU memory pool keeps releasing memory ({status:?})");
        }
    }
    Ok(device)
}

/// The default memory pool of device `ordinal` (the one stream-ordered allocations come from).
fn memory_pool(ordinal: usize) -> Option<driver::CUmemoryPool> {
    let mut dev: driver::CUdevice = 0;
    let mut pool: driver::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: out-pointers to live locals; the driver was initialised by the device's creation.
    unsafe {
        (driver::cuDeviceGet(&mut dev, ordinal as i32) == driver::CUresult::CUDA_SUCCESS
            && driver::cuDeviceGetDefaultMemPool(&mut pool, dev) == driver::CUresult::CUDA_SUCCESS)
            .then_some(pool)
    }
}

/// The most GPU memory this process's stream-ordered allocations have held at once on device
/// `ordinal` (the pool's high-water mark), in bytes.
pub fn peak_memory(ordinal: usize) -> Option<u64> {
    let pool = memory_pool(ordinal)?;
    let mut high = 0u64;
    // SAFETY: as in `device`.
    let status = unsafe {
        driver::cuMemPoolGetAttribute(
            pool,
            pool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        )
    };
    (status == driver::CUresult::CUDA_SUCCESS).then_some(high)
}

/// Eval batch norm's (scale, shift) = (γ/√(var + ε), β − mean·scale) from the running statistics,
/// in one kernel (no gradient: eval only).
struct BnEvalAffine {
    mean: Tensor,
    var: Tensor,
    eps: f32,
}

impl GpuOp<2> for BnEvalAffine {
    const NAME: &'static str = "qat-gpu-bn-eval-affine";
    fn forward(&self, [(g, lg), (b, lb)]: [(&CudaStorage, &Layout); 2]) -> Result<(CudaStorage, Shape)> {
        let dev = &g.device;
        let (gv, bv) = (view(g, lg, "γ")?, view(b, lb, "β")?);
        let c = gv.len();
        let mut out = alloc(dev, 2 * c)?;
        let c32 = count(c)?;
        let (mean, var) = (hold(&self.mean), hold(&self.var));
        let (mv, vv) = (held_view(&mean, "running mean")?, held_view(&var, "running variance")?);
        launch!(dev, "bn_eval_affine", elementwise(c), &gv, &bv, &mv, &vv, &mut out, &c32, &self.eps);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, c))))
    }
}

/// [`super::bn_eval_affine`] on the GPU.
pub fn bn_eval_affine(
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let op = BnEvalAffine { mean: mean.contiguous()?, var: var.contiguous()?, eps: eps as f32 };
    let out = gamma.detach().contiguous()?.apply_op2_no_bwd(&beta.detach().contiguous()?, &Gpu(op))?;
    Ok((out.get(0)?, out.get(1)?))
}

/// True when `t` lives on a CUDA device as f32 (the GPU ops' precondition).
pub fn on_gpu(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == candle_core::DType::F32
}

/// Every GPU op against the CPU kernels (values and gradients, odd shapes too). They run where a
/// CUDA device is present (`benches/gpu-check.sh` runs them there, with `QAT_LAB_TF32=0` so that the
/// GEMMs are full f32) and skip with a message elsewhere.
#[cfg(test)]
mod tests {
    use crate::ops::{self, testing::rand};
    use candle_core::{Device, Result, Tensor, Var};

    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: no CUDA device here ({e})");
                None
            }
        }
    }

    /// ‖a − b‖ / ‖b‖ (a on any device, b on the CPU).
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_device(&Device::Cpu).unwrap();
        let num = (&a - b).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let den = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        if den < 1e-12 {
            num
        } else {
            num / den
        }
    }

    /// Runs `f` on CPU variables and on GPU copies, compares the outputs and, through one random
    /// upstream gradient, the gradients of the first `grads` inputs.
    fn check(what: &str, inputs: &[Tensor], grads: usize, tol: f32, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let Some(dev) = gpu() else { return };
        let cpu: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let cuda: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(&dev).unwrap()).unwrap()).collect();
        let as_tensors = |v: &[Var]| v.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
        let (want, got) = (f(&as_tensors(&cpu)).unwrap(), f(&as_tensors(&cuda)).unwrap());
        assert_eq!(want.dims(), got.dims(), "{what}: shape");
        let e = rel(&got, &want);
        assert!(e < tol, "{what}: values differ by {e}");
        if grads == 0 {
            return;
        }
        let up = rand(want.dims(), 7);
        let gw = (&want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (&got * &up.to_device(&dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        for i in 0..grads {
            let (a, b) = (gg.get(cuda[i].as_tensor()).unwrap(), gw.get(cpu[i].as_tensor()).unwrap());
            let e = rel(a, b);
            assert!(e < tol, "{what}: gradient {i} differs by {e}");
        }
    }

    #[test]
    fn conv_matches_the_cpu_kernels() {
        for (n, c, h, w, o, k, stride, pad) in [
            (2, 3, 8, 8, 4, 3, 1, 1),
            (3, 5, 9, 7, 6, 3, 2, 1),
            (2, 16, 16, 16, 32, 3, 2, 1),
            (1, 2, 5, 5, 3, 1, 1, 0),
            (4, 16, 32, 32, 16, 3, 1, 1),
        ] {
            let inputs = [rand(&[n, c, h, w], 1), rand(&[o, c, k, k], 2)];
            let what = format!("conv {:?}", (n, c, h, w, o, k, stride, pad));
            check(&what, &inputs, 2, 1e-4, |t| ops::conv2d(&t[0], &t[1], stride, pad));
            let scale = Tensor::new(&[0.8f32], &Device::Cpu).unwrap();
            check(&format!("quantized {what}"), &inputs, 2, 1e-4, |t| {
                let s = scale.to_device(t[0].device())?;
                ops::conv2d_quantized(&t[0], &t[1], (stride, pad), Some((&s, 7.0)))
            });
        }
    }

    #[test]
    fn batch_norm_matches_the_cpu_kernels() {
        for (shape, relu) in [([2, 3, 5, 7], true), ([4, 16, 8, 8], false), ([3, 4, 1, 1], true)] {
            let c = shape[1];
            let inputs = [(rand(&shape, 1) * 2.0).unwrap(), (rand(&[c], 2) + 1.5).unwrap(), rand(&[c], 3)];
            check(&format!("batch norm {shape:?} relu {relu}"), &inputs, 3, 1e-4, |t| {
                let (y, mean, var) = ops::batch_norm_train(&t[0], &t[1], &t[2], 1e-5, relu)?;
                // The statistics ride along (each scaled, so that a wrong one shows).
                let stats = (mean.sum_all()? + var.sum_all()?)?.detach();
                y.broadcast_add(&(stats * 1e-3)?)
            });
            check(&format!("channel stats {shape:?}"), &inputs[..1], 1, 1e-4, |t| {
                let (mean, var) = ops::channel_stats(&t[0])?;
                Tensor::cat(&[&mean, &(var * 0.5)?], 0)
            });
        }
    }

    #[test]
    fn element_wise_ops_match_the_cpu_kernels() {
        let shape = [3, 4, 5, 6];
        let two = [rand(&shape, 1), rand(&shape, 2)];
        check("add_relu", &two, 2, 1e-6, |t| ops::add_relu(&t[0], &t[1]));
        let affine = [rand(&shape, 1), rand(&[4], 2), rand(&[4], 3)];
        for relu in [false, true] {
            check(&format!("channel affine relu {relu}"), &affine, 3, 1e-5, |t| {
                ops::channel_affine(&t[0], &t[1], &t[2], relu)
            });
        }
        for (stride, out_ch) in [(2, 8), (1, 4), (3, 6)] {
            let what = format!("subsample {stride} {out_ch}");
            check(&what, &two[..1], 1, 0.0 + 1e-7, |t| ops::subsample(&t[0], stride, out_ch));
        }
        let per_tensor = Tensor::new(&[0.7f32], &Device::Cpu).unwrap();
        let per_row = (rand(&[3], 4).abs().unwrap() + 0.1).unwrap();
        for scale in [per_tensor, per_row] {
            check("fake quant", &two[..1], 1, 1e-6, |t| ops::fake_quant(&t[0], &scale.to_device(t[0].device())?, 7.0));
        }
        for groups in [1, 3] {
            check("max_abs", &two[..1], 0, 0.0 + 1e-7, |t| ops::max_abs(&(&t[0] * 3.0)?, groups));
        }
    }

    #[test]
    fn max_abs_keeps_a_nan() {
        let Some(dev) = gpu() else { return };
        let x = Tensor::new(&[1f32, f32::NAN, -3.0, 2.0], &dev).unwrap();
        assert!(ops::max_abs(&x, 1).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
        assert_eq!(ops::max_abs(&x.reshape((2, 2)).unwrap(), 2).unwrap().to_vec1::<f32>().unwrap()[1], 3.0);
    }

    /// The eval convolution with its epilogue (the direct kernel; im2col + GEMM where its tile does
    /// not fit in shared memory: the 5x5 stride-2 case), against the CPU's: several tiles per plane,
    /// channel counts off the kernel's blocking, quantized input, the join.
    #[test]
    fn eval_conv_with_its_epilogue_matches_the_cpu() {
        for (c, o, h, w, k, stride, relu, join, quantized) in [
            (8, 8, 9, 7, 3, 1, true, false, true),
            (8, 8, 9, 7, 3, 2, false, true, true),
            (8, 8, 9, 7, 3, 1, false, true, true),
            (3, 16, 32, 32, 3, 1, true, false, false),
            (16, 32, 32, 32, 3, 2, false, true, true),
            (20, 20, 10, 12, 3, 1, true, false, true),
            (5, 7, 6, 6, 1, 1, true, false, false),
            (4, 6, 33, 34, 5, 2, false, false, false),
        ] {
            let n = 2;
            let pad = k / 2;
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
            let inputs = [
                rand(&[n, c, h, w], 1),
                rand(&[o, c, k, k], 2),
                rand(&[o], 3),
                rand(&[o], 4),
                rand(&[n, o, oh, ow], 5),
            ];
            check(&format!("eval conv {:?}", (c, o, h, w, k, stride, relu, join, quantized)), &inputs, 0, 1e-5, |t| {
                let s = Tensor::new(&[0.9f32], t[0].device())?;
                let residual = join.then_some(&t[4]);
                let input = quantized.then_some((&s, 7.0));
                ops::conv2d_eval(&t[0], &t[1], (stride, pad), input, (&t[2], &t[3]), relu, residual)
            });
        }
    }

    #[test]
    fn adam_step_matches_the_cpu() {
        use crate::model::{Param, Role};
        use crate::train::optim::Adam;
        let Some(dev) = gpu() else { return };
        let start = rand(&[3, 50], 1);
        let mut finals = Vec::new();
        for device in [Device::Cpu, dev] {
            let w = Param {
                name: "w".into(),
                var: Var::from_tensor(&start.to_device(&device).unwrap()).unwrap(),
                role: Role::Weight,
            };
            let mut opt = Adam::new(std::slice::from_ref(&w), 0.05, 0.1).unwrap();
            for step in 0..4 {
                let target = rand(&[3, 50], 10 + step).to_device(&device).unwrap();
                let loss = (w.var.as_tensor() - target).unwrap().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            finals.push(w.var.as_tensor().to_device(&Device::Cpu).unwrap());
        }
        // Four steps of rounding apart (the GPU's fused update and the CPU's tensor ops).
        assert!(rel(&finals[1], &finals[0]) < 1e-5, "{}", rel(&finals[1], &finals[0]));
    }

    /// A whole small ResNet, float and W4/A4 (BN kept and folded), from the same weights on both
    /// devices: the training loss, every parameter's gradient, and then the eval loss (with the running
    /// statistics and activation scales that training step left) equal the CPU's. (Whole training runs
    /// are not compared: Adam's first step moves every weight by ±lr whatever the gradient's size, so
    /// a gradient of 1e-9 whose sign differs by rounding moves a weight the other way, and 4-bit
    /// rounding amplifies that.)
    #[test]
    fn resnet_training_matches_the_cpu() {
        use crate::config::{Arch, BnMode, Quantization, Regularizer};
        use crate::model::resnet::NetSpec;
        use crate::model::ResNet;
        let Some(dev) = gpu() else { return };
        let quant = |bn| {
            Regularizer::Quantization(Quantization {
                weight_bits: 4,
                act_bits: 4,
                first_last_bits: 8,
                bn,
                ema_momentum: 0.9,
            })
        };
        for reg in [Regularizer::None, quant(BnMode::Keep), quant(BnMode::Fold)] {
            let mut spec =
                NetSpec { arch: Arch::Resnet20, width: 0.5, input: [3, 16, 16], outputs: 10, per_label_heads: false };
            let wiring = crate::methods::wiring(&reg, &mut spec);
            let x = rand(&[8, 3, 16, 16], 3);
            let y: Vec<u32> = (0..8).map(|i| i % 10).collect();
            let mut results = Vec::new();
            for device in [Device::Cpu, dev.clone()] {
                let net = ResNet::new(spec, &wiring, &device, 0);
                let (x, y) = (x.to_device(&device).unwrap(), Tensor::new(y.as_slice(), &device).unwrap());
                let loss = candle_nn::loss::cross_entropy(&net.forward(&x, true).unwrap(), &y).unwrap();
                let grads = loss.backward().unwrap();
                let grads: Vec<(String, Tensor)> = net
                    .params
                    .entries
                    .iter()
                    .filter_map(|p| {
                        grads.get(p.var.as_tensor()).map(|g| (p.name.clone(), g.to_device(&Device::Cpu).unwrap()))
                    })
                    .collect();
                let eval = candle_nn::loss::cross_entropy(&net.forward(&x, false).unwrap(), &y).unwrap();
                results.push((loss.to_scalar::<f32>().unwrap(), grads, eval.to_scalar::<f32>().unwrap()));
            }
            let ((loss_c, grads_c, eval_c), (loss_g, grads_g, eval_g)) = (&results[0], &results[1]);
            assert!(
                (loss_c - loss_g).abs() < 1e-4 * loss_c.abs().max(1.0),
                "{reg:?}: training loss CPU {loss_c} GPU {loss_g}"
            );
            assert!(
                (eval_c - eval_g).abs() < 1e-3 * eval_c.abs().max(1.0),
                "{reg:?}: eval loss CPU {eval_c} GPU {eval_g}"
            );
            assert_eq!(grads_c.len(), grads_g.len(), "{reg:?}: the same parameters get gradients");
            // Quantized, a pre-activation one rounding apart can land on the other side of a grid
            // boundary and move a whole step: the gradients then differ by more than rounding.
            let tol = if matches!(reg, Regularizer::None) { 2e-3 } else { 1e-2 };
            for ((name, a), (_, b)) in grads_c.iter().zip(grads_g) {
                let e = rel(b, a);
                assert!(e < tol, "{reg:?}: gradient of {name} differs by {e}");
            }
        }
    }
}
