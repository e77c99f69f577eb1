//! Structured magnitude pruning: the network trains dense for `at_epoch` epochs, then every block's
//! inner convolution loses a fraction of its output channels, chosen by L1 norm, and training goes on.

use super::{Method, Outcome};
use crate::config::PruneCriterion;
use crate::model::ResNet;
use anyhow::Result;

/// Prunes `ratio` of the inner channels once, before epoch `at_epoch + 1`.
#[derive(Debug, Clone, Copy)]
pub struct Pruning {
    pub ratio: f64,
    pub at_epoch: usize,
    pub criterion: PruneCriterion,
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
