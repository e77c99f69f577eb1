//! Fused fake-quantization on the CPU: one pass for clamp, scale, round and rescale, and a
//! straight-through backward (the incoming gradient, untouched).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
                let grid = Grid::new(lambda, self.levels);
                yg.par_chunks_mut(CHUNK).zip(xg.par_chunks(CHUNK)).for_each(|(yc, xc)| quantize_uninit(grid, xc, yc));
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

/// The symmetric uniform grid of one scale λ with `levels` steps per side: v ↦ round(clamp(v, ±λ)·L/λ)·λ/L.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    lambda: f32,
    step: f32,
    inv_step: f32,
}

impl Grid {
    /// The grid of scale `lambda` (floored at 1e-8, so an all-zero tensor does not divide by zero) with
    /// `levels` = 2^(b-1) − 1 steps per side.
    pub fn new(lambda: f32, levels: f32) -> Self {
        let lambda = lambda.max(1e-8);
        Grid { lambda, step: lambda / levels, inv_step: levels / lambda }
    }

    /// The grid point nearest to `v` clamped to ±λ (halves away from zero, like `f32::round`).
    #[inline]
    pub fn apply(&self, v: f32) -> f32 {
        self.index(v) * self.step
    }

    /// The signed index of [`Self::apply`]'s grid point (an integer in −L..=L): what an integer model
    /// stores, computed with the same float operations so that it agrees with fake-quantization.
    #[inline]
    pub fn index(&self, v: f32) -> f32 {
        round_half_away(v.clamp(-self.lambda, self.lambda) * self.inv_step)
    }

    /// The real value of one grid step, λ/L.
    pub fn step(&self) -> f32 {
        self.step
    }
}

/// `dst[i] = grid.apply(src[i])`. Compiled for the SIMD extensions the CPU has (AVX-512, AVX2, ...;
/// chosen once at run time): the crate targets baseline x86-64, where this loop runs 4 lanes wide.
#[multiversion(targets = "simd")]
pub fn quantize_into(grid: Grid, src: &[f32], dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = grid.apply(v));
}

/// [`quantize_into`] of rows of `width` values: `src` (whole rows) into `dst`, row r at `r·stride`.
/// One call per plane instead of one per row: a multiversioned call costs as much as quantizing a
/// short row.
#[multiversion(targets = "simd")]
pub fn quantize_rows(grid: Grid, src: &[f32], (dst, width, stride): (&mut [f32], usize, usize)) {
    for (r, row) in src.chunks_exact(width).enumerate() {
        let out = &mut dst[r * stride..r * stride + width];
        out.iter_mut().zip(row).for_each(|(d, &v)| *d = grid.apply(v));
    }
}

/// [`quantize_into`] for an output buffer that is being filled for the first time.
#[multiversion(targets = "simd")]
fn quantize_uninit(grid: Grid, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| _ = d.write(grid.apply(v)));
}

/// The larger of two running maxima; a NaN, once seen, stays.
#[inline]
fn keep_max(m: f32, a: f32) -> f32 {
    if m.is_nan() || a <= m {
        m
    } else {
        a
    }
}

/// max|v| with 32 running maxima so that the loop vectorises (NaN-preserving).
#[multiversion(targets = "simd")]
pub(crate) fn max_abs_slice(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 32];
    let chunks = v.chunks_exact(32);
    let tail = chunks.remainder().iter().fold(0f32, |m, &x| keep_max(m, x.abs()));
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = keep_max(*m, x.abs());
        }
    }
    lanes.iter().fold(tail, |m, &x| keep_max(m, x))
}

/// `v.round()` in a form the generic x86-64 target vectorises (`round` is a libm call there, and a
/// saturating `as i32` is scalar code with NaN checks): floor(|v| + the largest float below ½), with
/// floor from the 2^23 trick (adding and subtracting 2^23 rounds to an integer; one step back if that
/// went up), and v's sign. Exact for |v| < 2^22; here |v| is at most the grid's levels (< 2^15). A NaN
/// stays a NaN, so a diverging run is not hidden.
#[inline]
fn round_half_away(v: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let t = v.abs() + 0.49999997;
    let r = (t + TWO_23) - TWO_23;
    let floor = if r > t { r - 1.0 } else { r };
    floor.copysign(v)
}

/// Fake-quantizes contiguous f32 `x` on the CPU with one scale (shape (1)) or one per leading index.
pub fn fake_quant_cpu(x: &Tensor, scale: &Tensor, levels: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&scale.flatten_all()?.contiguous()?, FakeQuant { levels: levels as f32 })
}

/// max|x| per group of the leading dimension, in one parallel pass (NaN wins, so that a diverging
/// run is not hidden behind a finite scale).
/// max|v| over a slice, in parallel chunks (NaN-propagating like [`max_abs_cpu`]).
pub(crate) fn max_abs_par(v: &[f32]) -> f32 {
    v.par_chunks(16 * 1024).map(max_abs_slice).reduce(|| 0.0, keep_max)
}

pub fn max_abs_cpu(x: &Tensor, groups: usize) -> Result<Tensor> {
    let n = x.elem_count();
    if groups == 0 || !n.is_multiple_of(groups) {
        candle_core::bail!("max_abs: {n} values cannot be split into {groups} groups");
    }
    const CHUNK: usize = 16 * 1024;
    let out: Vec<f32> = super::with_slices([x], |[data]| {
        data.par_chunks(n / groups).map(|g| g.par_chunks(CHUNK).map(max_abs_slice).reduce(|| 0.0, keep_max)).collect()
    })?;
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

        #[test]
        fn fast_round_is_exact_at_and_near_halves(i in -40000i32..40000) {
            for v in [i as f32 + 0.5, i as f32 - 0.5, i as f32, (i as f32 + 0.5).next_up(), (i as f32 + 0.5).next_down()] {
                prop_assert_eq!(round_half_away(v), v.round(), "{}", v);
            }
        }
    }

    #[test]
    fn halves_round_away_from_zero() {
        for v in [0.5f32, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 0.0] {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }
}
