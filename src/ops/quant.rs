//! Fused fake-quantization on the CPU: one pass for clamp, scale, round and rescale, and a
//! straight-through backward (the incoming gradient, untouched).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// round(clamp(x, −λ, λ)·L/λ)·λ/L with λ broadcast along dimension 0 (one per output channel) or a
/// single value.
struct FakeQuant {
    levels: f32,
}

impl CustomOp2 for FakeQuant {
    fn name(&self) -> &'static str {
        "qat-fake-quant"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(s)) = (s1, s2) else { candle_core::bail!("fake-quant: f32 only") };
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("fake-quant: contiguous inputs only")
        };
        let (x, scales) = (&x[a..b], &s[c..d]);
        let groups = scales.len();
        if groups == 0 || x.len() % groups != 0 {
            candle_core::bail!("fake-quant: {} values cannot be split into {groups} scale groups", x.len());
        }
        let per = x.len() / groups;
        const CHUNK: usize = 16 * 1024;
        let y = super::written(x.len(), |y| {
            y.par_chunks_mut(per).zip(x.par_chunks(per)).zip(scales.par_iter()).for_each(|((yg, xg), &lambda)| {
                let lambda = lambda.max(1e-8);
                let (step, inv_step) = (lambda / self.levels, self.levels / lambda);
                yg.par_chunks_mut(CHUNK).zip(xg.par_chunks(CHUNK)).for_each(|(yc, xc)| {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        y.write(round_half_away(x.clamp(-lambda, lambda) * inv_step) * step);
                    }
                });
            })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Straight-through estimator: the rounding is treated as the identity.
        Ok((Some(grad.clone()), None))
    }
}

/// `v.round()` without the libm call (which the generic x86-64 target makes): adding the largest
/// float below ½ with v's sign, then truncating, rounds halves away from zero exactly. |v| stays below
/// 2^15 here (the grid's levels), well inside i32.
#[inline]
fn round_half_away(v: f32) -> f32 {
    (v + 0.49999997f32.copysign(v)) as i32 as f32
}

/// Fake-quantizes contiguous f32 `x` on the CPU with one scale (shape (1)) or one per leading index.
pub fn fake_quant_cpu(x: &Tensor, scale: &Tensor, levels: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&scale.flatten_all()?.contiguous()?, FakeQuant { levels: levels as f32 })
}

/// max|x| per group of the leading dimension, in one parallel pass (NaN wins, so that a diverging
/// run is not hidden behind a finite scale).
pub fn max_abs_cpu(x: &Tensor, groups: usize) -> Result<Tensor> {
    let x = x.contiguous()?.flatten_all()?;
    let n = x.elem_count();
    if groups == 0 || n % groups != 0 {
        candle_core::bail!("max_abs: {n} values cannot be split into {groups} groups");
    }
    let per = n / groups;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else { candle_core::bail!("max_abs: f32 only") };
    let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("max_abs: contiguous input only") };
    // 32 running maxima so the loop vectorises; a NaN, once seen, stays.
    let keep = |m: f32, a: f32| if m.is_nan() || a <= m { m } else { a };
    let max = |v: &[f32]| {
        let mut lanes = [0f32; 32];
        let chunks = v.chunks_exact(32);
        let tail = chunks.remainder().iter().fold(0f32, |m, &x| keep(m, x.abs()));
        for c in chunks {
            for (m, &x) in lanes.iter_mut().zip(c) {
                *m = keep(*m, x.abs());
            }
        }
        lanes.iter().fold(tail, |m, &x| keep(m, x))
    };
    const CHUNK: usize = 16 * 1024;
    let out: Vec<f32> = data[a..b].par_chunks(per).map(|g| g.par_chunks(CHUNK).map(max).reduce(|| 0.0, keep)).collect();
    Tensor::from_vec(out, groups, x.device())
}

#[cfg(test)]
mod tests {
    use super::round_half_away;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fast_round_equals_f32_round(v in -40000f32..40000.0) {
            prop_assert_eq!(round_half_away(v), v.round());
        }
    }

    #[test]
    fn halves_round_away_from_zero() {
        for v in [0.5f32, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 0.0] {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }
}
