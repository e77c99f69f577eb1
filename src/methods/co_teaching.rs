//! Co-teaching (Han et al., NeurIPS 2018): two networks train side by side; on every batch each picks
//! the samples with the smallest loss under itself, and its peer learns from those. Noisy labels have
//! large losses early on, so each network shields the other from them. The share dropped ramps
//! linearly from 0 to the forget rate over the first `tk` epochs (the authors' schedule); it defaults
//! to the noise rate, as in the paper.
//!
//! Multi-label data: each label column picks its small-loss (image, label) entries among the known
//! ones (noise is per label there, so one noisy AU does not discard an image's other AUs). The run's
//! metrics are those of the first network; the peer has the same layers (and quantizers).

use super::{binary_log_likelihood, known_and_clean, log_likelihood, Batch, Method, Settings, Setup};
use crate::config::{check_range, Experiment, Regularizer};
use crate::model::{ResNet, State};
use crate::ops;
use crate::threads;
use crate::train::optim::Adam;
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Seed offset of the peer network, so that the two start apart.
const PEER_SEED: u64 = 0x0c07_eac4;

/// Co-teaching's settings: `[robust] kind = "co_teaching"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoTeaching {
    /// Share of each batch dropped once ramped up; 0 (the default) means the preset's noise rate.
    #[serde(default)]
    pub forget_rate: f64,
    /// Epochs over which the forget rate ramps up from 0.
    #[serde(default = "default_tk")]
    pub tk: usize,
}

fn default_tk() -> usize {
    10
}

impl Settings for CoTeaching {
    fn label(&self) -> String {
        match self.forget_rate {
            f if f > 0.0 => format!("co-teaching f={f}"),
            _ => "co-teaching".into(),
        }
    }
    fn help(&self) -> &'static str {
        "Co-teaching: two networks; each trains on the small-loss samples its peer keeps, dropping up to the noise rate (2x the time)."
    }
    fn validate(&self, exp: &Experiment) -> Result<(), String> {
        check_range("robust.forget_rate", self.forget_rate, 0.0, 0.95)?;
        if self.tk == 0 {
            return Err("robust.tk must be at least 1 (epochs over which the forget rate ramps up)".into());
        }
        if matches!(exp.regularizer, Regularizer::Pruning(_)) {
            return Err("co-teaching does not combine with pruning (its peer network is not pruned); use robust.kind = \"none\" or another regularizer".into());
        }
        Ok(())
    }
    fn method(&self, exp: &Experiment) -> Box<dyn Method> {
        let rate = if self.forget_rate > 0.0 { self.forget_rate } else { exp.data.noise.rate };
        Box::new(CoTeachingRun::new(rate, self.tk))
    }
}

/// Co-teaching while a run trains: its forget rate (resolved), ramp and peer network.
#[derive(Debug)]
pub struct CoTeachingRun {
    pub forget_rate: f64,
    pub tk: usize,
    peer: Option<Peer>,
}

struct Peer {
    net: ResNet,
    optimizer: Adam,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({} parameters)", self.net.params.trainable_count())
    }
}

impl CoTeachingRun {
    pub fn new(forget_rate: f64, tk: usize) -> Self {
        Self { forget_rate, tk, peer: None }
    }

    /// Share of each batch dropped in 1-based `epoch`: 0 at epoch 1, rising linearly to the forget
    /// rate at epoch `tk` and staying there (`linspace(0, rate, tk)` in the authors' code).
    pub fn forget_at(&self, epoch: usize) -> f64 {
        let e = epoch.saturating_sub(1);
        if e >= self.tk {
            self.forget_rate
        } else if self.tk == 1 {
            0.0
        } else {
            self.forget_rate * e as f64 / (self.tk - 1) as f64
        }
    }
}

/// Which samples train a network: image indices (classes), or a 0/1 mask over (image, label).
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Images(Vec<u32>),
    Entries(Vec<f32>),
}

/// Indices of the `keep` smallest of `losses`, ties broken by index.
pub fn small_loss(losses: &[f32], keep: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..losses.len() as u32).collect();
    order.sort_by(|&a, &b| losses[a as usize].total_cmp(&losses[b as usize]).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// How many of `n` samples to keep when dropping a share `forget`: at least one.
fn kept(n: usize, forget: f64) -> usize {
    (((1.0 - forget) * n as f64) as usize).clamp(1.min(n), n)
}

/// The small-loss selection of a batch under `logits`, dropping a share `forget`.
pub fn select(logits: &Tensor, batch: &Batch, forget: f64) -> Result<Selection> {
    if !batch.multi_label {
        let losses = log_likelihood(logits, batch.labels)?.neg()?.to_vec1::<f32>()?;
        return Ok(Selection::Images(small_loss(&losses, kept(losses.len(), forget))));
    }
    let (known, clean) = known_and_clean(batch.targets);
    let clean_t = Tensor::from_vec(clean, logits.shape(), batch.device)?;
    let losses = binary_log_likelihood(logits, &clean_t)?.neg()?.flatten_all()?.to_vec1::<f32>()?;
    let labels = batch.classes;
    let mut mask = vec![0f32; losses.len()];
    for label in 0..labels {
        let entries: Vec<usize> = (label..losses.len()).step_by(labels).filter(|&k| known[k] > 0.0).collect();
        let column: Vec<f32> = entries.iter().map(|&k| losses[k]).collect();
        for i in small_loss(&column, kept(column.len(), forget)) {
            mask[entries[i as usize]] = 1.0;
        }
    }
    Ok(Selection::Entries(mask))
}

/// The mean loss of `logits` over the `selection` (cross-entropy, or masked binary cross-entropy).
pub fn selected_loss(logits: &Tensor, batch: &Batch, selection: &Selection) -> Result<Tensor> {
    match selection {
        Selection::Images(idx) => {
            let rows = Tensor::new(idx.as_slice(), batch.device)?;
            let labels: Vec<u32> = idx.iter().map(|&i| batch.labels[i as usize]).collect();
            let picked = logits.index_select(&rows, 0)?;
            Ok(candle_nn::loss::cross_entropy(&picked, &Tensor::new(labels.as_slice(), batch.device)?)?)
        }
        Selection::Entries(mask) => {
            let (_, clean) = known_and_clean(batch.targets);
            let shape = logits.shape().clone();
            Ok(ops::masked_bce_with_logits(
                logits,
                &Tensor::from_vec(clean, &shape, batch.device)?,
                &Tensor::from_vec(mask.clone(), &shape, batch.device)?,
            )?)
        }
    }
}

impl Method for CoTeachingRun {
    /// The peer network, of the same size.
    fn networks(&self) -> usize {
        2
    }

    fn built(&mut self, net: &ResNet, setup: &Setup) -> Result<()> {
        let peer = ResNet::new(net.spec, &setup.wiring, &setup.device, setup.seed ^ PEER_SEED);
        let optimizer = Adam::new(&peer.params.entries, setup.lr, setup.decoupled_decay)?;
        self.peer = Some(Peer { net: peer, optimizer });
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, logits: &Tensor) -> Result<Option<Tensor>> {
        let forget = self.forget_at(batch.epoch);
        let peer = self.peer.as_mut().ok_or_else(|| anyhow!("co-teaching's peer network was not built"))?;
        let peer_logits = threads::compute(batch.device, || peer.net.forward(batch.images, true))?;
        let by_main = select(&logits.detach(), batch, forget)?;
        let by_peer = select(&peer_logits.detach(), batch, forget)?;
        let peer_loss = selected_loss(&peer_logits, batch, &by_main)?;
        threads::compute(batch.device, || peer.optimizer.step(&peer_loss.backward()?))?;
        Ok(Some(selected_loss(logits, batch, &by_peer)?))
    }

    fn save_state(&self, state: &mut State) -> Result<()> {
        let peer = self.peer.as_ref().ok_or_else(|| anyhow!("co-teaching's peer network was not built"))?;
        state.scoped("peer.", |s| peer.net.save_state(s))?;
        state.scoped("peer_adam.", |s| peer.optimizer.save_state(s))
    }

    fn restore_state(&mut self, state: &mut State) -> Result<()> {
        let peer = self.peer.as_mut().ok_or_else(|| anyhow!("co-teaching's peer network was not built"))?;
        state.scoped("peer.", |s| peer.net.restore_state(s))?;
        state.scoped("peer_adam.", |s| peer.optimizer.restore_state(s))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::batch;
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_forget_rate_ramps_linearly_over_tk_epochs() {
        let c = CoTeachingRun::new(0.4, 5);
        let rates: Vec<f64> = (1..=7).map(|e| c.forget_at(e)).collect();
        let want = [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4];
        assert!(rates.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{rates:?}");
        assert_eq!(CoTeachingRun::new(0.3, 1).forget_at(1), 0.0);
        assert_eq!(CoTeachingRun::new(0.3, 1).forget_at(2), 0.3);
    }

    #[test]
    fn the_selection_leaves_out_the_known_noisy_examples() {
        // Six images; a network that fits the clean ones gives the true class a high logit. Images 1
        // and 4 carry wrong labels, so their loss is large: dropping a third leaves exactly the clean.
        let truth = [0u32, 1, 2, 0, 1, 2];
        let noisy = [0u32, 2, 2, 0, 0, 2];
        let mut z = vec![0f32; 18];
        for (i, &t) in truth.iter().enumerate() {
            z[i * 3 + t as usize] = 4.0;
        }
        let logits = Tensor::from_vec(z, (6, 3), &Device::Cpu).unwrap();
        let b = batch(&noisy, &[], 3, false, &logits);
        assert_eq!(select(&logits, &b, 1.0 / 3.0).unwrap(), Selection::Images(vec![0, 2, 3, 5]));
        assert_eq!(select(&logits, &b, 0.0).unwrap(), Selection::Images(vec![0, 1, 2, 3, 4, 5]));
        // The selected loss is the cross-entropy of those rows alone.
        let sel = selected_loss(&logits, &b, &Selection::Images(vec![0, 2, 3, 5])).unwrap();
        let clean = log_likelihood(&logits, &noisy).unwrap().to_vec1::<f32>().unwrap();
        let want = -(clean[0] + clean[2] + clean[3] + clean[5]) / 4.0;
        assert!((sel.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn multi_label_selection_is_per_label_among_the_known_entries() {
        // Two labels over four images; label 0 of image 2 is wrong (logit -3, target 1), label 1 of
        // image 3 is unknown.
        let logits = Tensor::new(&[[3f32, -3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let targets = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, -1.0];
        let b = batch(&[], &targets, 2, true, &logits);
        let Selection::Entries(mask) = select(&logits, &b, 0.25).unwrap() else { panic!("entries") };
        // Label 0 keeps 3 of 4 (not image 2); label 1 keeps 2 of its 3 known (int(0.75 * 3) = 2).
        assert_eq!(mask, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
    }
}
