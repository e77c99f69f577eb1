//! Winograd's minimal filtering F(2x2, 3x3) for the stride-1, padding-1 3x3 convolutions with 32+
//! channels (10 of ResNet-20's 19 convolutions): their forward, their input gradient (such a
//! convolution too) and their weight gradient.
//!
//! The direct kernel spends 9 multiply-adds per output, input channel and output channel; Winograd
//! (Lavin & Gray, 2016) computes each 2x2 block of outputs from its 4x4 block of input with 16, a
//! 2.25x cut, at the price of three cheap linear transforms:
//!
//! ```text
//! V[ξ][c][t] = (Bᵀ d_ct B)[ξ]        each input channel's 4x4 tile t, 16 values ξ
//! U[ξ][o][c] = (G g_oc Gᵀ)[ξ]        each 3x3 kernel, once per step
//! M[ξ][o][t] = Σ_c U[ξ][o][c] · V[ξ][c][t]   16 products (O×C)·(C×T), on the direct kernel
//! Y_ot       = Aᵀ M[·][o][t] A        each output tile's 2x2 outputs
//! ```
//!
//! The products carry nearly all the work and run on [`kernels::direct`] with one tap (its register
//! tiles and weight blocks unchanged); the transforms are additions only. The results agree with the
//! direct kernel's to float rounding (G's halves are exact in binary).
//!
//! The weight gradient is the same algorithm transposed ([`weight_from_products`]): per image, the
//! input's tiles transformed as above and dY's 2x2 tiles to 4x4, their products summed over tiles and
//! images by [`kernels::weight_grad`] (inner dimension: the tiles), and one final transform per batch.

use super::kernels::{self, LANES};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether a convolution of this shape runs on Winograd's transforms: 3x3, stride 1, padding 1, on
/// maps of even height and width (whole 2x2 output tiles), where the CPU has the direct kernel.
/// The transforms take 16 tiles per register, from rows of 4, 8 or a multiple of 16 tiles: maps 8,
/// 16 or a multiple of 32 wide, with a whole number of registers of tiles.
///
/// With fewer than [`MIN_CHANNELS`] channels on either side, each transformed value feeds too few
/// multiply-adds to pay for its transform: 16→16 channels on 32x32 maps measured 1.00x the direct
/// kernel, where 32→32 on 16x16 took 0.65x its time and 64→64 on 8x8 0.59x (one thread, per image).
pub(crate) fn applies(k: usize, stride: usize, pad: usize, (h, w): (usize, usize), (c, o): (usize, usize)) -> bool {
    let (th, tw) = (h / 2, w / 2);
    let rows_fit = w % 2 == 0 && (tw == 4 || tw == 8 || (tw > 0 && tw.is_multiple_of(LANES)));
    let shape = k == 3 && stride == 1 && pad == 1 && h % 2 == 0 && rows_fit && th > 0;
    shape && (th * tw).is_multiple_of(LANES) && c.min(o) >= MIN_CHANNELS && kernels::available()
}

/// The fewest input and output channels a convolution runs on Winograd's transforms with.
const MIN_CHANNELS: usize = 32;

/// Output rows of a product: O rounded up to the direct kernel's blocks.
fn output_rows(o: usize) -> usize {
    o.div_ceil(kernels::OB) * kernels::OB
}

/// Tiles per block of the forward: the transforms and products run block by block, so that the
/// scratch does not grow with the map (V and M of a whole 32-channel 32x32 image would take 1 MiB).
/// Blocks of 16 to 256 tiles measured within noise of each other on ResNet-20's maps.
const BLOCK: usize = 64;

/// Distance between the 16 matrices of V (C rows) or M (`rows` rows) of `tb` tiles: one register
/// more than their rows, so that the 16 values of a tile, stored or loaded together, fall into
/// different cache sets (rows of 2^k floats put them all in one set, where they evict each other).
pub(crate) fn matrix_stride(rows: usize, tb: usize) -> usize {
    rows * tb + LANES
}

/// Scratch values one block of `tb` tiles needs: V (16 matrices of C rows) and M (16 of O rows).
fn scratch_len((c, o): (usize, usize), tb: usize) -> usize {
    16 * (matrix_stride(c, tb) + matrix_stride(output_rows(o), tb))
}

thread_local! {
    /// Each thread's V and M, kept across calls: fresh buffers of this size (up to 512 KiB for
    /// ResNet-20) cost more in page faults and zeroing than the transforms themselves. Every value a
    /// product or transform reads is written first in the same call, so it is never cleared.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The OIHW 3x3 weight (O, C, 3, 3) transformed (U = G g Gᵀ) and laid out as 16 blocked weights of
/// one tap, one per ξ, as [`kernels::direct`] reads them.
pub(crate) fn weight(w: &[f32], (o, c): (usize, usize)) -> Vec<f32> {
    // U as (O, C, 16): each kernel's 16 values where OIHW has its 9.
    let mut u = vec![0f32; o * c * 16];
    for (kernel, out) in w.chunks_exact(9).zip(u.chunks_exact_mut(16)) {
        // G g (4 rows of 3: the kernel's rows combined), then each row's 3 values to 4 ((G g) Gᵀ).
        let g = |ky: usize, kx: usize| kernel[ky * 3 + kx];
        let gg: [[f32; 3]; 4] = [
            std::array::from_fn(|j| g(0, j)),
            std::array::from_fn(|j| 0.5 * (g(0, j) + g(1, j) + g(2, j))),
            std::array::from_fn(|j| 0.5 * (g(0, j) - g(1, j) + g(2, j))),
            std::array::from_fn(|j| g(2, j)),
        ];
        for ([a, b, c], dst) in gg.into_iter().zip(out.chunks_exact_mut(4)) {
            dst.copy_from_slice(&[a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]);
        }
    }
    let mut out = Vec::with_capacity(16 * output_rows(o) * c);
    for xi in 0..16 {
        let u_xi: Vec<f32> = u.chunks_exact(16).map(|kernel| kernel[xi]).collect();
        out.extend(kernels::blocked_weight(&u_xi, (o, c, 1)));
    }
    out
}

/// The convolution of one padded image: `xpad` holds C planes of `plane` values, rows `wp` = W + 1
/// wide, pixel (iy, ix) at (iy + 1)·wp + ix + 1 and zeros around (the stride-1 wide layout of
/// `conv::Shifted`, with at least one zero row below the bottom padding). Writes output channel o's
/// pixel (oy, ox) to `out[o·qstride + oy·wp + ox]`; `u` is [`weight`]'s.
pub(crate) fn forward(
    (xpad, plane, wp): (&[f32], usize, usize),
    (c, h, w): (usize, usize, usize),
    (u, o): (&[f32], usize),
    (out, qstride): (&mut [f32], usize),
) {
    assert!(wp == w + 1 && plane >= (h + 3) * wp && xpad.len() >= c * plane);
    let tb = BLOCK;
    let len = scratch_len((c, o), tb);
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        let (v, m) = scratch[..len].split_at_mut(16 * matrix_stride(c, tb));
        let tiles = tiles(h, w);
        for first in (0..tiles).step_by(tb) {
            let block = first..tiles.min(first + tb);
            products((xpad, plane, wp), (c, h, w), (u, o), (v, m), (out, qstride), (block, tb));
        }
    });
}

/// The outputs of the tiles `block` (at most `tb`), with V and M of `tb` tiles each.
fn products(
    (xpad, plane, wp): (&[f32], usize, usize),
    (c, h, w): (usize, usize, usize),
    (u, o): (&[f32], usize),
    (v, m): (&mut [f32], &mut [f32]),
    (out, qstride): (&mut [f32], usize),
    (block, tb): (std::ops::Range<usize>, usize),
) {
    let rows = output_rows(o);
    let (vs, ms, n) = (matrix_stride(c, tb), matrix_stride(rows, tb), block.len());
    // SAFETY (both transforms): `applies` (checked by the caller) found AVX-512F.
    unsafe { transform_tiles::<false>((xpad, plane, wp), (c, w), block.clone(), (v, tb)) };
    let weights = rows * c;
    for xi in 0..16 {
        // SAFETY: `applies` (checked by the caller) found AVX-512F.
        unsafe {
            kernels::direct(
                (&v[xi * vs..][..c * tb], tb, c),
                &[0],
                &u[xi * weights..(xi + 1) * weights],
                (&mut m[xi * ms..][..rows * tb], tb),
                n,
                None,
            )
        };
    }
    unsafe { output_transform((m, rows, tb), (o, h, w), block, (out, qstride, wp)) };
}

/// V = Bᵀ d B of every 4x4 tile d of `block` (rows and columns 2t .. 2t + 3 of the padded planes),
/// with Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], 16 tiles per register: each tile value `d[r][k]`
/// of a register's tiles is one permute of two loads (the even positions of a row, or of two rows).
///
/// With OUTPUT_GRAD, the weight gradient's transform of dY's 2x2 tiles instead, A dy Aᵀ (A = the
/// transpose of the output transform's Aᵀ), from dY laid out like the input (`xpad`): a tile's values
/// sit where the middle four of an input tile's do.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transform_tiles<const OUTPUT_GRAD: bool>(
    (xpad, plane, wp): (&[f32], usize, usize),
    (c, w): (usize, usize),
    block: std::ops::Range<usize>,
    (v, tb): (&mut [f32], usize),
) {
    let tw = w / 2;
    // The lowest and highest value a register's loads reach past its first tile's corner.
    let reach = 3 * wp
        + 3
        + LANES
        + if tw == 4 {
            6 * wp
        } else if tw == 8 {
            2 * wp
        } else {
            LANES
        };
    let vs = matrix_stride(c, tb);
    assert!(block.len().is_multiple_of(LANES) && block.len() <= tb && v.len() >= 15 * vs + c * tb);
    assert!(xpad.len() >= (c - 1) * plane + corner(block.end - LANES, tw, wp) + reach);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // Four tiles from each of two rows, in the low half.
    let four = _mm512_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22, 0, 0, 0, 0, 0, 0, 0, 0);
    for ci in 0..c {
        for t0 in block.clone().step_by(LANES) {
            // SAFETY: every load lies within `reach` of the corner (asserted above).
            let base = unsafe { xpad.as_ptr().add(ci * plane + corner(t0, tw, wp)) };
            let d = |r: usize, k: usize| unsafe {
                let p = base.add(r * wp + k);
                let load = |rows: usize| _mm512_loadu_ps(p.add(rows * wp));
                match tw {
                    4 => {
                        let (a, b) = (load(0), load(2));
                        let low = _mm512_permutex2var_ps(a, four, b);
                        let high = _mm512_permutex2var_ps(load(4), four, load(6));
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(low, high)
                    }
                    8 => _mm512_permutex2var_ps(load(0), even, load(2)),
                    _ => _mm512_permutex2var_ps(load(0), even, _mm512_loadu_ps(p.add(LANES))),
                }
            };
            let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
            if OUTPUT_GRAD {
                // A dy (rows p, p + r, p − r, −r of the tile's rows p and r), then each row (x, y)
                // to (x, x + y, x − y, −y).
                let (top, bottom) = ([d(1, 1), d(1, 2)], [d(2, 1), d(2, 2)]);
                let zero = _mm512_setzero_ps();
                let rows: [[__m512; 2]; 4] = [
                    top,
                    std::array::from_fn(|k| add(top[k], bottom[k])),
                    std::array::from_fn(|k| sub(top[k], bottom[k])),
                    std::array::from_fn(|k| sub(zero, bottom[k])),
                ];
                for (i, [x, y]) in rows.into_iter().enumerate() {
                    for (j, value) in [x, add(x, y), sub(x, y), sub(zero, y)].into_iter().enumerate() {
                        // SAFETY: as below.
                        let at = (4 * i + j) * vs + ci * tb + t0 - block.start;
                        unsafe { _mm512_storeu_ps(v.as_mut_ptr().add(at), value) };
                    }
                }
                continue;
            }
            let d: [[__m512; 4]; 4] = std::array::from_fn(|r| std::array::from_fn(|k| d(r, k)));
            // Down the columns (Bᵀ d), then along the rows ((Bᵀ d) B).
            let e: [[__m512; 4]; 4] = [
                std::array::from_fn(|k| sub(d[0][k], d[2][k])),
                std::array::from_fn(|k| add(d[1][k], d[2][k])),
                std::array::from_fn(|k| sub(d[2][k], d[1][k])),
                std::array::from_fn(|k| sub(d[1][k], d[3][k])),
            ];
            for (i, [e0, e1, e2, e3]) in e.into_iter().enumerate() {
                for (j, value) in [sub(e0, e2), add(e1, e2), sub(e2, e1), sub(e1, e3)].into_iter().enumerate() {
                    // SAFETY: 4i + j < 16, ci < C and t0 + 16 − block.start <= tb (asserted above).
                    let at = (4 * i + j) * vs + ci * tb + t0 - block.start;
                    unsafe { _mm512_storeu_ps(v.as_mut_ptr().add(at), value) };
                }
            }
        }
    }
}

/// The weight gradient's two transforms of one image, over all its `tiles` (see [`weight_from_products`]):
/// V of the padded input `xpad` and D of the output gradient `dypad`, laid out like it (both as
/// [`forward`] reads `xpad`, with C and O planes). Each is 16 matrices of its channels' rows of
/// `tiles` values, [`matrix_stride`] apart.
pub(crate) fn weight_grad_transforms(
    (xpad, dypad, plane, wp): (&[f32], &[f32], usize, usize),
    (c, o, w): (usize, usize, usize),
    tiles: usize,
    (v, d): (&mut [f32], &mut [f32]),
) {
    // SAFETY: `applies` (checked by the caller) found AVX-512F.
    unsafe {
        transform_tiles::<false>((xpad, plane, wp), (c, w), 0..tiles, (v, tiles));
        transform_tiles::<true>((dypad, plane, wp), (o, w), 0..tiles, (d, tiles));
    }
}

/// Tiles of an H x W map (2x2 outputs each).
pub(crate) fn tiles(h: usize, w: usize) -> usize {
    h / 2 * (w / 2)
}

/// The weight gradient from its Winograd products: `m` (O, C, 16) holds, for every pair of
/// channels, Σ over tiles of D ⊙ V (the transforms of dY's 2x2 tiles and of the input's 4x4 ones),
/// and dW = Gᵀ m G (3x3 each), returned OIHW. This is F(2x2, 3x3) transposed: the forward's
/// y = Aᵀ[(G g) ⊙ (Bᵀ d B)]A makes ∂y/∂g, summed against dY, Gᵀ[(A dY Aᵀ) ⊙ (Bᵀ d B)]G.
pub(crate) fn weight_from_products(m: &[f32]) -> Vec<f32> {
    let mut dw = vec![0f32; m.len() / 16 * 9];
    for (prod, out) in m.chunks_exact(16).zip(dw.chunks_exact_mut(9)) {
        // Gᵀ's rows combine M's rows: M0 + (M1 + M2)/2, (M1 − M2)/2, (M1 + M2)/2 + M3.
        let gt = |a: f32, b: f32, c: f32, d: f32| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
        let cols: [[f32; 3]; 4] = std::array::from_fn(|j| gt(prod[j], prod[4 + j], prod[8 + j], prod[12 + j]));
        for k in 0..3 {
            let row = gt(cols[0][k], cols[1][k], cols[2][k], cols[3][k]);
            out[k * 3..k * 3 + 3].copy_from_slice(&row);
        }
    }
    dw
}

/// Offset in a padded plane (rows `wp` wide) of tile t's top-left value: tile row t / tw, column t % tw.
fn corner(t: usize, tw: usize, wp: usize) -> usize {
    2 * (t / tw) * wp + 2 * (t % tw)
}

/// Y = Aᵀ M A of every tile, with Aᵀ = [1 1 1 0; 0 1 −1 −1], into the output grid: 16 tiles per
/// register, their 2x2 outputs interleaved into rows by two permutes per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn output_transform(
    (m, rows, tb): (&[f32], usize, usize),
    (o, h, w): (usize, usize, usize),
    block: std::ops::Range<usize>,
    (out, qstride, wp): (&mut [f32], usize, usize),
) {
    let tw = w / 2;
    let ms = matrix_stride(rows, tb);
    assert!(block.len().is_multiple_of(LANES) && block.len() <= tb && m.len() >= 15 * ms + rows * tb && o <= rows);
    assert!(out.len() >= (o - 1) * qstride + (h - 1) * wp + w);
    // The outputs of tiles 0..8 (low) and 8..16 (high): a tile's left value, then its right one.
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
    for oc in 0..o {
        for t0 in block.clone().step_by(LANES) {
            // SAFETY: ξ < 16, oc < rows and t0 + 16 − block.start <= tb (asserted above).
            let at = |xi: usize| unsafe { _mm512_loadu_ps(m.as_ptr().add(xi * ms + oc * tb + t0 - block.start)) };
            // Down the columns: the output's top row from M's rows 0 + 1 + 2, its bottom from 1 − 2 − 3.
            let s0: [__m512; 4] = std::array::from_fn(|j| add(add(at(j), at(4 + j)), at(8 + j)));
            let s1: [__m512; 4] = std::array::from_fn(|j| sub(sub(at(4 + j), at(8 + j)), at(12 + j)));
            let across = |s: [__m512; 4]| {
                let (left, right) = (add(add(s[0], s[1]), s[2]), sub(sub(s[1], s[2]), s[3]));
                [_mm512_permutex2var_ps(left, low, right), _mm512_permutex2var_ps(left, high, right)]
            };
            let (top, bottom) = (across(s0), across(s1));
            let ty0 = t0 / tw;
            // SAFETY: every store below writes output rows 2·ty0 .. 2·ty0 + 7 of channel oc within
            // the map's W columns (asserted above).
            unsafe {
                let dst = out.as_mut_ptr().add(oc * qstride + 2 * ty0 * wp + 2 * (t0 % tw));
                for (half, (t, b)) in top.into_iter().zip(bottom).enumerate() {
                    match tw {
                        // Tile rows ty0 + 2·half and the next, 8 outputs each.
                        4 => {
                            let row = dst.add(4 * half * wp);
                            let up = |v: __m512| _mm512_shuffle_f32x4::<0b11_10_11_10>(v, v);
                            _mm512_mask_storeu_ps(row, 0xFF, t);
                            _mm512_mask_storeu_ps(row.add(wp), 0xFF, b);
                            _mm512_mask_storeu_ps(row.add(2 * wp), 0xFF, up(t));
                            _mm512_mask_storeu_ps(row.add(3 * wp), 0xFF, up(b));
                        }
                        // Tile row ty0 + half, whole.
                        8 => {
                            let row = dst.add(2 * half * wp);
                            _mm512_storeu_ps(row, t);
                            _mm512_storeu_ps(row.add(wp), b);
                        }
                        _ => {
                            let row = dst.add(half * LANES);
                            _mm512_storeu_ps(row, t);
                            _mm512_storeu_ps(row.add(wp), b);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn transform_tiles<const OUTPUT_GRAD: bool>(
    _: (&[f32], usize, usize),
    _: (usize, usize),
    _: std::ops::Range<usize>,
    _: (&mut [f32], usize),
) {
    unreachable!("Winograd's transforms need AVX-512 (`applies` checks it)")
}

#[cfg(not(target_arch = "x86_64"))]
fn output_transform(
    _: (&[f32], usize, usize),
    _: (usize, usize, usize),
    _: std::ops::Range<usize>,
    _: (&mut [f32], usize, usize),
) {
    unreachable!("Winograd's transforms need AVX-512 (`applies` checks it)")
}
