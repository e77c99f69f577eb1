//! Methods: every regularizer is one file behind one trait, [`Method`], whose small hooks the trainer
//! calls without knowing any method by name. [`build`] is the one place that maps a preset's
//! `[regularizer]` to its method.

pub mod baseline;
pub mod dropout;
pub mod early_stopping;
pub mod label_smoothing;
pub mod pruning;
pub mod quantization;
pub mod weight_decay;

use crate::config::Regularizer;
use crate::model::resnet::{NetSpec, Wiring};
use crate::model::{Param, ResNet};
use crate::ops;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// One training batch as a loss sees it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Single-label data: the (possibly corrupted) class of each image.
    pub labels: &'a [u32],
    /// Multi-label data: (N, L) targets, 1 present, 0 absent, negative unknown.
    pub targets: &'a [f32],
    /// Classes, or labels per image.
    pub classes: usize,
    pub multi_label: bool,
    pub device: &'a Device,
}

/// What the trainer knows when an epoch has been evaluated and recorded.
#[derive(Debug, Clone, Copy)]
pub struct EpochEnd {
    pub epoch: usize,
    pub multi_label: bool,
    pub val_loss: Option<f64>,
    /// Multi-label data: validation average F1.
    pub val_f1: Option<f64>,
}

/// What an epoch hook tells the trainer.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Lines for the run's log.
    pub log: Vec<String>,
    /// The network's parameters changed shape: the optimiser starts afresh and the record gets the
    /// new cost.
    pub reshaped: bool,
    /// Training ends now; the run is recorded as early-stopped.
    pub stop: bool,
}

/// A regularizer (or, later, a loss made for noisy labels). Every hook has a neutral default, so a
/// method implements only what it changes.
pub trait Method: Send + std::fmt::Debug {
    /// Layers it adds to the network before it is built (quantizers, dropout, per-label heads).
    fn wire(&self, _spec: &mut NetSpec, _wiring: &mut Wiring, _multi_label: bool) {}

    /// Whether it decides on the validation split (a run without one is refused).
    fn needs_validation(&self) -> bool {
        false
    }

    /// Adam's decoupled weight decay.
    fn decoupled_decay(&self) -> f64 {
        0.0
    }

    /// The training loss of a batch; `None` leaves it to [`default_loss`].
    fn loss(&self, _batch: &Batch, _logits: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A term added to the loss (an L2 penalty).
    fn penalty(&self, _params: &[Param]) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Before the batches of `epoch` (1-based): it may reshape the network.
    fn before_epoch(&mut self, _epoch: usize, _net: &mut ResNet, _out: &mut Outcome) -> Result<()> {
        Ok(())
    }

    /// After an epoch has been evaluated and recorded: it may keep weights or stop training.
    fn after_epoch(&mut self, _end: &EpochEnd, _net: &ResNet, _out: &mut Outcome) -> Result<()> {
        Ok(())
    }

    /// At the end: restores the weights it wants kept and says of which epoch (`None` keeps the
    /// last epoch's).
    fn keep_weights(&mut self, _net: &mut ResNet, _epochs_run: usize) -> Result<Option<usize>> {
        Ok(None)
    }
}

/// The method of a preset's `[regularizer]`: the one registry of methods.
pub fn build(regularizer: &Regularizer) -> Box<dyn Method> {
    match *regularizer {
        Regularizer::None => Box::new(baseline::Baseline),
        Regularizer::EarlyStopping { patience } => Box::new(early_stopping::EarlyStopping::new(patience)),
        Regularizer::WeightDecay { value, decoupled } => Box::new(weight_decay::WeightDecay { value, decoupled }),
        Regularizer::Dropout { p, position } => Box::new(dropout::Dropout { p, position }),
        Regularizer::LabelSmoothing { alpha } => Box::new(label_smoothing::LabelSmoothing { alpha }),
        Regularizer::Pruning { ratio, at_epoch, criterion } => {
            Box::new(pruning::Pruning { ratio, at_epoch, criterion })
        }
        Regularizer::Quantization { weight_bits, act_bits, first_last_bits, bn, ema_momentum } => {
            Box::new(quantization::Quantization { weight_bits, act_bits, first_last_bits, bn, ema_momentum })
        }
    }
}

/// The layers `regularizer` wires into a network for single-label data.
pub fn wiring(regularizer: &Regularizer, spec: &mut NetSpec) -> Wiring {
    let mut wiring = Wiring::default();
    build(regularizer).wire(spec, &mut wiring, false);
    wiring
}

/// Cross-entropy on the noisy classes, or masked binary cross-entropy on the known labels.
pub fn default_loss(batch: &Batch, logits: &Tensor) -> Result<Tensor> {
    if batch.multi_label {
        binary_loss(batch, logits, 0.0)
    } else {
        Ok(candle_nn::loss::cross_entropy(logits, &Tensor::new(batch.labels, batch.device)?)?)
    }
}

/// Masked binary cross-entropy against targets smoothed label-wise by `alpha` (0: none).
pub fn binary_loss(batch: &Batch, logits: &Tensor, alpha: f64) -> Result<Tensor> {
    let known: Vec<f32> = batch.targets.iter().map(|&t| if t >= 0.0 { 1.0 } else { 0.0 }).collect();
    let clean: Vec<f32> = batch.targets.iter().map(|&t| if t > 0.5 { 1.0 } else { 0.0 }).collect();
    let soft = if alpha > 0.0 { label_smoothing::smooth_binary(&clean, alpha) } else { clean };
    let shape = (batch.targets.len() / batch.classes.max(1), batch.classes);
    Ok(ops::masked_bce_with_logits(
        logits,
        &Tensor::from_vec(soft, shape, batch.device)?,
        &Tensor::from_vec(known, shape, batch.device)?,
    )?)
}
