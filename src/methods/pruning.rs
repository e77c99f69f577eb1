//! Structured magnitude pruning: the network trains dense for `at_epoch` epochs, then every block's
//! inner convolution loses a fraction of its output channels, chosen by L1 norm, and training goes on.

use super::{Method, Outcome, Settings, SetupParam};
use crate::config::{step_choice, step_nearest, Experiment};
use serde::{Deserialize, Serialize};
use crate::model::ResNet;
use anyhow::Result;

/// Prunes `ratio` of the inner channels once, before epoch `at_epoch + 1`.
/// `[regularizer] kind = "pruning"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pruning {
    /// Fraction of output channels removed in every prunable layer.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Train dense for this many epochs ("F is pre-trained"), then prune and keep training.
    #[serde(default = "default_at_epoch")]
    pub at_epoch: usize,
    #[serde(default)]
    pub criterion: PruneCriterion,
}

fn default_ratio() -> f64 {
    0.75
}
fn default_at_epoch() -> usize {
    5
}

/// Which channels structured pruning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneCriterion {
    /// Remove the channels with the lowest L1 norm (the paper's reasoning; default).
    #[default]
    LowestL1,
    /// Remove the channels with the highest L1 norm (the paper's literal text).
    HighestL1,
}

impl Settings for Pruning {
    fn label(&self) -> String {
        format!("prune {:.0}%", self.ratio * 100.0)
    }
    fn help(&self) -> &'static str {
        "Structured pruning: trains dense, then removes the lowest-L1 channels of every block and keeps training."
    }
    fn validate(&self, exp: &Experiment) -> Result<(), String> {
        let (ratio, at_epoch, epochs) = (self.ratio, self.at_epoch, exp.train.epochs);
        if !(0.0..1.0).contains(&ratio) {
            return Err(format!("regularizer.ratio = {ratio} is out of range; allowed: [0, 1)"));
        }
        if at_epoch >= epochs {
            return Err(format!(
                "regularizer.at_epoch = {at_epoch} must be below train.epochs = {epochs} (pruning happens during training)"
            ));
        }
        Ok(())
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        let remove = match self.criterion {
            PruneCriterion::LowestL1 => "lowest L1",
            PruneCriterion::HighestL1 => "highest L1",
        };
        vec![
            SetupParam::new("ratio", format!("{:.0}% at epoch {}", self.ratio * 100.0, self.at_epoch)),
            SetupParam::new("remove", remove.into()),
        ]
    }
    /// Prunes by the middle of a shorter schedule at the latest, so that it happens during training.
    fn fit_schedule(&mut self, epochs: usize) {
        self.at_epoch = self.at_epoch.min(epochs.saturating_sub(1) / 2);
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        match which {
            0 => self.ratio = step_nearest(&[0.25, 0.5, 0.75, 0.9], self.ratio, dir),
            _ => {
                let criteria = [PruneCriterion::LowestL1, PruneCriterion::HighestL1];
                self.criterion = step_choice(&criteria, &self.criterion, dir)
            }
        }
    }
}

impl Method for Pruning {
    fn before_epoch(&mut self, epoch: usize, net: &mut ResNet, out: &mut Outcome) -> Result<()> {
        if epoch != self.at_epoch + 1 {
            return Ok(());
        }
        let before = net.cost()?;
        let kept = net.prune(self.ratio, self.criterion)?;
        let after = net.cost()?;
        out.reshaped = true;
        out.log.push(format!(
            "pruned {:.0}% of inner channels ({kept:?} kept): parameters {} -> {} ({:.1}x), MACs {} -> {} ({:.1}x)",
            self.ratio * 100.0,
            before.params,
            after.params,
            before.params as f64 / after.params as f64,
            before.macs,
            after.macs,
            before.macs as f64 / after.macs as f64
        ));
        Ok(())
    }
}

/// Which output channels to keep (`true`) in a layer whose per-channel L1 norms are `norms`.
/// Removes round(ratio·C) channels (never all of them), lowest or highest norms first; ties break by
/// channel index so the choice is deterministic.
pub fn channel_mask(norms: &[f32], ratio: f64, criterion: PruneCriterion) -> Vec<bool> {
    let c = norms.len();
    let remove = ((ratio * c as f64).round() as usize).min(c.saturating_sub(1));
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| {
        let ord = norms[a].partial_cmp(&norms[b]).unwrap_or(std::cmp::Ordering::Equal);
        let ord = match criterion {
            PruneCriterion::LowestL1 => ord,
            PruneCriterion::HighestL1 => ord.reverse(),
        };
        ord.then(a.cmp(&b))
    });
    let mut keep = vec![true; c];
    for &i in &order[..remove] {
        keep[i] = false;
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn removes_lowest_or_highest_norms() {
        let norms = [0.5, 0.1, 0.9, 0.3];
        assert_eq!(channel_mask(&norms, 0.5, PruneCriterion::LowestL1), vec![true, false, true, false]);
        assert_eq!(channel_mask(&norms, 0.5, PruneCriterion::HighestL1), vec![false, true, false, true]);
        assert_eq!(channel_mask(&norms, 0.99, PruneCriterion::LowestL1).iter().filter(|k| **k).count(), 1);
    }

    proptest! {
        #[test]
        fn removes_round_ratio_c_and_every_kept_norm_beats_every_removed(norms in proptest::collection::vec(0f32..10.0, 2..64), ratio in 0.0f64..0.95) {
            let keep = channel_mask(&norms, ratio, PruneCriterion::LowestL1);
            let removed = keep.iter().filter(|k| !**k).count();
            prop_assert_eq!(removed, ((ratio * norms.len() as f64).round() as usize).min(norms.len() - 1));
            let min_kept = norms.iter().zip(&keep).filter(|(_, k)| **k).map(|(n, _)| *n).fold(f32::INFINITY, f32::min);
            let max_removed = norms.iter().zip(&keep).filter(|(_, k)| !**k).map(|(n, _)| *n).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(min_kept >= max_removed);
        }
    }
}
