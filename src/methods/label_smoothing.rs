//! Label smoothing (paper eq. 1): y' = (1 - α)·y + α/C; label-wise (C = 2) on multi-label data.

use super::{binary_loss, Batch, Method, Settings, SetupParam};
use crate::config::{check_range, step_nearest, Experiment};
use crate::ops;
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Training on smoothed targets with factor `alpha`.
/// `[regularizer] kind = "label_smoothing"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSmoothing {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_alpha() -> f64 {
    0.1
}

impl Settings for LabelSmoothing {
    fn label(&self) -> String {
        format!("smooth a={}", self.alpha)
    }
    fn help(&self) -> &'static str {
        "Label smoothing: trains on (1-a)·y + a/C instead of one-hot labels."
    }
    fn validate(&self, _exp: &Experiment) -> Result<(), String> {
        check_range("regularizer.alpha", self.alpha, 0.0, 1.0)
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        vec![SetupParam::new("alpha", format!("{}", self.alpha))]
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        if which == 0 {
            self.alpha = step_nearest(&[0.05, 0.1, 0.2, 0.3, 0.5], self.alpha, dir);
        }
    }
}

impl Method for LabelSmoothing {
    fn loss(&mut self, batch: &Batch, logits: &Tensor) -> Result<Option<Tensor>> {
        if batch.multi_label {
            return binary_loss(batch, logits, self.alpha).map(Some);
        }
        if self.alpha <= 0.0 {
            return Ok(None);
        }
        let n = batch.labels.len();
        let targets = smooth_one_hot(batch.labels, batch.classes, self.alpha);
        Ok(Some(ops::soft_cross_entropy(logits, &Tensor::from_vec(targets, (n, batch.classes), batch.device)?)?))
    }
}

/// Smoothed one-hot targets for a batch of class labels, row-major (N, C).
pub fn smooth_one_hot(labels: &[u32], num_classes: usize, alpha: f64) -> Vec<f32> {
    let off = (alpha / num_classes as f64) as f32;
    let on = (1.0 - alpha) as f32 + off;
    let mut out = vec![off; labels.len() * num_classes];
    for (i, &l) in labels.iter().enumerate() {
        out[i * num_classes + l as usize] = on;
    }
    out
}

/// Label-wise smoothing of binary targets (multi-label, C = 2): y' = (1 - α)·y + α/2.
pub fn smooth_binary(targets: &[f32], alpha: f64) -> Vec<f32> {
    targets.iter().map(|&y| ((1.0 - alpha) * y as f64 + alpha / 2.0) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_equation_one() {
        let t = smooth_one_hot(&[2, 0], 4, 0.1);
        let expected = [0.025, 0.025, 0.925, 0.025, 0.925, 0.025, 0.025, 0.025];
        assert!(t.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{t:?}");
        let b = smooth_binary(&[1.0, 0.0], 0.1);
        assert!((b[0] - 0.95).abs() < 1e-6 && (b[1] - 0.05).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn rows_sum_to_one_and_argmax_is_kept(labels in proptest::collection::vec(0u32..10, 1..50), alpha in 0.0f64..0.9) {
            let t = smooth_one_hot(&labels, 10, alpha);
            for (i, row) in t.chunks(10).enumerate() {
                prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                let arg = row.iter().enumerate().max_by(|a, b| a.1.partial_cmp(b.1).unwrap()).unwrap().0;
                prop_assert_eq!(arg as u32, labels[i]);
            }
        }
    }
}
