//! Training: a worker thread per run that streams [`events::TrainEvent`]s and writes the run record.

pub mod checkpoint;
pub mod events;
pub mod footprint;
pub mod metrics;
pub mod optim;
pub mod trainer;

pub use events::{EpochMetrics, RunInfo, Status, Summary, TrainEvent};
pub use trainer::{spawn, RunControl, RunOptions};
