//! Winograd's minimal filtering for the stride-1, padding-1 3x3 convolutions with 16+ channels (16 of
//! ResNet-20's 19 convolutions): their forward, their input gradient (such a convolution too) and
//! their weight gradient.
//!
//! The direct kernel spends 9 multiply-adds per output, input channel and output channel; Winograd
//! (Lavin & Gray, 2016) computes each m x m block of outputs from its (m + 2) x (m + 2) block of input
//! with (m + 2)² of them, at the price of three linear transforms:
//!
//! ```text
//! V[ξ][c][t] = (Bᵀ d_ct B)[ξ]        each input channel's tile t, (m + 2)² values ξ
//! U[ξ][o][c] = (G g_oc Gᵀ)[ξ]        each 3x3 kernel, once per step
//! M[ξ][o][t] = Σ_c U[ξ][o][c] · V[ξ][c][t]   (m + 2)² products (O×C)·(C×T), on the direct kernel
//! Y_ot       = Aᵀ M[·][o][t] A        each output tile's m x m outputs
//! ```
//!
//! F(4x4, 3x3) (m = 4): 36 multiply-adds per 4x4 outputs where the direct kernel spends 144. This
//! module first ran F(2x2, 3x3) (16 per 2x2 outputs, 2.25x fewer); F(4x4) has more work per
//! transformed value, which is what the 16-channel layers need: there F(2x2) measured 1.00x the
//! direct kernel and F(4x4) 0.59x its time (one thread, per image: 10.9 µs against 18.6). It
//! replaced F(2x2) on every ResNet-20 layer (forward, input gradient and weight gradient), and F(2x2)
//! was removed: it still applied only to maps 2 more than a multiple of 4 high, and to the weight
//! gradient of 8x8 maps whose channels are not in 16s (these now run the direct kernel and gemm).
//!
//! The forward takes a batch of images ([`batch`]): an 8x8 map has 4 tiles of 4x4, a 16x16 one 16,
//! and the products run on far more tiles at once (one thread, per image: 64→64 on 8x8 6.5 µs in
//! batches of 8 against 11.6 on F(2x2) one image at a time; 32→32 on 16x16 7.2 µs in batches of 4
//! against 10.1 alone).
//!
//! The products carry most of the work and run on [`kernels::direct`] with one tap (its register
//! tiles and weight blocks unchanged); the transforms are additions and a few multiplies by small
//! constants. The results agree with the direct kernel's to ~1e-5 of the output's scale (G's sixths,
//! and transforms that multiply by up to 8 and 25: 2e-4 on outputs up to 17 with 64 channels,
//! against float64), as other libraries' F(4x4, 3x3) in float32.
//!
//! The weight gradient is the same algorithm transposed ([`weight_from_products`]): per image, the
//! input's tiles transformed as above and dY's m x m tiles to (m + 2)², their products summed over
//! tiles and images, and one final transform per batch. Two layouts:
//! - tiles in the register lanes (the forward's transforms; [`weight_grad_in_lanes`]), the products
//!   on [`kernels::weight_grad`], which sums the lanes at the end of each call: the 32x32 maps, whose
//!   images have 64 tiles each;
//! - channels in the lanes ([`weight_grad_channels_last`]: where a call's transforms fit the L2), the
//!   input and dY transposed to channels-last per image, the products on [`kernels::direct`] with the tiles as
//!   its contraction (no sums across lanes). On the 8x8 maps (4 tiles an image) this took 64→64's
//!   dW from 1.55 (F(2x2), tiles in the lanes) to 0.91-0.97 ms a batch; one thread, per image:
//!   transposes 0.8 µs, transforms 1.4, products 4.7.

use super::conv::Geometry;
use super::kernels::{self, LANES};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Outputs per side of a tile.
const SIZE: usize = 4;

/// Values of a transformed tile (products per tile and channel pair): (SIZE + 2)².
pub(crate) const VALUES: usize = 36;

/// Tiles of an H x W map.
pub(crate) fn tiles(h: usize, w: usize) -> usize {
    h / SIZE * (w / SIZE)
}

/// Whether a convolution of this shape runs on Winograd's transforms (its forward and input
/// gradient): 3x3, stride 1, padding 1, where the map's tiles make whole groups of four (see
/// [`Maps`]): rows of 4k tiles (maps 16k wide, a multiple of 4 high), or 8 wide and a multiple of 8
/// high (2x2 blocks of tiles); with [`MIN_CHANNELS`] channels on either side, where the CPU has the
/// direct kernel.
pub(crate) fn applies(g: &Geometry) -> bool {
    let Geometry { k, stride, pad, h, w, c, o, .. } = *g;
    let shape = k == 3 && stride == 1 && pad == 1 && h > 0 && w > 0;
    let groups = (h % 4 == 0 && w.is_multiple_of(LANES)) || (w == 8 && h % 8 == 0);
    let registers = (batch(h, w) * tiles(h, w)).is_multiple_of(LANES);
    shape && groups && registers && c.min(o) >= MIN_CHANNELS && kernels::available()
}

/// Whether a weight gradient of this shape runs tiles in the lanes (where the channels-last one does
/// not: [`weight_grad_channels_last`]): where the forward does and an image has whole registers of
/// tiles (16k). It transforms one image at a time (no batch), and sums its products over the tiles
/// of a few images per call: the four tiles of an 8x8 image would make those calls too short for
/// its kernel.
pub(crate) fn weight_grad_in_lanes(g: &Geometry) -> bool {
    applies(g) && tiles(g.h, g.w).is_multiple_of(LANES)
}

/// The fewest input and output channels a convolution runs on Winograd's transforms with: ResNet-20's
/// fewest, where it measured 0.59x the direct kernel's time (fewer were not measured).
const MIN_CHANNELS: usize = 16;

/// Images per call of [`forward`] on maps of H x W: enough for a block of tiles (small maps have
/// few tiles an image, and the products want many), at most 8.
pub(crate) fn batch(h: usize, w: usize) -> usize {
    (BLOCK / tiles(h, w).max(1)).clamp(1, 8)
}

/// Output rows of a product: O rounded up to the direct kernel's blocks.
fn output_rows(o: usize) -> usize {
    o.div_ceil(kernels::OB) * kernels::OB
}

/// Tiles per block of the forward: the transforms and products run block by block, so that the
/// scratch does not grow with the map (V and M of a whole 32-channel 32x32 image would take 1 MiB).
/// Blocks of 16 to 256 tiles measured within noise of each other on ResNet-20's maps.
const BLOCK: usize = 64;

/// Distance between the 36 matrices of V (C rows) or M (`rows` rows) of `tb` tiles: one register
/// more than their rows, so that the 36 values of a tile, stored or loaded together, fall into
/// different cache sets (rows of 2^k floats put them all in one set, where they evict each other).
pub(crate) fn matrix_stride(rows: usize, tb: usize) -> usize {
    rows * tb + LANES
}

/// Scratch values one block of `tb` tiles needs: V (36 matrices of C rows) and M (36 of O rows).
fn scratch_len((c, o): (usize, usize), tb: usize) -> usize {
    VALUES * (matrix_stride(c, tb) + matrix_stride(output_rows(o), tb))
}

thread_local! {
    /// Each thread's V and M, kept across calls: fresh buffers of this size (up to 512 KiB for
    /// ResNet-20) cost more in page faults and zeroing than the transforms themselves. Every value a
    /// product or transform reads is written first in the same call, so it is never cleared.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The OIHW 3x3 weight (O, C, 3, 3) transformed (U = G g Gᵀ) and laid out as one blocked weight of
/// one tap per transformed value ξ, as [`kernels::direct`] reads them.
pub(crate) fn weight(w: &[f32], (o, c): (usize, usize)) -> Vec<f32> {
    // U as (O, C, 36): each kernel's transformed values where OIHW has its 9, in f64: G's sixths and
    // twenty-fourths are not exact in binary, so each value is rounded once, at the end.
    let mut u = vec![0f32; o * c * VALUES];
    for (kernel, out) in w.chunks_exact(9).zip(u.chunks_exact_mut(VALUES)) {
        let gg: [[f64; 3]; 6] = std::array::from_fn(|i| {
            std::array::from_fn(|j| (0..3).map(|k| G[i][k] * f64::from(kernel[k * 3 + j])).sum())
        });
        for (i, row) in out.chunks_exact_mut(6).enumerate() {
            for (j, dst) in row.iter_mut().enumerate() {
                *dst = (0..3).map(|k| gg[i][k] * G[j][k]).sum::<f64>() as f32;
            }
        }
    }
    let mut out = Vec::with_capacity(VALUES * output_rows(o) * c);
    for xi in 0..VALUES {
        let u_xi: Vec<f32> = u.chunks_exact(VALUES).map(|kernel| kernel[xi]).collect();
        out.extend(kernels::blocked_weight(&u_xi, (o, c, 1)));
    }
    out
}

/// The kernel transform G (Lavin & Gray's, 6x3).
const G: [[f64; 3]; 6] = [
    [1. / 4., 0., 0.],
    [-1. / 6., -1. / 6., -1. / 6.],
    [-1. / 6., 1. / 6., -1. / 6.],
    [1. / 24., 1. / 12., 1. / 6.],
    [1. / 24., -1. / 12., 1. / 6.],
    [0., 0., 1.],
];

/// Where the tiles of a batch of images lie, in their padded inputs and in their outputs: planes
/// `plane` values apart (rows `wp` wide), padded images `xstride` apart; outputs `qstride` apart a
/// channel and `ostride` an image, rows `wp` wide too. Tile t is image t / `per_image`'s tile
/// t % `per_image`, at tile row (t % per_image) / `tw`.
///
/// The transforms take 16 tiles per register, in four groups of four consecutive tiles, each group
/// within one image: four side by side in a tile row (rows of 4k tiles), or, on maps 8 wide (rows
/// of 2 tiles), a 2x2 block of tiles.
#[derive(Debug, Clone, Copy)]
struct Maps {
    plane: usize,
    wp: usize,
    xstride: usize,
    qstride: usize,
    ostride: usize,
    tw: usize,
    per_image: usize,
}

impl Maps {
    /// Offset of tile t's top-left value in a padded image, from its image's start.
    fn corner(&self, t: usize) -> usize {
        let t = t % self.per_image;
        SIZE * ((t / self.tw) * self.wp + t % self.tw)
    }

    /// Offset of tile t's top-left value in the padded inputs.
    fn input(&self, t: usize) -> usize {
        t / self.per_image * self.xstride + self.corner(t)
    }

    /// Offset of tile t's top-left output in the outputs.
    fn output(&self, t: usize) -> usize {
        t / self.per_image * self.ostride + self.corner(t)
    }
}

/// The convolution of `images` padded images, `xstride` apart: each holds C planes of `plane`
/// values, rows `wp` = W + 1 wide, pixel (iy, ix) at (iy + 1)·wp + ix + 1 and zeros around (the
/// stride-1 wide layout of `conv::Shifted`, with at least one zero row below the bottom padding).
/// Writes image n's output channel o's pixel (oy, ox) to `out[n·ostride + o·qstride + oy·wp + ox]`;
/// `u` is [`weight`]'s. Images' outputs are independent: a batch may be
/// completed with any finite (or even stale) images whose outputs are not read.
pub(crate) fn forward(
    (xpad, plane, wp, xstride): (&[f32], usize, usize, usize),
    (c, h, w, images): (usize, usize, usize, usize),
    (u, o): (&[f32], usize),
    (out, qstride, ostride): (&mut [f32], usize, usize),
) {
    assert!(wp == w + 1 && plane >= (h + 3) * wp && xstride >= c * plane && images > 0);
    assert!(xpad.len() >= (images - 1) * xstride + c * plane);
    let maps = Maps { plane, wp, xstride, qstride, ostride, tw: w / SIZE, per_image: tiles(h, w) };
    let tb = BLOCK;
    let len = scratch_len((c, o), tb);
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        let (v, m) = scratch[..len].split_at_mut(VALUES * matrix_stride(c, tb));
        let all = images * maps.per_image;
        for first in (0..all).step_by(tb) {
            let block = first..all.min(first + tb);
            products(maps, (xpad, c), (u, o), (v, m), out, (block, tb));
        }
    });
}

/// The outputs of the tiles `block` (at most `tb`), with V and M of `tb` tiles each.
fn products(
    maps: Maps,
    (xpad, c): (&[f32], usize),
    (u, o): (&[f32], usize),
    (v, m): (&mut [f32], &mut [f32]),
    out: &mut [f32],
    (block, tb): (std::ops::Range<usize>, usize),
) {
    let rows = output_rows(o);
    let (vs, ms, n) = (matrix_stride(c, tb), matrix_stride(rows, tb), block.len());
    // SAFETY (both transforms): `applies` (checked by the caller) found AVX-512F.
    unsafe { transform_tiles::<false>(xpad, maps, c, block.clone(), (v, tb)) };
    let weights = rows * c;
    for xi in 0..VALUES {
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
    unsafe { output_transform((m, rows, tb), maps, o, block, out) };
}

/// F(4x4, 3x3)'s input transform Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0;
/// 0 2 −1 −2 1 0; 0 4 0 −5 0 1] applied to six registers (a tile's row or column), its rows' shared
/// sums taken once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn input_f4(d: [__m512; 6]) -> [__m512; 6] {
    let (add, sub, fma) = (_mm512_add_ps, _mm512_sub_ps, fma_by);
    let (s12, s34, d12, d43) = (add(d[1], d[2]), add(d[3], d[4]), sub(d[1], d[2]), sub(d[4], d[3]));
    let (d42, d31) = (sub(d[4], d[2]), sub(d[3], d[1]));
    [
        fma(4.0, d[0], fma(-5.0, d[2], d[4])),
        fma(-4.0, s12, s34),
        fma(4.0, d12, d43),
        fma(2.0, d31, d42),
        fma(-2.0, d31, d42),
        fma(4.0, d[1], fma(-5.0, d[3], d[5])),
    ]
}

/// The weight gradient's transform of dY's tiles for F(4x4, 3x3): A (6x4, the output transform's
/// transpose) applied to four registers: y0, y0 + y1 + y2 + y3, y0 − y1 + y2 − y3,
/// y0 + 2y1 + 4y2 + 8y3, y0 − 2y1 + 4y2 − 8y3, y3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn grad_f4(y: [__m512; 4]) -> [__m512; 6] {
    let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
    let (s02, s13, q02, half_q13) =
        (add(y[0], y[2]), add(y[1], y[3]), fma_by(4.0, y[2], y[0]), fma_by(4.0, y[3], y[1]));
    let q13 = add(half_q13, half_q13);
    [y[0], add(s02, s13), sub(s02, s13), add(q02, q13), sub(q02, q13), y[3]]
}

/// a·x + y, for a constant a.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn fma_by(a: f32, x: __m512, y: __m512) -> __m512 {
    _mm512_fmadd_ps(_mm512_set1_ps(a), x, y)
}

/// V = Bᵀ d B of every 6x6 tile d of `block` for F(4x4, 3x3) (rows and columns 4t .. 4t + 5 of the
/// padded planes), with Lavin & Gray's Bᵀ (see `bt` inside), 16 tiles per register in four groups
/// of four (see [`Maps`]):
/// - four tiles side by side in a tile row: a tile value of the group is every fourth lane of one
///   load, and the register's is two permutes of four loads and a blend;
/// - a 2x2 block of tiles (maps 8 wide): one load per tile row holds both tiles' values of an input
///   row, and the register's values are permuted together from eight loads, two values at a time.
///
/// With OUTPUT_GRAD, the weight gradient's transform of dY's 4x4 tiles instead, A dy Aᵀ, from dY laid
/// out like the input: a tile's values sit where the middle 4x4 of an input tile's do.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transform_tiles<const OUTPUT_GRAD: bool>(
    xpad: &[f32],
    maps: Maps,
    c: usize,
    block: std::ops::Range<usize>,
    (v, tb): (&mut [f32], usize),
) {
    let Maps { plane, wp, tw, .. } = maps;
    let blocks = tw == 2;
    let vs = matrix_stride(c, tb);
    assert!(tw.is_multiple_of(4) || (blocks && maps.per_image.is_multiple_of(4)));
    assert!(block.start.is_multiple_of(LANES) && block.len().is_multiple_of(LANES));
    assert!(block.len() <= tb && v.len() >= 35 * vs + c * tb);
    // The farthest load: row 5 of the last group's tiles from column 4 (side by side), or row 9 from
    // column 0 (blocks), 16 values.
    let reach = if blocks { 9 * wp + LANES } else { 5 * wp + 4 + LANES };
    assert!(xpad.len() >= (c - 1) * plane + maps.input(block.end - 4) + reach);
    // Side by side: value k of four tiles from each of two loads (lanes k, k + 4, ...), in both halves.
    let pick: [__m512i; 4] = std::array::from_fn(|k| {
        let lanes: [i32; 16] = std::array::from_fn(|j| (k + 4 * (j % 8)) as i32);
        // SAFETY: 16 i32.
        unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
    });
    // Blocks: values k and k + 1 of a block's tiles (lanes k and k + 4 of its two tile rows' loads),
    // then two blocks' halves side by side, then the four blocks' values k and k + 1 apart.
    let pair: [__m512i; 3] = std::array::from_fn(|p| {
        let k = 2 * p as i32;
        _mm512_setr_epi32(k, k + 4, k + 16, k + 20, k + 1, k + 5, k + 17, k + 21, 0, 0, 0, 0, 0, 0, 0, 0)
    });
    let halves = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let apart = [
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
        _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31),
    ];
    let transform = |d: [__m512; 6]| if OUTPUT_GRAD { grad_f4([d[1], d[2], d[3], d[4]]) } else { input_f4(d) };
    let zero = _mm512_setzero_ps();
    for ci in 0..c {
        for t0 in block.clone().step_by(LANES) {
            // SAFETY: every load lies within the reach asserted above.
            let groups: [*const f32; 4] =
                std::array::from_fn(|g| unsafe { xpad.as_ptr().add(ci * plane + maps.input(t0 + 4 * g)) });
            // Along the rows first (d B), row by row, then down the columns (Bᵀ (d B)).
            let e: [[__m512; 6]; 6] = std::array::from_fn(|r| {
                if OUTPUT_GRAD && (r == 0 || r == 5) {
                    // dY's 4x4 tile is the middle of the window: its first and last rows are not read.
                    return [zero; 6];
                }
                let load = |from: usize| -> [__m512; 4] {
                    std::array::from_fn(|g| unsafe { _mm512_loadu_ps(groups[g].add(from)) })
                };
                if blocks {
                    // Row r of each block's top tiles and of its bottom ones (4 rows further).
                    let (top, bottom) = (load(r * wp), load((r + 4) * wp));
                    let mut d = [zero; 6];
                    for (p, pair) in pair.iter().enumerate() {
                        let q: [__m512; 4] = std::array::from_fn(|g| _mm512_permutex2var_ps(top[g], *pair, bottom[g]));
                        let (q01, q23) =
                            (_mm512_permutex2var_ps(q[0], halves, q[1]), _mm512_permutex2var_ps(q[2], halves, q[3]));
                        d[2 * p] = _mm512_permutex2var_ps(q01, apart[0], q23);
                        d[2 * p + 1] = _mm512_permutex2var_ps(q01, apart[1], q23);
                    }
                    return transform(d);
                }
                let (near, far) = (load(r * wp), load(r * wp + 4));
                let gather = |l: &[__m512; 4], k: usize| {
                    let low = _mm512_permutex2var_ps(l[0], pick[k], l[1]);
                    _mm512_mask_blend_ps(0xFF00, low, _mm512_permutex2var_ps(l[2], pick[k], l[3]))
                };
                transform([
                    gather(&near, 0),
                    gather(&near, 1),
                    gather(&near, 2),
                    gather(&near, 3),
                    gather(&far, 0),
                    gather(&far, 1),
                ])
            });
            for (j, column) in (0..6).map(|j| transform(std::array::from_fn(|r| e[r][j]))).enumerate() {
                for (i, value) in column.into_iter().enumerate() {
                    // SAFETY: 6i + j < 36, ci < C and t0 + 16 − block.start <= tb (asserted above).
                    let at = (6 * i + j) * vs + ci * tb + t0 - block.start;
                    unsafe { _mm512_storeu_ps(v.as_mut_ptr().add(at), value) };
                }
            }
        }
    }
}

/// Y = Aᵀ M A of every tile for F(4x4, 3x3), with Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0;
/// 0 1 −1 8 −8 1], into the output grid: each output row of a group of four tiles is 16 values, one
/// store, interleaved from the tiles' four columns by two rounds of permutes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn output_transform(
    (m, rows, tb): (&[f32], usize, usize),
    maps: Maps,
    o: usize,
    block: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Maps { wp, qstride, tw, .. } = maps;
    let blocks = tw == 2;
    let ms = matrix_stride(rows, tb);
    assert!(tw.is_multiple_of(4) || (blocks && maps.per_image.is_multiple_of(4)));
    assert!(block.start.is_multiple_of(LANES) && block.len().is_multiple_of(LANES));
    assert!(block.len() <= tb && m.len() >= 35 * ms + rows * tb && o <= rows);
    // The last group's farthest store: its row 3 (16 values), or its bottom tiles' row 3 (8).
    let reach = if blocks { 7 * wp + 8 } else { 3 * wp + LANES };
    assert!(out.len() >= (o - 1) * qstride + maps.output(block.end - 4) + reach);
    let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
    let fma = fma_by;
    let at = |m: [__m512; 6]| {
        let (s12, d12, s34, d34) = (add(m[1], m[2]), sub(m[1], m[2]), add(m[3], m[4]), sub(m[3], m[4]));
        [add(add(m[0], s12), s34), fma(2.0, d34, d12), fma(4.0, s34, s12), fma(8.0, d34, add(d12, m[5]))]
    };
    // Columns 0 and 1 (or 2 and 3) of tiles 0..8 (or 8..16) in pairs, then two pairs to four tiles' rows.
    let pairs = [
        _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
    ];
    let quads = [
        _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23),
        _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31),
    ];
    for oc in 0..o {
        for t0 in block.clone().step_by(LANES) {
            // SAFETY: ξ < 36, oc < rows and t0 + 16 − block.start <= tb (asserted above).
            let load = |xi: usize| unsafe { _mm512_loadu_ps(m.as_ptr().add(xi * ms + oc * tb + t0 - block.start)) };
            // Down the columns (Aᵀ M: 4 rows of 6), then along each row.
            let cols: [[__m512; 4]; 6] = std::array::from_fn(|j| at(std::array::from_fn(|i| load(6 * i + j))));
            for (a, y) in (0..4).map(|a| at(std::array::from_fn(|j| cols[j][a]))).enumerate() {
                for (half, pair) in pairs.iter().enumerate() {
                    let (p01, p23) =
                        (_mm512_permutex2var_ps(y[0], *pair, y[1]), _mm512_permutex2var_ps(y[2], *pair, y[3]));
                    for (q, quad) in quads.iter().enumerate() {
                        let g = 2 * half + q;
                        // Row a of group g's four tiles, 16 outputs: side by side, one row of the
                        // map; a block, 8 of row a (top tiles) and 8 of row 4 + a (bottom ones).
                        let row = _mm512_permutex2var_ps(p01, *quad, p23);
                        // SAFETY: within the map's W columns (asserted above).
                        unsafe {
                            let dst = out.as_mut_ptr().add(oc * qstride + maps.output(t0 + 4 * g) + a * wp);
                            if blocks {
                                _mm512_mask_storeu_ps(dst, 0x00FF, row);
                                // Lanes 8..16 to the row 4 below: the store starts 8 values early.
                                _mm512_mask_storeu_ps(dst.add(4 * wp - 8), 0xFF00, row);
                            } else {
                                _mm512_storeu_ps(dst, row);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The tiles-in-lanes weight gradient's two transforms of one H x W image, over all its T tiles (see
/// [`weight_from_products`]): V of the padded input `xpad` and D of the output gradient `dypad`, laid
/// out like it (both as [`forward`] reads `xpad`, with C and O planes). Each is one matrix per
/// transformed value of its channels' rows of T values, [`matrix_stride`] apart.
pub(crate) fn weight_grad_transforms(
    (xpad, dypad, plane, wp): (&[f32], &[f32], usize, usize),
    (c, o, h, w): (usize, usize, usize, usize),
    (v, d): (&mut [f32], &mut [f32]),
) {
    let t = tiles(h, w);
    let maps = Maps { plane, wp, xstride: 0, qstride: 0, ostride: 0, tw: w / SIZE, per_image: t };
    // SAFETY: `weight_grad_in_lanes` (checked by the caller) found AVX-512F.
    unsafe {
        transform_tiles::<false>(xpad, maps, c, 0..t, (v, t));
        transform_tiles::<true>(dypad, maps, o, 0..t, (d, t));
    }
}

/// Whether a weight gradient of this shape runs on F(4x4, 3x3) over channels-last transforms
/// ([`weight_grad_transforms_cl`]): maps up to 16x16 (4 or 16 tiles an image), with channels in 16s.
/// There the tiles-in-lanes kernel would sum its lanes after a few dozen or hundred tiles (see
/// [`weight_grad_in_lanes`]); with channels in the lanes, the products sum over the tiles as the
/// direct kernel's contraction, with no sums across lanes.
pub(crate) fn weight_grad_channels_last(g: &Geometry) -> bool {
    weight_grad_channels_last_within(g, super::caches::caches().l2)
}

/// [`weight_grad_channels_last`] on a CPU with `l2` bytes of L2 per core.
fn weight_grad_channels_last_within(g: &Geometry, l2: usize) -> bool {
    let Geometry { k, stride, pad, h, w, c, o, .. } = *g;
    let shape = k == 3 && stride == 1 && pad == 1 && h % 4 == 0 && w % 4 == 0;
    let lanes = c.is_multiple_of(LANES) && o.is_multiple_of(LANES) && c.min(o) >= MIN_CHANNELS;
    let (d, v) = cl_call_lens(g);
    shape && lanes && (d + v) * std::mem::size_of::<f32>() <= l2 * CL_L2_SHARE / 2 && kernels::available()
}

/// Values of one channels-last weight-gradient call's transforms, a group's tiles for each of the 36
/// values: (D, O rows; V, C rows), [`cl_stride`] apart.
pub(crate) fn cl_call_lens(g: &Geometry) -> (usize, usize) {
    let k_total = super::conv::GROUP * tiles(g.h, g.w);
    (VALUES * cl_stride(k_total, g.o), VALUES * cl_stride(k_total, g.c))
}

/// Distance between the 36 matrices of a call's channels-last transforms (`k_total` tiles of C): one
/// register more than their values, so that a tile's 36 values, stored together, fall into different
/// cache sets (as [`matrix_stride`]; at 2^k floats apart they took 7x as long).
pub(crate) fn cl_stride(k_total: usize, c: usize) -> usize {
    k_total * c + LANES
}

/// How much of the L2, in halves, a channels-last weight-gradient call's transforms may take. On a
/// 1 MiB L2 (AMD Zen 5) the calls of 8x8 and 16x16 maps (0.6 and 1.2 MiB) ran faster channels-last,
/// those of 32x32 maps with 16 channels (2.4 MiB, out of L2) slower: 2.1 ms against 1.3-1.4 on the
/// tiles-in-lanes path. Half again the L2 separates them; hardware prefetch hides the overflow.
const CL_L2_SHARE: usize = 3;

/// One CHW image into `out` channels-last, (H + 2·pad) x (W + 2·pad) pixels of C values, the image
/// at (pad, pad). The border is not written (the caller's zeros).
pub(crate) fn channels_last(x: &[f32], (c, h, w): (usize, usize, usize), pad: usize, out: &mut [f32]) {
    let wp = w + 2 * pad;
    assert!(x.len() >= c * h * w && out.len() >= (h + 2 * pad) * wp * c);
    if kernels::available() && c.is_multiple_of(LANES) && (h * w).is_multiple_of(LANES) {
        // SAFETY: AVX-512F is there; the bounds are asserted above.
        unsafe { channels_last_blocks(x, (c, h, w), pad, out) };
        return;
    }
    for y in 0..h {
        for (xx, pixel) in out[((y + pad) * wp + pad) * c..][..w * c].chunks_exact_mut(c).enumerate() {
            for (ci, v) in pixel.iter_mut().enumerate() {
                *v = x[(ci * h + y) * w + xx];
            }
        }
    }
}

/// [`channels_last`] by 16x16 blocks (16 channels of 16 consecutive pixels), each transposed in
/// registers: one load and one store per 16 values instead of a scattered store per value (one
/// thread, an 8x8 image and its dY of 64 channels: 0.8 µs against 2.2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn channels_last_blocks(x: &[f32], (c, h, w): (usize, usize, usize), pad: usize, out: &mut [f32]) {
    let (pixels, wp) = (h * w, w + 2 * pad);
    for cb in (0..c).step_by(LANES) {
        for p0 in (0..pixels).step_by(LANES) {
            // SAFETY: channel cb + i's pixels p0 .. p0 + 16 lie within x (asserted by the caller).
            let r: [__m512; 16] =
                std::array::from_fn(|i| unsafe { _mm512_loadu_ps(x.as_ptr().add((cb + i) * pixels + p0)) });
            let r = transpose16(r);
            for (j, pixel) in r.into_iter().enumerate() {
                let (y, xx) = ((p0 + j) / w, (p0 + j) % w);
                // SAFETY: pixel (y, xx)'s channels cb .. cb + 16 lie within out (asserted by the caller).
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(((y + pad) * wp + xx + pad) * c + cb), pixel) };
            }
        }
    }
}

/// The transpose of a 16x16 block held as 16 registers (row i in register i): in-lane unpacks make
/// each 128-bit lane a 4x4 block's transpose, then two rounds of 128-bit shuffles put the blocks in
/// place (two-source permutes in four rounds took 2.4x as long: a 16-channel 32x32 image and its
/// dY, 9.2 µs against 3.9).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
    // Rows 2i and 2i + 1 interleaved: columns (0, 1) of each lane, then (2, 3).
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (r[k / 2 * 2], r[k / 2 * 2 + 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Rows 4g .. 4g + 4: u[4g + m] holds column m of every lane (columns m, m + 4, m + 8, m + 12).
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (g, m) = (k / 4, k % 4);
        let (a, b) = (t[4 * g + m / 2], t[4 * g + 2 + m / 2]);
        if m % 2 == 0 {
            ps(_mm512_unpacklo_pd(pd(a), pd(b)))
        } else {
            ps(_mm512_unpackhi_pd(pd(a), pd(b)))
        }
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        // Lanes 0, 2 (columns m, m + 8) and 1, 3 (m + 4, m + 12) of groups 0, 1 and of groups 2, 3.
        let even01 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[m], u[4 + m]);
        let even23 = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + m], u[12 + m]);
        let odd01 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[m], u[4 + m]);
        let odd23 = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + m], u[12 + m]);
        out[m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(even01, even23);
        out[m + 8] = _mm512_shuffle_f32x4::<0b11_01_11_01>(even01, even23);
        out[m + 4] = _mm512_shuffle_f32x4::<0b10_00_10_00>(odd01, odd23);
        out[m + 12] = _mm512_shuffle_f32x4::<0b11_01_11_01>(odd01, odd23);
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn channels_last_blocks(_: &[f32], _: (usize, usize, usize), _: usize, _: &mut [f32]) {
    unreachable!("the block transpose needs AVX-512 (`channels_last` checks it)")
}

/// The weight gradient's two F(4x4, 3x3) transforms of one H x W image, channels-last: V of the
/// padded input `xcl` ((H + 2) x (W + 2) pixels of C) into `vb`, blocked as [`kernels::direct`]
/// reads a weight (per ξ: C/8 blocks of `k_total` tiles of 8 channels), and D of the output gradient
/// `dycl` (H x W pixels of O) into `dt`, per ξ `k_total` rows of O; the matrices [`cl_stride`]
/// apart. The image's T tiles are tiles `first..first + T` of the `k_total` a call sums over.
pub(crate) fn weight_grad_transforms_cl(
    (xcl, dycl): (&[f32], &[f32]),
    (c, o, h, w): (usize, usize, usize, usize),
    (first, k_total): (usize, usize),
    (vb, dt): (&mut [f32], &mut [f32]),
) {
    let t = tiles(h, w);
    assert!(h % 4 == 0 && w % 4 == 0 && first + t <= k_total && c.is_multiple_of(LANES) && o.is_multiple_of(LANES));
    assert!(vb.len() >= VALUES * cl_stride(k_total, c) && dt.len() >= VALUES * cl_stride(k_total, o));
    assert!(xcl.len() >= (h + 2) * (w + 2) * c && dycl.len() >= h * w * o);
    // SAFETY: `weight_grad_channels_last` (checked by the caller) found AVX-512F; the bounds above.
    unsafe {
        transform_cl::<false>((xcl, w + 2, c), (w / SIZE, t), (first, k_total), vb);
        transform_cl::<true>((dycl, w, o), (w / SIZE, t), (first, k_total), dt);
    }
}

/// The 36 products of a call's transforms ([`weight_grad_transforms_cl`]), on the direct kernel with
/// V as the weight and D as the input: `acc[ξ][c][o] = Σ_t V[ξ][t][c] · D[ξ][t][o]` (overwritten),
/// the layout the tiles-in-lanes path accumulates ([`weight_from_products`] after the groups' sum).
pub(crate) fn weight_grad_products_cl(
    (vb, dt): (&[f32], &[f32]),
    (c, o): (usize, usize),
    k_total: usize,
    acc: &mut [f32],
) {
    assert!(acc.len() >= VALUES * c * o);
    for xi in 0..VALUES {
        // SAFETY: `weight_grad_channels_last` (checked by the caller) found AVX-512F.
        unsafe {
            kernels::direct(
                (&dt[xi * cl_stride(k_total, o)..][..k_total * o], o, k_total),
                &[0],
                &vb[xi * cl_stride(k_total, c)..][..k_total * c],
                (&mut acc[xi * c * o..][..c * o], o),
                o,
                None,
            )
        };
    }
}

/// F(4x4, 3x3)'s transform of the `tiles` tiles of one image (`tw` a row), channels-last, 16
/// channels per register: Bᵀ d B of the 6x6 windows of the padded input (`width` = W + 2 pixels a
/// row), written blocked by 8 channels (a weight for [`kernels::direct`]); or, with OUTPUT_GRAD,
/// A dy Aᵀ of dY's 4x4 tiles (`width` = W, unpadded), written as rows of all channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transform_cl<const OUTPUT_GRAD: bool>(
    (src, width, c): (&[f32], usize, usize),
    (tw, tiles): (usize, usize),
    (first, k_total): (usize, usize),
    dst: &mut [f32],
) {
    // A tile's window: 6 rows of 6 pixels (input), or its 4 x 4 pixels (dY).
    let side = if OUTPUT_GRAD { 4 } else { 6 };
    let (base, stride) = (dst.as_mut_ptr(), cl_stride(k_total, c));
    for tile in 0..tiles {
        let (ty, tx) = (tile / tw, tile % tw);
        let t = first + tile;
        for cb in (0..c).step_by(LANES) {
            // SAFETY: the window's pixels lie within the image (asserted by the caller).
            let load = |r: usize, k: usize| unsafe {
                _mm512_loadu_ps(src.as_ptr().add(((4 * ty + r) * width + 4 * tx + k) * c + cb))
            };
            let rows: [[__m512; 6]; 6] = std::array::from_fn(|r| {
                if r >= side {
                    return [_mm512_setzero_ps(); 6];
                }
                if OUTPUT_GRAD {
                    grad_f4(std::array::from_fn(|k| load(r, k)))
                } else {
                    input_f4(std::array::from_fn(|k| load(r, k)))
                }
            });
            for (j, column) in (0..6)
                .map(|j| {
                    if OUTPUT_GRAD {
                        grad_f4(std::array::from_fn(|r| rows[r][j]))
                    } else {
                        input_f4(std::array::from_fn(|r| rows[r][j]))
                    }
                })
                .enumerate()
            {
                for (i, value) in column.into_iter().enumerate() {
                    let xi = 6 * i + j;
                    // SAFETY: within dst (asserted by the caller: 36 · k_total · c values).
                    unsafe {
                        if OUTPUT_GRAD {
                            _mm512_storeu_ps(base.add(xi * stride + t * c + cb), value);
                        } else {
                            // Channels cb .. cb + 8 to block cb / 8, the next 8 to the next block.
                            let block = |b: usize| base.add(xi * stride + (b * k_total + t) * 8);
                            _mm512_mask_storeu_ps(block(cb / 8), 0x00FF, value);
                            _mm512_mask_storeu_ps(block(cb / 8 + 1).sub(8), 0xFF00, value);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn transform_cl<const OUTPUT_GRAD: bool>(
    _: (&[f32], usize, usize),
    _: (usize, usize),
    _: (usize, usize),
    _: &mut [f32],
) {
    unreachable!("Winograd's transforms need AVX-512 (`weight_grad_channels_last` checks it)")
}

/// The weight gradient from its Winograd products: `m` (O, C, 36) holds, for every pair of
/// channels, Σ over tiles of D ⊙ V (the transforms of dY's tiles and of the input's), and
/// dW = Gᵀ m G (3x3 each), returned OIHW. This is the forward transposed: its
/// y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A makes ∂y/∂g, summed against dY, Gᵀ[(A dY Aᵀ) ⊙ (Bᵀ d B)]G.
pub(crate) fn weight_from_products(m: &[f32]) -> Vec<f32> {
    let mut dw = vec![0f32; m.len() / VALUES * 9];
    for (prod, out) in m.chunks_exact(VALUES).zip(dw.chunks_exact_mut(9)) {
        // (Gᵀ M) as 3 rows of 6, then (Gᵀ M) G, in f64 like the forward's U.
        let gtm: [[f64; 6]; 3] = std::array::from_fn(|k| {
            std::array::from_fn(|j| (0..6).map(|i| G[i][k] * f64::from(prod[6 * i + j])).sum())
        });
        for (k, row) in out.chunks_exact_mut(3).enumerate() {
            for (l, dst) in row.iter_mut().enumerate() {
                *dst = (0..6).map(|j| gtm[k][j] * G[j][l]).sum::<f64>() as f32;
            }
        }
    }
    dw
}

#[cfg(not(target_arch = "x86_64"))]
fn transform_tiles<const OUTPUT_GRAD: bool>(
    _: &[f32],
    _: Maps,
    _: usize,
    _: std::ops::Range<usize>,
    _: (&mut [f32], usize),
) {
    unreachable!("Winograd's transforms need AVX-512 (`applies` checks it)")
}

#[cfg(not(target_arch = "x86_64"))]
fn output_transform(_: (&[f32], usize, usize), _: Maps, _: usize, _: std::ops::Range<usize>, _: &mut [f32]) {
    unreachable!("Winograd's transforms need AVX-512 (`applies` checks it)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register transposes (on AVX-512 CPUs) against the value-by-value copy, and a value at a
    /// known place.
    #[test]
    fn channels_last_blocks_match_the_plain_copy() {
        for (c, h, w, pad) in [(16, 4, 4, 0), (32, 8, 8, 1), (16, 16, 16, 1), (48, 4, 8, 0)] {
            let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
            let len = (h + 2 * pad) * (w + 2 * pad) * c;
            let (mut blocks, mut plain) = (vec![-1f32; len], vec![-1f32; len]);
            channels_last(&x, (c, h, w), pad, &mut blocks);
            kernels::portable(|| channels_last(&x, (c, h, w), pad, &mut plain));
            assert_eq!(blocks, plain, "{:?}", (c, h, w, pad));
            // Channel 3 of pixel (1, 2).
            assert_eq!(plain[((1 + pad) * (w + 2 * pad) + 2 + pad) * c + 3], x[(3 * h + 1) * w + 2]);
        }
    }

    /// The channels-last weight gradient follows the L2: on 1 MiB (where it was measured) ResNet-20's
    /// 8x8 and 16x16 layers take it and the 32x32 ones do not; on 2 MiB the 32x32 ones do too, on
    /// 512 KiB only the 8x8 ones. Shapes it cannot run never take it.
    #[test]
    fn the_channels_last_weight_gradient_follows_the_l2() {
        if !kernels::available() {
            eprintln!("skipped: the channels-last weight gradient needs AVX-512");
            return;
        }
        let layer = |c, size| Geometry { n: 128, c, h: size, w: size, o: c, k: 3, stride: 1, pad: 1 };
        let takes = |l2: usize| {
            [(64, 8), (32, 16), (16, 32)].map(|(c, size)| weight_grad_channels_last_within(&layer(c, size), l2))
        };
        assert_eq!(takes(1 << 20), [true, true, false]);
        assert_eq!(takes(2 << 20), [true, true, true]);
        assert_eq!(takes(512 << 10), [true, false, false]);
        let strided = Geometry { stride: 2, ..layer(32, 16) };
        let odd_channels = Geometry { c: 24, ..layer(32, 16) };
        for g in [strided, odd_channels] {
            assert!(!weight_grad_channels_last_within(&g, 64 << 20), "{g:?}");
        }
    }
}
