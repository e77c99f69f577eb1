//! Hand-written AVX-512 inner loops for the shifted stride-1 convolution (see [`super::conv`]).
//!
//! Through the `gemm` crate, the shifted convolution is k·k small GEMMs per image whose inner
//! dimension is the channel count (16 to 64 in ResNet-20): every call reloads and stores its
//! accumulators after only C multiply-adds each. The direct kernel here keeps a block of outputs in
//! registers across all taps and channels (C·k·k multiply-adds, 144 to 576), so the loads and stores
//! around the multiply-adds nearly vanish. The caller checks [`available`] first; other CPUs keep
//! the `gemm` path.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(test)]
thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as if the CPU had no AVX-512, on this thread: how the tests cover the portable path.
#[cfg(test)]
pub(crate) fn portable<R>(f: impl FnOnce() -> R) -> R {
    PORTABLE.set(true);
    let result = f();
    PORTABLE.set(false);
    result
}

/// Whether the CPU runs these kernels (AVX-512F; std caches the detection).
pub(crate) fn available() -> bool {
    #[cfg(test)]
    if PORTABLE.get() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Lanes of one AVX-512 register.
pub(crate) const LANES: usize = 16;

/// Output channels of one block of the direct kernel: the weights are laid out in blocks of this many
/// (zero-padded past the last channel).
pub(crate) const OB: usize = 8;

/// Registers of 16 positions in the direct kernel's main tile: 3 x 8 output channels, 24 accumulators,
/// 11 loads per 24 multiply-adds. The last two or four registers of a grid get narrower tiles of
/// their own (one or two of 2 x 8), so that no more than 15 positions are computed past the grid.
const TILE: usize = 3;

/// Positions the kernel computes for a grid of `q`: `q` rounded up to whole registers.
pub(crate) fn padded_positions(q: usize) -> usize {
    q.div_ceil(LANES) * LANES
}

/// `out[o·qstride + i] = Σ_t Σ_c w[o / OB][t][c][o % OB] · x[c·plane + shifts[t] + i]` for every
/// output channel `o` of `w` (whole blocks of [`OB`]), input channel `c < C` and position
/// `i < padded_positions(q)`.
///
/// With `rows` = Some(W), the grid is W positions wide with no padding column between rows (see
/// `conv::Shifted`), and the 9 taps are a 3x3 kernel's with padding 1: a tap in the left column
/// (t % 3 = 0) reads nothing for positions in the grid's first column, and one in the right column
/// nothing for positions in its last, where it would otherwise read the neighbouring row (masked
/// loads).
///
/// `x` must hold every position read: `(C − 1)·plane + max(shifts) + padded_positions(q)` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn direct(
    (x, plane, c): (&[f32], usize, usize),
    shifts: &[usize],
    w: &[f32],
    (out, qstride): (&mut [f32], usize),
    q: usize,
    rows: Option<usize>,
) {
    // Whole tiles of 3 registers, and the rest as one tile of 2, two of 2 (rather than 3 + 1: a
    // 1-register tile has 8 accumulators and 9 loads per 8 multiply-adds) or, for 1 register, 1.
    let registers = q.div_ceil(LANES);
    let threes = match registers % TILE {
        1 if registers > 1 => registers / TILE - 1,
        _ => registers / TILE,
    };
    let main = threes * TILE * LANES;
    let (twos, ones) = match registers - threes * TILE {
        4 => (2, 0),
        2 => (1, 0),
        1 => (0, 1),
        _ => (0, 0),
    };
    let twos = main..main + twos * 2 * LANES;
    let ones = twos.end..twos.end + ones * LANES;
    let xs = (x, plane, c);
    match rows {
        None => {
            direct_tiled::<TILE, false>(xs, shifts, w, (out, qstride), 0..main, 0);
            direct_tiled::<2, false>(xs, shifts, w, (out, qstride), twos, 0);
            direct_tiled::<1, false>(xs, shifts, w, (out, qstride), ones, 0);
        }
        Some(width) => {
            assert!(shifts.len() == 9 && width > 0, "direct: masked rows need a 3x3 kernel");
            direct_tiled::<TILE, true>(xs, shifts, w, (out, qstride), 0..main, width);
            direct_tiled::<2, true>(xs, shifts, w, (out, qstride), twos, width);
            direct_tiled::<1, true>(xs, shifts, w, (out, qstride), ones, width);
        }
    }
}

/// The lanes of the register of positions `p0..p0 + 16` whose column (position mod `width`) is not
/// the grid's first, and those whose column is not its last.
fn edge_masks(p0: usize, width: usize) -> (u16, u16) {
    let (mut first, mut last, mut col) = (0u16, 0u16, p0 % width);
    for i in 0..LANES {
        first |= u16::from(col != 0) << i;
        last |= u16::from(col != width - 1) << i;
        col = if col + 1 == width { 0 } else { col + 1 };
    }
    (first, last)
}

/// [`direct`] on the positions `range` (whole tiles of V registers), for every block of [`OB`]
/// output channels; with MASKED, the taps of the left and right kernel columns skip the grid's first
/// and last column (rows `width` wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn direct_tiled<const V: usize, const MASKED: bool>(
    (x, plane, c): (&[f32], usize, usize),
    shifts: &[usize],
    w: &[f32],
    (out, qstride): (&mut [f32], usize),
    range: std::ops::Range<usize>,
    width: usize,
) {
    if range.is_empty() {
        return;
    }
    let taps = shifts.len();
    let block = taps * c * OB;
    let blocks = w.len() / block;
    let reach = (c - 1) * plane + shifts.iter().max().copied().unwrap_or(0) + range.end;
    // Checked once here: every access below stays inside these bounds.
    assert!(c > 0 && w.len() == blocks * block && x.len() >= reach && range.len().is_multiple_of(V * LANES));
    assert!(out.len() >= (blocks * OB - 1) * qstride + range.end && qstride >= range.end);
    for q0 in range.step_by(V * LANES) {
        // Per register: the lanes each kernel column reads (all of them for the middle one).
        let masks: [[u16; V]; 3] = match MASKED {
            true => {
                let edges: [(u16, u16); V] = std::array::from_fn(|v| edge_masks(q0 + v * LANES, width));
                [edges.map(|e| e.0), [u16::MAX; V], edges.map(|e| e.1)]
            }
            false => [[u16::MAX; V]; 3],
        };
        for (b, wb) in w.chunks_exact(block).enumerate() {
            let mut acc = [[_mm512_setzero_ps(); V]; OB];
            for (t, &shift) in shifts.iter().enumerate() {
                let mask = masks[t % 3];
                for ci in 0..c {
                    // SAFETY: ci·plane + shift + q0 + V·16 <= reach <= x.len() (asserted above).
                    let xp = unsafe { x.as_ptr().add(ci * plane + shift + q0) };
                    let mut xs = [_mm512_setzero_ps(); V];
                    for (v, xv) in xs.iter_mut().enumerate() {
                        // SAFETY: see above (a masked load reads only the lanes it keeps).
                        *xv = unsafe {
                            match MASKED {
                                true => _mm512_maskz_loadu_ps(mask[v], xp.add(v * LANES)),
                                false => _mm512_loadu_ps(xp.add(v * LANES)),
                            }
                        };
                    }
                    let wt = &wb[(t * c + ci) * OB..][..OB];
                    for (j, row) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(wt[j]);
                        for (a, xv) in row.iter_mut().zip(&xs) {
                            *a = _mm512_fmadd_ps(*xv, wv, *a);
                        }
                    }
                }
            }
            for (j, row) in acc.iter().enumerate() {
                let dst = &mut out[(b * OB + j) * qstride + q0..][..V * LANES];
                for (v, a) in row.iter().enumerate() {
                    // SAFETY: dst holds V·16 floats.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(v * LANES), *a) };
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn direct(
    _: (&[f32], usize, usize),
    _: &[usize],
    _: &[f32],
    _: (&mut [f32], usize),
    _: usize,
    _: Option<usize>,
) {
    unreachable!("the direct kernel needs AVX-512 (callers check `available`)")
}

/// The weight, OIHW (O, C, k·k taps), in the blocks [`direct`] reads: (O/OB, tap, C, OB), zero past
/// the last output channel.
pub(crate) fn blocked_weight(w: &[f32], (o, c, taps): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; o.div_ceil(OB) * taps * c * OB];
    for (oo, per_o) in w.chunks_exact(c * taps).enumerate() {
        for (ci, kernel) in per_o.chunks_exact(taps).enumerate() {
            for (t, &v) in kernel.iter().enumerate() {
                out[(((oo / OB) * taps + t) * c + ci) * OB + oo % OB] = v;
            }
        }
    }
    out
}

/// acc (C×16, the 16 output channels fastest) += `Σ_q dyt[q][o] · xs[c·plane + q]` for 16 output
/// channels. gemm runs this product (m = 16) with its 1×6 kernel: 6 accumulators, 7 loads per 6 FMAs.
/// Here 16 registers accumulate a 16×16 block: one load and 16 broadcasts per 16 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn weight_grad_o16(dyt: &[f32], xs: &[f32], plane: usize, q: usize, acc: &mut [f32]) {
    let dyt = &dyt[..q * 16];
    for (cb, acc_block) in acc.chunks_exact_mut(256).enumerate() {
        // Bounds are checked here, once: every read below is inside these slices.
        let rows: [&[f32]; 16] = std::array::from_fn(|ci| &xs[(cb * 16 + ci) * plane..][..q]);
        let mut sums = [_mm512_setzero_ps(); 16];
        for p in 0..q {
            // SAFETY: p < q, and dyt holds q rows of 16 (sliced above).
            let d = unsafe { _mm512_loadu_ps(dyt.as_ptr().add(p * 16)) };
            for ci in 0..16 {
                // SAFETY: every row holds q values and p < q.
                let x = unsafe { *rows[ci].get_unchecked(p) };
                sums[ci] = _mm512_fmadd_ps(d, _mm512_set1_ps(x), sums[ci]);
            }
        }
        for (ci, sum) in sums.iter().enumerate() {
            let out = &mut acc_block[ci * 16..(ci + 1) * 16];
            // SAFETY: out holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(_mm512_loadu_ps(out.as_ptr()), *sum)) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn weight_grad_o16(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the 16x16 block needs AVX-512 (callers check `available`)")
}

/// Output and input channels of one tile of [`weight_grad`]: 4 x 4 = 16 accumulators.
const WG: usize = 4;

/// Whether [`weight_grad`] takes O output and C input channels (whole tiles).
pub(crate) fn weight_grad_fits(o: usize, c: usize) -> bool {
    o.is_multiple_of(WG) && c.is_multiple_of(WG)
}

/// `acc[t][c][o] += Σ_images Σ_i dy[o·qv + i] · x[c·plane + shifts[t] + i]` for i < qv: the weight
/// gradient of a few images, each given as (dY on the output grid, O rows of `qv` values, zero on the
/// dropped columns and past the grid; the padded input, as [`direct`] reads it).
///
/// Both operands are read in place, 16 positions per register: a tile of 4 output by 4 input channels
/// keeps 16 accumulators of 16 partial sums, over every position of every image given, for one tap
/// (8 loads per 16 multiply-adds, the rows in L1 across the taps). Only then are the partial sums
/// added up, all 16 accumulators at once ([`sum_lanes`]), so the images given should have enough
/// positions between them (a few hundred) for that to be cheap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn weight_grad(
    images: &[(&[f32], &[f32])],
    (o, c): (usize, usize),
    (plane, qv): (usize, usize),
    shifts: &[usize],
    acc: &mut [f32],
) {
    let reach = (c - 1) * plane + shifts.iter().max().copied().unwrap_or(0) + qv;
    // Checked once here: every access below stays inside these bounds.
    assert!(weight_grad_fits(o, c) && qv.is_multiple_of(LANES) && acc.len() >= shifts.len() * c * o);
    assert!(images.iter().all(|(dy, x)| dy.len() >= o * qv && x.len() >= reach));
    for ob in (0..o).step_by(WG) {
        for cb in (0..c).step_by(WG) {
            for (t, &shift) in shifts.iter().enumerate() {
                let mut sums = [_mm512_setzero_ps(); WG * WG];
                for (dy, x) in images {
                    // SAFETY: (ob + j)·qv + i + 16 <= o·qv <= dy.len() and
                    // (cb + k)·plane + shift + i + 16 <= reach <= x.len() for j, k < 4, i + 16 <= qv.
                    let (dp, xp) = unsafe { (dy.as_ptr().add(ob * qv), x.as_ptr().add(cb * plane + shift)) };
                    for i in (0..qv).step_by(LANES) {
                        let mut d = [_mm512_setzero_ps(); WG];
                        let mut xs = [_mm512_setzero_ps(); WG];
                        for j in 0..WG {
                            // SAFETY: see above.
                            d[j] = unsafe { _mm512_loadu_ps(dp.add(j * qv + i)) };
                            xs[j] = unsafe { _mm512_loadu_ps(xp.add(j * plane + i)) };
                        }
                        for j in 0..WG {
                            for k in 0..WG {
                                sums[j * WG + k] = _mm512_fmadd_ps(d[j], xs[k], sums[j * WG + k]);
                            }
                        }
                    }
                }
                // Lane k·4 + j of the total is Σ dy[ob + j] · x[cb + k].
                let mut total = [0f32; LANES];
                // SAFETY: total holds 16 floats.
                unsafe { _mm512_storeu_ps(total.as_mut_ptr(), sum_lanes(&sums)) };
                for k in 0..WG {
                    let dst = &mut acc[(t * c + cb + k) * o + ob..][..WG];
                    dst.iter_mut().zip(&total[k * WG..(k + 1) * WG]).for_each(|(a, s)| *a += s);
                }
            }
        }
    }
}

/// The 16 lane sums of 16 registers in one register, by halving: lane L·4 + m holds the sum of
/// register 4·m + L. 30 shuffles and 15 additions, against 16 × 8 for one horizontal sum at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes(a: &[__m512; 16]) -> __m512 {
    // Registers 2k and 2k+1: their 256-bit halves added, side by side (8 partial sums each).
    let mut b = [_mm512_setzero_ps(); 8];
    for (k, b) in b.iter_mut().enumerate() {
        let (x, y) = (a[2 * k], a[2 * k + 1]);
        *b = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y));
    }
    // 128-bit lane L of c[m]: 4 partial sums of register 4m + L.
    let mut c = [_mm512_setzero_ps(); 4];
    for (m, c) in c.iter_mut().enumerate() {
        let (x, y) = (b[2 * m], b[2 * m + 1]);
        *c = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y));
    }
    // Within each 128-bit lane L: 2 partial sums of registers L and 4 + L (e0), 8 + L and 12 + L (e1).
    let e0 = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(c[0], c[1]), _mm512_shuffle_ps::<0xEE>(c[0], c[1]));
    let e1 = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(c[2], c[3]), _mm512_shuffle_ps::<0xEE>(c[2], c[3]));
    _mm512_add_ps(_mm512_shuffle_ps::<0x88>(e0, e1), _mm512_shuffle_ps::<0xDD>(e0, e1))
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn weight_grad(_: &[(&[f32], &[f32])], _: (usize, usize), _: (usize, usize), _: &[usize], _: &mut [f32]) {
    unreachable!("the weight-gradient kernel needs AVX-512 (callers check `available`)")
}

/// Asks the CPU to bring `data` into its L2 cache, without waiting for it: the next image's input,
/// read from L3 or memory while the current one is computed (the hardware prefetchers cannot guess a
/// jump to another image).
pub(crate) fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
}

/// Mask of the first `n` lanes (all 16 from `n` = 16 on).
#[cfg(target_arch = "x86_64")]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(LANES)) - 1) as __mmask16
}

/// Splits `src` into its even-indexed values (`even`, ⌈n/2⌉ of them) and its odd-indexed ones (`odd`,
/// ⌊n/2⌋): a row of an image into the phases of a stride-2 convolution. AVX-512 where the CPU has it.
pub(crate) fn split_row(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(even.len() == src.len().div_ceil(2) && odd.len() == src.len() / 2, "split_row: lengths");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: available() found AVX-512F.
        return unsafe { split_row_avx512(src, even, odd) };
    }
    for (i, &v) in src.iter().enumerate() {
        if i % 2 == 0 {
            even[i / 2] = v;
        } else {
            odd[i / 2] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn split_row_avx512(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let n = src.len();
    for i in (0..n).step_by(2 * LANES) {
        let rest = n - i;
        // SAFETY: the masks keep the reads below n and the writes below ⌈n/2⌉ and ⌊n/2⌋, the
        // lengths of `even` and `odd` (asserted by the caller).
        unsafe {
            let a = _mm512_maskz_loadu_ps(lanes(rest), src.as_ptr().add(i));
            let b = _mm512_maskz_loadu_ps(lanes(rest.saturating_sub(LANES)), src.as_ptr().add(i + LANES.min(rest)));
            let (e, o) = (_mm512_permutex2var_ps(a, evens, b), _mm512_permutex2var_ps(a, odds, b));
            _mm512_mask_storeu_ps(even.as_mut_ptr().add(i / 2), lanes(rest.div_ceil(2)), e);
            _mm512_mask_storeu_ps(odd.as_mut_ptr().add(i / 2), lanes(rest / 2), o);
        }
    }
}

/// Interleaves `even` (⌈n/2⌉ values) and `odd` (⌊n/2⌋) into `dst` (n): the inverse of
/// [`split_row`], a row of a stride-2 input gradient from its phases. AVX-512 where the CPU has it.
pub(crate) fn merge_row(even: &[f32], odd: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
    assert!(even.len() == dst.len().div_ceil(2) && odd.len() == dst.len() / 2, "merge_row: lengths");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: available() found AVX-512F.
        return unsafe { merge_row_avx512(even, odd, dst) };
    }
    for (i, d) in dst.iter_mut().enumerate() {
        d.write(if i % 2 == 0 { even[i / 2] } else { odd[i / 2] });
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn merge_row_avx512(even: &[f32], odd: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let n = dst.len();
    let out = dst.as_mut_ptr().cast::<f32>();
    for i in (0..n).step_by(2 * LANES) {
        let rest = n - i;
        // SAFETY: the masks keep the reads below ⌈n/2⌉ and ⌊n/2⌋ values from i/2 (the lengths of
        // `even` and `odd`, asserted by the caller) and the writes below n.
        unsafe {
            let e = _mm512_maskz_loadu_ps(lanes(rest.div_ceil(2)), even.as_ptr().add(i / 2));
            let o = _mm512_maskz_loadu_ps(lanes(rest / 2), odd.as_ptr().add(i / 2));
            _mm512_mask_storeu_ps(out.add(i), lanes(rest), _mm512_permutex2var_ps(e, low, o));
            _mm512_mask_storeu_ps(
                out.add(i + LANES.min(rest)),
                lanes(rest.saturating_sub(LANES)),
                _mm512_permutex2var_ps(e, high, o),
            );
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn row_splits_of_every_length() {
        for n in 0..70usize {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let (mut even, mut odd) = (vec![-1f32; n.div_ceil(2)], vec![-1f32; n / 2]);
            split_row(&src, &mut even, &mut odd);
            assert_eq!(even, src.iter().step_by(2).copied().collect::<Vec<_>>(), "even of {n}");
            assert_eq!(odd, src.iter().skip(1).step_by(2).copied().collect::<Vec<_>>(), "odd of {n}");
        }
    }

    #[test]
    fn row_merges_of_every_length() {
        for n in 0..70usize {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let (mut even, mut odd) = (vec![0f32; n.div_ceil(2)], vec![0f32; n / 2]);
            split_row(&src, &mut even, &mut odd);
            let mut merged = vec![std::mem::MaybeUninit::new(-1f32); n];
            merge_row(&even, &odd, &mut merged);
            // SAFETY: every element was initialised (to -1, then by merge_row).
            let merged: Vec<f32> = merged.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(merged, src, "length {n}");
        }
    }

    #[test]
    fn lane_sums_of_sixteen_registers() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let values: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        // SAFETY: available() found AVX-512F; every load reads 16 of the 256 values.
        let got = unsafe {
            let regs: [__m512; 16] = std::array::from_fn(|r| _mm512_loadu_ps(values[r * 16..].as_ptr()));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sum_lanes(&regs));
            out
        };
        for l in 0..4 {
            for m in 0..4 {
                let want: f32 = values[(4 * m + l) * 16..][..16].iter().sum();
                assert_eq!(got[l * 4 + m], want, "lane {} = register {}", l * 4 + m, 4 * m + l);
            }
        }
    }
}
