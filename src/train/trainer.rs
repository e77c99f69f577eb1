//! The training loop: one worker thread per run, cancellable and pausable, streaming events and
//! writing the run record as it goes.

use super::checkpoint;
use super::events::{BatchProgress, Best, EpochMetrics, RunInfo, Status, Summary, TrainEvent};
use super::footprint::{self, Footprint};
use super::metrics::{argmax_rows, f1_per_label, tune_thresholds, Accuracy, Memorisation};
use super::optim::Adam;
use crate::config::{DeviceKind, Experiment};
use crate::data::{self, augment, DataSize, Dataset, Split};
use crate::methods::{self, Batch, EpochEnd, Method, Outcome, Setup};
use crate::model::resnet::{NetSpec, Wiring};
use crate::model::ResNet;
use crate::runs::RunDir;
use crate::threads;
use anyhow::{anyhow, bail, Context, Result};
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
    /// Added to the run's folder name (a sweep's grid index).
    pub tag: Option<String>,
    /// Go on from the checkpoint in this run folder instead of starting a new run.
    pub resume: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { runs_root: crate::runs::default_root(), batch_events_every: 1, tag: None, resume: None }
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
    /// Whether both handles steer the same run.
    pub fn same_as(&self, other: &RunControl) -> bool {
        Arc::ptr_eq(&self.cancel, &other.cancel)
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
    let mut summary = Summary::started(&exp.name, &exp.method_label(), exp.data.noise.rate);
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
    // A resumed run's summary already holds the time of the attempts before.
    summary.wall_secs += started.elapsed().as_secs_f64();
    if let Some(dir) = &dir {
        if let Err(e) = dir.write_summary(&summary) {
            let _ = tx.send(TrainEvent::Log(format!("could not write summary.json: {e:#}")));
        }
        if matches!(summary.status, Status::Completed | Status::EarlyStopped | Status::Diverged) {
            // Ended for good: nothing will resume from it.
            let _ = std::fs::remove_file(dir.path.join(crate::runs::CHECKPOINT_FILE));
        }
    }
    let _ = tx.send(TrainEvent::Finished(Box::new(summary.clone())));
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
            crate::ops::cuda_device(0).context(
                "no usable CUDA GPU (driver >= 580 and the CUDA 13 libraries are needed); use --set train.device=cpu",
            )
        }
    }
}

/// Fewest validation images that early stopping or threshold tuning may decide on (or one batch, if
/// the batch is smaller). Not a whole batch of 64: the small budgets' splits hold 12-60 images.
pub const MIN_VALIDATION: usize = 10;

fn check_validation_size(exp: &Experiment, method: &dyn Method, val_len: usize) -> Result<()> {
    let needs = method.needs_validation() || exp.train.tune_threshold;
    let least = exp.train.batch_size.min(MIN_VALIDATION);
    if needs && val_len < least {
        bail!(
            "data.val_fraction = {} gives {val_len} validation images; early stopping and threshold tuning need at least {least}: raise data.val_fraction or data.train_subset",
            exp.data.val_fraction
        );
    }
    Ok(())
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
    let attempt = Instant::now();
    // A resumed run writes into its own folder, and any failure from here on keeps its summary.
    let resumed = match &opts.resume {
        Some(path) => {
            let dir = RunDir::open(path)?;
            let saved = checkpoint::Saved::read(&dir)?;
            *summary = saved.summary.clone();
            *dir_out = Some(dir);
            Some(saved)
        }
        None => None,
    };
    let device = device_for(exp.train.device)?;
    let mut method = methods::build(exp);
    let (data, memory) = load_within_memory(exp, method.as_ref(), load)?;
    let dir = match dir_out.clone() {
        Some(dir) => dir,
        None => RunDir::create(&opts.runs_root, exp, opts.tag.as_deref())?,
    };
    *dir_out = Some(dir.clone());
    summary.run_id = dir.id();
    summary.measured_noise_rate = data.measured_noise_rate;
    summary.device = format!("{:?}", exp.train.device).to_lowercase();
    summary.classes = data.classes.clone();
    summary.transition = data.transition.clone();
    dir.write_summary(summary)?;

    let (mut net, wiring) = build_network(exp, &data, method.as_ref(), &device);
    let cost = net.cost()?;
    (summary.params, summary.macs) = (cost.params, cost.macs);
    let pass = Pass::new(exp, opts, control, tx, &data, &device);
    let _ = tx.send(TrainEvent::Started(run_info(exp, &data, &dir, summary, pass.batches)));
    log(format!(
        "{}: {} train / {} val / {} test images, {:.1}% of training labels corrupted, {} parameters, memory {}",
        data.name,
        data.train.len(),
        data.val.len(),
        data.test.len(),
        data.measured_noise_rate * 100.0,
        cost.params,
        memory.describe()
    ));

    let decoupled = method.decoupled_decay();
    method.built(
        &net,
        &Setup { wiring, device: device.clone(), seed: exp.train.seed, lr: exp.train.lr, decoupled_decay: decoupled },
    )?;
    let mut optimizer = Adam::new(&net.params.entries, exp.train.lr, decoupled)?;
    let mut rng = ChaCha8Rng::seed_from_u64(exp.train.seed.wrapping_add(0x7a11));
    let mut history: Vec<EpochMetrics> = Vec::new();
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut first_epoch = 1;
    if let Some(saved) = resumed {
        let progress = saved.apply(&mut rng, &mut net, &mut optimizer, method.as_mut())?;
        if progress.order.len() != order.len() {
            bail!(
                "the checkpoint holds {} training images but the data has {}: the data changed since the run started",
                progress.order.len(),
                order.len()
            );
        }
        (history, order, first_epoch) = (progress.history, progress.order, progress.epoch + 1);
        summary.status = Status::Running;
        summary.message = None;
        log(format!("resumed from the checkpoint of epoch {} (of {})", progress.epoch, exp.train.epochs));
    }

    for epoch in first_epoch..=exp.train.epochs {
        let mut outcome = Outcome::default();
        method.before_epoch(epoch, &mut net, &mut outcome)?;
        outcome.log.drain(..).for_each(log);
        if outcome.reshaped {
            let after = net.cost()?;
            (summary.pruned_params, summary.pruned_macs) = (Some(after.params), Some(after.macs));
            // Fresh optimiser state: moments of removed parameters must not carry over.
            optimizer = Adam::new(&net.params.entries, exp.train.lr, decoupled)?;
        }

        let epoch_start = Instant::now();
        order.shuffle(&mut rng);
        let trained = match pass.run(epoch, &order, &mut rng, &mut net, method.as_mut(), &mut optimizer)? {
            EpochEnding::Trained(trained) => trained,
            EpochEnding::Stopped => {
                summary.status = Status::Stopped;
                break;
            }
            EpochEnding::Diverged(message) => return diverged(summary, &history, message),
        };
        let m = pass.evaluate(epoch, &net, trained, epoch_start)?;
        if let Some(name) = net.params.first_non_finite()? {
            let message = format!(
                "parameter `{name}` became NaN or infinite at epoch {epoch}: lower train.lr or change the regularizer"
            );
            return diverged(summary, &history, message);
        }
        // Only a recorded epoch can be the best one: a diverged epoch above never reaches here.
        if summary.best.as_ref().is_none_or(|b| m.eval_acc > b.eval_acc) {
            summary.best = Some(Best { epoch, eval_acc: m.eval_acc, eval_loss: m.eval_loss });
        }
        history.push(m.clone());
        summary.epochs_run = epoch;
        summary.last = Some(m.clone());
        (summary.final_eval_acc, summary.final_eval_loss) = (Some(m.eval_acc), Some(m.eval_loss));
        dir.write_metrics(&history)?;
        let end = EpochEnd { epoch, multi_label: data.is_multi_label(), val_loss: m.val_loss, val_f1: m.val_f1 };
        let _ = tx.send(TrainEvent::Epoch(m));

        let mut outcome = Outcome::default();
        method.after_epoch(&end, &net, &mut outcome)?;
        outcome.log.drain(..).for_each(log);
        if outcome.stop {
            summary.status = Status::EarlyStopped;
            break;
        }
        if epoch < exp.train.epochs {
            let mut at = summary.clone();
            at.wall_secs += attempt.elapsed().as_secs_f64();
            let progress = checkpoint::Progress { epoch, history: history.clone(), summary: at, order: order.clone() };
            checkpoint::save(&dir, &progress, &rng, &net, &optimizer, method.as_ref())?;
        }
    }

    // A method may end the run with an earlier epoch's weights (early stopping's best).
    if let Some(kept) = method.keep_weights(&mut net, summary.epochs_run)? {
        let t = pass.test(&net, &history[kept - 1].thresholds)?;
        (summary.final_eval_acc, summary.final_eval_loss) = (Some(t.acc), Some(t.loss));
        summary.restored_epoch = Some(kept);
        log(format!(
            "restored the weights of epoch {kept} (test {} {:.1}%)",
            if data.is_multi_label() { "average F1" } else { "accuracy" },
            t.acc * 100.0
        ));
    }
    if summary.epochs_run > 0 {
        net.save_weights(&dir.weights_path())?;
        summary.size = Some(model_size(&net, exp, summary.pruned_params)?);
    }
    if summary.status == Status::Running {
        summary.status = Status::Completed;
    }
    Ok(())
}

/// Marks the run diverged with `message` (a recorded outcome, not an error); its record keeps the
/// epochs before.
fn diverged(summary: &mut Summary, history: &[EpochMetrics], message: String) -> Result<()> {
    summary.status = Status::Diverged;
    summary.message = Some(message);
    summary.epochs_run = history.len();
    Ok(())
}

/// The run's data, loaded only when the memory it will need is there: checked before loading where
/// the sizes are known (so that a run too big fails before it allocates), and again on the loaded
/// sizes. Returns the estimate too, for the run's log.
fn load_within_memory(
    exp: &Experiment,
    method: &dyn Method,
    load: impl FnOnce() -> Result<Dataset>,
) -> Result<(Dataset, Footprint)> {
    let available = footprint::available();
    if let Some(size) = DataSize::expected(&exp.data).filter(|s| s.exact) {
        Footprint::estimate(exp, &size).check(exp, available)?;
    }
    let data = load()?;
    check_validation_size(exp, method, data.val.len())?;
    let loaded = DataSize {
        shape: data.shape,
        train: data.train.len() + data.val.len(),
        test: data.test.len(),
        outputs: data.num_classes(),
        exact: true,
    };
    let memory = Footprint::estimate(exp, &loaded);
    memory.check(exp, available)?;
    Ok((data, memory))
}

/// The network for `data`, with the layers the methods wire in (the wiring also builds any peer).
fn build_network(exp: &Experiment, data: &Dataset, method: &dyn Method, device: &Device) -> (ResNet, Wiring) {
    let mut spec = NetSpec {
        arch: exp.model.arch,
        width: exp.model.width,
        input: data.shape,
        outputs: data.num_classes(),
        per_label_heads: false,
    };
    let mut wiring = Wiring::default();
    method.wire(&mut spec, &mut wiring, data.is_multi_label());
    (ResNet::new(spec, &wiring, device, exp.train.seed), wiring)
}

/// The `Started` event: what the lab shows of a run before its first epoch.
fn run_info(exp: &Experiment, data: &Dataset, dir: &RunDir, summary: &Summary, batches: usize) -> RunInfo {
    RunInfo {
        run_id: dir.id(),
        dir: dir.path.clone(),
        name: exp.name.clone(),
        label: exp.method_label(),
        dataset: data.name.clone(),
        classes: data.classes.clone(),
        multi_label: data.is_multi_label(),
        train_size: data.train.len(),
        val_size: data.val.len(),
        test_size: data.test.len(),
        noise_rate: exp.data.noise.rate,
        measured_noise_rate: data.measured_noise_rate,
        params: summary.params,
        macs: summary.macs,
        epochs: exp.train.epochs,
        batches_per_epoch: batches,
        device: summary.device.clone(),
    }
}

/// How an epoch's pass over the training batches ended.
enum EpochEnding {
    Trained(Trained),
    /// A stop was asked for: the run ends with the epochs before.
    Stopped,
    /// The loss was not finite; the message says where.
    Diverged(String),
}

/// What an epoch's training batches add up to.
struct Trained {
    loss_sum: f64,
    seen: usize,
    memo: Memorisation,
    secs: f64,
}

/// What every epoch of a run reads: one pass over the shuffled training set, then the evaluation.
struct Pass<'a> {
    exp: &'a Experiment,
    opts: &'a RunOptions,
    control: &'a RunControl,
    tx: &'a UnboundedSender<TrainEvent>,
    data: &'a Dataset,
    device: &'a Device,
    batch_size: usize,
    batches: usize,
}

impl<'a> Pass<'a> {
    fn new(
        exp: &'a Experiment,
        opts: &'a RunOptions,
        control: &'a RunControl,
        tx: &'a UnboundedSender<TrainEvent>,
        data: &'a Dataset,
        device: &'a Device,
    ) -> Self {
        let batch_size = exp.train.batch_size.min(data.train.len());
        Self { exp, opts, control, tx, data, device, batch_size, batches: data.train.len().div_ceil(batch_size) }
    }

    /// One epoch's steps over the training images in `order`: forward, the methods' loss, one
    /// optimiser step, and the tally of what the network fits.
    fn run(
        &self,
        epoch: usize,
        order: &[usize],
        rng: &mut ChaCha8Rng,
        net: &mut ResNet,
        method: &mut dyn Method,
        optimizer: &mut Adam,
    ) -> Result<EpochEnding> {
        let (data, device) = (self.data, self.device);
        let start = Instant::now();
        let classes = data.num_classes();
        let mut trained = Trained { loss_sum: 0.0, seen: 0, memo: Memorisation::default(), secs: 0.0 };
        for (b, chunk) in order.chunks(self.batch_size).enumerate() {
            if self.control.checkpoint() {
                return Ok(EpochEnding::Stopped);
            }
            let mut images = data::rows(&data.train.images, chunk, data.image_len());
            if self.exp.data.augment {
                augment::crop_flip(&mut images, data.shape, rng);
            }
            let labels: Vec<u32> = chunk.iter().map(|&i| data.train.labels[i]).collect();
            let x = Tensor::from_vec(images, (chunk.len(), data.shape[0], data.shape[1], data.shape[2]), device)?;
            let logits = threads::compute(device, || net.forward(&x, true))?;
            let multi_label = data.is_multi_label();
            let targets = if multi_label { data::rows(&data.train.targets, chunk, classes) } else { Vec::new() };
            let batch = Batch { epoch, images: &x, labels: &labels, targets: &targets, classes, multi_label, device };
            let mut loss = match method.loss(&batch, &logits)? {
                Some(loss) => loss,
                None => methods::default_loss(&batch, &logits)?,
            };
            if let Some(penalty) = method.penalty(&net.params.entries)? {
                loss = (loss + penalty)?;
            }
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                return Ok(EpochEnding::Diverged(format!(
                    "the training loss became {loss_value} at epoch {epoch}, batch {}: lower train.lr or change the regularizer",
                    b + 1
                )));
            }
            threads::compute(device, || optimizer.step(&loss.backward()?))?;
            self.tally(&mut trained.memo, chunk, &batch, &logits.detach().to_vec2::<f32>()?.concat());
            trained.loss_sum += loss_value * chunk.len() as f64;
            trained.seen += chunk.len();
            if self.opts.batch_events_every > 0 && (b + 1) % self.opts.batch_events_every == 0 {
                let _ = self.tx.send(TrainEvent::Batch(BatchProgress {
                    epoch,
                    batch: b + 1,
                    batches: self.batches,
                    loss: loss_value,
                    images_per_sec: trained.seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                }));
            }
        }
        trained.secs = start.elapsed().as_secs_f64();
        Ok(EpochEnding::Trained(trained))
    }

    /// Adds a batch's predictions `out` to the tally of fitted labels: per image (classes), or per
    /// known (image, label), predicted present (logit > 0) against the noisy target.
    fn tally(&self, memo: &mut Memorisation, chunk: &[usize], batch: &Batch, out: &[f32]) {
        let (data, classes) = (self.data, batch.classes);
        if batch.multi_label {
            let (targets, flags) = (batch.targets, data::rows(&data.corrupted, chunk, classes));
            let known: Vec<usize> = (0..targets.len()).filter(|&k| targets[k] >= 0.0).collect();
            let preds: Vec<u32> = known.iter().map(|&k| (out[k] > 0.0) as u32).collect();
            let noisy: Vec<u32> = known.iter().map(|&k| (targets[k] > 0.5) as u32).collect();
            let flags: Vec<bool> = known.iter().map(|&k| flags[k]).collect();
            let columns: Vec<usize> = known.iter().map(|&k| k % classes).collect();
            memo.add(&preds, &noisy, &flags, &columns);
        } else {
            let preds = argmax_rows(out, classes);
            let flags: Vec<bool> = chunk.iter().map(|&i| data.corrupted[i]).collect();
            let clean: Vec<usize> = chunk.iter().map(|&i| data.train_clean_labels[i] as usize).collect();
            memo.add(&preds, batch.labels, &flags, &clean);
        }
    }

    /// The epoch's record: the training tally, then validation (tuning the labels' thresholds where
    /// asked) and test.
    fn evaluate(&self, epoch: usize, net: &ResNet, trained: Trained, start: Instant) -> Result<EpochMetrics> {
        let (data, classes) = (self.data, self.data.num_classes());
        let val = if data.val.is_empty() { None } else { Some(evaluate(net, &data.val, data, self.device, None)?) };
        let thresholds = match (&val, self.exp.train.tune_threshold) {
            (Some(v), true) => tune_thresholds(&v.probs, &data.val.targets, classes),
            _ => Vec::new(),
        };
        let test = self.test(net, &thresholds)?;
        let train_loss = trained.loss_sum / trained.seen.max(1) as f64;
        let memo = &trained.memo;
        Ok(EpochMetrics {
            epoch,
            train_loss,
            train_acc: memo.noisy_acc(),
            memorized: memo.memorized(),
            memorized_per_class: memo.per_group(classes),
            clean_fit: memo.clean_fit(),
            eval_loss: test.loss,
            eval_acc: test.acc,
            per_class_acc: test.per_class,
            f1: test.f1,
            label_loss: test.label_loss,
            thresholds,
            val_f1: val.as_ref().filter(|_| data.is_multi_label()).map(|v| v.acc),
            val_loss: val.as_ref().map(|v| v.loss),
            val_acc: val.as_ref().map(|v| v.acc),
            gap: test.loss - train_loss,
            images_per_sec: trained.seen as f64 / trained.secs.max(1e-9),
            epoch_secs: start.elapsed().as_secs_f64(),
        })
    }

    /// The test split under `net`, with the labels' tuned thresholds when there are any.
    fn test(&self, net: &ResNet, thresholds: &[f64]) -> Result<Evaluation> {
        let tuned = (!thresholds.is_empty()).then_some(thresholds);
        evaluate(net, &self.data.test, self.data, self.device, tuned)
    }
}

/// What the kept network weighs: its float weights, and for a QAT run the packed integer model that
/// `qat-lab export` writes (None where the exporter does not support the network).
fn model_size(net: &ResNet, exp: &Experiment, pruned_params: Option<usize>) -> Result<crate::runs::ModelSize> {
    // A float layer (every layer of a float run) makes the exporter refuse: no integer model.
    let arch = format!("{:?}", exp.model.arch).to_lowercase();
    let int_model = crate::export::int_model::IntModel::from_network(net, &arch).ok();
    let int_bytes = int_model.map(|m| m.to_bytes()).transpose()?.map(|b| b.len());
    Ok(crate::runs::ModelSize {
        float_bytes: 4 * net.params.trainable_count(),
        pruned_float_bytes: pruned_params.map(|p| 4 * p),
        int_bytes,
    })
}

/// What one pass over a split in eval mode measured.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Mean cross-entropy (classes) or masked binary cross-entropy (multi-label).
    pub loss: f64,
    /// Accuracy (classes) or average F1 over labels (multi-label).
    pub acc: f64,
    pub per_class: Vec<f64>,
    pub f1: Vec<f64>,
    pub label_loss: Vec<f64>,
    /// Multi-label: sigmoid probabilities (N, L), for threshold tuning.
    pub probs: Vec<f32>,
}

/// Evaluates `split` in eval mode; multi-label data uses `thresholds` (default 0.5 each).
pub fn evaluate(
    net: &ResNet,
    split: &Split,
    data: &Dataset,
    device: &Device,
    thresholds: Option<&[f64]>,
) -> Result<Evaluation> {
    const EVAL_BATCH: usize = 500;
    let image_len = data.image_len();
    let classes = data.num_classes();
    let multi = data.is_multi_label();
    let mut acc = Accuracy::new(classes);
    let mut out = Evaluation::default();
    let mut loss_sum = 0.0;
    let (mut bce_sum, mut known) = (vec![0f64; classes], vec![0usize; classes]);
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(EVAL_BATCH) {
        let x = Tensor::from_vec(
            data::rows(&split.images, chunk, image_len),
            (chunk.len(), data.shape[0], data.shape[1], data.shape[2]),
            device,
        )?;
        let logits = threads::compute(device, || net.forward(&x, false))?;
        let z = logits.to_vec2::<f32>()?.concat();
        if multi {
            let t = data::rows(&split.targets, chunk, classes);
            for (k, (&zk, &tk)) in z.iter().zip(&t).enumerate() {
                if tk >= 0.0 {
                    // Stable BCE on the logit: max(z,0) - z·y + log(1 + e^-|z|).
                    let (zk, y) = (zk as f64, (tk > 0.5) as u8 as f64);
                    bce_sum[k % classes] += zk.max(0.0) - zk * y + (-zk.abs()).exp().ln_1p();
                    known[k % classes] += 1;
                }
            }
            out.probs.extend(z.iter().map(|&v| 1.0 / (1.0 + (-v).exp())));
        } else {
            let labels: Vec<u32> = chunk.iter().map(|&i| split.labels[i]).collect();
            let loss = candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels.as_slice(), device)?)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            acc.add(&argmax_rows(&z, classes), &labels);
        }
    }
    if multi {
        let half = vec![0.5; classes];
        out.f1 = f1_per_label(&out.probs, &split.targets, thresholds.unwrap_or(&half));
        out.acc = out.f1.iter().sum::<f64>() / classes.max(1) as f64;
        out.label_loss = bce_sum.iter().zip(&known).map(|(s, &n)| s / n.max(1) as f64).collect();
        out.loss = bce_sum.iter().sum::<f64>() / known.iter().sum::<usize>().max(1) as f64;
    } else {
        out.loss = loss_sum / split.len().max(1) as f64;
        out.acc = acc.overall();
        out.per_class = acc.per_class();
    }
    Ok(out)
}
