//! The CPU kernels, each a candle custom op with its own backward: [`conv`] (the convolution; its
//! AVX-512 inner loops in `kernels`, Winograd's transforms in `winograd`), [`conv_bn`] (convolution,
//! batch norm and ReLU or the residual join as one op), [`fold_bn`] (the same with batch norm folded
//! into quantized weights), [`block`] (a whole residual block of either kind as one op), [`bn`] and
//! [`quant`]. `ops` chooses between them, the GPU's and the composites.

pub mod block;
pub mod bn;
pub mod caches;
pub mod conv;
pub mod conv_bn;
pub mod fold_bn;
mod kernels;
pub mod quant;
mod winograd;

use candle_core::{Result, Tensor};
use std::mem::MaybeUninit;

/// The contiguous f32 data behind a custom op's CPU input.
pub(crate) fn slice<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = s else { candle_core::bail!("{what} must be f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of CPU tensors (for kernels that run inside a backward pass).
pub(crate) fn with_slices<R, const K: usize>(tensors: [&Tensor; K], f: impl FnOnce([&[f32]; K]) -> R) -> Result<R> {
    let owned = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(K);
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &**storage else {
            candle_core::bail!("expected f32 tensors on the CPU")
        };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("expected contiguous tensors") };
        slices.push(&data[a..b]);
    }
    let slices: [&[f32]; K] = slices.try_into().map_err(|_| candle_core::Error::Msg("slice count".into()))?;
    Ok(f(slices))
}

/// A new op output of `len` floats, every one of which `fill` writes: no zero fill first, which would
/// be one more pass over memory per op (measured ~5% of a training step). Each kernel below writes its
/// output chunk by chunk, element by element, covering the whole buffer; the tests of every op compare
/// all of its output against candle's.
pub(crate) fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and `fill` initialised elements 0..len (see above).
    unsafe { v.set_len(len) };
    v
}
