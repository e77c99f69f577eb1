//! What a training run tells the outside world. The UI and the headless sink see nothing else.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Known once the data is loaded and the model built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub dir: PathBuf,
    pub name: String,
    /// Regularizer label, e.g. `W4/A4`.
    pub label: String,
    pub dataset: String,
    /// Class names, or label (AU) names for multi-label data.
    pub classes: Vec<String>,
    #[serde(default)]
    pub multi_label: bool,
    pub train_size: usize,
    pub val_size: usize,
    pub test_size: usize,
    /// Requested fraction s of re-annotated labels.
    pub noise_rate: f64,
    /// Fraction of training labels that really differ from the truth.
    pub measured_noise_rate: f64,
    pub params: usize,
    pub macs: usize,
    pub epochs: usize,
    pub batches_per_epoch: usize,
    pub device: String,
}

pub use crate::runs::record::{Best, EpochMetrics, Status, Summary};

/// Progress inside an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchProgress {
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    pub loss: f64,
    pub images_per_sec: f64,
}

/// Everything a run reports, in order: `Started`, then `Batch`/`Epoch`/`Log`, then `Finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainEvent {
    Started(RunInfo),
    Batch(BatchProgress),
    Epoch(EpochMetrics),
    Log(String),
    /// Boxed: a summary is large next to the per-batch events that dominate the channel.
    Finished(Box<Summary>),
}
