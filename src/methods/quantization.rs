//! Quantization-aware training: symmetric uniform fake-quantization with a straight-through gradient.
//!
//! Weights use one scale per output channel, λ_c = max|W_c|, recomputed every step. Activations (layer
//! inputs) use one scale per tensor, λ = max|X| of the batch in training, and an exponential moving
//! average of it in eval.

use super::{Method, Settings, SetupParam};
use crate::config::{check_range, step_choice, Experiment};
use serde::{Deserialize, Serialize};
use crate::model::layers::QuantSpec;
use crate::model::resnet::{NetSpec, Wiring};
use crate::ops;
use candle_core::{Result, Tensor, Var};

/// QAT at W`weight_bits`/A`act_bits` in the inner layers and `first_last_bits` in the first and last,
/// with batch norm folded into the weights or kept.
/// `[regularizer] kind = "quantization"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    #[serde(default = "default_bits")]
    pub weight_bits: u32,
    #[serde(default = "default_bits")]
    pub act_bits: u32,
    /// Bits of the first and last layers (weights and activations).
    #[serde(default = "default_first_last_bits")]
    pub first_last_bits: u32,
    #[serde(default)]
    pub bn: BnMode,
    /// Momentum of the moving average of activation scales used in eval.
    #[serde(default = "default_ema")]
    pub ema_momentum: f64,
}

fn default_bits() -> u32 {
    4
}
fn default_first_last_bits() -> u32 {
    8
}
fn default_ema() -> f64 {
    0.9
}

/// Batch-norm handling under quantization-aware training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BnMode {
    /// BN folded into the conv weights before they are quantized (Jacob et al. 2018; the paper's CIFAR setting).
    #[default]
    Fold,
    /// BN kept after the quantized convolution (the paper's AU setting).
    Keep,
}

impl Settings for Quantization {
    fn label(&self) -> String {
        match (self.weight_bits, self.act_bits) {
            (w, a) if a >= 32 => format!("W{w}/Afloat"),
            (w, a) => format!("W{w}/A{a}"),
        }
    }
    fn help(&self) -> &'static str {
        "Quantization-aware training: weights (per channel) and layer inputs rounded to b bits with a straight-through gradient; first/last layers 8 bits."
    }
    fn validate(&self, _exp: &Experiment) -> std::result::Result<(), String> {
        for (key, bits) in [
            ("regularizer.weight_bits", self.weight_bits),
            ("regularizer.act_bits", self.act_bits),
            ("regularizer.first_last_bits", self.first_last_bits),
        ] {
            if !(2..=16).contains(&bits) && bits != 32 {
                return Err(format!("{key} = {bits} is out of range; allowed: 2..=16, or 32 for float"));
            }
        }
        check_range("regularizer.ema_momentum", self.ema_momentum, 0.0, 0.9999)
    }
    fn method(&self, _exp: &Experiment) -> Box<dyn Method> {
        Box::new(*self)
    }
    fn setup_params(&self) -> Vec<SetupParam> {
        let act = if self.act_bits >= 32 { "float".into() } else { format!("A{}", self.act_bits) };
        let bn = match self.bn {
            BnMode::Fold => "fold",
            BnMode::Keep => "keep",
        };
        vec![
            SetupParam::new("weight bits", format!("W{}", self.weight_bits)),
            SetupParam::new("act bits / BN", format!("{act} / {bn}")),
        ]
    }
    fn step_param(&mut self, which: usize, dir: isize) {
        match which {
            0 => self.weight_bits = step_choice(&[2, 3, 4, 6, 8], &self.weight_bits, dir),
            _ => {
                // Cycle A bits, and the BN mode once every A-bit value has been shown.
                let order = [
                    (2, BnMode::Fold),
                    (4, BnMode::Fold),
                    (8, BnMode::Fold),
                    (32, BnMode::Fold),
                    (2, BnMode::Keep),
                    (4, BnMode::Keep),
                    (8, BnMode::Keep),
                    (32, BnMode::Keep),
                ];
                (self.act_bits, self.bn) = step_choice(&order, &(self.act_bits, self.bn), dir);
            }
        }
    }
}

impl Method for Quantization {
    /// Folded-BN QAT keeps the float and the quantized copy of every layer (measured 3.8-4.7).
    fn step_copies(&self) -> Option<f64> {
        (self.bn == BnMode::Fold).then_some(5.5)
    }

    fn wire(&self, spec: &mut NetSpec, wiring: &mut Wiring, multi_label: bool) {
        let quant =
            |weight_bits, act_bits| QuantSpec { weight_bits, act_bits, ema_momentum: self.ema_momentum, bn: self.bn };
        wiring.inner_quant = Some(quant(self.weight_bits, self.act_bits));
        wiring.edge_quant = Some(quant(self.first_last_bits, self.first_last_bits));
        // The paper's multi-task QAT keeps one batch norm per AU head.
        if multi_label && self.bn == BnMode::Keep {
            spec.per_label_heads = true;
        }
    }
}

/// Bits that mean "leave this tensor in float".
pub const FLOAT_BITS: u32 = 32;

/// Grid steps on each side of zero: 2^(b-1) - 1 (so a b-bit grid has 2^b - 1 levels).
pub fn levels(bits: u32) -> f64 {
    ((1u64 << (bits - 1)) - 1) as f64
}

pub use crate::ops::weight_scales;

/// Grid steps per side of a weight quantizer of `bits` bits; None when `bits` leaves weights in float.
pub fn weight_levels(bits: u32) -> Option<f64> {
    (bits < FLOAT_BITS).then(|| levels(bits))
}

/// Fake-quantizes a weight tensor per output channel (identity when `bits` is float).
pub fn quantize_weight(w: &Tensor, bits: u32) -> Result<Tensor> {
    if bits >= FLOAT_BITS {
        return Ok(w.clone());
    }
    ops::fake_quant_weight(w, levels(bits))
}

/// The input quantizer of one layer: its bit-width and the moving average of its scale. With an `ema`
/// of one element the scale is per tensor; with `L` elements there is one scale per index of the
/// input's first dimension (one per head of [`crate::model::layers::LabelHeads`]).
#[derive(Debug, Clone)]
pub struct ActQuant {
    pub bits: u32,
    pub momentum: f64,
    /// Moving average of max|X|; 0 until the first training batch.
    pub ema: Var,
}

impl ActQuant {
    pub fn new(bits: u32, momentum: f64, ema: Var) -> Self {
        Self { bits, momentum, ema }
    }

    /// Fake-quantizes a layer input. Training uses the batch's max|X| and updates the moving average;
    /// eval uses the moving average (falling back to the batch scale before any training step).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.scale(x, train)? {
            Some(scale) => ops::fake_quant(x, &scale, self.levels()),
            None => Ok(x.clone()),
        }
    }

    /// Steps per side of zero of this quantizer's grid.
    pub fn levels(&self) -> f64 {
        levels(self.bits)
    }

    /// Moves the moving average toward a training batch's scale max|X| (or starts it there), for
    /// callers that compute that scale themselves ([`crate::model::resnet::Block`]'s fused op).
    pub fn record(&self, batch_scale: &Tensor) -> Result<()> {
        // Started or not is decided on the device: reading the average back would stall a GPU once
        // per layer.
        ops::ema_update(&self.ema, batch_scale, self.momentum, 1.0 - self.momentum, true)
    }

    /// The scale [`Self::forward`] quantizes `x` with (None in float), shaped to broadcast along the
    /// leading dimension; updates the moving average in training. For callers that fuse the
    /// quantization into their own kernel ([`ops::conv2d_quantized`]).
    pub fn scale(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        if self.bits >= FLOAT_BITS {
            return Ok(None);
        }
        let groups = self.ema.elem_count();
        let batch_scale = ops::max_abs(x, groups)?;
        let scale = if train {
            self.record(&batch_scale)?;
            batch_scale
        } else {
            // The average where it has started (> 0: it is 0 until the first training batch).
            let ema = self.ema.as_tensor();
            ema.gt(0f64)?.where_cond(ema, &batch_scale)?
        };
        // One scale per group, shaped to broadcast along the leading dimension.
        let mut shape = vec![groups];
        shape.extend(std::iter::repeat_n(1, x.rank().saturating_sub(1)));
        Ok(Some(if groups == 1 { scale } else { scale.reshape(shape)? }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use proptest::prelude::*;

    fn distinct(values: &[f32]) -> usize {
        let mut v: Vec<i64> = values.iter().map(|x| (x * 1e5).round() as i64).collect();
        v.sort();
        v.dedup();
        v.len()
    }

    proptest! {
        #[test]
        fn a_b_bit_grid_has_at_most_2_pow_b_minus_1_levels(bits in 2u32..=8, seed in 0u64..200) {
            let dev = Device::Cpu;
            let n = 4000;
            let data: Vec<f32> = (0..n).map(|i| (((i as u64 * 2654435761 + seed * 97) % 10007) as f32 / 10007.0) * 2.0 - 1.0).collect();
            let x = Tensor::from_vec(data, n, &dev).unwrap();
            let s = x.abs().unwrap().max_all().unwrap().reshape(1).unwrap();
            let q = ops::quantize(&x, &s, levels(bits)).unwrap().to_vec1::<f32>().unwrap();
            let max_levels = (1usize << bits) - 1;
            prop_assert!(distinct(&q) <= max_levels);
            // dense enough input hits every level
            prop_assert_eq!(distinct(&q), max_levels);
        }

        #[test]
        fn quantization_error_is_at_most_half_a_step(bits in 2u32..=8, scale in 0.01f32..10.0) {
            let dev = Device::Cpu;
            let data: Vec<f32> = (0..257).map(|i| (i as f32 / 128.0 - 1.0) * scale).collect();
            let x = Tensor::from_vec(data.clone(), 257, &dev).unwrap();
            let s = Tensor::new(&[scale], &dev).unwrap();
            let q = ops::quantize(&x, &s, levels(bits)).unwrap().to_vec1::<f32>().unwrap();
            let step = scale / levels(bits) as f32;
            for (a, b) in data.iter().zip(&q) {
                prop_assert!((a - b).abs() <= step / 2.0 + 1e-5 * scale);
            }
        }
    }

    #[test]
    fn weight_scales_are_per_output_channel() {
        let dev = Device::Cpu;
        // channel 0 small, channel 1 large: per-channel scales keep channel 0's resolution.
        let w = Tensor::new(&[[[[0.01f32, -0.02]]], [[[5.0, -3.0]]]], &dev).unwrap();
        let s = weight_scales(&w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s, vec![0.02, 5.0]);
        let q = quantize_weight(&w, 4).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((q[0] - 0.01 * 7.0f32.recip() * 7.0).abs() < 0.002, "{q:?}");
        assert!((q[1] + 0.02).abs() < 1e-6);
        assert!((q[2] - 5.0).abs() < 1e-6);
        assert!((q[3] + 3.0 * 7.0 / 7.0).abs() < 5.0 / 7.0 / 2.0 + 1e-6);
    }

    #[test]
    fn weight_gradient_is_straight_through() {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.3f32, -0.2, 0.77], [1.0, 0.5, -0.1]], &dev).unwrap();
        let q = quantize_weight(w.as_tensor(), 3).unwrap();
        let up = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
        let g = (q * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), up.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn activation_scale_ema_is_used_in_eval() {
        let dev = Device::Cpu;
        let aq = ActQuant::new(4, 0.9, Var::new(&[0f32], &dev).unwrap());
        let x1 = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        aq.forward(&x1, true).unwrap();
        assert_eq!(aq.ema.as_tensor().to_vec1::<f32>().unwrap(), vec![2.0]);
        let x2 = Tensor::new(&[4.0f32, 0.5], &dev).unwrap();
        aq.forward(&x2, true).unwrap();
        let ema = aq.ema.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((ema - (0.9 * 2.0 + 0.1 * 4.0)).abs() < 1e-6);
        // Eval: an input beyond the EMA scale is clipped to it, not rescaled to its own max.
        let y = aq.forward(&Tensor::new(&[10.0f32, 0.0], &dev).unwrap(), false).unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] - ema).abs() < 1e-5, "{y:?}");
        assert_eq!(aq.ema.as_tensor().to_vec1::<f32>().unwrap()[0], ema, "eval leaves the EMA alone");
    }
}
