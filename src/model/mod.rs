//! Networks: parameters with their roles, small composable layers, and the CIFAR ResNets.

pub mod layers;
pub mod resnet;
pub mod state;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

pub use resnet::ResNet;
pub use state::State;

/// What the optimiser does with a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Conv/linear weights: trained and subject to weight decay (the paper penalises weights only).
    Weight,
    /// Biases and batch-norm affine parameters: trained, never decayed.
    NoDecay,
    /// Running statistics and activation-scale averages: saved, not trained.
    Buffer,
}

/// One named tensor of a model.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub role: Role,
}

/// Every tensor of a model, in creation order (so saving and optimising are deterministic), created
/// from a seeded RNG on the host.
#[derive(Debug)]
pub struct Params {
    pub device: Device,
    rng: ChaCha8Rng,
    pub entries: Vec<Param>,
}

impl Params {
    pub fn new(device: Device, seed: u64) -> Self {
        Self { device, rng: ChaCha8Rng::seed_from_u64(seed), entries: Vec::new() }
    }

    fn push(&mut self, name: &str, data: Vec<f32>, shape: &[usize], role: Role) -> Var {
        let t = Tensor::from_vec(data, shape, &self.device).expect("shape matches data");
        let var = Var::from_tensor(&t).expect("var from tensor");
        self.entries.push(Param { name: name.to_string(), var: var.clone(), role });
        var
    }

    /// He (Kaiming) normal initialisation, std = sqrt(2 / fan_in).
    pub fn kaiming(&mut self, name: &str, shape: &[usize], fan_in: usize) -> Var {
        let std = (2.0 / fan_in as f64).sqrt();
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| (normal(&mut self.rng) * std) as f32).collect();
        self.push(name, data, shape, Role::Weight)
    }

    /// Uniform(-b, b) initialisation with b = 1/sqrt(fan_in), as PyTorch's Linear.
    pub fn uniform(&mut self, name: &str, shape: &[usize], fan_in: usize, role: Role) -> Var {
        let b = 1.0 / (fan_in as f64).sqrt();
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| self.rng.random_range(-b..b) as f32).collect();
        self.push(name, data, shape, role)
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32, role: Role) -> Var {
        let n: usize = shape.iter().product();
        self.push(name, vec![value; n], shape, role)
    }

    /// Trainable parameter count (weights, biases, batch-norm affine), as PyTorch counts it.
    pub fn trainable_count(&self) -> usize {
        self.entries.iter().filter(|p| p.role != Role::Buffer).map(|p| p.var.elem_count()).sum()
    }

    /// Name of the first tensor holding a NaN or an infinity, if any (one reduction per tensor).
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        for p in &self.entries {
            let s = p.var.as_tensor().sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(Some(p.name.clone()));
            }
        }
        Ok(None)
    }

    /// A copy of every tensor, to restore later (early stopping's best checkpoint).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self.entries.iter().map(|p| p.var.as_tensor().copy()).collect::<candle_core::Result<_>>()?)
    }

    pub fn restore(&self, snapshot: &[Tensor]) -> Result<()> {
        for (p, t) in self.entries.iter().zip(snapshot) {
            p.var.set(&t.to_device(p.var.device())?)?;
        }
        Ok(())
    }

    /// Puts every tensor into a checkpoint, by name.
    pub fn save_state(&self, state: &mut State) -> Result<()> {
        self.entries.iter().try_for_each(|p| state.put_tensor(&p.name, p.var.as_tensor()))
    }

    /// Sets every tensor from a checkpoint written by [`Params::save_state`].
    pub fn restore_state(&self, state: &State) -> Result<()> {
        for p in &self.entries {
            let t = state.tensor(&p.name, &self.device)?;
            p.var.set(&t).with_context(|| format!("the checkpoint's tensor `{}` has the wrong shape", p.name))?;
        }
        Ok(())
    }

    /// Every tensor by name, as f32.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let map = self
            .entries
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<String, Tensor>>>()?;
        Ok(map)
    }

    /// Sets every tensor from `map` (saved from [`Params::tensors`], read from `what`); names and
    /// shapes must match.
    pub fn set(&self, map: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        for p in &self.entries {
            let t = map.get(&p.name).with_context(|| format!("{what} has no tensor `{}`", p.name))?;
            p.var
                .set(&t.to_device(&self.device)?)
                .with_context(|| format!("tensor `{}` in {what} has the wrong shape", p.name))?;
        }
        Ok(())
    }
}

/// Writes tensors to a safetensors file through a temporary file and a rename.
pub fn save_tensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(map, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Standard normal sample (Box-Muller), so initialisation depends only on our seeded RNG.
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Size figures of a network, before and after pruning.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct Cost {
    /// Trainable parameters that still influence the output.
    pub params: usize,
    /// Multiply-accumulates of one forward pass on one image.
    pub macs: usize,
}
