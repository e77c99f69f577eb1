//! Regularizers that need more than a loss term or an optimiser setting: quantization, pruning, label
//! smoothing and early stopping. Weight decay and dropout live in the optimiser and the model.

pub mod early_stop;
pub mod prune;
pub mod quant;
pub mod smoothing;
