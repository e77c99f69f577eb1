//! The integer model's one heavy operation: a direct convolution, u8 inputs × i8 weights into i32.
//! Inputs carry their i8 values offset by 128 (unsigned, as AVX-512 VNNI's `vpdpbusd` wants them);
//! the offset is taken back out with each channel's weight sum.
//!
//! Inputs are channels-last with a zero border and channels padded to a multiple of 4, so that an
//! output pixel reads, for every tap, 4 input channels at a time from one address: one broadcast and
//! one `vpdpbusd` against a 64-byte vector holding those 4 channels' weights for 16 output channels.
//! No patch matrix is built. The kernel is chosen at run time: VNNI where the CPU has it, portable
//! code elsewhere.

/// Output channels per block (one 512-bit vector of i32).
pub const LANES: usize = 16;
/// Input channels per 32-bit lane of `vpdpbusd`.
pub const QUAD: usize = 4;
/// The offset that makes i8 input values unsigned (the stored form of 0).
pub const OFFSET: u8 = 128;

/// Which kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Vnni,
    Portable,
}

impl Kernel {
    /// The best kernel this CPU runs (detected once).
    pub fn detect() -> Kernel {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Kernel::Vnni;
            }
            Kernel::Portable
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Vnni => "AVX-512 VNNI (vpdpbusd)",
            Kernel::Portable => "portable",
        }
    }
}

/// A layer's weights packed as `[block of 16 outputs][tap][quad of inputs][16][4]`.
#[derive(Debug, Clone)]
pub struct PackedConv {
    /// Input channels, padded to a multiple of 4.
    pub channels: usize,
    /// Taps (k·k).
    pub taps: usize,
    /// Blocks of 16 output channels.
    pub blocks: usize,
    data: Vec<i8>,
    /// 128 × Σ w[o], per padded output channel.
    offset_sums: Vec<i32>,
}

impl PackedConv {
    /// Packs (out, in, taps) weights.
    pub fn new(weights: &[i8], out: usize, inputs: usize, taps: usize) -> Self {
        assert_eq!(weights.len(), out * inputs * taps);
        let channels = inputs.div_ceil(QUAD) * QUAD;
        let quads = channels / QUAD;
        let blocks = out.div_ceil(LANES);
        let mut data = vec![0i8; blocks * taps * quads * LANES * QUAD];
        let mut offset_sums = vec![0i32; blocks * LANES];
        for o in 0..out {
            let (block, lane) = (o / LANES, o % LANES);
            for c in 0..inputs {
                for t in 0..taps {
                    let w = weights[(o * inputs + c) * taps + t];
                    data[(((block * taps + t) * quads + c / QUAD) * LANES + lane) * QUAD + c % QUAD] = w;
                    offset_sums[o] += OFFSET as i32 * w as i32;
                }
            }
        }
        Self { channels, taps, blocks, data, offset_sums }
    }

    /// Values per output pixel of [`PackedConv::run`]'s result (the channels padded to 16).
    pub fn row_len(&self) -> usize {
        self.blocks * LANES
    }

    /// For each output pixel p: `acc[p][o] = Σ_t Σ_c (input[bases[p] + tap_offsets[t] + c] − 128) ·
    /// w[o][c][t]`; `acc` holds `bases.len()` × [`Self::row_len`] values.
    pub fn run(&self, kernel: Kernel, input: &[u8], bases: &[usize], tap_offsets: &[usize], acc: &mut [i32]) {
        assert_eq!(tap_offsets.len(), self.taps);
        assert_eq!(acc.len(), bases.len() * self.row_len());
        let reach = tap_offsets.iter().max().copied().unwrap_or(0) + self.channels;
        assert!(bases.iter().all(|&b| b + reach <= input.len()), "a tap reads past the input");
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Vnni` is only detected where the CPU has AVX-512 F, BW and VNNI, and
            // every read stays inside `input` (checked above).
            Kernel::Vnni => unsafe { vnni::run(self, input, bases, tap_offsets, acc) },
            _ => self.run_portable(input, bases, tap_offsets, acc),
        }
        for row in acc.chunks_exact_mut(self.row_len()) {
            for (a, s) in row.iter_mut().zip(&self.offset_sums) {
                *a -= s;
            }
        }
    }

    fn run_portable(&self, input: &[u8], bases: &[usize], tap_offsets: &[usize], acc: &mut [i32]) {
        let quads = self.channels / QUAD;
        for (&base, out) in bases.iter().zip(acc.chunks_exact_mut(self.row_len())) {
            for (block, lanes) in out.chunks_exact_mut(LANES).enumerate() {
                let mut sums = [0i32; LANES];
                for (t, &tap) in tap_offsets.iter().enumerate() {
                    for quad in 0..quads {
                        let a = &input[base + tap + quad * QUAD..][..QUAD];
                        let w = &self.data[((block * self.taps + t) * quads + quad) * LANES * QUAD..][..LANES * QUAD];
                        for (lane, sum) in sums.iter_mut().enumerate() {
                            for j in 0..QUAD {
                                *sum += a[j] as i32 * w[lane * QUAD + j] as i32;
                            }
                        }
                    }
                }
                lanes.copy_from_slice(&sums);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{PackedConv, LANES, QUAD};
    use std::arch::x86_64::*;

    /// Output pixels per tile: eight independent accumulators hide `vpdpbusd`'s latency.
    const TILE: usize = 8;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn run(w: &PackedConv, input: &[u8], bases: &[usize], taps: &[usize], acc: &mut [i32]) {
        let mut p = 0;
        while p + TILE <= bases.len() {
            tile::<TILE>(w, input, &bases[p..p + TILE], taps, &mut acc[p * w.row_len()..]);
            p += TILE;
        }
        while p < bases.len() {
            tile::<1>(w, input, &bases[p..p + 1], taps, &mut acc[p * w.row_len()..]);
            p += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize>(w: &PackedConv, input: &[u8], bases: &[usize], taps: &[usize], acc: &mut [i32]) {
        let quads = w.channels / QUAD;
        let x = input.as_ptr();
        for block in 0..w.blocks {
            let mut sums = [_mm512_setzero_si512(); R];
            let mut weights = w.data.as_ptr().add(block * w.taps * quads * LANES * QUAD);
            for &tap in taps {
                for quad in 0..quads {
                    let b = _mm512_loadu_si512(weights as *const _);
                    weights = weights.add(LANES * QUAD);
                    for (sum, &base) in sums.iter_mut().zip(bases) {
                        let a = _mm512_set1_epi32((x.add(base + tap + quad * QUAD) as *const i32).read_unaligned());
                        *sum = _mm512_dpbusd_epi32(*sum, a, b);
                    }
                }
            }
            for (r, sum) in sums.iter().enumerate() {
                _mm512_storeu_si512(acc.as_mut_ptr().add(r * w.row_len() + block * LANES) as *mut _, *sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every kernel equals the plain loops of a padded convolution, for odd channel counts,
        /// strides and sides.
        #[test]
        fn kernels_equal_the_reference(
            out in 1usize..40, inputs in 1usize..20, k in prop::sample::select(vec![1usize, 3]),
            side in 1usize..9, stride in 1usize..3, seed in 0u64..1000,
        ) {
            let mut state = seed;
            let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (state >> 33) as i32 };
            let taps = k * k;
            let w: Vec<i8> = (0..out * inputs * taps).map(|_| (next() % 256 - 128) as i8).collect();
            let pad = k / 2;
            let x: Vec<i8> = (0..side * side * inputs).map(|_| (next() % 256 - 128) as i8).collect();
            let packed = PackedConv::new(&w, out, inputs, taps);
            let (cp, wide) = (packed.channels, side + 2 * pad);
            let mut input = vec![OFFSET; wide * wide * cp];
            for y in 0..side {
                for xx in 0..side {
                    for c in 0..inputs {
                        input[((y + pad) * wide + xx + pad) * cp + c] = (x[(y * side + xx) * inputs + c] as i32 + 128) as u8;
                    }
                }
            }
            let o_side = (side + 2 * pad - k) / stride + 1;
            let bases: Vec<usize> = (0..o_side * o_side).map(|p| ((p / o_side) * stride * wide + (p % o_side) * stride) * cp).collect();
            let offsets: Vec<usize> = (0..taps).map(|t| ((t / k) * wide + t % k) * cp).collect();
            for kernel in [Kernel::Portable, Kernel::detect()] {
                let mut acc = vec![0i32; bases.len() * packed.row_len()];
                packed.run(kernel, &input, &bases, &offsets, &mut acc);
                for p in 0..bases.len() {
                    let (oy, ox) = (p / o_side, p % o_side);
                    for o in 0..out {
                        let mut want = 0i32;
                        for c in 0..inputs {
                            for t in 0..taps {
                                let (iy, ix) = ((oy * stride + t / k) as isize - pad as isize, (ox * stride + t % k) as isize - pad as isize);
                                if iy >= 0 && ix >= 0 && (iy as usize) < side && (ix as usize) < side {
                                    want += x[(iy as usize * side + ix as usize) * inputs + c] as i32 * w[(o * inputs + c) * taps + t] as i32;
                                }
                            }
                        }
                        prop_assert_eq!(acc[p * packed.row_len() + o], want, "{:?} pixel {} channel {}", kernel, p, o);
                    }
                }
            }
        }
    }
}
