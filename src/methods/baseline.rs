//! The baseline: no regularization, every hook neutral.

use super::Method;

/// Plain training on the noisy labels.
#[derive(Debug, Clone, Copy)]
pub struct Baseline;

impl Method for Baseline {}
