//! The on-disk record of a run: its per-epoch metrics and its summary. `train` writes these types and
//! every reader (`report`, `paper`, the lab) reads them; [`FORMAT`] says which layout a record has.

use serde::{Deserialize, Serialize};

/// The record layout this build writes. 0: records before the version was stored (no class names, no
/// `[robust]` in their experiment); 1: class names in the summary, `[robust]` in the experiment.
pub const FORMAT: u32 = 1;

/// Metrics of one finished epoch (one line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss on the noisy labels (with the regularizer's loss terms).
    pub train_loss: f64,
    /// Training accuracy against the noisy labels, during the epoch.
    pub train_acc: f64,
    /// Memorisation: share of corrupted examples (labels, for multi-label data) predicted as their
    /// wrong (noisy) label.
    pub memorized: f64,
    /// Memorisation per clean class (per label, for multi-label data); `None` where the class had no
    /// corrupted example. Absent from older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memorized_per_class: Vec<Option<f64>>,
    /// Share of clean training examples predicted correctly.
    pub clean_fit: f64,
    /// Loss on the clean test set.
    pub eval_loss: f64,
    /// Test accuracy (classes), or average F1 over labels (multi-label).
    pub eval_acc: f64,
    pub per_class_acc: Vec<f64>,
    /// Multi-label: test F1 per label (positive class); empty for classes.
    #[serde(default)]
    pub f1: Vec<f64>,
    /// Multi-label: test binary cross-entropy per label.
    #[serde(default)]
    pub label_loss: Vec<f64>,
    /// Multi-label: decision thresholds used (0.5, or tuned on validation).
    #[serde(default)]
    pub thresholds: Vec<f64>,
    /// Multi-label: average F1 on the validation split.
    #[serde(default)]
    pub val_f1: Option<f64>,
    /// Loss and accuracy on the validation split (noisy labels), when there is one.
    pub val_loss: Option<f64>,
    pub val_acc: Option<f64>,
    /// Over-fitting gap: eval loss minus train loss.
    pub gap: f64,
    pub images_per_sec: f64,
    pub epoch_secs: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Completed,
    /// Early stopping ended it; the best-validation weights were restored.
    EarlyStopped,
    /// Stopped by the user.
    Stopped,
    /// The loss became NaN or infinite.
    Diverged,
    Failed,
}

impl Status {
    pub fn is_final(self) -> bool {
        self != Status::Running
    }
    pub fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::EarlyStopped => "early-stopped",
            Status::Stopped => "stopped",
            Status::Diverged => "diverged",
            Status::Failed => "failed",
        }
    }
}

/// Best test accuracy seen and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub epoch: usize,
    pub eval_acc: f64,
    pub eval_loss: f64,
}

/// `summary.json`: how the run ended and its headline numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The record layout ([`FORMAT`]); 0 for records written before it was stored.
    #[serde(default)]
    pub format: u32,
    pub run_id: String,
    pub name: String,
    pub label: String,
    pub status: Status,
    /// Why it failed or diverged.
    pub message: Option<String>,
    pub epochs_run: usize,
    /// Metrics of the last epoch.
    pub last: Option<EpochMetrics>,
    /// Epoch with the best test accuracy (an oracle figure: it looks at the test set).
    pub best: Option<Best>,
    /// Test metrics of the weights the run keeps: the last epoch's, or the best-validation
    /// checkpoint's under early stopping.
    pub final_eval_acc: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Epoch whose weights were kept, when not the last (early stopping).
    pub restored_epoch: Option<usize>,
    pub noise_rate: f64,
    pub measured_noise_rate: f64,
    pub params: usize,
    pub macs: usize,
    /// Parameters and MACs after structured pruning, when pruned.
    pub pruned_params: Option<usize>,
    pub pruned_macs: Option<usize>,
    pub wall_secs: f64,
    pub device: String,
    /// The dataset's class names, or its label (AU) names, in output order (absent from records
    /// written before they were stored).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Single-label data: the noise transition matrix of the training labels (row i: the share of
    /// clean class i labelled j); empty for multi-label data and older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transition: Vec<Vec<f64>>,
    /// What the kept network weighs (absent from older records and from runs that kept no weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ModelSize>,
}

/// A network's size on disk: its float weights (4 bytes a parameter), before and after pruning, and
/// the file of its packed integer model (QAT runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSize {
    pub float_bytes: usize,
    pub pruned_float_bytes: Option<usize>,
    pub int_bytes: Option<usize>,
}

/// Bytes in KiB, for the sizes every screen and table prints.
pub fn kib(bytes: usize) -> f64 {
    bytes as f64 / 1024.0
}

impl ModelSize {
    /// The smallest form the run can be shipped in: the integer model, else the pruned floats.
    pub fn deployed_bytes(&self) -> usize {
        self.int_bytes.or(self.pruned_float_bytes).unwrap_or(self.float_bytes)
    }

    /// How many times smaller than the float network of the same architecture (the baseline's).
    pub fn shrink(&self) -> f64 {
        self.float_bytes as f64 / self.deployed_bytes().max(1) as f64
    }

    /// "1053.6 KiB float, 145.6 KiB int (7.2x smaller)".
    pub fn describe(&self) -> String {
        let kib = |b: usize| format!("{:.1} KiB", kib(b));
        let mut parts = vec![format!("{} float", kib(self.float_bytes))];
        if let Some(p) = self.pruned_float_bytes {
            parts.push(format!("{} after pruning", kib(p)));
        }
        if let Some(i) = self.int_bytes {
            parts.push(format!("{} int", kib(i)));
        }
        let shrink = if self.deployed_bytes() < self.float_bytes {
            format!(" ({:.1}x smaller)", self.shrink())
        } else {
            String::new()
        };
        format!("{}{shrink}", parts.join(", "))
    }
}

impl Summary {
    /// The summary of a run that has just started: nothing measured yet.
    pub fn started(name: &str, label: &str, noise_rate: f64) -> Self {
        Self {
            format: FORMAT,
            run_id: String::new(),
            name: name.into(),
            label: label.into(),
            status: Status::Running,
            message: None,
            epochs_run: 0,
            last: None,
            best: None,
            final_eval_acc: None,
            final_eval_loss: None,
            restored_epoch: None,
            noise_rate,
            measured_noise_rate: 0.0,
            params: 0,
            macs: 0,
            pruned_params: None,
            pruned_macs: None,
            wall_secs: 0.0,
            device: String::new(),
            classes: Vec::new(),
            transition: Vec::new(),
            size: None,
        }
    }
}
