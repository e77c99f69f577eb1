//! Weight decay on the weights only (the paper penalises weights, not biases or batch norm):
//! decoupled (AdamW) or as a coupled L2 penalty in the loss.

use super::{Method, Settings, SetupParam};
use crate::config::{check_range, step_nearest, Experiment};
use crate::model::{Param, Role};
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Decay of `value` per step (decoupled) or penalty `value`·Σ‖W‖² (coupled).
/// `[regularizer] kind = "weight_decay"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightDecay {
    #[serde(default = "default_value")]
    pub value: f64,
    /// AdamW-style decoupled decay (paper); `false` adds an L2 penalty to the loss instead.
    #[serde(default = "default_decoupled")]
    pub decoupled: bool,
}

fn default_value() -> f64 {
    0.01
}
fn default_decoupled() -> bool {
    true
}

impl Settings for WeightDecay {
    fn label(&self) -> String {
        format!("wd {}{}", self.value, if self.decoupled { "" } else { " (L2)" })
    }
    fn help(&self) -> &'static str {
        "Weight decay: shrinks weights every step (AdamW), or an L2 penalty in the loss."
    }
    fn validate(&self, _exp: &Experiment) -> Result<(), String> {
        check_range("regularizer.value", self.value, 0.0, 1.0)
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        let style = if self.decoupled { "decoupled (AdamW)" } else { "L2 in the loss" };
        vec![SetupParam::new("decay", format!("{}", self.value)), SetupParam::new("style", style.into())]
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        match which {
            0 => self.value = step_nearest(&[1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1], self.value, dir),
            _ => self.decoupled = !self.decoupled,
        }
    }
}

impl Method for WeightDecay {
    fn decoupled_decay(&self) -> f64 {
        if self.decoupled {
            self.value
        } else {
            0.0
        }
    }

    fn penalty(&self, params: &[Param]) -> Result<Option<Tensor>> {
        if self.decoupled || self.value <= 0.0 {
            return Ok(None);
        }
        l2_penalty(params, self.value)
    }
}

/// Coupled L2 penalty α·Σ‖W‖² over the weights.
pub fn l2_penalty(params: &[Param], alpha: f64) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for p in params.iter().filter(|p| p.role == Role::Weight) {
        let s = p.var.as_tensor().sqr()?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    Ok(total.map(|t| t * alpha).transpose()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_penalty_sums_squared_weights_only_and_decoupled_adds_none() {
        let param =
            |name: &str, v: &[f32], role| Param { name: name.into(), var: Var::new(v, &Device::Cpu).unwrap(), role };
        let all = vec![
            param("w", &[1.0, -2.0], Role::Weight),
            param("b", &[5.0], Role::NoDecay),
            param("m", &[7.0], Role::Buffer),
        ];
        let coupled = WeightDecay { value: 0.01, decoupled: false };
        let l2 = coupled.penalty(&all).unwrap().unwrap().to_scalar::<f32>().unwrap();
        assert!((l2 - 0.05).abs() < 1e-7, "{l2}");
        assert_eq!(coupled.decoupled_decay(), 0.0);
        let decoupled = WeightDecay { value: 0.01, decoupled: true };
        assert!(decoupled.penalty(&all).unwrap().is_none());
        assert_eq!(decoupled.decoupled_decay(), 0.01);
    }
}
