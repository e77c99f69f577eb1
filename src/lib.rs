//! qat-lab: watch, live, whether a regularizer stops a network from memorising noisy labels.
//!
//! Data flows one way: [`config`] (presets) -> [`data`] (datasets + label noise) -> [`model`] and
//! [`methods`] (layers; the regularizers and noise-robust losses, one file each) -> [`ops`] (`cpu/` or
//! `gpu/` kernels) -> [`train`] (worker thread, events) -> [`runs`] (records on disk) -> [`ui`] or
//! [`cli`] -> [`report`]. Multi-run commands go through [`runner`]; [`paper`] reproduces the paper's
//! claims on top of it; [`export`] ships a finished run's integer network.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod memory;
pub mod methods;
pub mod model;
pub mod ops;
pub mod paper;
pub mod report;
pub mod runner;
pub mod runs;
pub mod signals;
pub mod slurm;
pub mod threads;
pub mod train;
pub mod ui;
