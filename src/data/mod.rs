//! Datasets and label noise: everything between a preset's `[data]` section and batches of tensors.
//!
//! Images are kept as standardised `f32` in NCHW order; labels as class indices. Training labels are
//! corrupted once, up front, and the mask of corrupted examples is kept for the memorisation metric.

pub mod au_csv;
pub mod augment;
pub mod bp4d;
pub mod cifar;
pub mod cifar_n;
pub mod digits;
pub mod faces;
pub mod fetch;
pub mod folder;
pub mod noise;
pub mod shapes;

use crate::config::{DataConfig, DatasetKind};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Seed of the fixed shuffles that pick subsets and splits, so every method in a comparison sees the
/// same images whatever its training seed.
pub const DATA_SEED: u64 = 0x5eed;

/// Value of a multi-label target whose annotation is unknown (BP4D's 9): masked out of loss and metrics.
pub const UNKNOWN: f32 = -1.0;

/// What is predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One class per image.
    Classify,
    /// Several binary labels per image (Action Units).
    MultiLabel,
}

/// Rows `idx` of a row-major matrix of `width` columns, concatenated (images, targets, flags...).
pub fn rows<T: Copy>(values: &[T], idx: &[usize], width: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(idx.len() * width);
    for &i in idx {
        out.extend_from_slice(&values[i * width..(i + 1) * width]);
    }
    out
}

/// A set of images with their labels.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// `len * channels * height * width` values, NCHW.
    pub images: Vec<f32>,
    /// One class index per image (0 for multi-label datasets).
    pub labels: Vec<u32>,
    /// Multi-label targets, row-major (N, L): 1 present, 0 absent, [`UNKNOWN`]; empty for classes.
    pub targets: Vec<f32>,
    /// How strongly each label is expressed, (N, L) in [0, 1]; empty when unknown.
    pub intensity: Vec<f32>,
    /// Who is in each image (subject-exclusive folds); empty when unknown.
    pub subjects: Vec<String>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Labels per image (0 for single-label data).
    pub fn num_targets(&self) -> usize {
        if self.labels.is_empty() {
            0
        } else {
            self.targets.len() / self.labels.len()
        }
    }
    /// Keeps the examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize], image_len: usize) -> Split {
        let l = self.num_targets();
        let per_label = |v: &[f32]| if v.is_empty() { Vec::new() } else { rows(v, idx, l) };
        Split {
            images: rows(&self.images, idx, image_len),
            labels: rows(&self.labels, idx, 1),
            targets: per_label(&self.targets),
            intensity: per_label(&self.intensity),
            subjects: idx.iter().filter_map(|&i| self.subjects.get(i).cloned()).collect(),
        }
    }
}

/// Raw images as loaded, before subsetting, noise and standardisation.
#[derive(Debug, Clone)]
pub struct RawDataset {
    pub name: String,
    pub task: Task,
    /// Class names, or label (AU) names.
    pub classes: Vec<String>,
    /// (channels, height, width).
    pub shape: [usize; 3],
    pub train: Split,
    pub test: Split,
}

/// A dataset ready for training: noisy training labels with their mask, an optional validation split
/// taken from the noisy training data, and a clean test set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub task: Task,
    /// Class names, or label (AU) names.
    pub classes: Vec<String>,
    pub shape: [usize; 3],
    /// Training images with their (possibly corrupted) labels or targets.
    pub train: Split,
    /// The true classes of the training images (single-label).
    pub train_clean_labels: Vec<u32>,
    /// `true` where the training label differs from the true one: one per image for classes, one per
    /// (image, label) for multi-label data.
    pub corrupted: Vec<bool>,
    /// Validation images (noisy labels, like the training set they come from).
    pub val: Split,
    /// Clean test set.
    pub test: Split,
    /// Fraction of training labels the noise process picked (the requested s).
    pub noise_picked_rate: f64,
    /// Fraction of training labels that really differ from the truth.
    pub measured_noise_rate: f64,
    /// Single-label data: row i is the share of clean class i's training examples labelled j.
    pub transition: Vec<Vec<f64>>,
}

impl Dataset {
    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Classes, or labels per image.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    pub fn is_multi_label(&self) -> bool {
        self.task == Task::MultiLabel
    }
}

/// `relative` resolved under `root`, refused when it could leave it: an absolute path, a `..`
/// component, or a link that points outside. The message says which.
pub fn resolve_under(root: &std::path::Path, relative: &str) -> std::result::Result<std::path::PathBuf, String> {
    use std::path::Component;
    let rel = std::path::Path::new(relative);
    if relative.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("`{relative}` must be a path inside {}, without `..` or a leading `/`", root.display()));
    }
    let joined = root.join(rel);
    if let (Ok(real), Ok(real_root)) = (joined.canonicalize(), root.canonicalize()) {
        if !real.starts_with(&real_root) {
            return Err(format!("`{relative}` is a link to {}, outside {}", real.display(), root.display()));
        }
    }
    Ok(joined)
}

/// The most images a procedural generator (`shapes`, `faces`) makes for one split (about 1.2 GiB of
/// 32x32 RGB floats).
pub const MAX_GENERATED: usize = 100_000;

/// How many images of what shape a preset will load, known before loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSize {
    /// (channels, height, width).
    pub shape: [usize; 3],
    pub train: usize,
    pub test: usize,
    /// Classes or labels (the size of the network's head).
    pub outputs: usize,
    /// `false` where the counts are an upper bound (a CIFAR-10 copy without subsets may be a sample).
    pub exact: bool,
}

impl DataSize {
    /// What `cfg` loads: exact for the embedded and generated data and for file data with both
    /// subsets set (a larger subset than the file holds is refused when loading); the official
    /// CIFAR-10 sizes as an upper bound; `None` for folders, BP4D and manifests without subsets.
    pub fn expected(cfg: &DataConfig) -> Option<DataSize> {
        let pick = |subset: usize, all: usize| if subset > 0 { subset } else { all };
        let side = cfg.image_size;
        let files = |outputs: usize| {
            (cfg.train_subset > 0 && cfg.test_subset > 0).then_some(DataSize {
                shape: [3, side, side],
                train: cfg.train_subset,
                test: cfg.test_subset,
                outputs,
                exact: true,
            })
        };
        let generated = |shape, train, test, outputs| DataSize {
            shape,
            train: pick(cfg.train_subset, train),
            test: pick(cfg.test_subset, test),
            outputs,
            exact: true,
        };
        match cfg.dataset {
            DatasetKind::Digits => {
                let d = generated([1, 8, 8], digits::TRAIN_LEN, digits::ALL_LEN - digits::TRAIN_LEN, 10);
                Some(DataSize {
                    train: d.train.min(digits::TRAIN_LEN),
                    test: d.test.min(digits::ALL_LEN - digits::TRAIN_LEN),
                    ..d
                })
            }
            DatasetKind::Shapes => {
                Some(generated([3, shapes::SIDE, shapes::SIDE], shapes::DEFAULT_TRAIN, shapes::DEFAULT_TEST, 10))
            }
            DatasetKind::Faces => Some(generated(
                [3, faces::SIDE, faces::SIDE],
                faces::DEFAULT_TRAIN,
                faces::DEFAULT_TEST,
                faces::AUS.len(),
            )),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
                let layout = cifar::layout(cfg.dataset).expect("a CIFAR kind");
                Some(DataSize {
                    exact: cfg.train_subset > 0 && cfg.test_subset > 0,
                    ..generated([3, 32, 32], layout.train_len, layout.test_len, layout.classes.len())
                })
            }
            DatasetKind::Folder => files(10),
            DatasetKind::Bp4d | DatasetKind::AuCsv => files(faces::AUS.len()),
        }
    }
}

/// Loads the dataset a preset names, then subsets, corrupts, splits and standardises it.
pub fn load(cfg: &DataConfig) -> Result<Dataset> {
    let path = |what: &str| -> Result<std::path::PathBuf> {
        if cfg.path.is_empty() {
            bail!("the `{}` dataset needs data.path: {what}", cfg.dataset.name());
        }
        Ok(std::path::PathBuf::from(&cfg.path))
    };
    if cfg.dataset.is_generated() {
        // Checked before generating: a typo'd subset must not allocate terabytes.
        for (key, n) in [("data.train_subset", cfg.train_subset), ("data.test_subset", cfg.test_subset)] {
            if n > MAX_GENERATED {
                bail!(
                    "{key} = {n} is more than the `{}` generator makes (at most {MAX_GENERATED}); use a smaller subset",
                    cfg.dataset.name()
                );
            }
        }
    }
    let raw = match cfg.dataset {
        DatasetKind::Digits => digits::load()?,
        DatasetKind::Shapes => {
            let n_train = if cfg.train_subset > 0 { cfg.train_subset } else { shapes::DEFAULT_TRAIN };
            let n_test = if cfg.test_subset > 0 { cfg.test_subset } else { shapes::DEFAULT_TEST };
            shapes::generate(n_train, n_test, DATA_SEED)
        }
        DatasetKind::Faces => {
            let n_train = if cfg.train_subset > 0 { cfg.train_subset } else { faces::DEFAULT_TRAIN };
            let n_test = if cfg.test_subset > 0 { cfg.test_subset } else { faces::DEFAULT_TEST };
            faces::generate(n_train, n_test, DATA_SEED)
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let layout = cifar::layout(cfg.dataset).expect("a CIFAR kind");
            let path = if cfg.path.is_empty() { layout.default_dir } else { cfg.path.as_str() };
            layout.load(std::path::Path::new(path))?
        }
        DatasetKind::Folder => {
            folder::load(&path("a folder with one sub-folder of images per class")?, cfg.image_size)?
        }
        DatasetKind::Bp4d => bp4d::load(&path("the BP4D folder (AU_OCC/ and images/)")?, cfg.image_size, cfg.fold)?,
        DatasetKind::AuCsv => {
            au_csv::load(&path("a manifest CSV (image, subject, AU columns)")?, cfg.image_size, cfg.fold)?
        }
    };
    prepare(raw, cfg)
}

/// Subset, noise, validation split and standardisation of already loaded images.
pub fn prepare(raw: RawDataset, cfg: &DataConfig) -> Result<Dataset> {
    let image_len: usize = raw.shape.iter().product();
    if raw.train.is_empty() || raw.test.is_empty() {
        bail!("dataset `{}` has no training or no test images", raw.name);
    }
    for (key, n, have, split) in [
        ("data.train_subset", cfg.train_subset, raw.train.len(), "training"),
        ("data.test_subset", cfg.test_subset, raw.test.len(), "test"),
    ] {
        if n > have {
            bail!(
                "{key} = {n} is more than the {have} {split} images of `{}`; use at most {have}, or 0 for all",
                raw.name
            );
        }
    }
    // Human labels align with the raw training set by index, so they are read before subsetting.
    let human = match cfg.noise.kind {
        crate::config::NoiseKind::Human => {
            let human = crate::config::HumanLabels::of(cfg.dataset).expect("validated: a CIFAR-N dataset");
            Some(cifar_n::noisy_labels(&cfg.noise, &human, &raw.train.labels, raw.classes.len())?)
        }
        _ => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(DATA_SEED);
    let mut order: Vec<usize> = (0..raw.train.len()).collect();
    order.shuffle(&mut rng);
    if cfg.train_subset > 0 {
        order.truncate(cfg.train_subset);
    }
    let mut train = raw.train.select(&order, image_len);
    let mut test = raw.test.clone();
    if cfg.test_subset > 0 && cfg.test_subset < test.len() {
        let idx: Vec<usize> = (0..cfg.test_subset).collect();
        test = test.select(&idx, image_len);
    }

    let clean = train.labels.clone();
    let (corrupted_all, picked_rate, measured_rate, per) = match raw.task {
        Task::Classify => {
            let noisy = match &human {
                Some(labels) => noise::annotated(&clean, order.iter().map(|&i| labels[i]).collect()),
                None => noise::corrupt(&clean, raw.classes.len(), &cfg.noise),
            };
            train.labels = noisy.labels;
            (noisy.corrupted, noisy.picked_rate, noisy.measured_rate, 1)
        }
        Task::MultiLabel => {
            let l = raw.classes.len();
            let noisy = noise::corrupt_multi(&train.targets, &train.intensity, l, &cfg.noise);
            train.targets = noisy.targets;
            (noisy.corrupted, noisy.picked_rate, noisy.measured_rate, l)
        }
    };

    // Validation: the last part of the (shuffled, noisy) training data.
    let n_val = (train.len() as f64 * cfg.val_fraction).round() as usize;
    let n_fit = train.len() - n_val;
    if n_fit == 0 {
        bail!("data.val_fraction = {} leaves no training images", cfg.val_fraction);
    }
    let fit_idx: Vec<usize> = (0..n_fit).collect();
    let val_idx: Vec<usize> = (n_fit..train.len()).collect();
    let val = train.select(&val_idx, image_len);
    let fit = train.select(&fit_idx, image_len);
    let corrupted = corrupted_all[..n_fit * per].to_vec();
    let train_clean_labels = clean[..n_fit].to_vec();

    // Over the whole noisy training set (validation included), as the noise was made.
    let transition = match raw.task {
        Task::Classify => noise::transition_matrix(&clean, &train.labels, raw.classes.len()),
        Task::MultiLabel => Vec::new(),
    };
    let mut ds = Dataset {
        name: raw.name,
        task: raw.task,
        classes: raw.classes,
        shape: raw.shape,
        train: fit,
        train_clean_labels,
        corrupted,
        val,
        test,
        noise_picked_rate: picked_rate,
        measured_noise_rate: measured_rate,
        transition,
    };
    standardise(&mut ds);
    Ok(ds)
}

/// Per-channel mean/std of the training images, applied to every split.
fn standardise(ds: &mut Dataset) {
    let [c, h, w] = ds.shape;
    let plane = h * w;
    let n = ds.train.len();
    for ch in 0..c {
        let (mut sum, mut sq) = (0f64, 0f64);
        for i in 0..n {
            let start = (i * c + ch) * plane;
            for &v in &ds.train.images[start..start + plane] {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
            }
        }
        let count = (n * plane) as f64;
        let mean = sum / count;
        let std = ((sq / count - mean * mean).max(0.0)).sqrt().max(1e-6);
        for split in [&mut ds.train, &mut ds.val, &mut ds.test] {
            for i in 0..split.len() {
                let start = (i * c + ch) * plane;
                for v in &mut split.images[start..start + plane] {
                    *v = ((*v as f64 - mean) / std) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NoiseConfig, NoiseKind};

    #[test]
    fn digits_prepare_keeps_counts_and_standardises() {
        let cfg = DataConfig {
            val_fraction: 0.1,
            noise: NoiseConfig { kind: NoiseKind::Flip, rate: 0.4, seed: 3, ..Default::default() },
            ..Default::default()
        };
        let ds = load(&cfg).unwrap();
        assert_eq!(ds.shape, [1, 8, 8]);
        let total = ds.train.len() + ds.val.len();
        assert_eq!(total, digits::TRAIN_LEN);
        assert_eq!(ds.val.len(), (total as f64 * 0.1).round() as usize);
        // flip: every picked label changes, so measured == picked.
        assert!((ds.measured_noise_rate - 0.4).abs() < 0.01, "{}", ds.measured_noise_rate);
        let mean: f32 = ds.train.images.iter().sum::<f32>() / ds.train.images.len() as f32;
        assert!(mean.abs() < 1e-3);
        let corrupted = ds.corrupted.iter().filter(|&&c| c).count();
        let differs = ds.train.labels.iter().zip(&ds.train_clean_labels).filter(|(a, b)| a != b).count();
        assert_eq!(corrupted, differs);
    }

    #[test]
    fn subsets_are_the_same_whatever_the_noise_seed() {
        let mut cfg = DataConfig { dataset: DatasetKind::Digits, train_subset: 300, ..Default::default() };
        let a = load(&cfg).unwrap();
        cfg.noise.seed = 99;
        cfg.noise.rate = 0.5;
        let b = load(&cfg).unwrap();
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.train_clean_labels, b.train_clean_labels);
        assert_ne!(a.train.labels, b.train.labels);
    }

    #[test]
    fn paths_stay_under_their_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        assert_eq!(resolve_under(dir.path(), "a.png").unwrap(), dir.path().join("a.png"));
        for bad in ["../x.png", "/etc/hostname", "", "sub/../../x"] {
            assert!(resolve_under(dir.path(), bad).is_err(), "{bad} was accepted");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", dir.path().join("out")).unwrap();
            let err = resolve_under(dir.path(), "out/hostname").unwrap_err();
            assert!(err.contains("outside"), "{err}");
        }
    }
}
