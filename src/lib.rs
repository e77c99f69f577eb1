//! qat-lab: watch, live, whether a regularizer stops a network from memorising noisy labels.
//!
//! Data flows one way: [`config`] (presets) -> [`data`] (datasets + label noise) -> [`model`] (layers,
//! calling [`ops`], with [`regularize`]rs) -> [`train`] (worker thread, events) -> `ui` or headless ->
//! [`runs`] (records on disk) -> [`report`]. Multi-run commands go through [`runner`]; [`paper`]
//! reproduces the paper's claims on top of it.

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
