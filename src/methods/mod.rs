//! Methods: every regularizer and every method made for noisy labels is one file behind one trait,
//! [`Method`], whose small hooks the trainer calls without knowing any method by name. [`build`] is
//! the one place that maps a preset's `[regularizer]` and `[robust]` to methods, and combines them.
//! A method is one file (its [`Settings`] and its [`Method`]) and one line of a `registry!` below;
//! the config, the lab's Setup, `a`, sweeps, `paper --extended` and the labels read it from there.

pub mod baseline;

use crate::config::{default_of_kind, Experiment};
use crate::model::resnet::{NetSpec, Wiring};
use crate::model::{Param, ResNet, State};
use crate::ops;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// One training batch as a loss sees it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// 1-based.
    pub epoch: usize,
    /// The images (N, C, H, W), for methods that run another network on them.
    pub images: &'a Tensor,
    /// Single-label data: the (possibly corrupted) class of each image.
    pub labels: &'a [u32],
    /// Multi-label data: (N, L) targets, 1 present, 0 absent, negative unknown.
    pub targets: &'a [f32],
    /// Classes, or labels per image.
    pub classes: usize,
    pub multi_label: bool,
    pub device: &'a Device,
}

/// What the trainer knows when an epoch has been evaluated and recorded.
#[derive(Debug, Clone, Copy)]
pub struct EpochEnd {
    pub epoch: usize,
    pub multi_label: bool,
    pub val_loss: Option<f64>,
    /// Multi-label data: validation average F1.
    pub val_f1: Option<f64>,
}

/// What an epoch hook tells the trainer.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Lines for the run's log.
    pub log: Vec<String>,
    /// The network's parameters changed shape: the optimiser starts afresh and the record gets the
    /// new cost.
    pub reshaped: bool,
    /// Training ends now; the run is recorded as early-stopped.
    pub stop: bool,
}

/// How the run's network was built and is optimised, for methods that build a second one.
#[derive(Debug, Clone)]
pub struct Setup {
    pub wiring: Wiring,
    pub device: Device,
    pub seed: u64,
    pub lr: f64,
    pub decoupled_decay: f64,
}

/// A regularizer or a method made for noisy labels. Every hook has a neutral default, so a method
/// implements only what it changes.
pub trait Method: Send + std::fmt::Debug {
    /// Layers it adds to the network before it is built (quantizers, dropout, per-label heads).
    fn wire(&self, _spec: &mut NetSpec, _wiring: &mut Wiring, _multi_label: bool) {}

    /// Once the network is built (before the first epoch).
    fn built(&mut self, _net: &ResNet, _setup: &Setup) -> Result<()> {
        Ok(())
    }

    /// Whether it decides on the validation split (a run without one is refused).
    fn needs_validation(&self) -> bool {
        false
    }

    /// Adam's decoupled weight decay.
    fn decoupled_decay(&self) -> f64 {
        0.0
    }

    /// Networks of the model's size that the method trains (for the memory estimate).
    fn networks(&self) -> usize {
        1
    }

    /// Convolution outputs' worth of tensors a training step keeps per image, where the method
    /// keeps more than plain training's 4 (for the memory estimate).
    fn step_copies(&self) -> Option<f64> {
        None
    }

    /// The training loss of a batch; `None` leaves it to [`default_loss`].
    fn loss(&mut self, _batch: &Batch, _logits: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A term added to the loss (an L2 penalty).
    fn penalty(&self, _params: &[Param]) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Before the batches of `epoch` (1-based): it may reshape the network.
    fn before_epoch(&mut self, _epoch: usize, _net: &mut ResNet, _out: &mut Outcome) -> Result<()> {
        Ok(())
    }

    /// After an epoch has been evaluated and recorded: it may keep weights or stop training.
    fn after_epoch(&mut self, _end: &EpochEnd, _net: &ResNet, _out: &mut Outcome) -> Result<()> {
        Ok(())
    }

    /// At the end: restores the weights it wants kept and says of which epoch (`None` keeps the
    /// last epoch's).
    fn keep_weights(&mut self, _net: &mut ResNet, _epochs_run: usize) -> Result<Option<usize>> {
        Ok(None)
    }

    /// What it must carry across a restart from a checkpoint, beyond the network's own tensors
    /// (a best epoch's weights, a peer network).
    fn save_state(&self, _state: &mut State) -> Result<()> {
        Ok(())
    }

    /// Restores what [`Method::save_state`] kept (called after [`Method::built`]).
    fn restore_state(&mut self, _state: &mut State) -> Result<()> {
        Ok(())
    }
}

/// A method's section as a preset writes it: its fields (serde, with its paper's defaults), its
/// label and help, its checks, and the method a run of it trains with.
pub trait Settings {
    /// Short human label, e.g. `GCE q=0.7`.
    fn label(&self) -> String;
    /// One line for the lab's Setup: what the method does.
    fn help(&self) -> &'static str;
    /// Refuses out-of-range values (naming the key) and combinations that make no sense.
    fn validate(&self, exp: &Experiment) -> Result<(), String>;
    /// The method a run of `exp` trains with.
    fn method(&self, exp: &Experiment) -> Box<dyn Method>;
    /// The parameters (at most two) the lab's Setup shows and steps with ←/→.
    fn setup_params(&self) -> Vec<SetupParam> {
        Vec::new()
    }
    /// Steps Setup parameter `which` (0 or 1) by `dir` through the values the lab offers.
    fn step_param(&mut self, _which: usize, _dir: isize) {}
    /// Fits its epoch numbers to a schedule of `epochs` (the lab's comparisons keep the form's
    /// schedule, which may be shorter than the preset's).
    fn fit_schedule(&mut self, _epochs: usize) {}
}

/// A parameter as the lab's Setup shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupParam {
    pub name: &'static str,
    pub value: String,
}

impl SetupParam {
    pub fn new(name: &'static str, value: String) -> Self {
        Self { name, value }
    }
}

/// A registry of methods, one line each: `module::Settings`. It declares the modules and generates
/// the section's enum (`None`, then one variant per method holding its settings), its kinds and their
/// dispatch. The module's name is the `kind` presets write; serde reads the variant's name in snake
/// case, and a unit test checks that the two agree.
macro_rules! registry {
    ($(#[$doc:meta])* $section:ident, $kinds:ident, $what:literal: $($module:ident::$settings:ident),* $(,)?) => {
        $(pub mod $module;)*

        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
        pub enum $section {
            #[default]
            None,
            $($settings($module::$settings),)*
        }

        #[doc = concat!("Kinds accepted in `", $what, "`, in the order the lab lists them.")]
        pub const $kinds: &[&str] = &["none", $(stringify!($module)),*];

        impl $section {
            /// The `kind` tag as written in presets.
            pub fn kind(&self) -> &'static str {
                match self {
                    Self::None => "none",
                    $(Self::$settings(_) => stringify!($module),)*
                }
            }

            /// The method's settings; `None` for `kind = "none"`.
            pub fn settings(&self) -> Option<&dyn Settings> {
                match self {
                    Self::None => None,
                    $(Self::$settings(s) => Some(s),)*
                }
            }

            /// The method's settings, to change; `None` for `kind = "none"`.
            pub fn settings_mut(&mut self) -> Option<&mut dyn Settings> {
                match self {
                    Self::None => None,
                    $(Self::$settings(s) => Some(s),)*
                }
            }

            /// The method `kind` with its paper's defaults.
            pub fn default_for(kind: &str) -> Result<Self, String> {
                default_of_kind(kind, $what, $kinds)
            }

            /// Every kind with its defaults, in registry order.
            pub fn all_defaults() -> Vec<Self> {
                $kinds.iter().map(|k| Self::default_for(k).expect("a registered kind")).collect()
            }
        }
    };
}

registry! {
    /// The one regularizer a run uses (`none` is the paper's baseline), in `[regularizer]`, in the
    /// order the paper lists them.
    Regularizer, REGULARIZER_KINDS, "regularizer.kind":
    early_stopping::EarlyStopping,
    weight_decay::WeightDecay,
    dropout::Dropout,
    label_smoothing::LabelSmoothing,
    pruning::Pruning,
    quantization::Quantization,
}

registry! {
    /// A method made for noisy labels (`none`: plain cross-entropy), in `[robust]`.
    Robust, ROBUST_KINDS, "robust.kind":
    gce::Gce,
    sce::Sce,
    co_teaching::CoTeaching,
}

impl Regularizer {
    /// Short human label, e.g. `W4/A4`, `dropout p=0.1` (`baseline` for none).
    pub fn label(&self) -> String {
        self.settings().map_or_else(|| "baseline".into(), |s| s.label())
    }

    /// What it does, in one line for the lab's Setup.
    pub fn help(&self) -> &'static str {
        self.settings().map_or(
            "Baseline: no regularization. With noisy labels it memorises the wrong ones and its eval loss turns up.",
            |s| s.help(),
        )
    }
}

impl Robust {
    /// Short human label, e.g. `GCE q=0.7` (`CE` for none).
    pub fn label(&self) -> String {
        self.settings().map_or_else(|| "CE".into(), |s| s.label())
    }
}

/// The methods of an experiment: its regularizer and its robust method, as one.
pub fn build(exp: &Experiment) -> Box<dyn Method> {
    let regularizer =
        exp.regularizer.settings().map_or_else(|| Box::new(baseline::Baseline) as Box<dyn Method>, |r| r.method(exp));
    match exp.robust.settings() {
        None => regularizer,
        Some(robust) => Box::new(Combined(vec![regularizer, robust.method(exp)])),
    }
}

/// The layers `regularizer` wires into a network for single-label data (no other part of an
/// experiment changes them).
pub fn wiring(regularizer: &Regularizer, spec: &mut NetSpec) -> Wiring {
    let exp = Experiment { regularizer: regularizer.clone(), ..Default::default() };
    let mut wiring = Wiring::default();
    build(&exp).wire(spec, &mut wiring, false);
    wiring
}

/// Methods applied together: every hook of each, in order. The first loss given wins (the config
/// refuses two methods that both replace the loss); penalties and decays add up.
#[derive(Debug)]
struct Combined(Vec<Box<dyn Method>>);

impl Method for Combined {
    fn wire(&self, spec: &mut NetSpec, wiring: &mut Wiring, multi_label: bool) {
        self.0.iter().for_each(|m| m.wire(spec, wiring, multi_label));
    }
    fn built(&mut self, net: &ResNet, setup: &Setup) -> Result<()> {
        self.0.iter_mut().try_for_each(|m| m.built(net, setup))
    }
    fn needs_validation(&self) -> bool {
        self.0.iter().any(|m| m.needs_validation())
    }
    fn decoupled_decay(&self) -> f64 {
        self.0.iter().map(|m| m.decoupled_decay()).sum()
    }
    fn networks(&self) -> usize {
        self.0.iter().map(|m| m.networks()).max().unwrap_or(1)
    }
    fn step_copies(&self) -> Option<f64> {
        self.0.iter().filter_map(|m| m.step_copies()).reduce(f64::max)
    }
    fn loss(&mut self, batch: &Batch, logits: &Tensor) -> Result<Option<Tensor>> {
        for m in &mut self.0 {
            if let Some(loss) = m.loss(batch, logits)? {
                return Ok(Some(loss));
            }
        }
        Ok(None)
    }
    fn penalty(&self, params: &[Param]) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for p in self.0.iter().map(|m| m.penalty(params)) {
            if let Some(p) = p? {
                total = Some(match total {
                    Some(t) => (t + p)?,
                    None => p,
                });
            }
        }
        Ok(total)
    }
    fn before_epoch(&mut self, epoch: usize, net: &mut ResNet, out: &mut Outcome) -> Result<()> {
        self.0.iter_mut().try_for_each(|m| m.before_epoch(epoch, net, out))
    }
    fn after_epoch(&mut self, end: &EpochEnd, net: &ResNet, out: &mut Outcome) -> Result<()> {
        self.0.iter_mut().try_for_each(|m| m.after_epoch(end, net, out))
    }
    fn keep_weights(&mut self, net: &mut ResNet, epochs_run: usize) -> Result<Option<usize>> {
        for m in &mut self.0 {
            if let Some(epoch) = m.keep_weights(net, epochs_run)? {
                return Ok(Some(epoch));
            }
        }
        Ok(None)
    }
    fn save_state(&self, state: &mut State) -> Result<()> {
        self.0.iter().enumerate().try_for_each(|(i, m)| state.scoped(&format!("{i}."), |s| m.save_state(s)))
    }
    fn restore_state(&mut self, state: &mut State) -> Result<()> {
        self.0.iter_mut().enumerate().try_for_each(|(i, m)| state.scoped(&format!("{i}."), |s| m.restore_state(s)))
    }
}

/// Known labels (1) and unknown ones (0) of multi-label targets, and the targets as 0/1.
pub fn known_and_clean(targets: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let known = targets.iter().map(|&t| if t >= 0.0 { 1.0 } else { 0.0 }).collect();
    let clean = targets.iter().map(|&t| if t > 0.5 { 1.0 } else { 0.0 }).collect();
    (known, clean)
}

/// log p of the given label for every (image, label) entry: log σ(z) where the target is 1, log σ(-z)
/// where it is 0, computed stably as -softplus(-s·z) with s = ±1.
pub fn binary_log_likelihood(logits: &Tensor, clean: &Tensor) -> Result<Tensor> {
    let sign = ((clean * 2.0)? - 1.0)?;
    let x = logits.mul(&sign)?.neg()?;
    // softplus(x) = max(x, 0) + log(1 + e^-|x|)
    let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus.neg()?)
}

/// Mean of `values` over the entries where `mask` is 1.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let count = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    Ok((values.mul(mask)?.sum_all()? / count)?)
}

/// The mean of `loss_of(log p)` over the batch, where log p is each image's log-likelihood of its
/// label, or (multi-label data) each known (image, label) entry's: the shape of GCE and SCE.
pub fn mean_of_log_likelihood(
    batch: &Batch,
    logits: &Tensor,
    loss_of: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if !batch.multi_label {
        return Ok(loss_of(&log_likelihood(logits, batch.labels)?)?.mean_all()?);
    }
    let (known, clean) = known_and_clean(batch.targets);
    let shape = logits.shape().clone();
    let clean = Tensor::from_vec(clean, &shape, batch.device)?;
    let known = Tensor::from_vec(known, &shape, batch.device)?;
    masked_mean(&loss_of(&binary_log_likelihood(logits, &clean)?)?, &known)
}

/// log softmax of the logits at each image's label, (N,).
pub fn log_likelihood(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let idx = Tensor::new(labels, logits.device())?.unsqueeze(1)?;
    Ok(logp.gather(&idx, 1)?.squeeze(1)?)
}

/// Cross-entropy on the noisy classes, or masked binary cross-entropy on the known labels.
pub fn default_loss(batch: &Batch, logits: &Tensor) -> Result<Tensor> {
    if batch.multi_label {
        binary_loss(batch, logits, 0.0)
    } else {
        Ok(candle_nn::loss::cross_entropy(logits, &Tensor::new(batch.labels, batch.device)?)?)
    }
}

/// Masked binary cross-entropy against targets smoothed label-wise by `alpha` (0: none).
pub fn binary_loss(batch: &Batch, logits: &Tensor, alpha: f64) -> Result<Tensor> {
    let (known, clean) = known_and_clean(batch.targets);
    let soft = if alpha > 0.0 { label_smoothing::smooth_binary(&clean, alpha) } else { clean };
    let shape = (batch.targets.len() / batch.classes.max(1), batch.classes);
    Ok(ops::masked_bce_with_logits(
        logits,
        &Tensor::from_vec(soft, shape, batch.device)?,
        &Tensor::from_vec(known, shape, batch.device)?,
    )?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    /// The registries' kinds are the tags serde reads and writes, and each has its paper's defaults.
    #[test]
    fn registry_kinds_round_trip_through_presets() {
        fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
            kinds: &[&str],
            of: impl Fn(&str) -> T,
            kind: impl Fn(&T) -> &'static str,
        ) {
            for k in kinds {
                let value = of(k);
                assert_eq!(kind(&value), *k);
                let json = serde_json::to_value(&value).unwrap();
                assert_eq!(json["kind"], *k, "{json}");
                assert_eq!(serde_json::from_value::<T>(json).unwrap(), value);
            }
        }
        round_trip(REGULARIZER_KINDS, |k| Regularizer::default_for(k).unwrap(), Regularizer::kind);
        round_trip(ROBUST_KINDS, |k| Robust::default_for(k).unwrap(), Robust::kind);
        assert_eq!(Regularizer::all_defaults().len(), REGULARIZER_KINDS.len());
        assert_eq!(REGULARIZER_KINDS[6], "quantization");
        assert!(Robust::default_for("mae").unwrap_err().contains("allowed: none, gce, sce, co_teaching"));
        let unknown = serde_json::from_str::<Robust>(r#"{"kind": "gce", "alpha": 1}"#).unwrap_err();
        assert!(unknown.to_string().contains("alpha"), "{unknown}");
        let unknown = serde_json::from_str::<Regularizer>(r#"{"kind": "dropout", "q": 1}"#).unwrap_err();
        assert!(unknown.to_string().contains("`q`"), "{unknown}");
    }

    /// A batch over `logits` (which also stand in for the images).
    pub fn batch<'a>(
        labels: &'a [u32],
        targets: &'a [f32],
        classes: usize,
        multi: bool,
        logits: &'a Tensor,
    ) -> Batch<'a> {
        Batch { epoch: 1, images: logits, labels, targets, classes, multi_label: multi, device: logits.device() }
    }

    /// A per-row reference for classes turned into one for a binary label: p(1) = softmax([0, z])[1].
    pub fn binary(row: impl Fn(&[f64], u32) -> f64) -> impl Fn(&[f64], u32) -> f64 {
        move |z: &[f64], y: u32| row(&[0.0, z[0]], y)
    }

    /// Checks a method's loss and its gradient against `row`, an f64 reference of one row's loss (one
    /// label's, for multi-label data), on a fixed batch: the loss to 1e-5 and the gradient against
    /// central differences of the reference.
    pub fn check_against_reference(method: &mut dyn Method, row: impl Fn(&[f64], u32) -> f64, multi: bool) {
        let (n, c) = (4, if multi { 3 } else { 5 });
        let z: Vec<f64> = (0..n * c).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.45).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 3) % c as u32).collect();
        let targets: Vec<f32> = (0..n * c).map(|i| [1.0, 0.0, -1.0, 0.0, 1.0][i % 5]).collect();
        let reference = |z: &[f64]| -> f64 {
            if multi {
                let known: Vec<usize> = (0..n * c).filter(|&i| targets[i] >= 0.0).collect();
                known.iter().map(|&i| row(&z[i..i + 1], targets[i] as u32)).sum::<f64>() / known.len() as f64
            } else {
                (0..n).map(|i| row(&z[i * c..(i + 1) * c], labels[i])).sum::<f64>() / n as f64
            }
        };
        let var = Var::from_vec(z.iter().map(|&v| v as f32).collect::<Vec<_>>(), (n, c), &Device::Cpu).unwrap();
        let logits = var.as_tensor();
        let b = batch(&labels, &targets, c, multi, logits);
        let loss = method.loss(&b, logits).unwrap().expect("the method gives a loss");
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want = reference(&z);
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{method:?}: loss {got} vs {want}");
        let grad = loss.backward().unwrap().get(logits).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n * c {
            let h = 1e-5;
            let (mut up, mut down) = (z.clone(), z.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (reference(&up) - reference(&down)) / (2.0 * h);
            assert!((grad[i] as f64 - numeric).abs() < 1e-4, "{method:?}: d/dz[{i}] = {} vs {numeric}", grad[i]);
        }
    }
}
