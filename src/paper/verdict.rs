//! Verdicts from seeds: a claim is a difference that should be positive, measured once per seed
//! (paired: every method of a seed trains on the same data from the same initial seed).
//!
//! The rule, written out in every report: with the per-seed differences d₁…dₙ, mean Δ and standard
//! error SE = sd(d)/√n, the claim is **held** when Δ > 2·SE, **not held** when Δ < −2·SE or a
//! precondition fails, and **inconclusive** when |Δ| ≤ 2·SE (the difference lies inside the seed
//! spread) or there are fewer than two seeds. A claim whose runs a budget does not train is **not
//! run**, with the reason.

use serde::Serialize;

/// What the records say of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Held,
    NotHeld,
    Inconclusive,
    /// The budget does not train the claim's runs (the report says why).
    NotRun,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::NotHeld => "not held",
            Verdict::Inconclusive => "inconclusive",
            Verdict::NotRun => "not run",
        }
    }

    /// Both parts of a claim: held when both are, not held when either is not.
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::NotHeld, _) | (_, Verdict::NotHeld) => Verdict::NotHeld,
            (Verdict::Held, Verdict::Held) => Verdict::Held,
            _ => Verdict::Inconclusive,
        }
    }
}

/// The paired differences of one comparison, with their mean and standard error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub differences: Vec<f64>,
    pub mean: f64,
    /// Standard error of the mean; None with fewer than two seeds.
    pub se: Option<f64>,
}

impl Evidence {
    pub fn new(differences: Vec<f64>) -> Self {
        let n = differences.len();
        let mean = if n == 0 { f64::NAN } else { differences.iter().sum::<f64>() / n as f64 };
        let se = (n >= 2).then(|| {
            let var = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        });
        Self { differences, mean, se }
    }

    /// The 2·SE rule of this module's docs.
    pub fn verdict(&self) -> Verdict {
        match self.se {
            Some(se) if self.mean.is_finite() && self.mean > 2.0 * se => Verdict::Held,
            Some(se) if self.mean.is_finite() && self.mean < -2.0 * se => Verdict::NotHeld,
            _ => Verdict::Inconclusive,
        }
    }

    /// `Δ = +3.10 ± 0.80 (2·SE 1.60, n = 3)`, in the unit of the differences times `scale`.
    pub fn text(&self, scale: f64, unit: &str) -> String {
        match self.se {
            Some(se) => format!(
                "Δ = {:+.2}{unit} (SE {:.2}{unit}, 2·SE {:.2}{unit}, n = {})",
                self.mean * scale,
                se * scale,
                2.0 * se * scale,
                self.differences.len()
            ),
            None => format!("Δ = {:+.2}{unit} (n = {}: no spread)", self.mean * scale, self.differences.len()),
        }
    }
}

/// Mean of a slice (NaN when empty).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_standard_errors_separate_the_three_verdicts() {
        assert_eq!(Evidence::new(vec![0.05, 0.06, 0.04]).verdict(), Verdict::Held);
        assert_eq!(Evidence::new(vec![-0.05, -0.06, -0.04]).verdict(), Verdict::NotHeld);
        // Mean 0.01, but the seeds disagree by far more.
        assert_eq!(Evidence::new(vec![0.10, -0.08, 0.01]).verdict(), Verdict::Inconclusive);
        assert_eq!(Evidence::new(vec![0.10]).verdict(), Verdict::Inconclusive, "one seed has no spread");
        assert_eq!(Evidence::new(vec![]).verdict(), Verdict::Inconclusive);
        let e = Evidence::new(vec![0.02, 0.04]);
        assert!((e.mean - 0.03).abs() < 1e-12);
        assert!((e.se.unwrap() - 0.01).abs() < 1e-12, "sd 0.01414 / sqrt 2");
    }

    #[test]
    fn parts_combine() {
        use Verdict::*;
        assert_eq!(Held.and(Held), Held);
        assert_eq!(Held.and(Inconclusive), Inconclusive);
        assert_eq!(Inconclusive.and(NotHeld), NotHeld);
    }
}
