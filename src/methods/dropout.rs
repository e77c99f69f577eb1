//! Dropout (Srivastava et al. 2014): activations zeroed at random in training, at one position.

use super::{Method, Settings, SetupParam};
use crate::config::{step_choice, step_nearest, Experiment};
use crate::model::resnet::{NetSpec, Wiring};
use serde::{Deserialize, Serialize};

/// Dropout of probability `p` after every block or before the classifier.
/// `[regularizer] kind = "dropout"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropout {
    #[serde(default = "default_p")]
    pub p: f64,
    #[serde(default)]
    pub position: DropoutPosition,
}

fn default_p() -> f64 {
    0.1
}

/// Where dropout is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropoutPosition {
    /// On the pooled features, before the classifier (default).
    #[default]
    Classifier,
    /// After every residual block.
    Blocks,
}

impl Settings for Dropout {
    fn label(&self) -> String {
        format!("dropout p={}", self.p)
    }
    fn help(&self) -> &'static str {
        "Dropout: zeroes activations at random in training (p), at the chosen position."
    }
    fn validate(&self, _exp: &Experiment) -> Result<(), String> {
        match self.p {
            p if (0.0..1.0).contains(&p) => Ok(()),
            p => Err(format!("regularizer.p = {p} is out of range; allowed: [0, 1)")),
        }
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        let position = match self.position {
            DropoutPosition::Classifier => "before classifier",
            DropoutPosition::Blocks => "after every block",
        };
        vec![SetupParam::new("p", format!("{}", self.p)), SetupParam::new("position", position.into())]
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        match which {
            0 => self.p = step_nearest(&[0.05, 0.1, 0.2, 0.3, 0.5], self.p, dir),
            _ => self.position = step_choice(&[DropoutPosition::Classifier, DropoutPosition::Blocks], &self.position, dir),
        }
    }
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
