//! The training engine end to end: real data, every regularizer, run records, and the failure paths.

use qat_lab::config::{
    Arch, DatasetKind, Dropout, EarlyStopping, Experiment, LabelSmoothing, Pruning, Quantization, Regularizer, Robust,
    WeightDecay,
};
use qat_lab::data;
use qat_lab::methods::co_teaching::CoTeaching;
use qat_lab::runs;
use qat_lab::train::trainer::{run, run_on};
use qat_lab::train::{RunControl, RunOptions, Status, Summary, TrainEvent};
use std::path::PathBuf;
use tokio::sync::mpsc::unbounded_channel;

fn digits(epochs: usize, reg: Regularizer) -> Experiment {
    let mut e = Experiment { name: "test".into(), regularizer: reg, ..Default::default() };
    e.data.dataset = DatasetKind::Digits;
    e.data.noise.rate = 0.4;
    e.model.arch = Arch::Resnet8;
    e.model.width = 0.5;
    e.train.epochs = epochs;
    e.train.batch_size = 64;
    e.train.lr = 3e-3;
    e
}

fn train(exp: &Experiment, root: &std::path::Path) -> (Summary, Vec<TrainEvent>) {
    let (tx, mut rx) = unbounded_channel();
    let opts = RunOptions { runs_root: root.to_path_buf(), batch_events_every: 0, ..Default::default() };
    let summary = run(exp, &opts, &RunControl::default(), &tx);
    drop(tx);
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (summary, events)
}

fn sample_archive() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/datasets/cifar10-sample/cifar-10-sample-binary.tar.gz");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: the CIFAR-10 sample is not at {} (only present beside the project's checkout)",
            p.display()
        );
        None
    }
}

#[test]
fn cifar10_sample_trains_a_resnet_well_above_chance() {
    let Some(archive) = sample_archive() else { return };
    let mut e = Experiment { name: "cifar-sample".into(), ..Default::default() };
    e.data.dataset = DatasetKind::Cifar10;
    e.data.path = archive.display().to_string();
    e.data.train_subset = 4000;
    e.data.test_subset = 1000;
    e.model.arch = Arch::Resnet8;
    e.train.epochs = 4;
    e.train.batch_size = 64;
    e.train.lr = 2e-3;
    let root = tempfile::tempdir().unwrap();
    let (s, _) = train(&e, root.path());
    assert_eq!(s.status, Status::Completed, "{:?}", s.message);
    let acc = s.final_eval_acc.unwrap();
    eprintln!("CIFAR-10 sample, ResNet-8, 4 epochs on 4,000 images: test accuracy {:.1}%", acc * 100.0);
    assert!(acc > 0.35, "chance is 10%, got {acc}");
}

/// The phenomenon the lab exists to show: on a small noisy training set the baseline memorises the
/// corrupted labels, and its eval loss turns up while its train loss keeps falling.
#[test]
fn baseline_memorises_noisy_labels_and_its_eval_loss_turns_up() {
    let mut e = digits(30, Regularizer::None);
    e.model.width = 1.0;
    let root = tempfile::tempdir().unwrap();
    let (s, _) = train(&e, root.path());
    assert_eq!(s.status, Status::Completed);
    let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
    let m = &rec.metrics;
    assert_eq!(m.len(), 30);
    let first = &m[0];
    let last = m.last().unwrap();
    let (best_i, best) =
        m.iter().enumerate().min_by(|a, b| a.1.eval_loss.partial_cmp(&b.1.eval_loss).unwrap()).unwrap();
    eprintln!(
        "memorised {:.2} -> {:.2}; eval loss min {:.3} at epoch {} -> {:.3}; train loss {:.3} -> {:.3}",
        first.memorized,
        last.memorized,
        best.eval_loss,
        best.epoch,
        last.eval_loss,
        m[best_i].train_loss,
        last.train_loss
    );
    assert!(last.memorized > first.memorized + 0.5, "memorisation rises");
    // Per clean class too: every class has corrupted examples here, and the overall share lies
    // within the range of the classes' shares.
    let per_class: Vec<f64> = last.memorized_per_class.iter().map(|v| v.expect("a class without noise")).collect();
    assert_eq!(per_class.len(), 10);
    let (lo, hi) = per_class.iter().fold((1.0f64, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(lo <= last.memorized && last.memorized <= hi, "{lo} <= {} <= {hi}", last.memorized);
    assert!(best_i < m.len() - 5, "eval loss bottoms out early");
    assert!(last.eval_loss > best.eval_loss + 0.1, "eval loss turns up");
    assert!(last.train_loss < m[best_i].train_loss * 0.5, "while train loss keeps falling");
    assert!(last.eval_acc < s.best.as_ref().unwrap().eval_acc, "test accuracy drops from its best");
}

#[test]
fn every_regularizer_trains_and_writes_a_complete_record() {
    let root = tempfile::tempdir().unwrap();
    let mut regs = Regularizer::all_defaults();
    regs.push(Regularizer::WeightDecay(WeightDecay { value: 0.01, decoupled: false }));
    regs.push(Regularizer::Dropout(Dropout { p: 0.2, position: qat_lab::config::DropoutPosition::Blocks }));
    regs.push(Regularizer::Quantization(Quantization {
        weight_bits: 2,
        act_bits: 8,
        first_last_bits: 8,
        bn: qat_lab::config::BnMode::Keep,
        ema_momentum: 0.9,
    }));
    for reg in regs {
        let mut e = digits(2, reg.clone());
        e.data.train_subset = 400;
        e.data.val_fraction = 0.1;
        if let Regularizer::Pruning(Pruning { at_epoch, .. }) = &mut e.regularizer {
            *at_epoch = 1;
        }
        let (s, events) = train(&e, root.path());
        assert!(matches!(s.status, Status::Completed | Status::EarlyStopped), "{reg:?}: {:?}", s.message);
        assert!(matches!(events.first(), Some(TrainEvent::Started(_))), "{reg:?}");
        assert!(matches!(events.last(), Some(TrainEvent::Finished(_))), "{reg:?}");
        let dir = root.path().join(&s.run_id);
        for f in [runs::EXPERIMENT_FILE, runs::METRICS_FILE, runs::SUMMARY_FILE, runs::WEIGHTS_FILE] {
            assert!(dir.join(f).is_file(), "{reg:?}: {f} missing");
        }
        let rec = runs::load(&dir).unwrap();
        assert_eq!(rec.experiment, e, "the record re-runs the same experiment");
        assert_eq!(rec.summary.unwrap().status, s.status);
        assert!(rec.metrics.iter().all(|m| m.eval_loss.is_finite() && (0.0..=1.0).contains(&m.eval_acc)));
    }
}

#[test]
fn every_noisy_label_method_trains_alone_and_with_quantization_on_classes_and_labels() {
    let root = tempfile::tempdir().unwrap();
    let w4a4 = Regularizer::default_for("quantization").unwrap();
    for dataset in [DatasetKind::Digits, DatasetKind::Faces] {
        for kind in &qat_lab::config::ROBUST_KINDS[1..] {
            for reg in [Regularizer::None, w4a4.clone()] {
                let mut e = digits(2, reg.clone());
                e.robust = Robust::default_for(kind).unwrap();
                e.data.dataset = dataset;
                e.data.train_subset = 300;
                e.data.test_subset = 100;
                if dataset == DatasetKind::Faces {
                    e.data.noise.rate = 0.2;
                }
                let (s, _) = train(&e, root.path());
                let what = format!("{dataset:?} {}", e.method_label());
                assert_eq!(s.status, Status::Completed, "{what}: {:?}", s.message);
                assert_eq!(s.label, e.method_label(), "{what}: the record names both methods");
                let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
                assert_eq!(rec.experiment.robust, e.robust, "{what}: the record re-runs the same method");
                let stored = rec.summary.as_ref().unwrap();
                assert_eq!(stored.format, runs::record::FORMAT);
                assert_eq!(stored.classes.len(), if dataset == DatasetKind::Faces { 12 } else { 10 }, "{what}");
                assert_eq!(rec.label_names(), stored.classes, "{what}: views read the names from the record");
                let rows = if dataset == DatasetKind::Faces { 0 } else { 10 };
                assert_eq!(stored.transition.len(), rows, "{what}: the noise transition matrix of classes");
                assert!(stored.transition.iter().all(|r| (r.iter().sum::<f64>() - 1.0).abs() < 1e-9), "{what}");
                assert!(rec.metrics.iter().all(|m| m.train_loss.is_finite() && m.eval_loss.is_finite()), "{what}");
            }
        }
    }
}

#[test]
fn a_record_written_before_the_format_version_still_loads() {
    // Written by the main of 2026-12-03 (before `format`, class names and `[robust]` were stored).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/records-format-0");
    let scan = runs::scan(&root);
    assert!(scan.unreadable.is_empty(), "{:?}", scan.unreadable);
    assert_eq!(scan.records.len(), 1);
    let rec = &scan.records[0];
    let summary = rec.summary.as_ref().unwrap();
    assert_eq!((summary.format, summary.status, summary.classes.len()), (0, Status::Completed, 0));
    assert_eq!(rec.experiment.robust, Robust::None);
    assert_eq!(rec.experiment.method_label(), "baseline");
    assert_eq!(rec.metrics.len(), 3);
    assert_eq!(rec.metrics[2].f1.len(), 12);
    // Its label names were not stored; format 0's multi-label runs all had the paper's 12 AUs.
    assert_eq!(rec.label_names(), qat_lab::data::faces::au_names());
}

#[test]
fn co_teaching_trains_two_networks_so_it_differs_from_the_baseline_from_the_first_epoch() {
    // Epoch 1 drops nothing (the forget rate ramps from 0), but the peer is built and trained, and
    // from epoch 2 each network learns only from the samples its peer keeps.
    let root = tempfile::tempdir().unwrap();
    let mut base = digits(3, Regularizer::None);
    base.data.train_subset = 300;
    let mut co = base.clone();
    co.robust = Robust::CoTeaching(CoTeaching { forget_rate: 0.4, tk: 2 });
    let (a, _) = train(&base, root.path());
    let (b, _) = train(&co, root.path());
    let (ra, rb) =
        (runs::load(&root.path().join(&a.run_id)).unwrap(), runs::load(&root.path().join(&b.run_id)).unwrap());
    assert_eq!(ra.metrics[0].train_loss, rb.metrics[0].train_loss, "epoch 1 keeps every sample");
    assert_ne!(ra.metrics[2].train_loss, rb.metrics[2].train_loss, "later epochs train on the peer's picks");
}

#[test]
fn pruning_removes_real_parameters_and_macs() {
    let root = tempfile::tempdir().unwrap();
    let mut e = digits(2, Regularizer::default_for("pruning").unwrap());
    e.data.train_subset = 300;
    if let Regularizer::Pruning(Pruning { at_epoch, .. }) = &mut e.regularizer {
        *at_epoch = 1;
    }
    let (s, events) = train(&e, root.path());
    assert_eq!(s.status, Status::Completed);
    let (p, m) = (s.pruned_params.unwrap(), s.pruned_macs.unwrap());
    assert!(p < s.params * 6 / 10 && m < s.macs * 6 / 10, "{} -> {p}, {} -> {m}", s.params, s.macs);
    assert!(events.iter().any(|e| matches!(e, TrainEvent::Log(l) if l.contains("pruned 75%"))));
}

#[test]
fn early_stopping_keeps_the_best_validation_weights() {
    let root = tempfile::tempdir().unwrap();
    let mut e = digits(25, Regularizer::EarlyStopping(EarlyStopping { patience: 3 }));
    e.model.width = 1.0;
    e.data.val_fraction = 0.2;
    let (s, _) = train(&e, root.path());
    assert!(matches!(s.status, Status::EarlyStopped | Status::Completed));
    let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
    let val: Vec<f64> = rec.metrics.iter().map(|m| m.val_loss.unwrap()).collect();
    let best_epoch = val.iter().enumerate().min_by(|a, b| a.1.partial_cmp(b.1).unwrap()).unwrap().0 + 1;
    if best_epoch != rec.metrics.len() {
        assert_eq!(s.restored_epoch, Some(best_epoch));
        // The kept weights are the best epoch's: same test accuracy as that epoch measured.
        let then = rec.metrics[best_epoch - 1].eval_acc;
        assert!((s.final_eval_acc.unwrap() - then).abs() < 1e-9, "{} vs {then}", s.final_eval_acc.unwrap());
    }
    if s.status == Status::EarlyStopped {
        assert_eq!(rec.metrics.len(), best_epoch + 3, "stops after `patience` epochs without improvement");
    }
}

#[test]
fn a_nan_loss_ends_the_run_as_diverged_not_a_crash() {
    let root = tempfile::tempdir().unwrap();
    let e = digits(3, Regularizer::None);
    let mut ds = data::load(&e.data).unwrap();
    for v in ds.train.images.iter_mut().step_by(7) {
        *v = f32::NAN;
    }
    let (tx, _rx) = unbounded_channel();
    let opts = RunOptions { runs_root: root.path().to_path_buf(), batch_events_every: 0, ..Default::default() };
    let s = run_on(&e, ds, &opts, &RunControl::default(), &tx);
    assert_eq!(s.status, Status::Diverged);
    assert!(s.message.as_deref().unwrap().contains("train.lr"), "{:?}", s.message);
    let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
    assert_eq!(rec.summary.unwrap().status, Status::Diverged);
}

#[test]
fn stopping_a_run_marks_it_stopped_and_keeps_its_record() {
    let root = tempfile::tempdir().unwrap();
    let e = digits(50, Regularizer::None);
    let opts = RunOptions { runs_root: root.path().to_path_buf(), batch_events_every: 1, ..Default::default() };
    let (control, mut rx, handle) = qat_lab::train::spawn(e, opts);
    while let Some(ev) = rx.blocking_recv() {
        if let TrainEvent::Epoch(m) = ev {
            if m.epoch == 2 {
                control.stop();
            }
        }
    }
    let s = handle.join().unwrap();
    assert_eq!(s.status, Status::Stopped);
    let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
    assert_eq!(rec.summary.unwrap().status, Status::Stopped);
    assert!(rec.metrics.len() >= 2);
}

#[test]
fn a_missing_dataset_fails_with_the_fix_in_the_message() {
    let root = tempfile::tempdir().unwrap();
    let mut e = digits(1, Regularizer::None);
    e.data.dataset = DatasetKind::Cifar10;
    e.data.path = root.path().join("nowhere").display().to_string();
    let (s, events) = train(&e, root.path());
    assert_eq!(s.status, Status::Failed);
    assert!(s.message.unwrap().contains("qat-lab data fetch cifar10"));
    assert!(matches!(events.last(), Some(TrainEvent::Finished(_))));
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let root = tempfile::tempdir().unwrap();
    let mut e = digits(2, Regularizer::default_for("quantization").unwrap());
    e.data.train_subset = 300;
    let (a, _) = train(&e, root.path());
    let (b, _) = train(&e, root.path());
    assert_eq!(a.last.unwrap().train_loss, b.last.unwrap().train_loss);
}

/// The paper's AU setting end to end on the embedded faces: per-AU F1, masked BCE, label-wise
/// smoothing, QAT with one batch norm per AU head, early stopping on validation F1, tuned thresholds.
#[test]
fn multi_label_faces_train_with_per_au_f1() {
    let root = tempfile::tempdir().unwrap();
    let mut base = digits(3, Regularizer::None);
    base.data.dataset = DatasetKind::Faces;
    base.data.train_subset = 600;
    base.data.test_subset = 300;
    base.data.val_fraction = 0.2;
    base.data.noise.kind = qat_lab::config::NoiseKind::Ambiguous;
    base.data.noise.rate = 0.2;
    base.train.tune_threshold = true;
    let quant_keep = Regularizer::Quantization(Quantization {
        weight_bits: 4,
        act_bits: 4,
        first_last_bits: 8,
        bn: qat_lab::config::BnMode::Keep,
        ema_momentum: 0.9,
    });
    for reg in [
        Regularizer::None,
        Regularizer::LabelSmoothing(LabelSmoothing { alpha: 0.1 }),
        quant_keep,
        Regularizer::EarlyStopping(EarlyStopping { patience: 2 }),
    ] {
        let mut e = base.clone();
        e.regularizer = reg.clone();
        let (s, events) = train(&e, root.path());
        assert!(matches!(s.status, Status::Completed | Status::EarlyStopped), "{reg:?}: {:?}", s.message);
        let info =
            events.iter().find_map(|e| if let TrainEvent::Started(i) = e { Some(i.clone()) } else { None }).unwrap();
        assert!(info.multi_label);
        assert_eq!(info.classes.len(), 12);
        assert!((info.measured_noise_rate - 0.2).abs() < 0.01, "{}", info.measured_noise_rate);
        let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
        let last = rec.metrics.last().unwrap();
        assert_eq!(last.f1.len(), 12);
        assert_eq!(last.label_loss.len(), 12);
        assert_eq!(last.thresholds.len(), 12, "thresholds tuned on validation");
        assert!(last.f1.iter().all(|f| (0.0..=1.0).contains(f)));
        assert!((last.eval_acc - last.f1.iter().sum::<f64>() / 12.0).abs() < 1e-9, "eval_acc is the average F1");
        assert!(last.val_f1.is_some());
        if matches!(reg, Regularizer::Quantization(_)) {
            // 12 heads with their own batch norm (2 x 12 x features more parameters than one linear layer).
            let plain = runs::load(&root.path().join(runs::list(root.path())[0].id())).unwrap();
            assert!(s.params > plain.summary.unwrap().params, "per-AU BN heads add parameters");
        }
    }
}

#[test]
fn a_diverged_run_names_only_a_best_epoch_it_recorded() {
    // The reproduction of issue 22 #8: the weights blow up after some epochs were recorded.
    let overrides: Vec<String> = [
        "train.lr=9.99",
        "train.epochs=12",
        "regularizer.kind=weight_decay",
        "regularizer.value=1",
        "data.train_subset=300",
    ]
    .map(String::from)
    .to_vec();
    let e = Experiment::load(&qat_lab::config::resolve_preset("demo-digits"), &overrides).unwrap();
    let root = tempfile::tempdir().unwrap();
    let (s, _) = train(&e, root.path());
    assert_eq!(s.status, Status::Diverged, "{:?}", s.message);
    let rec = runs::load(&root.path().join(&s.run_id)).unwrap();
    let epochs: Vec<usize> = rec.metrics.iter().map(|m| m.epoch).collect();
    if let Some(best) = &rec.summary.as_ref().unwrap().best {
        assert!(epochs.contains(&best.epoch), "best epoch {} is not among the recorded {epochs:?}", best.epoch);
    }
    assert_eq!(rec.summary.unwrap().epochs_run, epochs.len());
}

#[test]
fn early_stopping_refuses_a_validation_split_of_no_images() {
    let mut e = digits(3, Regularizer::default_for("early_stopping").unwrap());
    e.data.val_fraction = 0.0001;
    e.data.train_subset = 200;
    let root = tempfile::tempdir().unwrap();
    let (s, _) = train(&e, root.path());
    assert_eq!(s.status, Status::Failed);
    let msg = s.message.unwrap();
    assert!(msg.contains("gives 0 validation images") && msg.contains("data.val_fraction"), "{msg}");
}

#[test]
fn subsets_beyond_the_data_name_the_key_and_the_limit() {
    let mut e = digits(1, Regularizer::None);
    e.data.train_subset = 1_000_000;
    let err = data::load(&e.data).unwrap_err().to_string();
    assert!(err.contains("data.train_subset = 1000000") && err.contains("use at most"), "{err}");
    e.data.dataset = DatasetKind::Shapes;
    e.data.train_subset = 1_000_000_000;
    let err = data::load(&e.data).unwrap_err().to_string();
    assert!(err.contains("data.train_subset") && err.contains("at most 100000"), "{err}");
}

#[test]
fn a_flipped_bit_in_the_cifar10_sample_is_refused() {
    let Some(archive) = sample_archive() else { return };
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let dir = tempfile::tempdir().unwrap();
    let flipped = dir.path().join("flipped.tar.gz");
    std::fs::write(&flipped, &bytes).unwrap();
    let err = format!("{:#}", data::cifar::CIFAR10.load(&flipped).unwrap_err());
    assert!(err.contains("flipped.tar.gz") && err.contains("corrupt"), "{err}");
}

/// Every metric a run records, without the timings (which differ between any two runs).
fn without_timings(metrics: &[qat_lab::train::EpochMetrics]) -> Vec<qat_lab::train::EpochMetrics> {
    metrics.iter().map(|m| qat_lab::train::EpochMetrics { images_per_sec: 0.0, epoch_secs: 0.0, ..m.clone() }).collect()
}

/// Trains `e`, stopping it (as SIGTERM does) once epoch `stop_after` is recorded; returns its folder.
fn train_and_stop(e: &Experiment, root: &std::path::Path, stop_after: usize) -> PathBuf {
    let opts = RunOptions { runs_root: root.to_path_buf(), batch_events_every: 0, ..Default::default() };
    let (control, mut rx, handle) = qat_lab::train::spawn(e.clone(), opts);
    while let Some(ev) = rx.blocking_recv() {
        if matches!(ev, TrainEvent::Epoch(ref m) if m.epoch == stop_after) {
            control.stop();
        }
    }
    let s = handle.join().unwrap();
    assert_eq!(s.status, Status::Stopped, "{:?}", s.message);
    root.join(&s.run_id)
}

#[test]
fn a_stopped_run_resumed_from_its_checkpoint_ends_as_if_never_interrupted() {
    use qat_lab::config::{BnMode, DropoutPosition, PruneCriterion};
    let quant = Regularizer::Quantization(Quantization {
        weight_bits: 4,
        act_bits: 4,
        first_last_bits: 8,
        bn: BnMode::Fold,
        ema_momentum: 0.9,
    });
    let cases: Vec<(&str, Regularizer, Robust, bool)> = vec![
        (
            "dropout + augmentation",
            Regularizer::Dropout(Dropout { p: 0.2, position: DropoutPosition::Blocks }),
            Robust::None,
            true,
        ),
        ("early stopping", Regularizer::EarlyStopping(EarlyStopping { patience: 10 }), Robust::None, false),
        (
            "pruned before the stop",
            Regularizer::Pruning(Pruning { ratio: 0.5, at_epoch: 1, criterion: PruneCriterion::LowestL1 }),
            Robust::None,
            false,
        ),
        (
            "pruned after the resume",
            Regularizer::Pruning(Pruning { ratio: 0.5, at_epoch: 2, criterion: PruneCriterion::LowestL1 }),
            Robust::None,
            false,
        ),
        ("W4/A4 + co-teaching", quant, Robust::CoTeaching(CoTeaching { forget_rate: 0.0, tk: 2 }), false),
    ];
    for (what, reg, robust, augment) in cases {
        let root = tempfile::tempdir().unwrap();
        let mut e = digits(4, reg);
        e.robust = robust;
        e.data.augment = augment;
        e.data.train_subset = 300;
        e.data.val_fraction = 0.15;
        let (whole, _) = train(&e, root.path());
        assert_eq!(whole.status, Status::Completed, "{what}: {:?}", whole.message);
        let whole_dir = root.path().join(&whole.run_id);
        assert!(!whole_dir.join(runs::CHECKPOINT_FILE).exists(), "{what}: a finished run keeps no checkpoint");

        let cut = train_and_stop(&e, &root.path().join("cut"), 2);
        let before = runs::load(&cut).unwrap();
        assert!(before.resumable(), "{what}: a stopped run has a checkpoint");
        let (tx, _rx) = unbounded_channel();
        let opts = RunOptions { runs_root: root.path().join("cut"), resume: Some(cut.clone()), ..Default::default() };
        let resumed = run(&e, &opts, &RunControl::default(), &tx);
        assert_eq!(resumed.status, Status::Completed, "{what}: {:?}", resumed.message);
        assert_eq!(resumed.run_id, before.id(), "{what}: it resumes in its own folder");
        let after = runs::load(&cut).unwrap();
        let epochs: Vec<usize> = after.metrics.iter().map(|m| m.epoch).collect();
        assert_eq!(epochs, vec![1, 2, 3, 4], "{what}: every epoch once");
        let reference = runs::load(&whole_dir).unwrap();
        assert_eq!(without_timings(&after.metrics), without_timings(&reference.metrics), "{what}: the same metrics");
        let (a, b) = (after.summary.unwrap(), reference.summary.unwrap());
        assert_eq!((a.best, a.final_eval_acc, a.pruned_params), (b.best, b.final_eval_acc, b.pruned_params), "{what}");
        assert_eq!(
            std::fs::read(cut.join(runs::WEIGHTS_FILE)).unwrap(),
            std::fs::read(whole_dir.join(runs::WEIGHTS_FILE)).unwrap(),
            "{what}: bit-identical weights"
        );
    }
}

#[test]
fn resuming_refuses_a_run_without_a_checkpoint_or_a_changed_one() {
    let root = tempfile::tempdir().unwrap();
    let e = digits(3, Regularizer::None);
    let cut = train_and_stop(&e, root.path(), 1);
    let (tx, _rx) = unbounded_channel();
    let resume = |e: &Experiment| {
        let opts = RunOptions { runs_root: root.path().into(), resume: Some(cut.clone()), ..Default::default() };
        run(e, &opts, &RunControl::default(), &tx)
    };
    // Another network than the checkpoint's: refused, and the record keeps what it had.
    let mut wider = e.clone();
    wider.model.width = 1.0;
    let s = resume(&wider);
    assert_eq!(s.status, Status::Failed);
    assert!(s.message.as_deref().unwrap_or_default().contains("does not fit this run's network"), "{:?}", s.message);
    assert_eq!(runs::load(&cut).unwrap().metrics.len(), 1);
    std::fs::remove_file(cut.join(runs::CHECKPOINT_FILE)).unwrap();
    let s = resume(&e);
    assert!(s.message.as_deref().unwrap_or_default().contains("nothing to resume"), "{:?}", s.message);
}
