//! Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018): L_q = (1 - p_y^q) / q, between
//! cross-entropy (q -> 0) and the noise-robust mean absolute error (q = 1). Multi-label data: the same
//! per label, with p the probability given to the label's (noisy) value, over the known labels.

use super::{mean_of_log_likelihood, Batch, Method, Settings};
use crate::config::Experiment;
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// GCE with exponent `q` (the paper's default 0.7): `[robust] kind = "gce"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gce {
    #[serde(default = "default_q")]
    pub q: f64,
}

fn default_q() -> f64 {
    0.7
}

impl Settings for Gce {
    fn label(&self) -> String {
        format!("GCE q={}", self.q)
    }
    fn help(&self) -> &'static str {
        "GCE: (1 - p^q)/q, between cross-entropy and the noise-robust MAE (q = 0.7)."
    }
    fn validate(&self, _exp: &Experiment) -> Result<(), String> {
        match self.q {
            q if q > 0.0 && q <= 1.0 => Ok(()),
            q => Err(format!("robust.q = {q} is out of range; allowed: (0, 1]")),
        }
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
}

impl Gce {
    /// (1 - e^(q·log p)) / q, element-wise.
    fn of_log_likelihood(&self, logp: &Tensor) -> Result<Tensor> {
        Ok(((logp * self.q)?.exp()?.neg()? + 1.0)?.affine(1.0 / self.q, 0.0)?)
    }
}

impl Method for Gce {
    fn loss(&mut self, batch: &Batch, logits: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(mean_of_log_likelihood(batch, logits, |logp| self.of_log_likelihood(logp))?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::log_likelihood;
    use super::super::tests::{batch, check_against_reference};
    use super::*;

    /// GCE of one row in f64.
    fn reference(q: f64) -> impl Fn(&[f64], u32) -> f64 {
        move |z: &[f64], y: u32| {
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
            let p = (z[y as usize] - m).exp() / sum;
            (1.0 - p.powf(q)) / q
        }
    }

    #[test]
    fn loss_and_gradient_match_an_f64_reference() {
        for q in [0.7, 1.0, 0.1] {
            check_against_reference(&mut Gce { q }, reference(q), false);
            check_against_reference(&mut Gce { q }, super::super::tests::binary(reference(q)), true);
        }
    }

    #[test]
    fn q_near_zero_approaches_cross_entropy_and_unknown_labels_are_ignored() {
        let logits = Tensor::new(&[[2.0f32, -1.0, 0.5]], &candle_core::Device::Cpu).unwrap();
        let mut gce = Gce { q: 1e-4 };
        let b = batch(&[0], &[], 3, false, &logits);
        let got = gce.loss(&b, &logits).unwrap().unwrap().to_scalar::<f32>().unwrap() as f64;
        let ce = -log_likelihood(&logits, &[0]).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - ce).abs() < 1e-3, "{got} vs {ce}");
        // Multi-label: an unknown label (-1) changes nothing.
        let two = Tensor::new(&[[2.0f32, -1.0]], &candle_core::Device::Cpu).unwrap();
        let one_known = gce.loss(&batch(&[], &[1.0, -1.0], 2, true, &two), &two).unwrap().unwrap();
        let first = Tensor::new(&[[2.0f32]], &candle_core::Device::Cpu).unwrap();
        let alone = gce.loss(&batch(&[], &[1.0], 1, true, &first), &first).unwrap().unwrap();
        assert_eq!(one_known.to_scalar::<f32>().unwrap(), alone.to_scalar::<f32>().unwrap());
    }
}
