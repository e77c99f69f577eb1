//! Batch norm in training mode (optionally fused with the ReLU that follows), with its own backward, on
//! the CPU. candle's composite version reduces over a transposed copy and makes several passes per op;
//! here statistics take one parallel pass per channel and the backward two.

use super::{slice, with_slices, written};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// (N, C, H·W) of an NCHW layout.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() != 4 {
        candle_core::bail!("batch norm expects NCHW, got {d:?}");
    }
    Ok((d[0], d[1], d[2] * d[3]))
}

/// Per-channel statistics of one plane set: the planes of channel `c` over the batch.
fn planes<'a>(x: &'a [f32], (n, c, p): (usize, usize, usize), ch: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
    (0..n).map(move |i| &x[(i * c + ch) * p..(i * c + ch + 1) * p])
}

/// Sums `f` over the elements of three equally long slices, as two totals. The 32 independent partial
/// sums let the loop vectorise: a single running f32 sum is bound by the latency of each add (4x
/// slower here), and an f64 one by that and the conversions. Compiled for the CPU's SIMD extensions.
#[multiversion(targets = "simd")]
pub(crate) fn lane_sums(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> (f32, f32)) -> (f64, f64) {
    const LANES: usize = 32;
    let (mut s, mut t) = ([0f32; LANES], [0f32; LANES]);
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for j in 0..LANES {
            let (u, v) = f(x[j], y[j], z[j]);
            s[j] += u;
            t[j] += v;
        }
    }
    let (mut u_total, mut v_total) = (0f64, 0f64);
    for ((&x, &y), &z) in ra.iter().zip(rb).zip(rc) {
        let (u, v) = f(x, y, z);
        u_total += u as f64;
        v_total += v as f64;
    }
    (u_total + tree_sum(s), v_total + tree_sum(t))
}

/// The sum of 32 partial sums, in f64, added pairwise: the compiler keeps a left-to-right sum in order
/// (a chain of 31 dependent additions, ~130 cycles), which cost more than the loop itself on the
/// 64- and 256-value planes of the 8x8 and 16x16 maps.
#[inline(always)]
fn tree_sum(partial: [f32; 32]) -> f64 {
    let mut v = partial.map(f64::from);
    let mut width = v.len() / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

/// Per-channel mean and biased variance of NCHW data with dims `d` = (N, C, H·W).
pub(crate) fn moments(x: &[f32], d: (usize, usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let count = (d.0 * d.2) as f64;
    (0..d.1)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = planes(x, d, ch).map(|p| lane_sums(p, p, p, |v, _, _| (v, 0.0)).0).sum();
            let mean = sum / count;
            let m = mean as f32;
            let sq: f64 = planes(x, d, ch).map(|p| lane_sums(p, p, p, |v, _, _| ((v - m) * (v - m), 0.0)).0).sum();
            (mean as f32, (sq / count) as f32)
        })
        .unzip()
}

/// (mean, sum of squared deviations) of each channel plane of one image's `p`-value planes.
pub(crate) fn image_moments(image: &[f32], p: usize) -> Vec<(f64, f64)> {
    image
        .chunks_exact(p)
        .map(|plane| {
            let mean = lane_sums(plane, plane, plane, |v, _, _| (v, 0.0)).0 / p as f64;
            let m = mean as f32;
            (mean, lane_sums(plane, plane, plane, |v, _, _| ((v - m) * (v - m), 0.0)).0)
        })
        .collect()
}

/// Per-channel mean and biased variance of a batch from each image's [`image_moments`] (`p` values per
/// channel and image), merged exactly: M2 = Σ M2ᵢ + p·Σ (meanᵢ − mean)² (Chan et al. 1979).
pub(crate) fn merge_moments(per_image: &[Vec<(f64, f64)>], c: usize, p: usize) -> (Vec<f32>, Vec<f32>) {
    let n = per_image.len() as f64;
    (0..c)
        .map(|ch| {
            let mean = per_image.iter().map(|m| m[ch].0).sum::<f64>() / n;
            let m2: f64 = per_image.iter().map(|m| m[ch].1 + p as f64 * (m[ch].0 - mean).powi(2)).sum();
            (mean as f32, (m2 / (n * p as f64)) as f32)
        })
        .unzip()
}

/// `relu?(γ·(x − μ)·σ⁻¹ + β)` per channel of NCHW data with dims (N, C, H·W), or with a residual
/// `relu(γ·(x − μ)·σ⁻¹ + β + residual)`.
pub(crate) fn normalize(
    x: &[f32],
    d: (usize, usize, usize),
    stats: &Stats,
    (gamma, beta): (&[f32], &[f32]),
    residual: Option<&[f32]>,
) -> Vec<f32> {
    affine_planes(x, (d.1, d.2), |ch| stats.affine(ch, gamma, beta), stats.relu, residual)
}

/// `relu?(x·a + b [+ residual])` with (a, b) = `coefficients(channel)`, over NCHW data of `c` channels of
/// `p` values.
fn affine_planes(
    x: &[f32],
    (c, p): (usize, usize),
    coefficients: impl Fn(usize) -> (f32, f32) + Sync,
    relu: bool,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    written(x.len(), |y| {
        y.par_chunks_mut(p).zip(x.par_chunks(p)).enumerate().for_each(|(i, (yp, xp))| {
            affine_row(yp, xp, residual.map(|r| &r[i * p..(i + 1) * p]), coefficients(i % c), relu)
        })
    })
}

/// `dst = relu?(src·a + b)`, or `relu?(src·a + b + residual)`. Compiled for the CPU's SIMD extensions.
#[multiversion(targets = "simd")]
pub(crate) fn affine_row(
    dst: &mut [MaybeUninit<f32>],
    src: &[f32],
    residual: Option<&[f32]>,
    (a, b): (f32, f32),
    relu: bool,
) {
    // Not f32::max, which would turn a NaN into 0 and hide a diverging run.
    let relu = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
    match residual {
        Some(r) => dst.iter_mut().zip(src.iter().zip(r)).for_each(|(d, (&x, &r))| _ = d.write(relu(x * a + b + r))),
        None => dst.iter_mut().zip(src).for_each(|(d, &x)| _ = d.write(relu(x * a + b))),
    }
}

/// `dst = s·g` where the ReLU's output `y` is positive (everywhere without a ReLU), 0 elsewhere.
/// Compiled for the CPU's SIMD extensions.
#[multiversion(targets = "simd")]
pub(crate) fn masked_row(dst: &mut [f32], (g, y): (&[f32], &[f32]), s: f32, relu: bool) {
    dst.iter_mut().zip(g.iter().zip(y)).for_each(|(d, (&g, &y))| *d = if relu && y <= 0.0 { 0.0 } else { g * s });
}

/// 1/√(var + eps) per channel.
pub(crate) fn invstd(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect()
}

/// The batch statistics a training batch norm normalised with, and whether a ReLU followed.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub mean: Vec<f32>,
    pub invstd: Vec<f32>,
    pub relu: bool,
}

impl Stats {
    /// Channel `ch`'s (a, b) of the normalisation `x·a + b`: a = γ·σ⁻¹, b = β − μ·a. [`normalize`] and
    /// [`Relu::Input`] both take them from here, so that the backward's recomputed ReLU decisions are
    /// the forward's, bit for bit.
    pub fn affine(&self, ch: usize, gamma: &[f32], beta: &[f32]) -> (f32, f32) {
        let scale = gamma[ch] * self.invstd[ch];
        (scale, beta[ch] - self.mean[ch] * scale)
    }
}

/// Where the backward learns which outputs the ReLU passed (those > 0), when there is a ReLU.
#[derive(Clone, Copy)]
pub(crate) enum Relu<'a> {
    /// From the forward output: needed where the ReLU followed a residual join.
    Output(&'a [f32]),
    /// Recomputed from the batch norm's input as `x·a + b > 0`, with each channel's (a, b) from
    /// [`Stats::affine`]: the forward's own decisions, and one plane fewer to read from memory per
    /// pass.
    Input(&'a [(f32, f32)]),
}

/// Whether the gradient passes a ReLU whose output is `y` (or had a pre-activation of `y`): not where
/// it is ≤ 0. A NaN passes, as the forward kept it.
#[inline]
fn passes(y: f32) -> bool {
    y > 0.0 || y.is_nan()
}

/// Per channel: Σ dy' and Σ dy'·x̂ (dy' = dy masked by the ReLU, as `relu` says), and dy' itself when
/// `want_masked` (the gradient of a residual join's shortcut). Images are summed in parallel and
/// merged in image order, so the sums do not depend on scheduling; dy' is written in the same pass
/// that reads dy for the sums.
pub(crate) fn grad_sums(
    (dy, x): (&[f32], &[f32]),
    relu: Relu,
    d: (usize, usize, usize),
    stats: &Stats,
    want_masked: bool,
) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let (_, c, p) = d;
    let image = |n: usize, mut masked: Option<&mut [MaybeUninit<f32>]>| -> Vec<(f64, f64)> {
        (0..c)
            .map(|ch| {
                let at = (n * c + ch) * p..(n * c + ch + 1) * p;
                let (g, xp) = (&dy[at.clone()], &x[at.clone()]);
                let m = stats.mean[ch];
                // The ReLU's mask as (the plane it is read from, the map from its values to y).
                let (yp, (a, b)) = match relu {
                    Relu::Output(y) => (&y[at], (1.0, 0.0)),
                    Relu::Input(affine) => (xp, affine[ch]),
                };
                if let Some(mk) = masked.as_deref_mut() {
                    let mk = &mut mk[ch * p..(ch + 1) * p];
                    mk.iter_mut()
                        .zip(g.iter().zip(yp))
                        .for_each(|(mk, (&g, &y))| _ = mk.write(if passes(y * a + b) { g } else { 0.0 }));
                }
                let (sum, sum_x) = match relu {
                    _ if !stats.relu => lane_sums(g, xp, xp, |g, x, _| (g, g * (x - m))),
                    Relu::Output(_) => lane_sums(g, xp, yp, |g, x, y| {
                        let g = if passes(y) { g } else { 0.0 };
                        (g, g * (x - m))
                    }),
                    Relu::Input(_) => lane_sums(g, xp, xp, |g, x, _| {
                        let g = if passes(x * a + b) { g } else { 0.0 };
                        (g, g * (x - m))
                    }),
                };
                (sum, sum_x * stats.invstd[ch] as f64)
            })
            .collect()
    };
    let mut masked = None;
    let per_image: Vec<Vec<(f64, f64)>> = if want_masked {
        let mut per_image = Vec::new();
        masked = Some(written(dy.len(), |m| {
            per_image = m.par_chunks_mut(c * p).enumerate().map(|(n, m)| image(n, Some(m))).collect()
        }));
        per_image
    } else {
        (0..d.0).into_par_iter().map(|n| image(n, None)).collect()
    };
    let (sum_dy, sum_dy_xhat) = (0..c)
        .map(|ch| per_image.iter().fold((0f64, 0f64), |(a, b), m| (a + m[ch].0, b + m[ch].1)))
        .unzip::<_, _, Vec<_>, Vec<_>>();
    let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (narrow(sum_dy), narrow(sum_dy_xhat), masked)
}

/// dx = γ·σ⁻¹·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M) of image `n`, into `dx` (C·H·W values), with the sums from
/// [`grad_sums`] (dy' = dy masked by the ReLU, as `relu` says).
#[allow(clippy::too_many_arguments)]
pub(crate) fn image_input_grad(
    n: usize,
    (dy, x): (&[f32], &[f32]),
    relu: Relu,
    d: (usize, usize, usize),
    stats: &Stats,
    gamma: &[f32],
    (sum_dy, sum_dy_xhat): (&[f32], &[f32]),
    dx: &mut [f32],
) {
    let (_, c, p) = d;
    let m = (d.0 * p) as f32;
    for (ch, dxp) in dx.chunks_exact_mut(p).enumerate() {
        let (mean, is) = (stats.mean[ch], stats.invstd[ch]);
        let (s1, s2, k) = (sum_dy[ch] / m, sum_dy_xhat[ch] / m, gamma[ch] * is);
        let at = (n * c + ch) * p..(n * c + ch + 1) * p;
        let (g, xp) = (&dy[at.clone()], &x[at.clone()]);
        let coefficients = (mean, is, k, s1, s2);
        match relu {
            _ if !stats.relu => input_grad_row(dxp, (g, xp, xp), coefficients, (1.0, f32::INFINITY)),
            Relu::Output(y) => input_grad_row(dxp, (g, xp, &y[at]), coefficients, (1.0, 0.0)),
            Relu::Input(affine) => input_grad_row(dxp, (g, xp, xp), coefficients, affine[ch]),
        }
    }
}

/// One plane of [`image_input_grad`]: `dx = k·(g′ − s1 − (x − mean)·is·s2)`, g′ the gradient where the
/// ReLU passed it: where `y·a + b` is not ≤ 0, `y` the output plane (a, b = 1, 0) or the input plane
/// itself (the forward's affine). b = ∞ passes everything (no ReLU). Compiled for the CPU's SIMD
/// extensions.
#[multiversion(targets = "simd")]
fn input_grad_row(
    dx: &mut [f32],
    (dy, x, y): (&[f32], &[f32], &[f32]),
    (mean, is, k, s1, s2): (f32, f32, f32, f32, f32),
    (a, b): (f32, f32),
) {
    for ((d, &gy), (&xv, &yv)) in dx.iter_mut().zip(dy).zip(x.iter().zip(y)) {
        let gy = if passes(yv * a + b) { gy } else { 0.0 };
        *d = k * (gy - s1 - (xv - mean) * is * s2);
    }
}

/// Mean and biased variance per channel, as a (2, C) tensor, differentiable.
struct Moments;

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "qat-bn-moments"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (mut mean, var) = moments(slice(s, l, "input")?, dims(l)?);
        mean.extend(var);
        Ok((CpuStorage::F32(mean), Shape::from((2, l.dims()[1]))))
    }

    /// d mean/dx = 1/M, d var/dx = 2(x − mean)/M, in one pass.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mean = res.get(0)?.to_vec1::<f32>()?;
        let grad = grad.to_vec2::<f32>()?;
        let op = MomentsGrad { mean, g_mean: grad[0].clone(), g_var: grad[1].clone() };
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The input gradient of [`Moments`].
struct MomentsGrad {
    mean: Vec<f32>,
    g_mean: Vec<f32>,
    g_var: Vec<f32>,
}

impl CustomOp1 for MomentsGrad {
    fn name(&self) -> &'static str {
        "qat-bn-moments-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "input")?;
        let (n, c, p) = dims(l)?;
        let m = (n * p) as f32;
        let dx = written(x.len(), |dx| {
            dx.par_chunks_mut(p).zip(x.par_chunks(p)).enumerate().for_each(|(i, (dp, xp))| {
                let ch = i % c;
                let (mean, a, b) = (self.mean[ch], 2.0 * self.g_var[ch] / m, self.g_mean[ch] / m);
                dp.iter_mut().zip(xp).for_each(|(d, &x)| _ = d.write((x - mean) * a + b));
            })
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// The batch norm backward over slices: (dx, dγ, dβ).
pub(crate) fn backward(
    (dy, x, y): (&[f32], &[f32], &[f32]),
    d: (usize, usize, usize),
    stats: &Stats,
    gamma: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (sum_dy, sum_dy_xhat, _) = grad_sums((dy, x), Relu::Output(y), d, stats, false);
    let image = d.1 * d.2;
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(image).enumerate().for_each(|(n, dxn)| {
        image_input_grad(n, (dy, x), Relu::Output(y), d, stats, gamma, (&sum_dy, &sum_dy_xhat), dxn)
    });
    (dx, sum_dy_xhat, sum_dy)
}

/// Training-mode batch norm with fixed batch statistics (computed by [`Moments`] from the same input),
/// `relu` fused. Inputs: x, gamma, beta.
struct BnTrain(Stats);

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "qat-bn-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "batch norm input")?;
        let (gamma, beta) = (slice(s2, l2, "batch norm gamma")?, slice(s3, l3, "batch norm beta")?);
        let y = normalize(x, dims(l1)?, &self.0, (gamma, beta), None);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.layout())?;
        let (dx, dgamma, dbeta) =
            with_slices([dy, x, y, gamma], |[dy, x, y, gamma]| backward((dy, x, y), d, &self.0, gamma))?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, d.1, dev)?),
            Some(Tensor::from_vec(dbeta, d.1, dev)?),
        ))
    }
}

/// Per-channel mean and biased variance of f32 NCHW `x` on the CPU, each shaped (C), differentiable.
pub fn moments_cpu(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = x.contiguous()?.apply_op1(Moments)?;
    Ok((m.get(0)?, m.get(1)?))
}

/// Training batch norm (+ ReLU) on the CPU; returns the output and the batch mean and variance.
pub fn batch_norm_train_cpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let m = x.apply_op1_no_bwd(&Moments)?;
    let (mean, var) = (m.get(0)?, m.get(1)?);
    let stats = Stats { mean: mean.to_vec1::<f32>()?, invstd: invstd(&var.to_vec1::<f32>()?, eps), relu };
    let y = x.apply_op3(gamma, beta, BnTrain(stats))?;
    Ok((y, mean, var))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use proptest::prelude::*;

    proptest! {
        /// The ReLU decisions the backward recomputes from the batch norm's input ([`Relu::Input`]) are
        /// the forward's, element by element, also where the pre-activation is 0 or rounds to it.
        #[test]
        fn recomputed_relu_decisions_are_the_forwards(
            p in 1usize..50,
            gamma in -3f32..3.0,
            beta in -2f32..2.0,
            seed in 0u64..1000,
        ) {
            let (n, c) = (2, 2);
            // Values on a coarse grid, so that many equal the mean or sit at the ReLU's edge.
            let x: Vec<f32> = (0..n * c * p).map(|i| (((i as u64 * 2654435761 + seed * 40503) % 17) as f32 - 8.0) / 4.0).collect();
            let (mean, var) = moments(&x, (n, c, p));
            let stats = Stats { invstd: invstd(&var, 1e-5), mean, relu: true };
            let (gammas, betas) = ([gamma, 1.0], [beta, 0.0]);
            let y = normalize(&x, (n, c, p), &stats, (&gammas, &betas), None);
            for (i, (&xv, &yv)) in x.iter().zip(&y).enumerate() {
                let (a, b) = stats.affine(i / p % c, &gammas, &betas);
                prop_assert_eq!(passes(yv), passes(xv * a + b), "element {}: x {} y {}", i, xv, yv);
            }
        }

        /// Per-image moments merged (Chan) equal the two-pass moments of the whole batch, also for data
        /// far from zero, where a sum of squares would cancel.
        #[test]
        fn merged_image_moments_equal_batch_moments(
            (n, c, p) in (1usize..5, 1usize..4, 1usize..40),
            offset in -1000f32..1000.0,
            seed in 0u64..1000,
        ) {
            let x: Vec<f32> = (0..n * c * p)
                .map(|i| offset + (((i as u64 * 2654435761 + seed * 40503) % 1000) as f32 / 100.0))
                .collect();
            let per_image: Vec<_> = x.chunks_exact(c * p).map(|image| image_moments(image, p)).collect();
            let (mean, var) = merge_moments(&per_image, c, p);
            let (mean2, var2) = moments(&x, (n, c, p));
            for ch in 0..c {
                prop_assert!((mean[ch] - mean2[ch]).abs() <= 1e-5 * (1.0 + mean2[ch].abs()));
                prop_assert!((var[ch] - var2[ch]).abs() <= 1e-4 * (1.0 + var2[ch]), "{} vs {}", var[ch], var2[ch]);
            }
        }
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> =
            (0..n).map(|i| (((i as u64 * 2654435761 + seed * 40503) % 1000) as f32 / 300.0) - 1.2).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// candle's own ops: the reference.
    fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Tensor {
        let c = x.dim(1).unwrap();
        let flat = x.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let mean = flat.mean(D::Minus1).unwrap();
        let var = flat.broadcast_sub(&mean.reshape((c, 1)).unwrap()).unwrap().sqr().unwrap().mean(D::Minus1).unwrap();
        let xhat = x
            .broadcast_sub(&mean.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap().reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        let y = xhat
            .broadcast_mul(&gamma.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_reference_values_and_gradients() {
        for (shape, relu) in [([4, 3, 5, 5], false), ([2, 5, 3, 7], true), ([7, 2, 1, 1], true), ([1, 4, 6, 6], false)]
        {
            let x = Var::from_tensor(&rand(&shape, 1)).unwrap();
            let gamma = Var::from_tensor(&rand(&[shape[1]], 2)).unwrap();
            let beta = Var::from_tensor(&rand(&[shape[1]], 3)).unwrap();
            let (ours, mean, var) =
                batch_norm_train_cpu(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5, relu).unwrap();
            let refr = reference(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), relu);
            assert!(max_diff(&ours, &refr) < 1e-4, "forward {shape:?}");
            let flat = x.as_tensor().transpose(0, 1).unwrap().flatten_from(1).unwrap();
            assert!(max_diff(&mean, &flat.mean(D::Minus1).unwrap()) < 1e-5);
            assert!(var.min(0).unwrap().to_scalar::<f32>().unwrap() >= 0.0);
            let up = rand(&shape, 4);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (refr * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &gamma, &beta] {
                let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(d < 2e-3, "gradient {shape:?} relu={relu}: {d}");
            }
        }
    }
}

#[cfg(test)]
mod moment_tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn moments_gradient_matches_candle_composite() {
        let data: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| ((i * 37 % 23) as f32 / 7.0) - 1.5).collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (2, 3, 4, 5), &Device::Cpu).unwrap()).unwrap();
        let (m, v) = moments_cpu(x.as_tensor()).unwrap();
        let loss = ((m * 3.0).unwrap().sum_all().unwrap() + v.sqr().unwrap().sum_all().unwrap()).unwrap();
        let g1 = loss.backward().unwrap();
        let flat = x.as_tensor().transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let m2 = flat.mean(D::Minus1).unwrap();
        let v2 = flat.broadcast_sub(&m2.reshape((3, 1)).unwrap()).unwrap().sqr().unwrap().mean(D::Minus1).unwrap();
        let loss2 = ((m2 * 3.0).unwrap().sum_all().unwrap() + v2.sqr().unwrap().sum_all().unwrap()).unwrap();
        let g2 = loss2.backward().unwrap();
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}

/// `y = x·scale[c] + shift[c]`, then a ReLU when `relu`; differentiable in all three. Inputs: x (NCHW),
/// scale (C), shift (C).
struct ChannelAffine {
    relu: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "qat-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "channel affine input")?;
        let scale = slice(s2, l2, "channel affine scale")?;
        let shift = slice(s3, l3, "channel affine shift")?;
        let (_, c, p) = dims(l1)?;
        let y = affine_planes(x, (c, p), |ch| (scale[ch], shift[ch]), self.relu, None);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dy = if self.relu { dy.apply_op2_no_bwd(y, &ReluGrad)? } else { dy };
        let c = scale.dim(0)?;
        let sums = dy.apply_op2_no_bwd(x, &AffineGradSums)?;
        let dshift = sums.get(0)?;
        let dscale = sums.get(1)?;
        let zeros = Tensor::zeros(c, scale.dtype(), scale.device())?;
        let dx = dy.apply_op3_no_bwd(scale, &zeros, &ChannelAffine { relu: false })?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

/// Per channel: Σ dy and Σ dy·x, as a (2, C) tensor.
struct AffineGradSums;

impl candle_core::CustomOp2 for AffineGradSums {
    fn name(&self) -> &'static str {
        "qat-affine-grad-sums"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = slice(s1, l1, "channel affine gradient")?;
        let x = slice(s2, l2, "channel affine input")?;
        let d = dims(l2)?;
        let sums: Vec<(f32, f32)> = (0..d.1)
            .into_par_iter()
            .map(|ch| {
                let (mut a, mut b) = (0f64, 0f64);
                for (g, xp) in planes(dy, d, ch).zip(planes(x, d, ch)) {
                    let (u, v) = lane_sums(g, xp, xp, |g, x, _| (g, g * x));
                    a += u;
                    b += v;
                }
                (a as f32, b as f32)
            })
            .collect();
        let mut out: Vec<f32> = sums.iter().map(|s| s.0).collect();
        out.extend(sums.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, d.1))))
    }
}

/// `x·scale[c] + shift[c]` (then a ReLU when `relu`) on f32 NCHW `x` on the CPU, differentiable.
pub fn channel_affine_cpu(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, ChannelAffine { relu })
}

#[cfg(test)]
mod affine_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn channel_affine_matches_broadcast_ops_with_gradients() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..3 * 2 * 3 * 4).map(|i| ((i * 31 % 17) as f32 / 5.0) - 1.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (3, 2, 3, 4), &dev).unwrap()).unwrap();
        let a = Var::new(&[0.5f32, -2.0], &dev).unwrap();
        let b = Var::new(&[1.0f32, 0.25], &dev).unwrap();
        let up = Tensor::arange(0f32, 72.0, &dev).unwrap().reshape((3, 2, 3, 4)).unwrap();
        for relu in [false, true] {
            let ours = channel_affine_cpu(x.as_tensor(), a.as_tensor(), b.as_tensor(), relu).unwrap();
            let refr = x
                .as_tensor()
                .broadcast_mul(&a.as_tensor().reshape((1, 2, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, 2, 1, 1)).unwrap())
                .unwrap();
            let refr = if relu { refr.relu().unwrap() } else { refr };
            let diff = |p: &Tensor, q: &Tensor| {
                (p - q).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&ours, &refr) < 1e-6);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (refr * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &a, &b] {
                assert!(diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-3);
            }
        }
    }
}

/// `relu(a + b)` in one pass (the residual join), NaN-propagating like PyTorch's so that a diverging
/// run shows up in its loss. Backward: the incoming gradient where the output is positive, to both.
struct AddRelu;

impl candle_core::CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "qat-add-relu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "add_relu lhs")?;
        let b = slice(s2, l2, "add_relu rhs")?;
        if a.len() != b.len() {
            candle_core::bail!("add_relu: shapes differ ({:?} vs {:?})", l1.dims(), l2.dims());
        }
        let y = written(a.len(), |y| {
            y.par_chunks_mut(16 * 1024).zip(a.par_chunks(16 * 1024).zip(b.par_chunks(16 * 1024))).for_each(
                |(yc, (ac, bc))| {
                    for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
                        let v = a + b;
                        y.write(if v < 0.0 { 0.0 } else { v });
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op2_no_bwd(y, &ReluGrad)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// The gradient where the forward output is positive.
struct ReluGrad;

impl candle_core::CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "qat-relu-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, y) = (slice(s1, l1, "relu gradient")?, slice(s2, l2, "relu output")?);
        Ok((CpuStorage::F32(relu_grad(g, y)), l1.shape().clone()))
    }
}

/// The gradient `g` where the ReLU's output `y` is positive, zero elsewhere.
fn relu_grad(g: &[f32], y: &[f32]) -> Vec<f32> {
    written(g.len(), |d| {
        d.par_chunks_mut(16 * 1024).zip(g.par_chunks(16 * 1024).zip(y.par_chunks(16 * 1024))).for_each(
            |(dc, (gc, yc))| {
                for ((d, &g), &y) in dc.iter_mut().zip(gc).zip(yc) {
                    d.write(if y > 0.0 { g } else { 0.0 });
                }
            },
        )
    })
}

/// The option-A shortcut of a downsampling residual block (He et al. 2016): every `stride`-th pixel of
/// the C input channels, then zero channels up to `out_ch`. One pass each way (as candle ops it is two
/// index_selects and a cat forward, and their scatter-adds and narrow backward).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subsample {
    pub stride: usize,
    pub out_ch: usize,
}

impl Subsample {
    /// Output (H, W) of an input plane of (h, w).
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.stride), w.div_ceil(self.stride))
    }
}

impl Subsample {
    /// The shortcut of NCHW `x` with dims (n, c, h, w).
    pub(crate) fn forward(&self, x: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
        let (oh, ow) = self.out_size(h, w);
        let (o, st) = (self.out_ch, self.stride);
        written(n * o * oh * ow, |y| {
            y.par_chunks_mut(o * oh * ow).enumerate().for_each(|(i, yi)| {
                for (ch, plane) in yi.chunks_exact_mut(oh * ow).enumerate() {
                    if ch >= c {
                        plane.iter_mut().for_each(|v| _ = v.write(0.0));
                        continue;
                    }
                    let src = &x[(i * c + ch) * h * w..][..h * w];
                    for (oy, row) in plane.chunks_exact_mut(ow).enumerate() {
                        let src_row = &src[oy * st * w..][..w];
                        row.iter_mut().zip(src_row.iter().step_by(st)).for_each(|(d, &v)| _ = d.write(v));
                    }
                }
            })
        })
    }

    /// Adds the shortcut's gradient `g` into `dx`, the gradient of NCHW input of dims (n, c, h, w).
    pub(crate) fn add_backward(&self, g: &[f32], (_, c, h, w): (usize, usize, usize, usize), dx: &mut [f32]) {
        let (oh, ow) = self.out_size(h, w);
        let (o, st) = (self.out_ch, self.stride);
        dx.par_chunks_mut(c * h * w).enumerate().for_each(|(i, di)| {
            for (ch, plane) in di.chunks_exact_mut(h * w).enumerate() {
                let src = &g[(i * o + ch) * oh * ow..][..oh * ow];
                for (oy, row) in src.chunks_exact(ow).enumerate() {
                    let dst = &mut plane[oy * st * w..][..w];
                    dst.iter_mut().step_by(st).zip(row).for_each(|(d, &v)| *d += v);
                }
            }
        });
    }
}

impl CustomOp1 for Subsample {
    fn name(&self) -> &'static str {
        "qat-subsample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "shortcut input")?;
        let &[n, c, h, w] = l.dims() else { candle_core::bail!("shortcut expects NCHW, got {:?}", l.dims()) };
        let (oh, ow) = self.out_size(h, w);
        Ok((CpuStorage::F32(self.forward(x, (n, c, h, w))), Shape::from((n, self.out_ch, oh, ow))))
    }

    /// The gradient back on the sampled pixels of the input channels, zero elsewhere.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims4()?;
        let dx = with_slices([grad], |[g]| {
            let mut dx = vec![0f32; x.elem_count()];
            self.add_backward(g, dims, &mut dx);
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The option-A shortcut on the CPU for f32 NCHW `x`: every `stride`-th pixel, channels zero-padded to
/// `out_ch` (≥ C), differentiable.
pub fn subsample_cpu(x: &Tensor, stride: usize, out_ch: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Subsample { stride, out_ch })
}

/// `relu(a + b)` for two f32 tensors of the same shape on the CPU, differentiable.
pub fn add_relu_cpu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

#[cfg(test)]
mod add_relu_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_and_propagates_nan() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, -2.0, 0.5, 3.0], &dev).unwrap();
        let b = Var::new(&[-0.5f32, 1.0, -1.0, 1.0], &dev).unwrap();
        let y = add_relu_cpu(a.as_tensor(), b.as_tensor()).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.5, 0.0, 0.0, 4.0]);
        let up = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap();
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 4.0]);
        assert_eq!(g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 4.0]);
        let nan = add_relu_cpu(&Tensor::new(&[f32::NAN], &dev).unwrap(), &Tensor::new(&[1f32], &dev).unwrap()).unwrap();
        assert!(nan.to_vec1::<f32>().unwrap()[0].is_nan());
    }
}
