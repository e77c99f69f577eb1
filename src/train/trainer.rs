//! The training loop: one worker thread per run, cancellable and pausable, streaming events and
//! writing the run record as it goes.

use super::events::{BatchProgress, Best, EpochMetrics, RunInfo, Status, Summary, TrainEvent};
use super::metrics::{argmax_rows, Accuracy, Memorisation};
use super::optim::{l2_penalty, Adam};
use crate::config::{DeviceKind, Experiment, Regularizer};
use crate::data::{self, augment, Dataset, Split};
use crate::model::resnet::NetSpec;
use crate::model::ResNet;
use crate::ops;
use crate::regularize::early_stop::{EarlyStopping, Verdict};
use crate::regularize::smoothing::smooth_one_hot;
use crate::runs::RunDir;
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Where and how a run records itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Folder that receives `<run id>/`.
    pub runs_root: PathBuf,
    /// Emit a `Batch` event every this many batches (0 = never).
    pub batch_events_every: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { runs_root: crate::runs::default_root(), batch_events_every: 1 }
    }
}

/// Handle to steer a running worker.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    cancel: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl RunControl {
    /// Asks the run to stop after the current batch; it is recorded as `stopped`.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.cancelled()
    }
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    /// Blocks while paused; returns `true` if the run should stop.
    fn checkpoint(&self) -> bool {
        while self.paused.load(Ordering::SeqCst) && !self.cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.cancelled()
    }
}

/// Starts a run in its own thread. Events arrive on the receiver; the last one is always `Finished`.
pub fn spawn(
    exp: Experiment,
    opts: RunOptions,
) -> (RunControl, UnboundedReceiver<TrainEvent>, std::thread::JoinHandle<Summary>) {
    let (tx, rx) = unbounded_channel();
    let control = RunControl::default();
    let worker_control = control.clone();
    let handle = std::thread::Builder::new()
        .name(format!("train-{}", exp.name))
        .spawn(move || run(&exp, &opts, &worker_control, &tx))
        .expect("spawn training thread");
    (control, rx, handle)
}

/// Runs an experiment to the end on the calling thread. Never panics on bad data or a diverging loss:
/// every ending is a `Finished` event with its status, also written to `summary.json`.
pub fn run(exp: &Experiment, opts: &RunOptions, control: &RunControl, tx: &UnboundedSender<TrainEvent>) -> Summary {
    run_with(exp, opts, control, tx, || data::load(&exp.data))
}

/// [`run`] on an already prepared dataset (tests use it for data no loader produces, e.g. NaN pixels).
pub fn run_on(
    exp: &Experiment,
    data: Dataset,
    opts: &RunOptions,
    control: &RunControl,
    tx: &UnboundedSender<TrainEvent>,
) -> Summary {
    run_with(exp, opts, control, tx, move || Ok(data))
}

fn run_with(
    exp: &Experiment,
    opts: &RunOptions,
    control: &RunControl,
    tx: &UnboundedSender<TrainEvent>,
    load: impl FnOnce() -> Result<Dataset>,
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary {
        run_id: String::new(),
        name: exp.name.clone(),
        label: exp.regularizer.label(),
        status: Status::Running,
        message: None,
        epochs_run: 0,
        last: None,
        best: None,
        final_eval_acc: None,
        final_eval_loss: None,
        restored_epoch: None,
        noise_rate: exp.data.noise.rate,
        measured_noise_rate: 0.0,
        params: 0,
        macs: 0,
        pruned_params: None,
        pruned_macs: None,
        wall_secs: 0.0,
        device: String::new(),
    };
    let mut dir: Option<RunDir> = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(exp, opts, control, tx, &mut summary, &mut dir, load)
    }));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            summary.status = Status::Failed;
            summary.message = Some(format!("{e:#}"));
        }
        Err(panic) => {
            summary.status = Status::Failed;
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            summary.message = Some(format!("internal error: {text}"));
        }
    }
    summary.wall_secs = started.elapsed().as_secs_f64();
    if let Some(dir) = &dir {
        if let Err(e) = dir.write_summary(&summary) {
            let _ = tx.send(TrainEvent::Log(format!("could not write summary.json: {e:#}")));
        }
    }
    let _ = tx.send(TrainEvent::Finished(summary.clone()));
    summary
}

/// Picks the device a run asked for, with a clear message when it is not available.
pub fn device_for(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                return Err(anyhow!(
                    "train.device = cuda, but this binary was built without CUDA: rebuild with `cargo build --release --features cuda`, or use --set train.device=cpu"
                ));
            }
            Device::new_cuda(0).context(
                "no usable CUDA GPU (driver >= 580 and the CUDA 13 libraries are needed); use --set train.device=cpu",
            )
        }
    }
}

fn train(
    exp: &Experiment,
    opts: &RunOptions,
    control: &RunControl,
    tx: &UnboundedSender<TrainEvent>,
    summary: &mut Summary,
    dir_out: &mut Option<RunDir>,
    load: impl FnOnce() -> Result<Dataset>,
) -> Result<()> {
    let log = |msg: String| {
        let _ = tx.send(TrainEvent::Log(msg));
    };
    let device = device_for(exp.train.device)?;
    let data = load()?;
    let dir = RunDir::create(&opts.runs_root, exp)?;
    *dir_out = Some(dir.clone());
    summary.run_id = dir.id();
    summary.measured_noise_rate = data.measured_noise_rate;
    summary.device = format!("{:?}", exp.train.device).to_lowercase();
    dir.write_summary(summary)?;

    let spec = NetSpec { arch: exp.model.arch, width: exp.model.width, input: data.shape, outputs: data.num_classes() };
    let mut net = ResNet::new(spec, &exp.regularizer, &device, exp.train.seed);
    let cost = net.cost()?;
    summary.params = cost.params;
    summary.macs = cost.macs;
    let bs = exp.train.batch_size.min(data.train.len());
    let batches = data.train.len().div_ceil(bs);
    let _ = tx.send(TrainEvent::Started(RunInfo {
        run_id: dir.id(),
        dir: dir.path.clone(),
        name: exp.name.clone(),
        label: exp.regularizer.label(),
        dataset: data.name.clone(),
        classes: data.classes.clone(),
        train_size: data.train.len(),
        val_size: data.val.len(),
        test_size: data.test.len(),
        noise_rate: exp.data.noise.rate,
        measured_noise_rate: data.measured_noise_rate,
        params: cost.params,
        macs: cost.macs,
        epochs: exp.train.epochs,
        batches_per_epoch: batches,
        device: summary.device.clone(),
    }));
    log(format!(
        "{}: {} train / {} val / {} test images, {:.1}% of training labels corrupted, {} parameters",
        data.name,
        data.train.len(),
        data.val.len(),
        data.test.len(),
        data.measured_noise_rate * 100.0,
        cost.params
    ));

    let (decoupled, l2) = match exp.regularizer {
        Regularizer::WeightDecay { value, decoupled: true } => (value, 0.0),
        Regularizer::WeightDecay { value, decoupled: false } => (0.0, value),
        _ => (0.0, 0.0),
    };
    let smoothing = match exp.regularizer {
        Regularizer::LabelSmoothing { alpha } => alpha,
        _ => 0.0,
    };
    let mut early = match exp.regularizer {
        Regularizer::EarlyStopping { patience } => Some(EarlyStopping::new(patience)),
        _ => None,
    };
    let mut best_snapshot: Option<Vec<Tensor>> = None;
    let mut optimizer = Adam::new(&net.params.entries, exp.train.lr, decoupled)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.train.seed.wrapping_add(0x7a11));
    let mut history: Vec<EpochMetrics> = Vec::new();
    let image_len = data.image_len();
    let classes = data.num_classes();
    let mut order: Vec<usize> = (0..data.train.len()).collect();

    for epoch in 1..=exp.train.epochs {
        if let Regularizer::Pruning { ratio, at_epoch, criterion } = exp.regularizer {
            if epoch == at_epoch + 1 {
                let kept = net.prune(ratio, criterion)?;
                let after = net.cost()?;
                summary.pruned_params = Some(after.params);
                summary.pruned_macs = Some(after.macs);
                // Fresh optimiser state: moments of removed channels must not carry over.
                optimizer = Adam::new(&net.params.entries, exp.train.lr, decoupled)?;
                log(format!(
                    "pruned {:.0}% of inner channels ({kept:?} kept): parameters {} -> {} ({:.1}x), MACs {} -> {} ({:.1}x)",
                    ratio * 100.0,
                    cost.params,
                    after.params,
                    cost.params as f64 / after.params as f64,
                    cost.macs,
                    after.macs,
                    cost.macs as f64 / after.macs as f64
                ));
            }
        }

        let epoch_start = Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut seen = 0usize;
        let mut memo = Memorisation::default();
        let mut stopped = false;
        for (b, chunk) in order.chunks(bs).enumerate() {
            if control.checkpoint() {
                stopped = true;
                break;
            }
            let mut images = gather(&data.train, chunk, image_len);
            if exp.data.augment {
                augment::crop_flip(&mut images, data.shape, &mut rng);
            }
            let labels: Vec<u32> = chunk.iter().map(|&i| data.train.labels[i]).collect();
            let x = Tensor::from_vec(images, (chunk.len(), data.shape[0], data.shape[1], data.shape[2]), &device)?;
            let logits = net.forward(&x, true)?;
            let mut loss = if smoothing > 0.0 {
                let t = Tensor::from_vec(smooth_one_hot(&labels, classes, smoothing), (chunk.len(), classes), &device)?;
                ops::soft_cross_entropy(&logits, &t)?
            } else {
                candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels.as_slice(), &device)?)?
            };
            if l2 > 0.0 {
                if let Some(p) = l2_penalty(&net.params.entries, l2)? {
                    loss = (loss + p)?;
                }
            }
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                summary.status = Status::Diverged;
                summary.message = Some(format!(
                    "the training loss became {loss_value} at epoch {epoch}, batch {}: lower train.lr or change the regularizer",
                    b + 1
                ));
                summary.epochs_run = history.len();
                return Ok(());
            }
            optimizer.step(&loss.backward()?)?;
            let preds = argmax_rows(&logits.detach().to_vec2::<f32>()?.concat(), classes);
            let flags: Vec<bool> = chunk.iter().map(|&i| data.corrupted[i]).collect();
            memo.add(&preds, &labels, &flags);
            loss_sum += loss_value * chunk.len() as f64;
            seen += chunk.len();
            if opts.batch_events_every > 0 && (b + 1) % opts.batch_events_every == 0 {
                let _ = tx.send(TrainEvent::Batch(BatchProgress {
                    epoch,
                    batch: b + 1,
                    batches,
                    loss: loss_value,
                    images_per_sec: seen as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9),
                }));
            }
        }
        if stopped {
            summary.status = Status::Stopped;
            break;
        }
        let train_secs = epoch_start.elapsed().as_secs_f64();
        let (eval_loss, eval_acc, per_class_acc) = evaluate(&net, &data.test, &data, &device)?;
        let (val_loss, val_acc) = if data.val.is_empty() {
            (None, None)
        } else {
            let (l, a, _) = evaluate(&net, &data.val, &data, &device)?;
            (Some(l), Some(a))
        };
        let train_loss = loss_sum / seen.max(1) as f64;
        let m = EpochMetrics {
            epoch,
            train_loss,
            train_acc: memo.noisy_acc(),
            memorized: memo.memorized(),
            clean_fit: memo.clean_fit(),
            eval_loss,
            eval_acc,
            per_class_acc,
            val_loss,
            val_acc,
            gap: eval_loss - train_loss,
            images_per_sec: seen as f64 / train_secs.max(1e-9),
            epoch_secs: epoch_start.elapsed().as_secs_f64(),
        };
        if summary.best.as_ref().is_none_or(|b| eval_acc > b.eval_acc) {
            summary.best = Some(Best { epoch, eval_acc, eval_loss });
        }
        if let Some(name) = net.params.first_non_finite()? {
            summary.status = Status::Diverged;
            summary.message = Some(format!(
                "parameter `{name}` became NaN or infinite at epoch {epoch}: lower train.lr or change the regularizer"
            ));
            summary.epochs_run = history.len();
            return Ok(());
        }
        history.push(m.clone());
        summary.epochs_run = epoch;
        summary.last = Some(m.clone());
        summary.final_eval_acc = Some(eval_acc);
        summary.final_eval_loss = Some(eval_loss);
        dir.write_metrics(&history)?;
        let _ = tx.send(TrainEvent::Epoch(m));

        if let Some(es) = early.as_mut() {
            match es.observe(epoch, val_loss.unwrap_or(f64::NAN)) {
                Verdict::Improved => best_snapshot = Some(net.params.snapshot()?),
                Verdict::Wait => {}
                Verdict::Stop => {
                    summary.status = Status::EarlyStopped;
                    log(format!(
                        "early stopping: no better validation loss for {} epochs; best was epoch {}",
                        es.patience,
                        es.best_epoch.unwrap_or(0)
                    ));
                    break;
                }
            }
        }
    }

    // Early stopping keeps the best-validation weights, whether patience ran out or the epochs did.
    if let (Some(es), Some(snapshot)) = (&early, &best_snapshot) {
        if es.best_epoch != Some(summary.epochs_run) {
            net.params.restore(snapshot)?;
            let (l, a, _) = evaluate(&net, &data.test, &data, &device)?;
            summary.final_eval_acc = Some(a);
            summary.final_eval_loss = Some(l);
            summary.restored_epoch = es.best_epoch;
            log(format!(
                "restored the weights of epoch {} (test accuracy {:.1}%)",
                es.best_epoch.unwrap_or(0),
                a * 100.0
            ));
        }
    }
    if summary.epochs_run > 0 {
        net.params.save(&dir.weights_path())?;
    }
    if summary.status == Status::Running {
        summary.status = Status::Completed;
    }
    Ok(())
}

fn gather(split: &Split, idx: &[usize], image_len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * image_len);
    for &i in idx {
        out.extend_from_slice(&split.images[i * image_len..(i + 1) * image_len]);
    }
    out
}

/// Mean cross-entropy, accuracy and per-class accuracy of `split` in eval mode.
pub fn evaluate(net: &ResNet, split: &Split, data: &Dataset, device: &Device) -> Result<(f64, f64, Vec<f64>)> {
    const EVAL_BATCH: usize = 500;
    let image_len = data.image_len();
    let classes = data.num_classes();
    let mut acc = Accuracy::new(classes);
    let mut loss_sum = 0.0;
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(EVAL_BATCH) {
        let x = Tensor::from_vec(
            gather(split, chunk, image_len),
            (chunk.len(), data.shape[0], data.shape[1], data.shape[2]),
            device,
        )?;
        let labels: Vec<u32> = chunk.iter().map(|&i| split.labels[i]).collect();
        let logits = net.forward(&x, false)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels.as_slice(), device)?)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        acc.add(&argmax_rows(&logits.to_vec2::<f32>()?.concat(), classes), &labels);
    }
    Ok((loss_sum / split.len().max(1) as f64, acc.overall(), acc.per_class()))
}
