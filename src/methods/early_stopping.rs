//! Early stopping: watches a validation score, keeps the best epoch's weights, stops when patience
//! runs out, and ends the run with the best weights (whether patience ran out or the epochs did).

use super::{EpochEnd, Method, Outcome, Settings, SetupParam};
use crate::config::{step_choice, Experiment};
use crate::model::{ResNet, State};
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Early stopping's settings: `[regularizer] kind = "early_stopping"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Epochs without a better validation loss before training stops.
    #[serde(default = "default_patience")]
    pub patience: usize,
}

fn default_patience() -> usize {
    10
}

impl Settings for EarlyStopping {
    fn label(&self) -> String {
        format!("early stop p={}", self.patience)
    }
    fn help(&self) -> &'static str {
        "Early stopping: watches the loss on a validation split and keeps the best epoch's weights."
    }
    fn validate(&self, exp: &Experiment) -> Result<(), String> {
        if self.patience == 0 {
            return Err("regularizer.patience must be at least 1".into());
        }
        if exp.data.val_fraction <= 0.0 {
            return Err("early stopping needs a validation split: set data.val_fraction (e.g. 0.1)".into());
        }
        Ok(())
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(EarlyStoppingRun::new(self.patience))
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        vec![SetupParam::new("patience", format!("{} epochs", self.patience))]
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        if which == 0 {
            self.patience = step_choice(&[2, 3, 5, 10, 20], &self.patience, dir);
        }
    }
}

/// Tracks the best validation score (lower is better), its weights, and when patience has run out.
#[derive(Debug, Clone)]
pub struct EarlyStoppingRun {
    pub patience: usize,
    pub best: f64,
    pub best_epoch: Option<usize>,
    since_best: usize,
    best_weights: Option<Vec<Tensor>>,
}

/// What the trainer should do after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New best: save a checkpoint.
    Improved,
    /// No improvement, patience left.
    Wait,
    /// Patience exhausted: stop and restore the best checkpoint.
    Stop,
}

impl EarlyStoppingRun {
    pub fn new(patience: usize) -> Self {
        Self { patience, best: f64::INFINITY, best_epoch: None, since_best: 0, best_weights: None }
    }

    /// Records the score of `epoch` (lower is better; NaN never improves).
    pub fn observe(&mut self, epoch: usize, score: f64) -> Verdict {
        if score < self.best {
            self.best = score;
            self.best_epoch = Some(epoch);
            self.since_best = 0;
            Verdict::Improved
        } else {
            self.since_best += 1;
            if self.since_best >= self.patience {
                Verdict::Stop
            } else {
                Verdict::Wait
            }
        }
    }
}

impl Method for EarlyStoppingRun {
    fn needs_validation(&self) -> bool {
        true
    }

    /// Validation loss for classes; validation average F1 (higher is better) for multi-label data.
    fn after_epoch(&mut self, end: &EpochEnd, net: &ResNet, out: &mut Outcome) -> Result<()> {
        let score = if end.multi_label { -end.val_f1.unwrap_or(f64::NAN) } else { end.val_loss.unwrap_or(f64::NAN) };
        match self.observe(end.epoch, score) {
            Verdict::Improved => self.best_weights = Some(net.params.snapshot()?),
            Verdict::Wait => {}
            Verdict::Stop => {
                out.stop = true;
                out.log.push(format!(
                    "early stopping: no better validation {} for {} epochs; best was epoch {}",
                    if end.multi_label { "average F1" } else { "loss" },
                    self.patience,
                    self.best_epoch.unwrap_or(0)
                ));
            }
        }
        Ok(())
    }

    fn save_state(&self, state: &mut State) -> Result<()> {
        // JSON has no infinity: the best score is absent until an epoch has one.
        state.put("best", &self.best_epoch.map(|_| self.best))?;
        state.put("best_epoch", &self.best_epoch)?;
        state.put("since_best", &self.since_best)?;
        for (i, t) in self.best_weights.iter().flatten().enumerate() {
            state.put_tensor(&format!("best.{i}"), t)?;
        }
        state.put("best_weights", &self.best_weights.as_ref().map(|w| w.len()))
    }

    fn restore_state(&mut self, state: &mut State) -> Result<()> {
        self.best = state.get::<Option<f64>>("best")?.unwrap_or(f64::INFINITY);
        self.best_epoch = state.get("best_epoch")?;
        self.since_best = state.get("since_best")?;
        let device = candle_core::Device::Cpu;
        self.best_weights = match state.get::<Option<usize>>("best_weights")? {
            Some(n) => Some((0..n).map(|i| state.tensor(&format!("best.{i}"), &device)).collect::<Result<_>>()?),
            None => None,
        };
        Ok(())
    }

    fn keep_weights(&mut self, net: &mut ResNet, epochs_run: usize) -> Result<Option<usize>> {
        match (&self.best_weights, self.best_epoch) {
            (Some(weights), Some(best)) if best != epochs_run => {
                net.params.restore(weights)?;
                Ok(Some(best))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_improvement() {
        let mut es = EarlyStoppingRun::new(2);
        let scores = [1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.6];
        let verdicts: Vec<Verdict> = scores[..6].iter().enumerate().map(|(e, &s)| es.observe(e, s)).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Improved, Improved, Wait, Improved, Wait, Stop]);
        assert_eq!(es.best_epoch, Some(3));
        assert_eq!(es.best, 0.7);
    }

    #[test]
    fn nan_never_counts_as_better() {
        let mut es = EarlyStoppingRun::new(1);
        assert_eq!(es.observe(0, 1.0), Verdict::Improved);
        assert_eq!(es.observe(1, f64::NAN), Verdict::Stop);
    }
}
