//! Symmetric cross-entropy (Wang et al., ICCV 2019): alpha·CE + beta·RCE, where the reverse
//! cross-entropy -Σ_k p_k log y_k takes log 0 = A = -4 (the paper's clamp), so RCE = -A·(1 - p_y).
//! Multi-label data: the same per label (C = 2), over the known labels.

use super::{mean_of_log_likelihood, Batch, Method, Settings};
use crate::config::{check_range, Experiment};
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// log 0 in the reverse cross-entropy.
pub const LOG_ZERO: f64 = -4.0;

/// SCE with the paper's CIFAR-10 defaults alpha = 0.1, beta = 1.0: `[robust] kind = "sce"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sce {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_alpha() -> f64 {
    0.1
}
fn default_beta() -> f64 {
    1.0
}

impl Settings for Sce {
    fn label(&self) -> String {
        format!("SCE a={} b={}", self.alpha, self.beta)
    }
    fn help(&self) -> &'static str {
        "SCE: 0.1·CE + 1.0·reverse CE; the reverse term is bounded, so wrong labels pull less."
    }
    fn validate(&self, _exp: &Experiment) -> Result<(), String> {
        check_range("robust.alpha", self.alpha, 0.0, 100.0)?;
        check_range("robust.beta", self.beta, 0.0, 100.0)?;
        if self.alpha + self.beta <= 0.0 {
            return Err("robust.alpha and robust.beta are both 0: nothing would be trained".into());
        }
        Ok(())
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
}

impl Sce {
    /// alpha·(-log p) + beta·(-A)·(1 - p), element-wise from log p.
    fn of_log_likelihood(&self, logp: &Tensor) -> Result<Tensor> {
        let ce = logp.neg()?;
        let rce = (logp.exp()?.neg()? + 1.0)?.affine(-LOG_ZERO, 0.0)?;
        Ok((ce.affine(self.alpha, 0.0)? + rce.affine(self.beta, 0.0)?)?)
    }
}

impl Method for Sce {
    fn loss(&mut self, batch: &Batch, logits: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(mean_of_log_likelihood(batch, logits, |logp| self.of_log_likelihood(logp))?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{binary, check_against_reference};
    use super::*;

    /// SCE of one row in f64, written out as the paper defines it: the sum over classes of
    /// p_k·log(clamped one-hot).
    fn reference(alpha: f64, beta: f64) -> impl Fn(&[f64], u32) -> f64 {
        move |z: &[f64], y: u32| {
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
            let p: Vec<f64> = z.iter().map(|v| (v - m).exp() / sum).collect();
            let ce = -p[y as usize].ln();
            let rce: f64 = -(0..z.len()).map(|k| p[k] * if k == y as usize { 0.0 } else { LOG_ZERO }).sum::<f64>();
            alpha * ce + beta * rce
        }
    }

    #[test]
    fn loss_and_gradient_match_an_f64_reference() {
        for (a, b) in [(0.1, 1.0), (1.0, 0.0), (0.0, 1.0)] {
            check_against_reference(&mut Sce { alpha: a, beta: b }, reference(a, b), false);
            check_against_reference(&mut Sce { alpha: a, beta: b }, binary(reference(a, b)), true);
        }
    }
}
