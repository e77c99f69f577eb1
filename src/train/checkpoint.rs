//! Resumable checkpoints. At the end of every epoch but the last a run writes
//! `checkpoint.safetensors` into its folder: the network (tensors, pruning masks, dropout generator),
//! Adam's moments, what the methods carry (early stopping's best weights, co-teaching's peer), the
//! data order and the loop's generator, the epochs recorded so far and the summary. A run resumed
//! from it goes on at the next epoch and, on the CPU with the same thread count, ends with the same
//! metrics as a run never interrupted (the resume test checks it). A stop mid-epoch loses only that
//! epoch's batches: they are trained again from the checkpoint of the epoch before.

use super::events::{EpochMetrics, Summary};
use super::optim::Adam;
use crate::methods::Method;
use crate::model::{ResNet, State};
use crate::runs::{RunDir, CHECKPOINT_FILE};
use anyhow::{Context, Result};
use rand_chacha::ChaCha8Rng;

/// Where the training loop stands after an epoch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Epochs done (1-based: the next epoch is `epoch + 1`).
    pub epoch: usize,
    pub history: Vec<EpochMetrics>,
    pub summary: Summary,
    /// The training order, which each epoch shuffles further.
    pub order: Vec<usize>,
}

/// Writes the checkpoint of `progress` into the run folder (atomically: one file, one rename).
pub fn save(
    dir: &RunDir,
    progress: &Progress,
    rng: &ChaCha8Rng,
    net: &ResNet,
    optimizer: &Adam,
    method: &dyn Method,
) -> Result<()> {
    let mut state = State::default();
    state.put("epoch", &progress.epoch)?;
    state.put("history", &progress.history)?;
    state.put("summary", &progress.summary)?;
    state.put("order", &progress.order)?;
    state.put("rng", &rng.get_word_pos().to_string())?;
    state.scoped("net.", |s| net.save_state(s))?;
    state.scoped("adam.", |s| optimizer.save_state(s))?;
    state.scoped("method.", |s| method.save_state(s))?;
    state.write(&dir.path.join(CHECKPOINT_FILE))
}

/// The checkpoint of a run folder, read but not yet applied.
pub struct Saved {
    state: State,
    /// The summary as it stood at the checkpoint.
    pub summary: Summary,
}

impl Saved {
    pub fn read(dir: &RunDir) -> Result<Saved> {
        let path = dir.path.join(CHECKPOINT_FILE);
        if !path.is_file() {
            anyhow::bail!(
                "{} has no {CHECKPOINT_FILE}: the run ended before its first epoch did, so there is nothing to resume; train it again",
                dir.path.display()
            );
        }
        let state = State::read(&path)?;
        let summary = state.get("summary")?;
        Ok(Saved { state, summary })
    }

    /// Restores the network, the optimiser, the methods and the loop's generator; returns where the
    /// loop stood.
    pub fn apply(
        mut self,
        rng: &mut ChaCha8Rng,
        net: &mut ResNet,
        optimizer: &mut Adam,
        method: &mut dyn Method,
    ) -> Result<Progress> {
        let state = &mut self.state;
        let context = "the checkpoint does not fit this run's network (was experiment.toml edited?)";
        state.scoped("net.", |s| net.restore_state(s)).context(context)?;
        state.scoped("adam.", |s| optimizer.restore_state(s)).context(context)?;
        state.scoped("method.", |s| method.restore_state(s)).context(context)?;
        let position: String = state.get("rng")?;
        rng.set_word_pos(position.parse().context("the checkpoint's rng is not a number")?);
        Ok(Progress {
            epoch: state.get("epoch")?,
            history: state.get("history")?,
            summary: self.summary,
            order: state.get("order")?,
        })
    }
}
