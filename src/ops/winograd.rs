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
//! Two tilings ([`Tiling`]): F(4x4, 3x3), 2.25 multiply-adds per output (4x fewer), and F(2x2,
//! 3x3), 4 per output (2.25x fewer). F(4x4) has more work per transformed value, which is what the
//! 16-channel layers need: there F(2x2) measured 1.00x the direct kernel and F(4x4) 0.59x its time
//! (one thread, per image: 10.9 µs against 18.6). Every stride-1 layer of ResNet-20 runs its forward,
//! input gradient and weight gradient on F(4x4); F(2x2) remains for other shapes (see [`tiling`],
//! [`weight_grad_tiling`]).
//!
//! The forward takes a batch of images ([`batch`]): an 8x8 map has 4 tiles of 4x4, a 16x16 one 16,
//! and the products run on far more tiles at once (one thread, per image: 64→64 on 8x8 6.5 µs in
//! batches of 8 against 11.6 on F(2x2) one image at a time; 32→32 on 16x16 7.2 µs in batches of 4
//! against 10.1 alone).
//!
//! The products carry most of the work and run on [`kernels::direct`] with one tap (its register
//! tiles and weight blocks unchanged); the transforms are additions and a few multiplies by small
//! constants. F(2x2)'s results agree with the direct kernel's to float rounding (its G's halves are
//! exact in binary); F(4x4)'s to ~1e-5 of the output's scale (G's sixths, and transforms that
//! multiply by up to 8 and 25: 2e-4 on outputs up to 17 with 64 channels, against float64), as
//! other libraries' F(4x4, 3x3) in float32.
//!
//! The weight gradient is the same algorithm transposed ([`weight_from_products`]): per image, the
//! input's tiles transformed as above and dY's m x m tiles to (m + 2)², their products summed over
//! tiles and images, and one final transform per batch. Two layouts:
//! - tiles in the register lanes (the forward's transforms), the products on
//!   [`kernels::weight_grad`], which sums the lanes at the end of each call: the 32x32 maps, whose
//!   images have 64 tiles each;
//! - channels in the lanes ([`weight_grad_channels_last`]: maps up to 16x16), the input and dY
//!   transposed to channels-last per image, the products on [`kernels::direct`] with the tiles as
//!   its contraction (no sums across lanes). On the 8x8 maps (4 tiles an image) this took 64→64's
//!   dW from 1.55 to 0.91-0.97 ms a batch; one thread, per image: transposes 0.8 µs, transforms
//!   1.4, products 4.7.

use super::conv::Geometry;
use super::kernels::{self, LANES};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether a convolution of this shape runs on F(2x2, 3x3): 3x3, stride 1, padding 1, on maps of
/// even height and width (whole 2x2 output tiles), where the CPU has the direct kernel. The
/// transforms take 16 tiles per register, from rows of 4, 8 or a multiple of 16 tiles: maps 8, 16 or
/// a multiple of 32 wide, with a whole number of registers of tiles.
///
/// With fewer than [`MIN_CHANNELS`] channels on either side, each transformed value feeds too few
/// multiply-adds to pay for its transform: 16→16 channels on 32x32 maps measured 1.00x the direct
/// kernel, where 32→32 on 16x16 took 0.65x its time and 64→64 on 8x8 0.59x (one thread, per image).
fn applies(g: &Geometry) -> bool {
    let Geometry { k, stride, pad, h, w, c, o, .. } = *g;
    let (th, tw) = (h / 2, w / 2);
    let rows_fit = w % 2 == 0 && (tw == 4 || tw == 8 || (tw > 0 && tw.is_multiple_of(LANES)));
    let shape = k == 3 && stride == 1 && pad == 1 && h % 2 == 0 && rows_fit && th > 0;
    shape && (th * tw).is_multiple_of(LANES) && c.min(o) >= MIN_CHANNELS && kernels::available()
}

/// The fewest input and output channels a convolution runs on F(2x2, 3x3) with.
const MIN_CHANNELS: usize = 32;

/// Winograd's two tilings of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tiling {
    /// F(2x2, 3x3): 2x2 outputs from a 4x4 input tile, 16 products (4 per output).
    F2,
    /// F(4x4, 3x3): 4x4 outputs from a 6x6 input tile, 36 products (2.25 per output).
    F4,
}

impl Tiling {
    /// Outputs per side of a tile.
    fn size(self) -> usize {
        match self {
            Tiling::F2 => 2,
            Tiling::F4 => 4,
        }
    }

    /// Values of a transformed tile (products per tile and channel pair).
    pub(crate) fn values(self) -> usize {
        (self.size() + 2) * (self.size() + 2)
    }

    /// Tiles of an H x W map.
    pub(crate) fn tiles(self, h: usize, w: usize) -> usize {
        h / self.size() * (w / self.size())
    }
}

/// The tiling a convolution of this shape runs on (its forward and input gradient), if any:
/// F(4x4, 3x3) where the map's tiles make whole groups of four (see [`Maps`]): rows of 4k tiles (maps
/// 16k wide, a multiple of 4 high), or 8 wide and a multiple of 8 high (2x2 blocks of tiles), with
/// [`MIN_CHANNELS_F4`] channels on either side, where the CPU has the direct kernel; else F(2x2, 3x3)
/// where [`applies`].
pub(crate) fn tiling(g: &Geometry) -> Option<Tiling> {
    let Geometry { k, stride, pad, h, w, c, o, .. } = *g;
    let shape = k == 3 && stride == 1 && pad == 1 && h > 0 && w > 0;
    let groups = (h % 4 == 0 && w.is_multiple_of(LANES)) || (w == 8 && h % 8 == 0);
    let registers = (batch(Tiling::F4, h, w) * Tiling::F4.tiles(h, w)).is_multiple_of(LANES);
    if shape && groups && registers && c.min(o) >= MIN_CHANNELS_F4 && kernels::available() {
        Some(Tiling::F4)
    } else {
        applies(g).then_some(Tiling::F2)
    }
}

/// The tiling the tiles-in-lanes weight gradient runs on, if any (where the channels-last one does
/// not: [`weight_grad_channels_last`]): the forward's where an image has whole registers of tiles
/// (16k), else F(2x2, 3x3) where [`applies`]. It transforms one image at a time (no batch), and sums
/// its products over the tiles of a few images per call: F(4x4)'s four tiles an 8x8 image would
/// make those calls too short for its kernel.
pub(crate) fn weight_grad_tiling(g: &Geometry) -> Option<Tiling> {
    match tiling(g) {
        Some(Tiling::F4) if !Tiling::F4.tiles(g.h, g.w).is_multiple_of(LANES) => applies(g).then_some(Tiling::F2),
        t => t,
    }
}

/// The fewest input and output channels a convolution runs on F(4x4, 3x3) with: ResNet-20's fewest,
/// where it measured 0.59x the direct kernel's time (fewer were not measured).
const MIN_CHANNELS_F4: usize = 16;

/// Images per call of [`forward`] on maps of H x W: enough for a block of tiles (small maps have
/// few tiles an image, and the products want many), at most 8.
pub(crate) fn batch(tiling: Tiling, h: usize, w: usize) -> usize {
    (BLOCK / tiling.tiles(h, w).max(1)).clamp(1, 8)
}

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
fn scratch_len(tiling: Tiling, (c, o): (usize, usize), tb: usize) -> usize {
    tiling.values() * (matrix_stride(c, tb) + matrix_stride(output_rows(o), tb))
}

thread_local! {
    /// Each thread's V and M, kept across calls: fresh buffers of this size (up to 512 KiB for
    /// ResNet-20) cost more in page faults and zeroing than the transforms themselves. Every value a
    /// product or transform reads is written first in the same call, so it is never cleared.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The OIHW 3x3 weight (O, C, 3, 3) transformed (U = G g Gᵀ) and laid out as one blocked weight of
/// one tap per transformed value ξ (16 or 36), as [`kernels::direct`] reads them.
pub(crate) fn weight(tiling: Tiling, w: &[f32], (o, c): (usize, usize)) -> Vec<f32> {
    let values = tiling.values();
    // U as (O, C, values): each kernel's transformed values where OIHW has its 9.
    let mut u = vec![0f32; o * c * values];
    for (kernel, out) in w.chunks_exact(9).zip(u.chunks_exact_mut(values)) {
        match tiling {
            Tiling::F2 => weight_f2(kernel, out),
            Tiling::F4 => weight_f4(kernel, out),
        }
    }
    let mut out = Vec::with_capacity(values * output_rows(o) * c);
    for xi in 0..values {
        let u_xi: Vec<f32> = u.chunks_exact(values).map(|kernel| kernel[xi]).collect();
        out.extend(kernels::blocked_weight(&u_xi, (o, c, 1)));
    }
    out
}

/// G g Gᵀ of one 3x3 kernel for F(2x2, 3x3), G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
fn weight_f2(kernel: &[f32], out: &mut [f32]) {
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

/// F(4x4, 3x3)'s kernel transform G (Lavin & Gray's, 6x3).
const G4: [[f64; 3]; 6] = [
    [1. / 4., 0., 0.],
    [-1. / 6., -1. / 6., -1. / 6.],
    [-1. / 6., 1. / 6., -1. / 6.],
    [1. / 24., 1. / 12., 1. / 6.],
    [1. / 24., -1. / 12., 1. / 6.],
    [0., 0., 1.],
];

/// G g Gᵀ of one 3x3 kernel for F(4x4, 3x3) (Lavin & Gray's G, 6x3), in f64: G's sixths and
/// twenty-fourths are not exact in binary, so the kernel is rounded once, at the end.
fn weight_f4(kernel: &[f32], out: &mut [f32]) {
    const G: [[f64; 3]; 6] = G4;
    let gg: [[f64; 3]; 6] =
        std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| G[i][k] * f64::from(kernel[k * 3 + j])).sum()));
    for (i, row) in out.chunks_exact_mut(6).enumerate() {
        for (j, dst) in row.iter_mut().enumerate() {
            *dst = (0..3).map(|k| gg[i][k] * G[j][k]).sum::<f64>() as f32;
        }
    }
}

/// Where the tiles of a batch of images lie, in their padded inputs and in their outputs: planes
/// `plane` values apart (rows `wp` wide), padded images `xstride` apart; outputs `qstride` apart a
/// channel and `ostride` an image, rows `wp` wide too. Tile t is image t / `per_image`'s tile
/// t % `per_image`, at tile row (t % per_image) / `tw`.
///
/// The transforms take 16 tiles per register. F(2x2)'s are 16 consecutive tiles of one image (see
/// [`transform_tiles`]); F(4x4)'s are four groups of four consecutive tiles, each group within one
/// image: four side by side in a tile row (rows of 4k tiles), or, on maps 8 wide (rows of 2 tiles),
/// a 2x2 block of tiles.
#[derive(Debug, Clone, Copy)]
struct Maps {
    plane: usize,
    wp: usize,
    xstride: usize,
    qstride: usize,
    ostride: usize,
    tw: usize,
    per_image: usize,
    /// Outputs per side of a tile.
    size: usize,
}

impl Maps {
    /// Offset of tile t's top-left value in a padded image, from its image's start.
    fn corner(&self, t: usize) -> usize {
        let t = t % self.per_image;
        self.size * ((t / self.tw) * self.wp + t % self.tw)
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
/// `u` is [`weight`]'s for the same tiling. Images' outputs are independent: a batch may be
/// completed with any finite (or even stale) images whose outputs are not read.
pub(crate) fn forward(
    tiling: Tiling,
    (xpad, plane, wp, xstride): (&[f32], usize, usize, usize),
    (c, h, w, images): (usize, usize, usize, usize),
    (u, o): (&[f32], usize),
    (out, qstride, ostride): (&mut [f32], usize, usize),
) {
    assert!(wp == w + 1 && plane >= (h + 3) * wp && xstride >= c * plane && images > 0);
    assert!(xpad.len() >= (images - 1) * xstride + c * plane);
    let (size, per_image) = (tiling.size(), tiling.tiles(h, w));
    let maps = Maps { plane, wp, xstride, qstride, ostride, tw: w / size, per_image, size };
    let tb = BLOCK;
    let len = scratch_len(tiling, (c, o), tb);
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        let (v, m) = scratch[..len].split_at_mut(tiling.values() * matrix_stride(c, tb));
        let tiles = images * per_image;
        for first in (0..tiles).step_by(tb) {
            let block = first..tiles.min(first + tb);
            products(tiling, maps, (xpad, c), (u, o), (v, m), out, (block, tb));
        }
    });
}

/// The outputs of the tiles `block` (at most `tb`), with V and M of `tb` tiles each.
fn products(
    tiling: Tiling,
    maps: Maps,
    (xpad, c): (&[f32], usize),
    (u, o): (&[f32], usize),
    (v, m): (&mut [f32], &mut [f32]),
    out: &mut [f32],
    (block, tb): (std::ops::Range<usize>, usize),
) {
    let rows = output_rows(o);
    let (vs, ms, n) = (matrix_stride(c, tb), matrix_stride(rows, tb), block.len());
    // SAFETY (the transforms): `tiling` (checked by the caller) found AVX-512F.
    match tiling {
        Tiling::F2 => unsafe { transform_tiles::<false>(xpad, maps, c, block.clone(), (v, tb)) },
        Tiling::F4 => unsafe { transform_tiles_f4::<false>(xpad, maps, c, block.clone(), (v, tb)) },
    }
    let weights = rows * c;
    for xi in 0..tiling.values() {
        // SAFETY: `tiling` (checked by the caller) found AVX-512F.
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
    match tiling {
        Tiling::F2 => unsafe { output_transform((m, rows, tb), maps, o, block, out) },
        Tiling::F4 => unsafe { output_transform_f4((m, rows, tb), maps, o, block, out) },
    }
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
    xpad: &[f32],
    maps: Maps,
    c: usize,
    block: std::ops::Range<usize>,
    (v, tb): (&mut [f32], usize),
) {
    let Maps { plane, wp, tw, per_image, .. } = maps;
    assert!(maps.size == 2 && per_image.is_multiple_of(LANES) && block.start.is_multiple_of(LANES));
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
    assert!(xpad.len() >= (c - 1) * plane + maps.input(block.end - LANES) + reach);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // Four tiles from each of two rows, in the low half.
    let four = _mm512_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22, 0, 0, 0, 0, 0, 0, 0, 0);
    for ci in 0..c {
        for t0 in block.clone().step_by(LANES) {
            // SAFETY: every load lies within `reach` of the corner (asserted above).
            let base = unsafe { xpad.as_ptr().add(ci * plane + maps.input(t0)) };
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
fn transform_tiles_f4<const OUTPUT_GRAD: bool>(
    xpad: &[f32],
    maps: Maps,
    c: usize,
    block: std::ops::Range<usize>,
    (v, tb): (&mut [f32], usize),
) {
    let Maps { plane, wp, tw, .. } = maps;
    let blocks = tw == 2;
    let vs = matrix_stride(c, tb);
    assert!(maps.size == 4 && (tw.is_multiple_of(4) || (blocks && maps.per_image.is_multiple_of(4))));
    assert!(block.start.is_multiple_of(LANES) && block.len().is_multiple_of(LANES));
    assert!(block.len() <= tb && v.len() >= 35 * vs + c * tb);
    // The farthest load: row 5 of the last group's tiles from column 4 (side by side), or row 9 from
    // column 0 (blocks), 16 values.
    let reach = if blocks { 9 * wp + LANES } else { 5 * wp + 4 + LANES };
    assert!(xpad.len() >= (c - 1) * plane + maps.input(block.end - 4) + reach);
    // Side by side: value k of four tiles from each of two loads (lanes k, k + 4, ...), in both halves.
    let pick: [__m512i; 4] = std::array::from_fn(|k| {
        let k = k as i32;
        _mm512_setr_epi32(
            k,
            k + 4,
            k + 8,
            k + 12,
            k + 16,
            k + 20,
            k + 24,
            k + 28,
            k,
            k + 4,
            k + 8,
            k + 12,
            k + 16,
            k + 20,
            k + 24,
            k + 28,
        )
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
fn output_transform_f4(
    (m, rows, tb): (&[f32], usize, usize),
    maps: Maps,
    o: usize,
    block: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Maps { wp, qstride, tw, .. } = maps;
    let blocks = tw == 2;
    let ms = matrix_stride(rows, tb);
    assert!(maps.size == 4 && (tw.is_multiple_of(4) || (blocks && maps.per_image.is_multiple_of(4))));
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
    tiling: Tiling,
    (xpad, dypad, plane, wp): (&[f32], &[f32], usize, usize),
    (c, o, h, w): (usize, usize, usize, usize),
    (v, d): (&mut [f32], &mut [f32]),
) {
    let (size, tiles) = (tiling.size(), tiling.tiles(h, w));
    let maps = Maps { plane, wp, xstride: 0, qstride: 0, ostride: 0, tw: w / size, per_image: tiles, size };
    // SAFETY: `weight_grad_tiling` (checked by the caller) found AVX-512F.
    unsafe {
        match tiling {
            Tiling::F2 => {
                transform_tiles::<false>(xpad, maps, c, 0..tiles, (v, tiles));
                transform_tiles::<true>(dypad, maps, o, 0..tiles, (d, tiles));
            }
            Tiling::F4 => {
                transform_tiles_f4::<false>(xpad, maps, c, 0..tiles, (v, tiles));
                transform_tiles_f4::<true>(dypad, maps, o, 0..tiles, (d, tiles));
            }
        }
    }
}

/// Whether a weight gradient of this shape runs on F(4x4, 3x3) over channels-last transforms
/// ([`weight_grad_transforms_cl`]): maps up to 16x16 (4 or 16 tiles an image), with channels in 16s.
/// There the tiles-in-lanes kernel would sum its lanes after a few dozen or hundred tiles (see
/// [`weight_grad_tiling`]); with channels in the lanes, the products sum over the tiles as the
/// direct kernel's contraction, with no sums across lanes.
pub(crate) fn weight_grad_channels_last(g: &Geometry) -> bool {
    let Geometry { k, stride, pad, h, w, c, o, .. } = *g;
    let shape = k == 3 && stride == 1 && pad == 1 && h % 4 == 0 && w % 4 == 0 && h * w <= MAX_PIXELS_CL;
    shape && c.is_multiple_of(LANES) && o.is_multiple_of(LANES) && c.min(o) >= MIN_CHANNELS_F4 && kernels::available()
}

/// Distance between the 36 matrices of a call's channels-last transforms (`k_total` tiles of C): one
/// register more than their values, so that a tile's 36 values, stored together, fall into different
/// cache sets (as [`matrix_stride`]; at 2^k floats apart they took 7x as long).
pub(crate) fn cl_stride(k_total: usize, c: usize) -> usize {
    k_total * c + LANES
}

/// The largest maps whose weight gradient runs channels-last: a group's transforms of 32x32 maps
/// (2.4 MiB with 16 channels) no longer stay in L2, and their dW measured 2.1 ms against 1.3-1.4 on
/// the tiles-in-lanes path.
const MAX_PIXELS_CL: usize = 256;

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
    let tiles = Tiling::F4.tiles(h, w);
    assert!(h % 4 == 0 && w % 4 == 0 && first + tiles <= k_total && c.is_multiple_of(LANES) && o.is_multiple_of(LANES));
    assert!(vb.len() >= 36 * cl_stride(k_total, c) && dt.len() >= 36 * cl_stride(k_total, o));
    assert!(xcl.len() >= (h + 2) * (w + 2) * c && dycl.len() >= h * w * o);
    // SAFETY: `weight_grad_channels_last` (checked by the caller) found AVX-512F; the bounds above.
    unsafe {
        transform_cl::<false>((xcl, w + 2, c), (w / 4, tiles), (first, k_total), vb);
        transform_cl::<true>((dycl, w, o), (w / 4, tiles), (first, k_total), dt);
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
    assert!(acc.len() >= 36 * c * o);
    for xi in 0..36 {
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

/// The weight gradient from its Winograd products: `m` (O, C, values) holds, for every pair of
/// channels, Σ over tiles of D ⊙ V (the transforms of dY's tiles and of the input's), and
/// dW = Gᵀ m G (3x3 each), returned OIHW. This is the forward transposed: its
/// y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A makes ∂y/∂g, summed against dY, Gᵀ[(A dY Aᵀ) ⊙ (Bᵀ d B)]G.
pub(crate) fn weight_from_products(tiling: Tiling, m: &[f32]) -> Vec<f32> {
    let values = tiling.values();
    let mut dw = vec![0f32; m.len() / values * 9];
    for (prod, out) in m.chunks_exact(values).zip(dw.chunks_exact_mut(9)) {
        match tiling {
            Tiling::F2 => {
                // Gᵀ's rows combine M's rows: M0 + (M1 + M2)/2, (M1 − M2)/2, (M1 + M2)/2 + M3.
                let gt = |a: f32, b: f32, c: f32, d: f32| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
                let cols: [[f32; 3]; 4] = std::array::from_fn(|j| gt(prod[j], prod[4 + j], prod[8 + j], prod[12 + j]));
                for k in 0..3 {
                    let row = gt(cols[0][k], cols[1][k], cols[2][k], cols[3][k]);
                    out[k * 3..k * 3 + 3].copy_from_slice(&row);
                }
            }
            Tiling::F4 => {
                // (Gᵀ M) as 3 rows of 6, then (Gᵀ M) G, in f64 like the forward's U.
                let gtm: [[f64; 6]; 3] = std::array::from_fn(|k| {
                    std::array::from_fn(|j| (0..6).map(|i| G4[i][k] * f64::from(prod[6 * i + j])).sum())
                });
                for (k, row) in out.chunks_exact_mut(3).enumerate() {
                    for (l, dst) in row.iter_mut().enumerate() {
                        *dst = (0..6).map(|j| gtm[k][j] * G4[j][l]).sum::<f64>() as f32;
                    }
                }
            }
        }
    }
    dw
}

/// Y = Aᵀ M A of every tile, with Aᵀ = [1 1 1 0; 0 1 −1 −1], into the output grid: 16 tiles per
/// register, their 2x2 outputs interleaved into rows by two permutes per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn output_transform(
    (m, rows, tb): (&[f32], usize, usize),
    maps: Maps,
    o: usize,
    block: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Maps { wp, qstride, tw, per_image, .. } = maps;
    let ms = matrix_stride(rows, tb);
    assert!(maps.size == 2 && per_image.is_multiple_of(LANES) && block.start.is_multiple_of(LANES));
    assert!(block.len().is_multiple_of(LANES) && block.len() <= tb && m.len() >= 15 * ms + rows * tb && o <= rows);
    // The last register's stores reach 8 rows of 8 tiles' outputs (rows of 4 tiles), 4 of 16 (rows of
    // 8) or 2 of 32 past its corner.
    let reach = match tw {
        4 => 7 * wp + 8,
        8 => 3 * wp + 16,
        _ => wp + 2 * LANES,
    };
    assert!(out.len() >= (o - 1) * qstride + maps.output(block.end - LANES) + reach);
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
            // SAFETY: every store below writes the register's output rows (at most 8 from its
            // corner) of channel oc within the map's W columns (asserted above).
            unsafe {
                let dst = out.as_mut_ptr().add(oc * qstride + maps.output(t0));
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

#[cfg(not(target_arch = "x86_64"))]
fn transform_tiles_f4<const OUTPUT_GRAD: bool>(
    _: &[f32],
    _: Maps,
    _: usize,
    _: std::ops::Range<usize>,
    _: (&mut [f32], usize),
) {
    unreachable!("Winograd's transforms need AVX-512 (`tiling` checks it)")
}

#[cfg(not(target_arch = "x86_64"))]
fn output_transform_f4(_: (&[f32], usize, usize), _: Maps, _: usize, _: std::ops::Range<usize>, _: &mut [f32]) {
    unreachable!("Winograd's transforms need AVX-512 (`tiling` checks it)")
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
}
