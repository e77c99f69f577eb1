//! Dropout (Srivastava et al. 2014): activations zeroed at random in training, at one position.

use super::Method;
use crate::config::DropoutPosition;
use crate::model::resnet::{NetSpec, Wiring};

/// Dropout of probability `p` after every block or before the classifier.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub position: DropoutPosition,
}

impl Method for Dropout {
    /// The masks and the masked activations.
    fn step_copies(&self) -> Option<f64> {
        Some(4.5)
    }

    fn wire(&self, _spec: &mut NetSpec, wiring: &mut Wiring, _multi_label: bool) {
        wiring.dropout = Some((self.p, self.position));
    }
}
