//! Adam with decoupled (AdamW) or coupled (L2) weight decay applied to weights only.
//!
//! candle-nn's AdamW decays every variable, BN and biases included; the paper's weight decay penalises
//! weights, so this optimiser reads each parameter's [`Role`].

use crate::model::{Param, Role};
use candle_core::{backprop::GradStore, Result, Tensor};

/// Adam's first and second moments of one parameter.
enum Moments {
    /// m and v, updated by candle's element-wise ops (on the CPU, where that costs next to nothing).
    Apart { m: Tensor, v: Tensor },
    /// [m; v] in one buffer, updated together with the parameter by one kernel (on a GPU, where
    /// each of the ~9 element-wise ops per parameter would be a launch).
    #[cfg(feature = "cuda")]
    Packed(Tensor),
}

/// Adam state for a list of parameters.
pub struct Adam {
    params: Vec<Param>,
    moments: Vec<Moments>,
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Decoupled decay per step: p -= lr · decay · p, for [`Role::Weight`] only.
    pub decoupled_decay: f64,
    step: i32,
}

impl Adam {
    /// Adam over every trainable parameter (buffers are skipped).
    pub fn new(params: &[Param], lr: f64, decoupled_decay: f64) -> Result<Self> {
        let params: Vec<Param> = params.iter().filter(|p| p.role != Role::Buffer).cloned().collect();
        let moments = params
            .iter()
            .map(|p| {
                #[cfg(feature = "cuda")]
                if crate::ops::gpu::on_gpu(&p.var) {
                    let state = Tensor::zeros(2 * p.var.elem_count(), p.var.dtype(), p.var.device())?;
                    return Ok(Moments::Packed(state));
                }
                Ok(Moments::Apart { m: p.var.zeros_like()?, v: p.var.zeros_like()? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, moments, lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_decay, step: 0 })
    }

    /// One update from the gradients of a backward pass.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        let step_size = self.lr / bc1;
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Gradients can carry candle's op history; keeping it in the moments would chain every
            // step's graph to the next (an unbounded leak).
            let g = &g.detach();
            let decay = if p.role == Role::Weight && self.decoupled_decay > 0.0 {
                1.0 - self.lr * self.decoupled_decay
            } else {
                1.0
            };
            match &mut self.moments[i] {
                Moments::Apart { m, v } => {
                    *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?.detach();
                    *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
                    let denom = ((&*v / bc2)?.sqrt()? + self.eps)?;
                    let mut theta = p.var.as_tensor().clone();
                    if decay != 1.0 {
                        theta = (theta * decay)?;
                    }
                    p.var.set(&(theta - ((&*m / denom)? * step_size)?)?)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Packed(state) => {
                    let op = crate::ops::gpu::AdamStep {
                        beta1: self.beta1 as f32,
                        beta2: self.beta2 as f32,
                        step_size: step_size as f32,
                        bc2: bc2 as f32,
                        eps: self.eps as f32,
                        decay: decay as f32,
                    };
                    p.var.as_tensor().inplace_op3(state, &g.contiguous()?, &op)?;
                }
            }
        }
        Ok(())
    }

    /// Puts the step count and both moments of every parameter into a checkpoint.
    pub fn save_state(&self, state: &mut crate::model::State) -> anyhow::Result<()> {
        state.put("step", &self.step)?;
        for (i, moments) in self.moments.iter().enumerate() {
            match moments {
                Moments::Apart { m, v } => {
                    state.put_tensor(&format!("{i}.m"), m)?;
                    state.put_tensor(&format!("{i}.v"), v)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Packed(packed) => state.put_tensor(&format!("{i}.mv"), packed)?,
            }
        }
        Ok(())
    }

    /// Restores what [`Adam::save_state`] kept, into an optimiser over the same parameters.
    pub fn restore_state(&mut self, state: &crate::model::State) -> anyhow::Result<()> {
        self.step = state.get("step")?;
        for (i, (moments, p)) in self.moments.iter_mut().zip(&self.params).enumerate() {
            let device = p.var.device();
            let check = |t: Tensor, like: &Tensor| -> anyhow::Result<Tensor> {
                if t.shape() != like.shape() {
                    anyhow::bail!("the checkpoint's Adam moments of `{}` have the wrong shape", p.name);
                }
                Ok(t)
            };
            match moments {
                Moments::Apart { m, v } => {
                    *m = check(state.tensor(&format!("{i}.m"), device)?, m)?;
                    *v = check(state.tensor(&format!("{i}.v"), device)?, v)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Packed(packed) => *packed = check(state.tensor(&format!("{i}.mv"), device)?, packed)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn param(name: &str, v: &[f32], role: Role) -> Param {
        Param { name: name.into(), var: Var::new(v, &Device::Cpu).unwrap(), role }
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let w = param("w", &[1.0, -1.0], Role::Weight);
        let mut opt = Adam::new(std::slice::from_ref(&w), 0.1, 0.0).unwrap();
        let loss = (w.var.as_tensor() * Tensor::new(&[2f32, -3.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let got = w.var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-5 && (got[1] + 0.9).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn decoupled_decay_touches_weights_only_and_buffers_are_not_trained() {
        let w = param("w", &[1.0], Role::Weight);
        let b = param("b", &[1.0], Role::NoDecay);
        let buf = param("running", &[1.0], Role::Buffer);
        let all = vec![w.clone(), b.clone(), buf.clone()];
        let mut opt = Adam::new(&all, 0.1, 0.5).unwrap();
        // Positive gradients: Adam's first step moves each by -lr; the weight also decays by lr·0.5.
        let loss = (w.var.as_tensor() + b.var.as_tensor()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let got_w = w.var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got_w - (0.95 - 0.1)).abs() < 1e-5, "{got_w}");
        assert!((b.var.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.9).abs() < 1e-5);
        assert_eq!(buf.var.as_tensor().to_vec1::<f32>().unwrap()[0], 1.0);
    }
}

#[cfg(test)]
mod leak_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn moments_keep_no_graph_history() {
        let w = Param { name: "w".into(), var: Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap(), role: Role::Weight };
        let mut opt = Adam::new(std::slice::from_ref(&w), 0.1, 0.0).unwrap();
        for _ in 0..3 {
            // d(w³)/dw = 3w², computed by candle from tensors that track the graph.
            let loss = w.var.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let detached = opt.moments.iter().all(|s| match s {
            Moments::Apart { m, v } => !m.track_op() && !v.track_op(),
            #[cfg(feature = "cuda")]
            Moments::Packed(state) => !state.track_op(),
        });
        assert!(detached, "optimizer state must be detached");
    }
}
