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
        // Multipliers of 2^31 and more (never needed here) saturate; tiny ones keep fewer bits.
        let (mantissa, shift) = match shift {
            s if s < 0 => ((1 << MANTISSA_BITS) - 1, 0),
            s if s > 62 => (mantissa >> (s - 62), 62),
            s => (mantissa, s),
        };
        Self { mantissa, shift: shift as u32 }
    }

    /// round(x · M), halves away from zero (as the float model rounds). `x` up to 2^32 in magnitude.
    #[inline]
    pub fn apply(&self, x: i64) -> i64 {
        let p = x.unsigned_abs() as i128 * self.mantissa as i128;
        let r = if self.shift == 0 { p } else { (p + (1i128 << (self.shift - 1))) >> self.shift };
        let r = r as i64;
        if x < 0 {
            -r
        } else {
            r
        }
    }

    /// The multiplier this stands for.
    pub fn value(&self) -> f64 {
        self.mantissa as f64 / 2f64.powi(self.shift as i32)
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
