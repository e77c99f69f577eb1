//! The compression half of the paper: a finished QAT run as a packed integer model
//! ([`int_model`]) run in integers ([`infer`]), and any finished run as an ONNX file ([`onnx`]).

pub mod fixed;
pub mod infer;
pub mod int_model;
pub mod kernel;
pub mod onnx;
pub mod pack;
pub mod reference;

use crate::model::resnet::{NetSpec, Wiring};
use crate::model::ResNet;
use crate::runs::{self, RunRecord, Status};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use int_model::IntModel;
use std::path::Path;
use std::time::Instant;

/// File name of the packed integer model inside a run folder.
pub const INT_MODEL_FILE: &str = "model.int.safetensors";
/// File name of the ONNX export inside a run folder.
pub const ONNX_FILE: &str = "model.onnx";

/// A finished run with its network rebuilt from the kept weights (on the CPU, in eval mode).
pub struct Trained {
    pub record: RunRecord,
    pub net: ResNet,
}

impl Trained {
    /// Reads `dir`, refusing runs that did not finish or kept no weights.
    pub fn load(dir: &Path) -> Result<Self> {
        let record = runs::load(dir)?;
        let id = record.id();
        let Some(summary) = &record.summary else {
            bail!("{id} has no summary.json: it never started training, so it has no weights to export")
        };
        match summary.status {
            Status::Completed | Status::EarlyStopped => {}
            Status::Running | Status::Stopped => bail!(
                "{id} did not finish ({}): go on with `qat-lab run --resume {}`, then export it",
                summary.status.name(),
                dir.display()
            ),
            Status::Diverged | Status::Failed => {
                bail!("{id} {}: its weights are not a trained network; train it again", summary.status.name())
            }
        }
        let weights = dir.join(runs::WEIGHTS_FILE);
        if !weights.is_file() {
            bail!("{id} has no {}: the run kept no weights", runs::WEIGHTS_FILE);
        }
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .with_context(|| format!("cannot read {}: the file is damaged", weights.display()))?;
        let dims = |name: &str| tensors.get(name).map(|t| t.dims().to_vec());
        let exp = &record.experiment;
        let in_ch = match dims("stem.weight").as_deref() {
            Some([_, c, _, _]) => *c,
            _ => bail!("{} has no 4-d `stem.weight`: not a qat-lab ResNet", weights.display()),
        };
        let (outputs, per_label_heads) = match (dims("fc.weight").as_deref(), dims("heads.weight").as_deref()) {
            (Some([o, _]), _) => (*o, false),
            (_, Some([l, _])) => (*l, true),
            _ => bail!("{} has no classifier (`fc.weight` or `heads.weight`)", weights.display()),
        };
        if summary.pruned_params.is_some() && !tensors.keys().any(|k| k.starts_with("keep.")) {
            bail!("{id} was pruned, but its weights file holds no pruning masks (it was written by an older qat-lab); train it again to export it");
        }
        let [_, h, w] = image_shape(&exp.data);
        let mut spec = NetSpec {
            arch: exp.model.arch,
            width: exp.model.width,
            input: [in_ch, h, w],
            outputs,
            per_label_heads: false,
        };
        let mut wiring = Wiring::default();
        crate::methods::build(exp).wire(&mut spec, &mut wiring, exp.data.dataset.is_multi_label());
        if spec.per_label_heads != per_label_heads {
            bail!(
                "{} does not match its experiment.toml (classifier heads differ): was experiment.toml edited?",
                weights.display()
            );
        }
        let mut net = ResNet::new(spec, &wiring, &Device::Cpu, exp.train.seed);
        net.set_weights(&tensors, &weights.display().to_string())
            .with_context(|| format!("{} does not fit the network of its experiment.toml", weights.display()))?;
        Ok(Self { record, net })
    }

    /// The packed integer model of this run.
    pub fn int_model(&self) -> Result<IntModel> {
        IntModel::from_network(&self.net, &format!("{:?}", self.record.experiment.model.arch).to_lowercase())
            .with_context(|| format!("{} has no integer model", self.record.id()))
    }

    /// The run's images, (channels, height, width).
    pub fn image_shape(&self) -> (usize, usize, usize) {
        let [c, h, w] = self.net.spec.input;
        (c, h, w)
    }

    /// The run's ONNX file: QCDQ for a QAT run, the float graph for a float one.
    pub fn onnx(&self) -> Result<Vec<u8>> {
        let quantized = self.net.stem.quant.is_some();
        let model = if quantized { Some(self.int_model()?) } else { None };
        onnx::to_bytes(&self.net, model.as_ref(), self.image_shape(), &self.record.id())
            .with_context(|| format!("{} cannot be exported as ONNX", self.record.id()))
    }

    /// Bytes of the float weights (4 a parameter, after pruning).
    pub fn float_bytes(&self) -> Result<usize> {
        Ok(4 * self.net.cost()?.params)
    }
}

/// How onnxruntime, running the run's ONNX file, compares with the fake-quant (or float) network:
/// as written, and with onnxruntime's graph optimizations.
#[derive(Debug, Clone)]
pub struct OnnxAgreement {
    pub as_written: OrtFigures,
    pub optimized: OrtFigures,
    pub version: String,
    pub bytes: usize,
}

/// One onnxruntime evaluation against qat-lab's.
#[derive(Debug, Clone, Copy)]
pub struct OrtFigures {
    pub acc: f64,
    pub same_top1: f64,
    pub max_logit_diff: f64,
    pub images_per_sec: f64,
}

/// Runs the run's ONNX export in onnxruntime on `images` (`batch` a call) beside its own network.
pub fn onnx_agreement(trained: &Trained, images: &[f32], labels: &[u32], batch: usize) -> Result<OnnxAgreement> {
    let bytes = trained.onnx()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(ONNX_FILE);
    std::fs::write(&path, &bytes)?;
    let n = labels.len();
    let shape = trained.image_shape();
    let len = shape.0 * shape.1 * shape.2;
    let mut ours = Vec::with_capacity(n * trained.net.spec.outputs);
    for chunk in images.chunks(batch.max(1) * len) {
        let x = Tensor::from_slice(chunk, (chunk.len() / len, shape.0, shape.1, shape.2), &Device::Cpu)?;
        let logits = crate::threads::compute(&Device::Cpu, || trained.net.forward(&x, false))?;
        ours.extend(logits.flatten_all()?.to_vec1::<f32>()?);
    }
    let classes = ours.len() / n.max(1);
    let mine = infer::argmax_rows(&ours, classes);
    let share = |k: usize| k as f64 / n.max(1) as f64;
    let figures = |ort: &onnx::OrtRun| {
        let theirs = infer::argmax_rows(&ort.logits, classes);
        OrtFigures {
            acc: share(theirs.iter().zip(labels).filter(|(p, l)| **p == **l as usize).count()),
            same_top1: share(theirs.iter().zip(&mine).filter(|(a, b)| a == b).count()),
            max_logit_diff: ort.logits.iter().zip(&ours).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max),
            images_per_sec: ort.images_per_sec,
        }
    };
    let as_written = onnx::run_onnxruntime(&path, images, n, shape, batch, false)?;
    let optimized = onnx::run_onnxruntime(&path, images, n, shape, batch, true)?;
    Ok(OnnxAgreement {
        as_written: figures(&as_written),
        optimized: figures(&optimized),
        version: optimized.version,
        bytes: bytes.len(),
    })
}

/// The images a run's data config loads, (channels, height, width).
fn image_shape(cfg: &crate::config::DataConfig) -> [usize; 3] {
    crate::data::DataSize::expected(cfg).map(|d| d.shape).unwrap_or([3, cfg.image_size, cfg.image_size])
}

/// How the integer model compares with the fake-quant network on the test set.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub images: usize,
    pub fake_quant_acc: f64,
    pub int_acc: f64,
    /// Share of images on which both give the same top-1 class (multi-label: of (image, label)
    /// pairs with the same decision).
    pub same_top1: f64,
    /// Largest |logit difference| in real units, and the largest |fake-quant logit| for scale.
    pub max_logit_diff: f64,
    pub max_logit: f64,
    pub fake_quant_images_per_sec: f64,
    pub int_images_per_sec: f64,
    /// The f64 evaluation ([`crate::export::reference`]), when asked for: its accuracy and its top-1 agreement
    /// with the integer and with the fake-quant network.
    pub exact: Option<ExactAgreement>,
}

/// How the integer and the fake-quant network agree with the f64 evaluation.
#[derive(Debug, Clone, Copy)]
pub struct ExactAgreement {
    pub acc: f64,
    pub int_same_top1: f64,
    pub fake_quant_same_top1: f64,
}

impl Agreement {
    /// The bar of the issue: the same top-1 on 99.5% of images and accuracy within 0.3 points.
    pub fn meets_bar(&self) -> bool {
        self.same_top1 >= 0.995 && (self.int_acc - self.fake_quant_acc).abs() <= 0.003
    }
}

/// What a test set says the outputs should be.
#[derive(Debug, Clone, Copy)]
pub enum Truth<'a> {
    /// One class per image.
    Classes(&'a [u32]),
    /// Multi-label: (N, L) targets (1, 0, or negative for unknown).
    Labels(&'a [f32]),
}

impl Truth<'_> {
    fn images(&self, outputs: usize) -> usize {
        match self {
            Truth::Classes(labels) => labels.len(),
            Truth::Labels(targets) => targets.len() / outputs.max(1),
        }
    }

    /// The predictions to compare: the top-1 class of each image, or each (image, label) decision
    /// (logit > 0, probability > 0.5).
    fn predictions<T: PartialOrd + Copy + Default>(&self, logits: &[T], outputs: usize) -> Vec<usize> {
        match self {
            Truth::Classes(_) => infer::argmax_rows(logits, outputs),
            Truth::Labels(_) => logits.iter().map(|&z| usize::from(z > T::default())).collect(),
        }
    }

    /// Accuracy (classes) or average F1 at threshold 0.5 (labels) of real-valued logits.
    fn score(&self, logits: &[f64], outputs: usize) -> f64 {
        match self {
            Truth::Classes(labels) => {
                let top = infer::argmax_rows(logits, outputs);
                top.iter().zip(*labels).filter(|(p, l)| **p == **l as usize).count() as f64 / labels.len().max(1) as f64
            }
            Truth::Labels(targets) => {
                let probs: Vec<f32> = logits.iter().map(|&z| (1.0 / (1.0 + (-z).exp())) as f32).collect();
                let f1 = crate::train::metrics::f1_per_label(&probs, targets, &vec![0.5; outputs]);
                f1.iter().sum::<f64>() / outputs.max(1) as f64
            }
        }
    }
}

/// The share of equal predictions.
fn same(a: &[usize], b: &[usize]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
}

/// Evaluates the fake-quant network and `model` on the same images (NCHW, `shape` each), `batch` at
/// a time, against `truth`; with `exact`, the f64 evaluation too.
pub fn compare(
    net: &ResNet,
    model: &IntModel,
    images: &[f32],
    truth: Truth,
    shape: [usize; 3],
    batch: usize,
    exact: bool,
) -> Result<Agreement> {
    let outputs = model.classes();
    let n = truth.images(outputs);
    let len: usize = shape.iter().product();
    let dims = (shape[0], shape[1], shape[2]);
    let network = infer::IntNetwork::new(model);
    let (mut fake_quant, mut int, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fq_secs, mut int_secs) = (0f64, 0f64);
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch).min(n);
        let x = &images[start * len..end * len];
        let t = Instant::now();
        let input = Tensor::from_slice(x, (end - start, shape[0], shape[1], shape[2]), &Device::Cpu)?;
        let logits = crate::threads::compute(&Device::Cpu, || net.forward(&input, false))?;
        fake_quant.extend(logits.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from));
        fq_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        int.extend(network.forward(x, end - start, dims).into_iter().map(|q| q as f64 * network.logit_step()));
        int_secs += t.elapsed().as_secs_f64();
        if exact {
            reference.extend(crate::threads::compute(&Device::Cpu, || reference::logits(model, x, end - start, dims))?);
        }
    }
    let (fq_pred, int_pred) = (truth.predictions(&fake_quant, outputs), truth.predictions(&int, outputs));
    let max_logit_diff = fake_quant.iter().zip(&int).map(|(f, q)| (f - q).abs()).fold(0f64, f64::max);
    Ok(Agreement {
        images: n,
        fake_quant_acc: truth.score(&fake_quant, outputs),
        int_acc: truth.score(&int, outputs),
        same_top1: same(&fq_pred, &int_pred),
        max_logit_diff,
        max_logit: fake_quant.iter().fold(0f64, |m, f| m.max(f.abs())),
        fake_quant_images_per_sec: n as f64 / fq_secs.max(1e-9),
        int_images_per_sec: n as f64 / int_secs.max(1e-9),
        exact: exact.then(|| {
            let pred = truth.predictions(&reference, outputs);
            ExactAgreement {
                acc: truth.score(&reference, outputs),
                int_same_top1: same(&pred, &int_pred),
                fake_quant_same_top1: same(&pred, &fq_pred),
            }
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, BnMode, PruneCriterion, Quantization, Regularizer};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A quantized ResNet-8 whose batch-norm statistics and input scales have seen a few training
    /// batches (no weight update), and test images.
    fn warmed(bn: BnMode, prune: bool, input: [usize; 3]) -> (ResNet, Vec<f32>) {
        let reg = Regularizer::Quantization(Quantization {
            weight_bits: 4,
            act_bits: 4,
            first_last_bits: 8,
            bn,
            ema_momentum: 0.5,
        });
        let mut spec = NetSpec { arch: Arch::Resnet8, width: 0.5, input, outputs: 5, per_label_heads: false };
        let wiring = crate::methods::wiring(&reg, &mut spec);
        let mut net = ResNet::new(spec, &wiring, &Device::Cpu, 3);
        if prune {
            net.prune(0.5, PruneCriterion::LowestL1).unwrap();
        }
        let len: usize = input.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Standard normal draws (Box-Muller), seeded so that the test is the same every time.
        let mut images = |n: usize, mean: f32| -> Vec<f32> {
            (0..n * len)
                .map(|_| {
                    let (u, t): (f32, f32) =
                        (rng.random_range(1e-7..1.0), rng.random_range(0.0..std::f32::consts::TAU));
                    mean + (-2.0 * u.ln()).sqrt() * t.cos()
                })
                .collect()
        };
        for batch in 0..4 {
            let x = Tensor::from_vec(images(16, 0.1 * batch as f32), (16, input[0], input[1], input[2]), &Device::Cpu);
            net.forward(&x.unwrap(), true).unwrap();
        }
        (net, images(64, 0.0))
    }

    /// NCHW to NHWC.
    fn channels_last(t: &Tensor) -> Vec<f32> {
        t.permute((0, 2, 3, 1)).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn the_integer_stream_follows_the_float_network_layer_by_layer() {
        for (bn, prune, input) in
            [(BnMode::Fold, false, [3, 8, 8]), (BnMode::Keep, false, [1, 9, 7]), (BnMode::Fold, true, [3, 8, 8])]
        {
            let (net, images) = warmed(bn, prune, input);
            let model = IntModel::from_network(&net, "resnet8").unwrap();
            let network = infer::IntNetwork::new(&model);
            let x = Tensor::from_slice(&images, (64, input[0], input[1], input[2]), &Device::Cpu).unwrap();
            let mut floats = vec![net.stem.forward(&x, false, true).unwrap()];
            for b in &net.blocks {
                let next = b.forward(floats.last().unwrap(), false).unwrap();
                floats.push(next);
            }
            let mut traced = Vec::new();
            let logits = network.forward_traced(&images, 64, (input[0], input[1], input[2]), &mut |s, step| {
                traced.push(s.iter().map(|&v| v as f64 * step).collect::<Vec<_>>())
            });
            assert_eq!(traced.len(), floats.len());
            for (layer, (f, q)) in floats.iter().zip(&traced).enumerate() {
                let f = channels_last(f);
                let scale = f.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let worst = f.iter().zip(q).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
                let off = f.iter().zip(q).filter(|(a, b)| (**a as f64 - **b).abs() > scale * 0.02).count();
                assert!(
                    off * 100 <= f.len(),
                    "{bn:?} prune {prune}: layer {layer}: {off} of {} values off by >2% (worst {worst}, scale {scale})",
                    f.len()
                );
            }
            // The integer model is the f64 evaluation, to the stream's and biases' fixed point.
            let exact = reference::logits(&model, &images, 64, (input[0], input[1], input[2])).unwrap();
            assert_eq!(infer::argmax_rows(&exact, 5), infer::argmax_rows(&logits, 5), "{bn:?} prune {prune}");
            let step = network.logit_step();
            let worst = exact.iter().zip(&logits).map(|(e, &q)| (e - q as f64 * step).abs()).fold(0f64, f64::max);
            assert!(worst <= step, "{bn:?} prune {prune}: logits differ by {worst} (one unit is {step})");
            let float_logits = net.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let same = infer::argmax_rows(&float_logits, 5) == infer::argmax_rows(&logits, 5);
            let top = |v: &[f32]| infer::argmax_rows(v, 5);
            let agree =
                top(&float_logits).iter().zip(infer::argmax_rows(&logits, 5)).filter(|(a, b)| **a == *b).count();
            assert!(agree >= 60, "{bn:?} prune {prune}: same top-1 on {agree} of 64 ({same})");
        }
    }
}
