//! The setup form: every choice of an experiment as a row whose value cycles with ←/→.

use crate::config::{
    step_choice, step_nearest, Arch, DatasetKind, DeviceKind, Experiment, HumanLabels, NoiseKind, Regularizer, Robust,
    REGULARIZER_KINDS, ROBUST_KINDS,
};
use crate::methods::SetupParam;

/// One editable row of the form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Preset,
    Dataset,
    Path,
    Subset,
    NoiseKind,
    NoiseRate,
    Validation,
    Regularizer,
    Robust,
    Param1,
    Param2,
    Arch,
    Width,
    Epochs,
    BatchSize,
    Lr,
    Seed,
    Augment,
    Device,
    Parallel,
}

pub const FIELDS: [Field; 20] = [
    Field::Preset,
    Field::Dataset,
    Field::Path,
    Field::Subset,
    Field::NoiseKind,
    Field::NoiseRate,
    Field::Validation,
    Field::Regularizer,
    Field::Robust,
    Field::Param1,
    Field::Param2,
    Field::Arch,
    Field::Width,
    Field::Epochs,
    Field::BatchSize,
    Field::Lr,
    Field::Seed,
    Field::Augment,
    Field::Device,
    Field::Parallel,
];

const SUBSETS: [usize; 7] = [0, 500, 1000, 2000, 5000, 10000, 20000];
const WIDTHS: [f64; 5] = [0.25, 0.5, 1.0, 1.5, 2.0];
const EPOCHS: [usize; 11] = [1, 3, 5, 10, 16, 20, 30, 40, 60, 100, 200];
const BATCHES: [usize; 5] = [32, 64, 128, 256, 512];
const LRS: [f64; 5] = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2];
const VALIDATION: [f64; 4] = [0.0, 0.1, 0.2, 0.3];

/// The form's state: the experiment being edited plus lab-level settings.
#[derive(Debug, Clone)]
pub struct SetupForm {
    pub experiment: Experiment,
    /// Preset names (file stems); index 0 of the cycle is "custom".
    pub presets: Vec<(String, Experiment)>,
    pub preset: Option<usize>,
    pub cursor: usize,
    /// Runs trained at the same time.
    pub parallel: usize,
    pub max_parallel: usize,
    pub cuda_available: bool,
    /// Text being typed into the path field, when editing.
    pub editing: Option<String>,
    /// The CIFAR-N label files present: Setup then offers human noise on their dataset.
    pub human_labels: Vec<String>,
    /// The transition matrix of the human label set last chosen, read once from its file.
    human_matrix: Option<HumanMatrix>,
}

/// A human label set's transition matrix, or why it could not be read.
#[derive(Debug, Clone)]
struct HumanMatrix {
    labels: String,
    set: String,
    matrix: Result<Vec<Vec<f64>>, String>,
}

/// What Setup can show of the chosen noise's transition matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum NoiseMatrix {
    /// Row i: the share of clean class i given each label j.
    Known(Vec<Vec<f64>>),
    /// No class matrix: the reason, as the screen says it.
    Unknown(String),
}

impl SetupForm {
    pub fn new(presets: Vec<(String, Experiment)>, cores: usize, cuda_available: bool) -> Self {
        let start = presets.iter().position(|(n, _)| n == "demo");
        let experiment = start.map(|i| presets[i].1.clone()).unwrap_or_else(default_demo);
        Self {
            experiment,
            presets,
            preset: start,
            cursor: 0,
            // Runs share the compute threads. On 2 cores, 4 at once finish 5-10% more runs an hour
            // than 2 and 10-25% more than 1 (BENCHMARKS.md, "Runs at once"): small models leave
            // threads idle between ops that another run fills.
            parallel: (2 * cores.max(1)).min(4),
            max_parallel: (2 * cores).clamp(1, 8),
            cuda_available,
            editing: None,
            human_labels: Vec::new(),
            human_matrix: None,
        }
    }

    /// The noise kinds the form offers: the synthetic ones, and human noise on CIFAR-10 or
    /// CIFAR-100 when its label file is there.
    fn noise_kinds(&self) -> Vec<NoiseKind> {
        let mut kinds = NoiseKind::ALL.to_vec();
        if self.human_file().is_some() {
            kinds.push(NoiseKind::Human);
        }
        kinds
    }

    /// The chosen dataset's CIFAR-N labels and the path of their file, when it is present.
    fn human_file(&self) -> Option<(HumanLabels, String)> {
        let human = HumanLabels::of(self.experiment.data.dataset)?;
        let named = |p: &&String| std::path::Path::new(p.as_str()).file_name().is_some_and(|n| n == human.file);
        self.human_labels.iter().find(named).map(|p| (human, p.clone()))
    }

    /// The transition matrix of the chosen noise: expected for the synthetic kinds, read from the
    /// file for human labels.
    pub fn noise_matrix(&self) -> NoiseMatrix {
        let data = &self.experiment.data;
        if data.dataset.is_multi_label() {
            return NoiseMatrix::Unknown("multi-label data: noise flips each label on its own".into());
        }
        if data.noise.kind == NoiseKind::Human {
            return match &self.human_matrix {
                Some(h) if h.labels == data.noise.labels && h.set == data.noise.set => match &h.matrix {
                    Ok(m) => NoiseMatrix::Known(m.clone()),
                    Err(e) => NoiseMatrix::Unknown(e.clone()),
                },
                _ => NoiseMatrix::Unknown("the label file is read when its set is chosen".into()),
            };
        }
        let classes = match (data.dataset, crate::data::DataSize::expected(data)) {
            (DatasetKind::Folder, _) | (_, None) => {
                return NoiseMatrix::Unknown("the classes are known once the folder is loaded".into())
            }
            (_, Some(size)) => size.outputs,
        };
        match crate::data::noise::expected_transition(data.noise.kind, data.noise.rate, classes) {
            Some(m) => NoiseMatrix::Known(m),
            None => NoiseMatrix::Unknown(format!("{} noise has no class matrix", data.noise.kind.name())),
        }
    }

    /// Reads the chosen human label set's matrix, unless it is the one already read.
    fn read_human_matrix(&mut self) {
        let noise = &self.experiment.data.noise;
        let fresh = self.human_matrix.as_ref().is_some_and(|h| h.labels == noise.labels && h.set == noise.set);
        if noise.kind != NoiseKind::Human || fresh {
            return;
        }
        let matrix = HumanLabels::of(self.experiment.data.dataset)
            .ok_or_else(|| "no CIFAR-N labels for this dataset".to_string())
            .and_then(|h| crate::data::cifar_n::clean_and_noisy(noise, &h).map_err(|e| format!("{e:#}")))
            .map(|(clean, noisy)| {
                let to_u32 = |v: &[i64]| v.iter().map(|&x| x.max(0) as u32).collect::<Vec<_>>();
                let classes = clean.iter().max().map_or(0, |&m| m.max(0) as usize + 1);
                crate::data::noise::transition_matrix(&to_u32(&clean), &to_u32(&noisy), classes)
            });
        self.human_matrix = Some(HumanMatrix { labels: noise.labels.clone(), set: noise.set.clone(), matrix });
    }

    /// Points human noise at the chosen dataset's label file and first set, or, where it has none,
    /// goes back to the synthetic kinds (which take no file).
    fn fit_human_noise(&mut self) {
        let human = self.human_file();
        let noise = &mut self.experiment.data.noise;
        match (noise.kind, human) {
            (NoiseKind::Human, Some((h, path))) => {
                if noise.labels != path || h.key(&noise.set).is_none() {
                    noise.labels = path;
                    noise.set = h.sets[0].0.into();
                }
            }
            (NoiseKind::Human, None) => {
                noise.kind = NoiseKind::Uniform;
                noise.labels.clear();
                noise.set.clear();
            }
            _ => {
                noise.labels.clear();
                noise.set.clear();
            }
        }
        self.read_human_matrix();
    }

    pub fn field(&self) -> Field {
        FIELDS[self.cursor]
    }

    pub fn move_cursor(&mut self, delta: isize) {
        self.cursor = (self.cursor as isize + delta).rem_euclid(FIELDS.len() as isize) as usize;
    }

    /// Label and current value of a row, as shown.
    pub fn row(&self, f: Field) -> (String, String) {
        let e = &self.experiment;
        let (p1, p2) = self.param_labels();
        match f {
            Field::Preset => {
                ("Preset".into(), self.preset.map(|i| self.presets[i].0.clone()).unwrap_or_else(|| "(custom)".into()))
            }
            Field::Dataset => ("Dataset".into(), e.data.dataset.name().into()),
            Field::Path => (
                "Data path".into(),
                match &self.editing {
                    Some(t) => format!("{t}_"),
                    None if e.data.path.is_empty() => "(default)".into(),
                    None => e.data.path.clone(),
                },
            ),
            Field::Subset => (
                "Train images".into(),
                if e.data.train_subset == 0 { "all".into() } else { e.data.train_subset.to_string() },
            ),
            Field::NoiseKind => ("Noise kind".into(), e.data.noise.kind.name().into()),
            Field::NoiseRate if e.data.noise.kind == NoiseKind::Human => {
                ("Human label set".into(), e.data.noise.set.clone())
            }
            Field::NoiseRate => ("Noise rate s".into(), format!("{:.0}%", e.data.noise.rate * 100.0)),
            Field::Validation => ("Validation split".into(), format!("{:.0}%", e.data.val_fraction * 100.0)),
            Field::Regularizer => ("Regularizer".into(), e.regularizer.kind().replace('_', " ")),
            Field::Robust => ("Robust method".into(), e.robust.label()),
            Field::Param1 => p1,
            Field::Param2 => p2,
            Field::Arch => ("Model".into(), e.model.arch.name().into()),
            Field::Width => ("Width".into(), format!("x{}", e.model.width)),
            Field::Epochs => ("Epochs".into(), e.train.epochs.to_string()),
            Field::BatchSize => ("Batch size".into(), e.train.batch_size.to_string()),
            Field::Lr => ("Learning rate".into(), format!("{}", e.train.lr)),
            Field::Seed => ("Seed".into(), e.train.seed.to_string()),
            Field::Augment => ("Augmentation".into(), if e.data.augment { "crop+flip" } else { "off" }.into()),
            Field::Device => ("Device".into(), format!("{:?}", e.train.device).to_lowercase()),
            Field::Parallel => ("Runs at once".into(), self.parallel.to_string()),
        }
    }

    fn param_labels(&self) -> ((String, String), (String, String)) {
        let mut params = self.experiment.regularizer.settings().map(|s| s.setup_params()).unwrap_or_default();
        params.resize(2, SetupParam::new("-", String::new()));
        let label = |p: &SetupParam| (format!("  {}", p.name), p.value.clone());
        (label(&params[0]), label(&params[1]))
    }

    /// Steps the value of the current row by `dir` (+1 or -1).
    pub fn cycle(&mut self, dir: isize) {
        let field = self.field();
        let custom = !matches!(field, Field::Preset | Field::Parallel);
        let e = &mut self.experiment;
        match field {
            Field::Preset => {
                if self.presets.is_empty() {
                    return;
                }
                let n = self.presets.len() as isize + 1; // + custom
                let cur = self.preset.map(|i| i as isize + 1).unwrap_or(0);
                let next = (cur + dir).rem_euclid(n);
                self.preset = if next == 0 { None } else { Some(next as usize - 1) };
                if let Some(i) = self.preset {
                    self.experiment = self.presets[i].1.clone();
                }
                self.read_human_matrix();
            }
            Field::Dataset => {
                e.data.dataset = step_choice(&DatasetKind::ALL, &e.data.dataset, dir);
                self.fit_human_noise();
            }
            Field::Path => {}
            Field::Subset => e.data.train_subset = step_choice(&SUBSETS, &e.data.train_subset, dir),
            Field::NoiseKind => {
                let kinds = self.noise_kinds();
                let noise = &mut self.experiment.data.noise;
                noise.kind = step_choice(&kinds, &noise.kind, dir);
                self.fit_human_noise();
            }
            Field::NoiseRate if e.data.noise.kind == NoiseKind::Human => {
                if let Some(h) = HumanLabels::of(e.data.dataset) {
                    e.data.noise.set = step_choice(&h.set_names(), &e.data.noise.set.as_str(), dir).to_string();
                }
                self.read_human_matrix();
            }
            Field::NoiseRate => {
                e.data.noise.rate = ((e.data.noise.rate * 20.0).round() + dir as f64).clamp(0.0, 18.0) / 20.0;
            }
            Field::Validation => e.data.val_fraction = step_nearest(&VALIDATION, e.data.val_fraction, dir),
            Field::Regularizer => {
                let next = step_choice(REGULARIZER_KINDS, &e.regularizer.kind(), dir);
                e.regularizer = Regularizer::default_for(next).expect("known kind");
            }
            Field::Robust => {
                let next = step_choice(ROBUST_KINDS, &e.robust.kind(), dir);
                e.robust = Robust::default_for(next).expect("known kind");
            }
            Field::Param1 | Field::Param2 => {
                if let Some(settings) = e.regularizer.settings_mut() {
                    settings.step_param(usize::from(field == Field::Param2), dir);
                }
            }
            Field::Arch => e.model.arch = step_choice(&Arch::ALL, &e.model.arch, dir),
            Field::Width => e.model.width = step_nearest(&WIDTHS, e.model.width, dir),
            Field::Epochs => e.train.epochs = step_choice(&EPOCHS, &e.train.epochs, dir),
            Field::BatchSize => e.train.batch_size = step_choice(&BATCHES, &e.train.batch_size, dir),
            Field::Lr => e.train.lr = step_nearest(&LRS, e.train.lr, dir),
            Field::Seed => e.train.seed = (e.train.seed as i64 + dir as i64).max(0) as u64,
            Field::Augment => e.data.augment = !e.data.augment,
            Field::Device => {
                e.train.device = if self.cuda_available && e.train.device == DeviceKind::Cpu {
                    DeviceKind::Cuda
                } else {
                    DeviceKind::Cpu
                }
            }
            Field::Parallel => {
                self.parallel = (self.parallel as isize + dir).clamp(1, self.max_parallel as isize) as usize
            }
        }
        if custom {
            self.preset = None;
            self.experiment.name =
                format!("{}-{:.0}pct", self.experiment.data.dataset.name(), self.experiment.data.noise.rate * 100.0);
        }
    }

    /// Starts or finishes typing into the path row; returns true when the row takes text.
    pub fn toggle_edit(&mut self) -> bool {
        if self.field() != Field::Path {
            return false;
        }
        match self.editing.take() {
            Some(text) => {
                self.experiment.data.path = text.trim().to_string();
                self.preset = None;
            }
            None => self.editing = Some(self.experiment.data.path.clone()),
        }
        true
    }

    /// The experiment to run, checked; the message says what to change.
    pub fn build(&self) -> Result<Experiment, String> {
        let e = self.experiment.clone();
        e.validate()?;
        if e.data.dataset == DatasetKind::Folder && e.data.path.is_empty() {
            return Err("the folder dataset needs a data path: select `Data path`, press Enter and type it".into());
        }
        Ok(e)
    }

    /// The same experiment under each method in `methods` (a regularizer and a noisy-label loss; same
    /// data, noise and seed).
    pub fn variants(&self, methods: &[(Regularizer, Robust)]) -> Result<Vec<Experiment>, String> {
        let base = self.build()?;
        methods
            .iter()
            .map(|(r, robust)| {
                let mut e = base.clone();
                e.regularizer = r.clone();
                e.robust = robust.clone();
                if e.data.val_fraction == 0.0 && crate::methods::build(&e).needs_validation() {
                    return Err(format!(
                        "{} needs a validation split: set `Validation split` to 10%",
                        e.method_label()
                    ));
                }
                let epochs = e.train.epochs;
                if let Some(settings) = e.regularizer.settings_mut() {
                    settings.fit_schedule(epochs);
                }
                e.validate()?;
                Ok(e)
            })
            .collect()
    }
}

fn default_demo() -> Experiment {
    let mut e = Experiment { name: "demo-digits".into(), ..Default::default() };
    e.data.noise.rate = 0.4;
    e.model.arch = Arch::Resnet8;
    e.train.epochs = 40;
    e.train.batch_size = 64;
    e.train.lr = 0.003;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comparison asks each method what it needs (a validation split) and fits it to the form's
    /// schedule (pruning's epoch), naming no method.
    #[test]
    fn variants_check_validation_and_fit_the_schedule() {
        let mut f = SetupForm::new(Vec::new(), 2, false);
        f.experiment.data.val_fraction = 0.0;
        f.experiment.train.epochs = 6;
        let early = (Regularizer::default_for("early_stopping").unwrap(), Robust::None);
        let err = f.variants(&[early]).unwrap_err();
        assert!(err.contains("early stop p=10 needs a validation split"), "{err}");
        let pruning = (Regularizer::default_for("pruning").unwrap(), Robust::None);
        let e = f.variants(&[pruning]).unwrap().remove(0);
        let Regularizer::Pruning(p) = e.regularizer else { panic!("{:?}", e.regularizer) };
        assert_eq!(p.at_epoch, 2, "by the middle of 6 epochs, not the preset's 5");
    }

    #[test]
    fn cycling_changes_values_and_invalid_choices_are_explained() {
        let mut f = SetupForm::new(Vec::new(), 2, false);
        f.cursor = FIELDS.iter().position(|x| *x == Field::Regularizer).unwrap();
        f.cycle(1);
        assert_eq!(f.experiment.regularizer.kind(), "early_stopping");
        // Human noise is offered on CIFAR-10 only when the label file is there; its set takes the
        // noise-rate row.
        f.experiment.data.dataset = DatasetKind::Cifar10;
        f.cursor = FIELDS.iter().position(|x| *x == Field::NoiseKind).unwrap();
        let kinds = |f: &mut SetupForm| {
            (0..5)
                .map(|_| {
                    f.cycle(1);
                    f.experiment.data.noise.kind
                })
                .collect::<Vec<_>>()
        };
        assert!(!kinds(&mut f).contains(&NoiseKind::Human), "no label file, no human noise");
        f.human_labels = vec!["data/cifar-n/CIFAR-10_human.pt".into(), "data/cifar-n/CIFAR-100_human.pt".into()];
        while f.experiment.data.noise.kind != NoiseKind::Human {
            f.cycle(1);
        }
        assert_eq!(f.experiment.data.noise.labels, "data/cifar-n/CIFAR-10_human.pt");
        assert_eq!(f.row(Field::NoiseRate), ("Human label set".to_string(), "aggre".to_string()));
        f.cursor = FIELDS.iter().position(|x| *x == Field::NoiseRate).unwrap();
        f.cycle(-1);
        assert_eq!(f.experiment.data.noise.set, "worst");
        let chosen = std::mem::replace(&mut f.experiment.regularizer, Regularizer::None);
        assert!(f.experiment.validate().is_ok(), "{:?}", f.experiment.validate());
        f.experiment.regularizer = chosen;
        f.cursor = FIELDS.iter().position(|x| *x == Field::NoiseKind).unwrap();
        f.cycle(1);
        assert!(f.experiment.data.noise.labels.is_empty() && f.experiment.data.noise.set.is_empty());
        // Another CIFAR takes its own file and first set; a dataset without human labels goes back to
        // uniform noise.
        while f.experiment.data.noise.kind != NoiseKind::Human {
            f.cycle(1);
        }
        f.cursor = FIELDS.iter().position(|x| *x == Field::Dataset).unwrap();
        f.cycle(1);
        assert_eq!(f.experiment.data.dataset, DatasetKind::Cifar100);
        let noise = &f.experiment.data.noise;
        assert_eq!((noise.labels.as_str(), noise.set.as_str()), ("data/cifar-n/CIFAR-100_human.pt", "noisy"));
        f.cycle(1);
        let noise = &f.experiment.data.noise;
        assert_eq!(noise.kind, NoiseKind::Uniform);
        assert!(noise.labels.is_empty() && noise.set.is_empty());
        f.cycle(-2);
        // The robust method's row cycles through the noisy-label methods, and back to plain CE.
        f.cursor = FIELDS.iter().position(|x| *x == Field::Robust).unwrap();
        let kinds: Vec<&str> = (0..ROBUST_KINDS.len())
            .map(|_| {
                f.cycle(1);
                f.experiment.robust.kind()
            })
            .collect();
        assert_eq!(kinds, [&ROBUST_KINDS[1..], &ROBUST_KINDS[..1]].concat());
        f.cycle(1);
        assert_eq!(f.row(Field::Robust), ("Robust method".to_string(), "GCE q=0.7".to_string()));
        f.experiment.data.val_fraction = 0.0;
        assert!(f.build().unwrap_err().contains("val_fraction"));
        f.cursor = FIELDS.iter().position(|x| *x == Field::Validation).unwrap();
        f.cycle(1);
        assert!(f.build().is_ok());
        f.cursor = FIELDS.iter().position(|x| *x == Field::Device).unwrap();
        f.cycle(1);
        assert_eq!(f.experiment.train.device, DeviceKind::Cpu, "no CUDA offered when not available");
        let v = f
            .variants(&[
                (Regularizer::None, Robust::None),
                (Regularizer::default_for("quantization").unwrap(), Robust::None),
            ])
            .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].data, v[1].data);
    }

    #[test]
    fn the_noise_matrix_is_expected_for_synthetic_noise_and_read_for_human_labels() {
        use crate::data::cifar_n::tests::{int64, pickle, write_pt};
        let mut f = SetupForm::new(vec![], 2, false);
        f.experiment.data.dataset = DatasetKind::Cifar10;
        f.experiment.data.noise.kind = NoiseKind::Flip;
        f.experiment.data.noise.rate = 0.3;
        let NoiseMatrix::Known(m) = f.noise_matrix() else { panic!("flip noise has a matrix") };
        assert!((m[0][0] - 0.7).abs() < 1e-12 && (m[0][1] - 0.3 / 9.0).abs() < 1e-12);
        // Human labels: the file's own matrix (class 0 half given to class 1).
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("CIFAR-10_human.pt");
        let clean: Vec<i64> = (0..40).map(|i| i % 10).collect();
        let worst: Vec<i64> = clean.iter().enumerate().map(|(i, &c)| if i % 20 == 0 { 1 } else { c }).collect();
        write_pt(&pt, &pickle(&[("clean_label", "i8", int64(&clean), 40), ("worse_label", "i8", int64(&worst), 40)]));
        f.human_labels = vec![pt.display().to_string()];
        f.cursor = FIELDS.iter().position(|x| *x == Field::NoiseKind).unwrap();
        while f.experiment.data.noise.kind != NoiseKind::Human {
            f.cycle(1);
        }
        f.cursor = FIELDS.iter().position(|x| *x == Field::NoiseRate).unwrap();
        f.cycle(-1);
        assert_eq!(f.experiment.data.noise.set, "worst");
        let NoiseMatrix::Known(m) = f.noise_matrix() else { panic!("{:?}", f.noise_matrix()) };
        assert_eq!((m[0][0], m[0][1], m[1][1]), (0.5, 0.5, 1.0));
        // A file that cannot be read says why instead of a grid.
        std::fs::write(&pt, b"not a zip").unwrap();
        f.cycle(-1);
        let NoiseMatrix::Unknown(why) = f.noise_matrix() else { panic!("read a broken file") };
        assert!(why.contains("not a PyTorch .pt archive"), "{why}");
    }
}
