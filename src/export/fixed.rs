//! Requantization by fixed-point multipliers (Jacob et al. 2018, section 2.2): a real multiplier M > 0
//! is held as an integer mantissa m0 in [2^30, 2^31) and a shift, M ≈ m0 · 2^−shift, so that rescaling
//! an i32 accumulator is one 64-bit multiply and one rounding shift.

/// A real multiplier in fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedMul {
    mantissa: i64,
    shift: u32,
}

/// Mantissa bits: m0 < 2^31, so that m0 times a 32-bit value fits an i64.
const MANTISSA_BITS: i32 = 31;

impl FixedMul {
    /// The fixed-point form of `m` (> 0 and finite; anything else is treated as 0, which maps every
    /// value to 0). Multipliers down to 2^−32 keep 31 significant bits; smaller ones lose bits.
    pub fn new(m: f64) -> Self {
        if !(m.is_finite() && m > 0.0) {
            return Self { mantissa: 0, shift: 0 };
        }
        // m = f · 2^e with f in [0.5, 1): m0 = round(f · 2^31), shift = 31 − e.
        let e = m.log2().floor() as i32 + 1;
        let mut shift = MANTISSA_BITS - e;
        let mut mantissa = (m * 2f64.powi(shift)).round() as i64;
        if mantissa >= 1 << MANTISSA_BITS {
            // f rounded up to 1.0.
            mantissa >>= 1;
            shift -= 1;
        }
        // Multipliers of 2^31 and more are whole numbers up to 2^40 (saturating beyond); tiny ones
        // keep fewer bits.
        let (mantissa, shift) = match shift {
            s if s < 0 => ((m.round() as i64).min(1 << 40), 0),
            s if s > 62 => (mantissa >> (s - 62), 62),
            s => (mantissa, s),
        };
        Self { mantissa, shift: shift as u32 }
    }

    /// round(x · M), halves away from zero (as the float model rounds).
    #[inline]
    pub fn apply(&self, x: i64) -> i64 {
        let magnitude = x.unsigned_abs() as u128;
        // In 64 bits where the product fits (the common case), else in 128.
        let r = match (magnitude as u64).checked_mul(self.mantissa as u64) {
            Some(p) if self.shift == 0 => p as i64,
            Some(p) if p < u64::MAX / 2 => ((p + (1u64 << (self.shift - 1))) >> self.shift) as i64,
            // x = hi·2^32 + lo: for shift ≤ 32, hi·m·2^32 is a multiple of 2^shift, so the rounding
            // shift splits exactly into two 64-bit products (the residual stream's rescale).
            _ if self.shift <= 32 => {
                let m = self.mantissa as u64;
                let (hi, lo) = (magnitude as u64 >> 32, magnitude as u64 & 0xffff_ffff);
                let half = if self.shift == 0 { 0 } else { 1u64 << (self.shift - 1) };
                ((hi * m) << (32 - self.shift)).wrapping_add((lo * m + half) >> self.shift) as i64
            }
            _ => {
                let p = magnitude * self.mantissa as u128;
                let half = if self.shift == 0 { 0 } else { 1u128 << (self.shift - 1) };
                ((p + half) >> self.shift) as i64
            }
        };
        if x < 0 {
            -r
        } else {
            r
        }
    }

    /// The multiplier this stands for.
    #[cfg(test)]
    fn value(&self) -> f64 {
        self.mantissa as f64 / 2f64.powi(self.shift as i32)
    }
}

/// The affine requantization of one output channel, round((acc + b) · M) for an i32 accumulator
/// `acc` and a bias b given in 2^−`bias_bits` accumulator units: the bias is moved into the
/// multiplier's fixed point once, so that each value costs one 64-bit multiply-add and a rounding
/// shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requant {
    mantissa: i64,
    shift: u32,
    offset: i128,
}

impl Requant {
    pub fn new(m: f64, bias: i64, bias_bits: u32) -> Self {
        let FixedMul { mantissa, shift } = FixedMul::new(m);
        // b · m0 · 2^−bias_bits, rounded, in the product's units.
        let scaled = bias as i128 * mantissa as i128;
        let offset = if bias_bits == 0 {
            scaled
        } else {
            let half = 1i128 << (bias_bits - 1);
            if scaled >= 0 {
                (scaled + half) >> bias_bits
            } else {
                -((-scaled + half) >> bias_bits)
            }
        };
        Self { mantissa, shift, offset }
    }

    /// The 64-bit form of this requantization for accumulators up to `max_acc` in magnitude: None
    /// where a product, the offset or the rounding would leave the i64 range.
    pub fn narrow(&self, max_acc: i64) -> Option<NarrowRequant> {
        let offset = i64::try_from(self.offset).ok()?;
        let half = if self.shift == 0 { 0 } else { 1i64 << (self.shift - 1) };
        let bound = (max_acc as i128 * self.mantissa as i128).abs() + (offset as i128).abs() + half as i128;
        (bound < i64::MAX as i128).then_some(NarrowRequant {
            mantissa: self.mantissa,
            offset,
            half,
            shift: self.shift as i64,
        })
    }

    /// round((acc + b) · M), halves away from zero.
    #[inline]
    pub fn apply(&self, acc: i32) -> i64 {
        // In 64 bits where the offset and the product fit (the common case), else in i128.
        if let Ok(offset) = i64::try_from(self.offset) {
            if let Some(p) = (acc as i64).checked_mul(self.mantissa).and_then(|p| p.checked_add(offset)) {
                if self.shift == 0 {
                    return p;
                }
                if let Some(up) = p.unsigned_abs().checked_add(1u64 << (self.shift - 1)) {
                    let r = (up >> self.shift) as i64;
                    return if p < 0 { -r } else { r };
                }
            }
        }
        let p = acc as i128 * self.mantissa as i128 + self.offset;
        if self.shift == 0 {
            return p as i64;
        }
        let r = ((p.unsigned_abs() + (1u128 << (self.shift - 1))) >> self.shift) as i64;
        if p < 0 {
            -r
        } else {
            r
        }
    }
}

/// [`Requant`] in 64 bits, for accumulators whose bound it was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NarrowRequant {
    pub mantissa: i64,
    pub offset: i64,
    pub half: i64,
    pub shift: i64,
}

/// `out[i] = round((acc[i] + b_i) · M_i)` for one output pixel's channels, branch-free so that it
/// compiles to vector code (AVX-512 DQ has the 64-bit multiplies), chosen once at run time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512dq+avx512vl+avx512bw", "x86_64+avx2"))]
pub fn requant_row(acc: &[i32], requant: &[NarrowRequant], out: &mut [i64]) {
    for ((o, &a), q) in out.iter_mut().zip(acc).zip(requant) {
        let p = a as i64 * q.mantissa + q.offset;
        let r = (p.abs() + q.half) >> q.shift;
        *o = if p < 0 { -r } else { r };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against an f64 reference: within half a unit plus the mantissa's relative error, and
        /// exactly equal away from the halves.
        #[test]
        fn requantization_matches_the_f64_reference(m in 1e-9f64..1e4, x in -(1i64 << 31)..(1i64 << 31)) {
            let f = FixedMul::new(m);
            let exact = x as f64 * m;
            let got = f.apply(x) as f64;
            let tolerance = 0.5 + exact.abs() * 2f64.powi(-29) + 1e-9;
            prop_assert!((got - exact).abs() <= tolerance, "{} * {} = {} (exact {})", x, m, got, exact);
            let frac = exact.abs().fract();
            if (frac - 0.5).abs() > exact.abs() * 2f64.powi(-28) + 1e-6 {
                prop_assert_eq!(got, exact.round());
            }
        }

        #[test]
        fn the_mantissa_keeps_31_bits(m in 1e-9f64..1e4) {
            let f = FixedMul::new(m);
            prop_assert!((f.value() - m).abs() <= m * 2f64.powi(-30));
        }
    }

    proptest! {
        #[test]
        fn affine_requantization_matches_the_f64_reference(
            m in 1e-9f64..1e9,
            acc in -(1i32 << 24)..(1i32 << 24),
            bias in any::<i32>(),
            bits in 0u32..=32,
        ) {
            let r = Requant::new(m, bias as i64, bits);
            let exact = (acc as f64 + bias as f64 / 2f64.powi(bits as i32)) * m;
            let got = r.apply(acc) as f64;
            prop_assert!((got - exact).abs() <= 0.5 + exact.abs() * 2f64.powi(-29) + 1e-6, "{} vs {}", got, exact);
        }
    }

    proptest! {
        #[test]
        fn the_64_bit_row_equals_the_wide_requantization(
            m in 1e-9f64..1e9, acc in -(1i32 << 22)..(1i32 << 22), bias in any::<i32>(), bits in 0u32..=32,
        ) {
            let wide = Requant::new(m, bias as i64, bits);
            if let Some(narrow) = wide.narrow(1 << 22) {
                let mut out = [0i64];
                requant_row(&[acc], &[narrow], &mut out);
                prop_assert_eq!(out[0], wide.apply(acc));
            }
        }

        #[test]
        fn large_values_rescale_exactly(x in -(1i64 << 45)..(1i64 << 45), m in 0.25f64..4.0) {
            let f = FixedMul::new(m);
            let exact = (x as i128 * f.mantissa as i128).unsigned_abs();
            let half = if f.shift == 0 { 0 } else { 1u128 << (f.shift - 1) };
            let want = ((exact + half) >> f.shift) as i64 * x.signum();
            prop_assert_eq!(f.apply(x), want);
        }
    }

    #[test]
    fn edge_multipliers() {
        assert_eq!(FixedMul::new(1.0).apply(-7), -7);
        assert_eq!(FixedMul::new(0.5).apply(3), 2, "1.5 rounds away from zero");
        assert_eq!(FixedMul::new(0.5).apply(-3), -2);
        assert_eq!(FixedMul::new(0.0).apply(1000), 0);
        assert_eq!(FixedMul::new(f64::NAN).apply(1000), 0);
        // Just below a power of two rounds the mantissa up to 2^31: still exact.
        let f = FixedMul::new(1.0 - 1e-12);
        assert_eq!(f.apply(1 << 20), 1 << 20);
        assert!(FixedMul::new(1e-15).apply(1 << 30) == 0);
    }
}
