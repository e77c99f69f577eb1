//! qat-lab: watch, live, whether a regularizer stops a network from memorising noisy labels.
//!
//! Data flows one way: [`config`] (presets) -> [`data`] (datasets + label noise) -> [`model`] (layers,
//! calling [`ops`], with [`regularize`]rs) -> [`train`] (worker thread, events) -> `ui` or headless ->
//! [`runs`] (records on disk) -> [`report`].

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod memory;
pub mod model;
pub mod ops;
pub mod regularize;
pub mod report;
pub mod runs;
pub mod threads;
pub mod train;
pub mod ui;
