//! Experiments as data: the TOML presets in `presets/`, `--set key=value` overrides, and validation.
//!
//! Every field has a default, so a preset only states what differs from the paper's setting. Unknown keys
//! and out-of-range values are rejected with the file, the key and what is allowed.

pub use crate::methods::dropout::{Dropout, DropoutPosition};
pub use crate::methods::early_stopping::EarlyStopping;
pub use crate::methods::label_smoothing::LabelSmoothing;
pub use crate::methods::pruning::{PruneCriterion, Pruning};
pub use crate::methods::quantization::{BnMode, Quantization};
pub use crate::methods::weight_decay::WeightDecay;
pub use crate::methods::{Regularizer, Robust, REGULARIZER_KINDS, ROBUST_KINDS};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One complete, re-runnable experiment: data, model, regularizer and training schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// Short label, used in run folder names and on screen.
    pub name: String,
    /// One line saying what the experiment shows (listed by `qat-lab run --list`).
    pub description: String,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub regularizer: Regularizer,
    /// A method made for noisy labels, combined with the regularizer (`quantization` + `gce` is one run).
    pub robust: Robust,
    pub train: TrainConfig,
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            description: String::new(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            regularizer: Regularizer::None,
            robust: Robust::None,
            train: TrainConfig::default(),
        }
    }
}

/// Which data, how much of it, and how its training labels are corrupted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// Folder or archive for `cifar10` / `folder`; empty means the default location (`data/cifar10`).
    pub path: String,
    /// Use only the first N training images (after a seeded shuffle); 0 = all.
    pub train_subset: usize,
    /// Use only the first N test images; 0 = all.
    pub test_subset: usize,
    /// Fraction of the (noisy) training set held out for validation; early stopping needs it.
    pub val_fraction: f64,
    /// Pad-4 random crop and horizontal flip during training.
    pub augment: bool,
    /// Side of the square images `folder`, `bp4d` and `au_csv` images are resized to.
    pub image_size: usize,
    /// Test fold (0, 1 or 2) of the subject-exclusive 3-fold protocol of `bp4d` and `au_csv`.
    pub fold: usize,
    pub noise: NoiseConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Digits,
            path: String::new(),
            train_subset: 0,
            test_subset: 0,
            val_fraction: 0.0,
            augment: false,
            image_size: 32,
            fold: 0,
            noise: NoiseConfig::default(),
        }
    }
}

/// The datasets qat-lab can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// UCI handwritten digits, 8x8, bundled in the binary.
    Digits,
    /// Procedural coloured shapes, 10 classes, 32x32 RGB, generated from a seed.
    Shapes,
    /// CIFAR-10 in the official binary layout (folder or `.tar.gz`).
    Cifar10,
    /// CIFAR-100 in the official binary layout, with its 100 fine classes.
    Cifar100,
    /// One sub-folder per class of image files.
    Folder,
    /// Procedural faces with 12 Action Units (multi-label), generated from a seed.
    Faces,
    /// BP4D AU occurrence CSVs + face images (user-supplied), subject-exclusive 3 folds.
    Bp4d,
    /// A manifest CSV (image, subject, AU columns) for DISFA-like AU datasets.
    AuCsv,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 8] =
        [Self::Digits, Self::Shapes, Self::Faces, Self::Cifar10, Self::Cifar100, Self::Folder, Self::Bp4d, Self::AuCsv];
    pub fn name(self) -> &'static str {
        match self {
            Self::Digits => "digits",
            Self::Shapes => "shapes",
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::Folder => "folder",
            Self::Faces => "faces",
            Self::Bp4d => "bp4d",
            Self::AuCsv => "au_csv",
        }
    }
    /// Whether the images are generated from a seed (any subset size works, up to the generator's limit).
    pub fn is_generated(self) -> bool {
        matches!(self, Self::Shapes | Self::Faces)
    }

    /// Whether every image carries several binary labels (Action Units) instead of one class.
    pub fn is_multi_label(self) -> bool {
        matches!(self, Self::Faces | Self::Bp4d | Self::AuCsv)
    }
}

/// Label noise injected into the training labels (the test set is never corrupted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseConfig {
    pub kind: NoiseKind,
    /// Fraction s of training examples that are re-annotated (synthetic kinds; `human` ignores it).
    pub rate: f64,
    pub seed: u64,
    /// `human`: the CIFAR-N label file (`CIFAR-10_human.pt` or `CIFAR-100_human.pt`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub labels: String,
    /// `human`: which annotation (CIFAR-10N: aggre, rand1, rand2, rand3, worst; CIFAR-100N: noisy).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub set: String,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self { kind: NoiseKind::Uniform, rate: 0.0, seed: 1, labels: String::new(), set: String::new() }
    }
}

/// CIFAR-10N's label sets as `data.noise.set` names them, with their key in the official file.
pub const CIFAR10N_SETS: [(&str, &str); 5] = [
    ("aggre", "aggre_label"),
    ("rand1", "random_label1"),
    ("rand2", "random_label2"),
    ("rand3", "random_label3"),
    ("worst", "worse_label"),
];

/// CIFAR-100N's one label set (fine classes).
pub const CIFAR100N_SETS: [(&str, &str); 1] = [("noisy", "noisy_label")];

/// The CIFAR-N human labels that exist for a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HumanLabels {
    /// The dataset the labels belong to, as messages print it.
    pub dataset: &'static str,
    /// The official file's name.
    pub file: &'static str,
    /// The `qat-lab data fetch` argument that downloads it.
    pub fetch: &'static str,
    /// `data.noise.set` names with their key in the file.
    pub sets: &'static [(&'static str, &'static str)],
}

impl HumanLabels {
    /// Human labels for `dataset`, where CIFAR-N has them (CIFAR-10 and CIFAR-100).
    pub fn of(dataset: DatasetKind) -> Option<Self> {
        match dataset {
            DatasetKind::Cifar10 => {
                Some(Self { dataset: "CIFAR-10", file: "CIFAR-10_human.pt", fetch: "cifar10n", sets: &CIFAR10N_SETS })
            }
            DatasetKind::Cifar100 => Some(Self {
                dataset: "CIFAR-100",
                file: "CIFAR-100_human.pt",
                fetch: "cifar100n",
                sets: &CIFAR100N_SETS,
            }),
            _ => None,
        }
    }

    /// The set names, for messages and the Setup form.
    pub fn set_names(&self) -> Vec<&'static str> {
        self.sets.iter().map(|(name, _)| *name).collect()
    }

    /// The file's key for a set name.
    pub fn key(&self, set: &str) -> Option<&'static str> {
        self.sets.iter().find(|(name, _)| *name == set).map(|(_, key)| *key)
    }
}

/// How a re-annotated label is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// The paper's: a label drawn uniformly from all C classes (it may equal the true one).
    Uniform,
    /// Always a different class, uniformly.
    Flip,
    /// Class c becomes c+1 (mod C).
    Pair,
    /// Multi-label only: per-label flips concentrated on low-intensity (ambiguous) examples, the way
    /// annotators disagree.
    Ambiguous,
    /// Real human annotations: CIFAR-N's labels (`data.noise.labels`, `data.noise.set`) in place of the
    /// training labels.
    Human,
}

impl NoiseKind {
    /// The synthetic kinds (Setup cycles through these).
    pub const ALL: [NoiseKind; 4] = [Self::Uniform, Self::Flip, Self::Pair, Self::Ambiguous];
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Flip => "flip",
            Self::Pair => "pair",
            Self::Ambiguous => "ambiguous",
            Self::Human => "human",
        }
    }
}

/// Network architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Channel multiplier (1.0 = 16/32/64 channels as in He et al.).
    pub width: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { arch: Arch::Resnet20, width: 1.0 }
    }
}

/// CIFAR-style ResNets of He et al. 2016: depth 6n+2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Resnet8,
    Resnet14,
    Resnet20,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Self::Resnet8, Self::Resnet14, Self::Resnet20];
    /// Residual blocks per stage (n in depth = 6n + 2).
    pub fn blocks_per_stage(self) -> usize {
        match self {
            Self::Resnet8 => 1,
            Self::Resnet14 => 2,
            Self::Resnet20 => 3,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Resnet8 => "resnet8",
            Self::Resnet14 => "resnet14",
            Self::Resnet20 => "resnet20",
        }
    }
}

/// A kinded section (`{ kind = "..." }`) with every other field at its default.
pub(crate) fn default_of_kind<T: serde::de::DeserializeOwned>(
    kind: &str,
    what: &str,
    allowed: &[&str],
) -> Result<T, String> {
    let mut t = toml::Table::new();
    t.insert("kind".into(), toml::Value::String(kind.into()));
    T::deserialize(toml::Value::Table(t))
        .map_err(|_| format!("unknown {what} `{kind}`; allowed: {}", allowed.join(", ")))
}

impl Experiment {
    /// The run's method as tables and folders name it: the regularizer's label, the robust method's,
    /// or both (`W4/A4 + GCE q=0.7`).
    pub fn method_label(&self) -> String {
        match (&self.regularizer, &self.robust) {
            (_, Robust::None) => self.regularizer.label(),
            (Regularizer::None, r) => r.label(),
            (reg, r) => format!("{} + {}", reg.label(), r.label()),
        }
    }

    /// The paper's baseline: no regularizer and plain cross-entropy.
    pub fn is_baseline(&self) -> bool {
        self.regularizer == Regularizer::None && self.robust == Robust::None
    }
}

/// Optimisation schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// Seed of weight initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    pub device: DeviceKind,
    /// Multi-label: tune each label's decision threshold on the validation split (else 0.5).
    pub tune_threshold: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 128,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            seed: 0,
            device: DeviceKind::Cpu,
            tune_threshold: false,
        }
    }
}

/// Optimiser; `weight_decay` regularizers pick the decay style themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adam,
    Adamw,
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// Presets are a few hundred bytes; anything over this is not one.
pub const MAX_PRESET_BYTES: u64 = 1 << 20;

/// A preset that could not be read, parsed or validated; the message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    /// File (or `--set`) the problem comes from.
    pub source_name: String,
    pub message: String,
}

impl Experiment {
    /// Reads a preset file and applies `--set key=value` overrides in order.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Experiment, ConfigError> {
        let name = path.display().to_string();
        let refuse = |message: String| ConfigError { source_name: name.clone(), message };
        // A device or a pipe (`/dev/zero`) would be read forever, and no preset is near a mebibyte.
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(refuse("not a regular file; a preset is a TOML file, e.g. presets/demo.toml".into()));
            }
            Ok(m) if m.len() > MAX_PRESET_BYTES => {
                return Err(refuse(format!(
                    "{} bytes is too large for a preset (at most {MAX_PRESET_BYTES}); is this the right file?",
                    m.len()
                )));
            }
            _ => {}
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse(format!("cannot read the preset ({e}); `qat-lab run --list` shows the presets")))?;
        Self::from_toml(&text, &name, overrides)
    }

    /// Parses TOML text (named `source_name` in errors) and applies overrides.
    ///
    /// A `regularizer.kind` override is applied first, so `--set regularizer.weight_bits=2 --set
    /// regularizer.kind=quantization` means W2 whatever the order. An error caused by an override names
    /// that `--set`; keys the final regularizer kind does not have are refused by name.
    pub fn from_toml(text: &str, source_name: &str, overrides: &[String]) -> Result<Experiment, ConfigError> {
        let err = |message: String| ConfigError { source_name: source_name.to_string(), message };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
        // `[sweep]` belongs to `qat-lab sweep` (see [`sweep_axes`]); a single run ignores it.
        table.remove("sweep");
        // Parse once before the overrides so that an error is blamed on the right source.
        check_kind_keys(&table).map_err(err)?;
        let mut exp = parse_table(&table).map_err(err)?;
        let is_kind = |o: &&String| {
            o.split_once('=').is_some_and(|(k, _)| KINDED.iter().any(|s| k.trim() == format!("{s}.kind")))
        };
        let ordered = overrides.iter().filter(is_kind).chain(overrides.iter().filter(|o| !is_kind(o)));
        for o in ordered {
            let blame = |m: String| ConfigError { source_name: format!("--set {o}"), message: m };
            apply_override(&mut table, o).map_err(blame)?;
            check_kind_keys(&table).map_err(blame)?;
            exp = parse_table(&table).map_err(blame)?;
        }
        exp.validate().map_err(|m| {
            // A range error names its key; blame the `--set` that wrote that key, if one did.
            let key = m.split_whitespace().next().unwrap_or_default();
            match overrides.iter().rev().find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key)) {
                Some(o) => ConfigError { source_name: format!("--set {o}"), message: m },
                None => err(m),
            }
        })?;
        Ok(exp)
    }

    /// The experiment as TOML, as stored in run records.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("experiment serialises")
    }

    /// Checks value ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.data;
        check_range("data.noise.rate", d.noise.rate, 0.0, 1.0)?;
        check_range("data.val_fraction", d.val_fraction, 0.0, 0.9)?;
        let multi = d.dataset.is_multi_label();
        if multi && d.noise.kind == NoiseKind::Pair {
            return Err(format!(
                "data.noise.kind = \"pair\" needs classes; {} is multi-label: use uniform, flip or ambiguous",
                d.dataset.name()
            ));
        }
        if !multi && d.noise.kind == NoiseKind::Ambiguous {
            return Err(format!(
                "data.noise.kind = \"ambiguous\" is for multi-label datasets (faces, bp4d, au_csv), not {}",
                d.dataset.name()
            ));
        }
        if d.noise.kind == NoiseKind::Human {
            let Some(human) = HumanLabels::of(d.dataset) else {
                return Err(format!(
                    "data.noise.kind = \"human\" reads CIFAR-N's labels, so it needs data.dataset = \"cifar10\" or \"cifar100\", not {}",
                    d.dataset.name()
                ));
            };
            if d.noise.labels.is_empty() {
                return Err(format!(
                    "data.noise.kind = \"human\" needs data.noise.labels: the path of {} (`qat-lab data fetch {}`)",
                    human.file, human.fetch
                ));
            }
            if human.key(&d.noise.set).is_none() {
                return Err(format!(
                    "data.noise.set = \"{}\" is not a label set of {}; allowed: {}",
                    d.noise.set,
                    human.file,
                    human.set_names().join(", ")
                ));
            }
        } else if !d.noise.labels.is_empty() || !d.noise.set.is_empty() {
            return Err(format!(
                "data.noise.labels and data.noise.set are for data.noise.kind = \"human\", not \"{}\"",
                d.noise.kind.name()
            ));
        }
        if d.fold > 2 {
            return Err(format!("data.fold = {} is out of range; allowed: 0, 1, 2", d.fold));
        }
        if self.train.tune_threshold && (!multi || d.val_fraction <= 0.0) {
            return Err(
                "train.tune_threshold needs a multi-label dataset and a validation split (data.val_fraction)".into()
            );
        }
        if !(4..=256).contains(&d.image_size) {
            return Err(format!("data.image_size = {} is out of range; allowed: 4..=256", d.image_size));
        }
        if !(self.model.width > 0.0 && self.model.width <= 8.0) {
            return Err(format!("model.width = {} is out of range; allowed: (0, 8]", self.model.width));
        }
        let t = &self.train;
        if t.epochs == 0 || t.epochs > 100_000 {
            return Err(format!("train.epochs = {} is out of range; allowed: 1..=100000", t.epochs));
        }
        if t.batch_size == 0 || t.batch_size > 65_536 {
            return Err(format!("train.batch_size = {} is out of range; allowed: 1..=65536", t.batch_size));
        }
        if !(t.lr > 0.0 && t.lr < 10.0) {
            return Err(format!("train.lr = {} is out of range; allowed: (0, 10)", t.lr));
        }
        if let Some(regularizer) = self.regularizer.settings() {
            regularizer.validate(self)?;
        }
        self.validate_robust()
    }

    /// The robust method's own checks (its ranges, its combinations), and the one rule for all: it
    /// replaces the loss, so label smoothing cannot join it.
    fn validate_robust(&self) -> Result<(), String> {
        let Some(robust) = self.robust.settings() else { return Ok(()) };
        robust.validate(self)?;
        if matches!(self.regularizer, Regularizer::LabelSmoothing(_)) {
            return Err(format!(
                "label smoothing and robust.kind = \"{}\" both replace the loss; combine {} with another regularizer",
                self.robust.kind(),
                self.robust.label()
            ));
        }
        Ok(())
    }
}

/// The value after `cur` (`dir` = +1) or before it (-1) among `values`, wrapping around; the first
/// when `cur` is not one of them.
pub fn step_choice<T: PartialEq + Copy>(values: &[T], cur: &T, dir: isize) -> T {
    let i = values.iter().position(|v| v == cur).unwrap_or(0) as isize;
    values[(i + dir).rem_euclid(values.len() as isize) as usize]
}

/// [`step_choice`] from the value of `values` nearest to `cur`.
pub fn step_nearest(values: &[f64], cur: f64, dir: isize) -> f64 {
    let nearest = values.iter().enumerate().min_by(|a, b| (a.1 - cur).abs().total_cmp(&(b.1 - cur).abs()));
    let i = nearest.map_or(0, |(i, _)| i) as isize;
    values[(i + dir).rem_euclid(values.len() as isize) as usize]
}

pub(crate) fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), String> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(format!("{key} = {v} is out of range; allowed: {lo} to {hi}"))
    }
}

/// The experiment in `table`. serde names a wrong field's section but not always the field
/// (`invalid value: integer \`-4\`, expected u32 in \`regularizer\``): then the key whose removal
/// makes the table parse is named in front.
fn parse_table(table: &toml::Table) -> Result<Experiment, String> {
    let parse = |t: &toml::Table| Experiment::deserialize(toml::Value::Table(t.clone()));
    let message = match parse(table) {
        Ok(exp) => return Ok(exp),
        Err(e) => clean_serde(e),
    };
    let mut paths = Vec::new();
    leaf_paths(table, "", &mut paths);
    let culprit = paths.into_iter().find(|path| {
        let mut without = table.clone();
        remove_path(&mut without, path);
        parse(&without).is_ok()
    });
    match culprit {
        Some(key) if !message.contains(&format!("`{}`", key.rsplit('.').next().unwrap_or(&key))) => {
            Err(format!("{key}: {message}"))
        }
        _ => Err(message),
    }
}

fn leaf_paths(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v.as_table() {
            Some(t) => leaf_paths(t, &path, out),
            None => out.push(path),
        }
    }
}

fn remove_path(table: &mut toml::Table, path: &str) {
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Some(t) = table.get_mut(head).and_then(|v| v.as_table_mut()) {
                remove_path(t, rest);
            }
        }
        None => {
            table.remove(path);
        }
    }
}

/// The defaults of `kind` in a kinded section (`regularizer`, `robust`), as a TOML table.
fn kind_defaults(section: &str, kind: &str) -> Result<toml::Value, String> {
    let value = match section {
        "regularizer" => toml::Value::try_from(Regularizer::default_for(kind)?),
        _ => toml::Value::try_from(Robust::default_for(kind)?),
    };
    value.map_err(|e| e.to_string())
}

/// Sections whose `kind` decides which other keys they have.
const KINDED: [&str; 2] = ["regularizer", "robust"];

/// serde ignores extra keys beside a field-less kind (`kind = "none"`, `weight_bits = 4`): refuse any
/// key of `[regularizer]` or `[robust]` that its kind does not have, naming the keys it does.
fn check_kind_keys(table: &toml::Table) -> Result<(), String> {
    for section in KINDED {
        let Some(reg) = table.get(section).and_then(|r| r.as_table()) else {
            continue;
        };
        let kind = reg.get("kind").and_then(|k| k.as_str()).unwrap_or("none");
        let defaults = kind_defaults(section, kind)?;
        let allowed: Vec<&str> =
            defaults.as_table().map(|t| t.keys().map(String::as_str).collect()).unwrap_or_default();
        let extra: Vec<&str> = reg.keys().map(String::as_str).filter(|k| !allowed.contains(k)).collect();
        if extra.is_empty() {
            continue;
        }
        let has: Vec<&str> = allowed.iter().copied().filter(|k| *k != "kind").collect();
        return Err(format!(
            "{section} kind `{kind}` has no key {}; it has {}",
            extra.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
            if has.is_empty() { "none besides `kind`".to_string() } else { has.join(", ") }
        ));
    }
    Ok(())
}

/// serde's messages name the field but not always the section; keep them but drop the trailing noise.
fn clean_serde(e: toml::de::Error) -> String {
    e.to_string().trim().replace('\n', " ")
}

/// Applies one `a.b.c=value` to a TOML table. The value is read as TOML (numbers, booleans) and
/// otherwise taken as a string. Changing `regularizer.kind` drops the old kind's parameters.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (key, raw) =
        assignment.split_once('=').ok_or_else(|| "expected key=value, e.g. --set train.epochs=4".to_string())?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() {
        return Err("empty key; e.g. --set data.noise.rate=0.4".into());
    }
    if raw.is_empty() {
        return Err(format!("no value after `{key}=`; write one, or `{key}=\"\"` for an empty text"));
    }
    let value = parse_value(raw);
    let parts: Vec<&str> = key.split('.').collect();
    if let [section, "kind"] = parts[..] {
        if KINDED.contains(&section) {
            let kind = value.as_str().unwrap_or(raw).to_string();
            let defaults = kind_defaults(section, &kind)?;
            let prev = table.get(section).and_then(|r| r.get("kind")).and_then(|k| k.as_str());
            if prev != Some(kind.as_str()) {
                table.insert(section.into(), defaults);
            }
            return Ok(());
        }
    }
    let mut cur = table;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = cur.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry.as_table_mut().ok_or_else(|| format!("`{}` is a value, not a section", parts[..=i].join(".")))?;
    }
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// The `[sweep]` table of a preset: `key = [v1, v2, ...]` axes whose product `qat-lab sweep` trains,
/// as `key=value` overrides, in file order. A value may be a whole section as an inline table, e.g.
/// `regularizer = [{ kind = "none" }, { kind = "quantization", bn = "keep" }]`.
pub fn sweep_axes(text: &str, source_name: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError { source_name: source_name.into(), message: e.to_string() })?;
    let Some(sweep) = table.get("sweep") else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ConfigError { source_name: source_name.into(), message: m };
    let sweep = sweep.as_table().ok_or_else(|| bad("`sweep` must be a table of key = [values]".into()))?;
    let mut axes = Vec::new();
    flatten_axes("", sweep, &mut axes).map_err(bad)?;
    Ok(axes)
}

fn flatten_axes(prefix: &str, t: &toml::Table, out: &mut Vec<(String, Vec<String>)>) -> Result<(), String> {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(inner) => flatten_axes(&key, inner, out)?,
            toml::Value::Array(values) => out.push((
                key,
                values
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Table(t) => inline_table(t),
                        other => other.to_string(),
                    })
                    .collect(),
            )),
            _ => return Err(format!("sweep.{key} must be a list of values, e.g. [0.0, 0.2, 0.4]")),
        }
    }
    Ok(())
}

/// `{ a = 1, b = "x" }`: a table of scalars as one line of TOML.
fn inline_table(t: &toml::Table) -> String {
    let fields: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", fields.join(", "))
}

/// A preset found on disk.
#[derive(Debug, Clone)]
pub struct PresetEntry {
    pub path: PathBuf,
    pub experiment: Result<Experiment, String>,
}

/// The folder presets are read from: `QAT_LAB_PRESETS`, else `presets/` beside the working directory,
/// else the one in the source tree this binary was built from.
pub fn presets_dir() -> PathBuf {
    if let Ok(p) = std::env::var("QAT_LAB_PRESETS") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("presets");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets")
}

/// Resolves `NAME` or `NAME.toml` to a file in the presets folder, or takes a path as it is.
pub fn resolve_preset(name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.exists() || name.contains('/') {
        return p;
    }
    let dir = presets_dir();
    let with_ext = if name.ends_with(".toml") { name.to_string() } else { format!("{name}.toml") };
    dir.join(with_ext)
}

/// All presets in the presets folder, sorted by file name; broken ones carry their error.
pub fn list_presets() -> Vec<PresetEntry> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(presets_dir()) {
        let mut paths: Vec<PathBuf> =
            rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
        paths.sort();
        for path in paths {
            let experiment = Experiment::load(&path, &[]).map_err(|e| e.message);
            out.push(PresetEntry { path, experiment });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let e = Experiment::default();
        let back = Experiment::from_toml(&e.to_toml(), "t", &[]).unwrap();
        assert_eq!(e, back);
    }

    #[test]
    fn a_robust_method_parses_combines_and_names_the_run() {
        let e = Experiment::from_toml("[robust]\nkind = \"gce\"\nq = 0.5\n", "t.toml", &[]).unwrap();
        assert_eq!(
            (e.robust.clone(), e.method_label()),
            (Robust::Gce(crate::methods::gce::Gce { q: 0.5 }), "GCE q=0.5".to_string())
        );
        assert!(!e.is_baseline());
        // Whatever the order, the kind comes first and its keys apply; a new kind drops the old keys.
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = Experiment::from_toml(
            "[robust]\nkind = \"gce\"\nq = 0.5\n",
            "t.toml",
            &o(&["robust.beta=0.5", "robust.kind=sce", "regularizer.kind=quantization"]),
        )
        .unwrap();
        assert_eq!(e.robust, Robust::Sce(crate::methods::sce::Sce { alpha: 0.1, beta: 0.5 }));
        assert_eq!(e.method_label(), "W4/A4 + SCE a=0.1 b=0.5");
        let e = Experiment::from_toml("", "t.toml", &o(&["robust.kind=co_teaching"])).unwrap();
        assert_eq!(e.robust, Robust::CoTeaching(crate::methods::co_teaching::CoTeaching { forget_rate: 0.0, tk: 10 }));
        let refused = |text: &str, sets: &[&str]| Experiment::from_toml(text, "t.toml", &o(sets)).unwrap_err().message;
        assert!(refused("", &["robust.kind=gce", "robust.q=0"]).contains("robust.q = 0 is out of range"));
        assert!(refused("", &["robust.kind=gce", "robust.alpha=1"]).contains("robust kind `gce` has no key `alpha`"));
        assert!(refused("", &["robust.kind=mae"]).contains("allowed: none, gce, sce, co_teaching"));
        let m = refused("", &["robust.kind=gce", "regularizer.kind=label_smoothing"]);
        assert!(m.contains("both replace the loss"), "{m}");
        let m = refused("", &["robust.kind=co_teaching", "regularizer.kind=pruning", "train.epochs=10"]);
        assert!(m.contains("does not combine with pruning"), "{m}");
        assert!(refused("[robust]\nkind = \"none\"\nq = 1\n", &[]).contains("has no key `q`"));
    }

    #[test]
    fn overrides_change_nested_fields_and_regularizer_kind() {
        let e = Experiment::from_toml(
            "[regularizer]\nkind = \"dropout\"\np = 0.3\n",
            "t.toml",
            &[
                "train.epochs=4".into(),
                "regularizer.kind=quantization".into(),
                "regularizer.weight_bits=2".into(),
                "data.noise.rate=0.4".into(),
                "data.dataset=shapes".into(),
            ],
        )
        .unwrap();
        assert_eq!(e.train.epochs, 4);
        assert_eq!(e.data.noise.rate, 0.4);
        assert_eq!(e.data.dataset, DatasetKind::Shapes);
        match e.regularizer {
            Regularizer::Quantization(Quantization { weight_bits, act_bits, first_last_bits, .. }) => {
                assert_eq!((weight_bits, act_bits, first_last_bits), (2, 4, 8));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_file_and_key() {
        let err = Experiment::from_toml("[train]\nepoks = 3\n", "presets/x.toml", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("presets/x.toml"), "{msg}");
        assert!(msg.contains("epoks") && msg.contains("epochs"), "{msg}");

        let err = Experiment::from_toml("", "p.toml", &["regularizer.kind=magic".into()]).unwrap_err();
        assert!(err.to_string().contains("quantization"), "{err}");

        let err = Experiment::from_toml("", "p.toml", &["data.dataset=mnist".into()]).unwrap_err();
        assert!(err.to_string().contains("digits"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected_with_the_allowed_range() {
        let err = Experiment::from_toml("", "p.toml", &["data.noise.rate=1.5".into()]).unwrap_err();
        assert!(err.to_string().contains("data.noise.rate") && err.to_string().contains("0 to 1"), "{err}");
        let err =
            Experiment::from_toml("[regularizer]\nkind='quantization'\nweight_bits=1\n", "p.toml", &[]).unwrap_err();
        assert!(err.to_string().contains("weight_bits"), "{err}");
        let err = Experiment::from_toml("[regularizer]\nkind='early_stopping'\n", "p.toml", &[]).unwrap_err();
        assert!(err.to_string().contains("val_fraction"), "{err}");
    }

    #[test]
    fn devices_and_huge_files_are_refused_as_presets() {
        let err = Experiment::load(Path::new("/dev/zero"), &[]).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_PRESET_BYTES + 1) as usize]).unwrap();
        let err = Experiment::load(&big, &[]).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn overrides_apply_whatever_their_order() {
        let e = Experiment::from_toml(
            "",
            "p.toml",
            &["regularizer.weight_bits=2".into(), "regularizer.kind=quantization".into()],
        )
        .unwrap();
        assert!(
            matches!(e.regularizer, Regularizer::Quantization(Quantization { weight_bits: 2, .. })),
            "{:?}",
            e.regularizer
        );
    }

    #[test]
    fn keys_the_kind_does_not_have_are_refused_by_name() {
        let err =
            Experiment::from_toml("[regularizer]\nkind = \"none\"\nweight_bits = 4\nbanana = \"yes\"\n", "p.toml", &[])
                .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("p.toml") && msg.contains("`weight_bits`") && msg.contains("`banana`"), "{msg}");
        let err = Experiment::from_toml("", "p.toml", &["regularizer.weight_bits=4".into()]).unwrap_err();
        assert!(err.to_string().starts_with("--set regularizer.weight_bits=4"), "{err}");
        let err =
            Experiment::from_toml("", "p.toml", &["regularizer.kind=dropout".into(), "regularizer.patience=3".into()])
                .unwrap_err();
        assert!(err.to_string().contains("`patience`") && err.to_string().contains("position"), "{err}");
    }

    #[test]
    fn errors_caused_by_a_set_name_the_set() {
        let err = Experiment::from_toml("", "p.toml", &["train.epochs=0".into()]).unwrap_err();
        assert_eq!(err.source_name, "--set train.epochs=0", "{err}");
        let err = Experiment::from_toml("", "p.toml", &["train.epochs=many".into()]).unwrap_err();
        assert_eq!(err.source_name, "--set train.epochs=many", "{err}");
        let err = Experiment::from_toml("", "p.toml", &["name=".into()]).unwrap_err();
        assert!(err.source_name == "--set name=" && err.message.contains("no value"), "{err}");
        let err =
            Experiment::from_toml("[regularizer]\nkind='quantization'\nweight_bits=-4\n", "p.toml", &[]).unwrap_err();
        assert!(err.to_string().contains("weight_bits"), "{err}");
    }

    #[test]
    fn sweep_axes_accept_whole_sections() {
        let text = "[sweep]\nregularizer = [{ kind = \"none\" }, { kind = \"quantization\", bn = \"keep\" }]\n\"train.seed\" = [0, 1]\n";
        let axes = sweep_axes(text, "t.toml").unwrap();
        assert_eq!(axes.len(), 2);
        let e = Experiment::from_toml(text, "t.toml", &[format!("regularizer={}", axes[0].1[1])]).unwrap();
        assert!(
            matches!(e.regularizer, Regularizer::Quantization(Quantization { bn: BnMode::Keep, .. })),
            "{:?}",
            e.regularizer
        );
    }

    #[test]
    fn every_bundled_preset_is_valid() {
        let presets = list_presets();
        assert!(presets.len() >= 5, "presets folder should hold the paper presets");
        for p in presets {
            if let Err(e) = &p.experiment {
                panic!("{}: {e}", p.path.display());
            }
        }
    }
}
