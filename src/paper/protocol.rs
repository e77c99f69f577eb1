//! What `qat-lab paper` trains at each budget: the data, model and schedule of each family of runs
//! (the same for every method), the grids of the four claims, and the methods with the paper's
//! hyper-parameters. Only data size, epochs and model width follow the budget (and, for time, how many
//! noise rates, settings and seeds the grids hold).

use crate::config::{
    Arch, BnMode, DatasetKind, DeviceKind, Dropout, EarlyStopping, Experiment, LabelSmoothing, NoiseKind, Pruning,
    Quantization, Regularizer, Robust, WeightDecay,
};

/// How much compute a reproduction may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// At most 15 minutes on 2 cores: embedded data (and the CIFAR-10 sample for F1 with --data).
    Quick,
    /// At most 2 hours on 2 cores: CIFAR-10 subsets (F1, F2, F3) and larger faces (T1).
    Standard,
    /// The paper's protocol: all 50,000 CIFAR-10 images, augmentation, 200 epochs, 5 seeds (a GPU or
    /// a cluster).
    Full,
    /// A few seconds of tiny runs that exercise every grid (the test suite's budget).
    #[value(hide = true)]
    Smoke,
}

impl Budget {
    pub fn name(self) -> &'static str {
        match self {
            Budget::Quick => "quick",
            Budget::Standard => "standard",
            Budget::Full => "full",
            Budget::Smoke => "smoke",
        }
    }
}

/// One grid point: a method on a family's data at a noise rate, for one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub regularizer: Regularizer,
    pub rate: f64,
    pub seed: u64,
}

/// Everything a budget trains, and the grids the claims read.
#[derive(Debug, Clone)]
pub struct Protocol {
    pub budget: Budget,
    /// F2 and F3: single-label classification with synthetic noise.
    pub classes: Experiment,
    /// F1: the baseline against W4/A4 at s = 40% (the same family as `classes` unless CIFAR-10 is given
    /// at `quick`).
    pub fig1: Experiment,
    /// T1: multi-label AU detection on faces.
    pub faces: Experiment,
    /// F2H: the F2 family on CIFAR-10N's human label sets ([`HUMAN_SETS`]); `Err` says why this
    /// budget does not run it (it needs the whole official CIFAR-10 and the label file).
    pub human: Result<Experiment, String>,
    /// F2's noise rates.
    pub rates: Vec<f64>,
    /// F3's noise rates.
    pub f3_rates: Vec<f64>,
    /// Seeds of F1, F2 and F3.
    pub seeds: Vec<u64>,
    /// Seeds of T1 (the paper averages 5 runs).
    pub t1_seeds: Vec<u64>,
    /// F3's parameter settings per method.
    pub quant_bits: Vec<(u32, u32)>,
    pub dropout_p: Vec<f64>,
    pub prune_ratio: Vec<f64>,
}

/// The noise rate of F1 (the paper's Fig. 1 setting, and the lab's demo).
pub const F1_RATE: f64 = 0.4;

/// A base experiment: no regularizer, the family's data and schedule.
fn base(
    name: &str,
    dataset: DatasetKind,
    train: usize,
    test: usize,
    arch: Arch,
    width: f64,
    epochs: usize,
) -> Experiment {
    let mut e = Experiment { name: name.into(), regularizer: Regularizer::None, ..Default::default() };
    e.data.dataset = dataset;
    e.data.train_subset = train;
    e.data.test_subset = test;
    // Every method sees the same held-out split: early stopping needs one.
    e.data.val_fraction = 0.1;
    e.data.noise.kind = NoiseKind::Uniform;
    e.data.noise.seed = 1;
    e.model.arch = arch;
    e.model.width = width;
    e.train.epochs = epochs;
    e
}

/// The CIFAR-10N label sets F2H trains on: the aggregate (9% noisy), one annotator (17%) and the
/// worst of three (40%).
pub const HUMAN_SETS: [&str; 3] = ["aggre", "rand1", "worst"];

/// Where `qat-lab data fetch cifar10n` puts the CIFAR-10N labels, and where F2H reads them by default.
pub const HUMAN_LABELS: &str = "data/cifar-n/CIFAR-10_human.pt";

impl Protocol {
    /// The protocol of `budget`; `data` is a CIFAR-10 folder or archive (required from `standard` on,
    /// optional at `quick`, where it adds F1 on CIFAR-10). F2H reads CIFAR-10N's labels from
    /// `human_labels` at `standard` and `full`.
    pub fn new(budget: Budget, data: Option<&str>, device: DeviceKind, human_labels: &str) -> Protocol {
        let cifar = |name: &str, train: usize, epochs: usize| {
            let mut e = base(name, DatasetKind::Cifar10, train, 0, Arch::Resnet20, 1.0, epochs);
            e.data.path = data.unwrap_or_default().to_string();
            e.train.batch_size = 128;
            e.train.lr = 1e-3;
            e
        };
        let mut p = match budget {
            Budget::Quick => {
                let mut classes = base("paper-quick-shapes", DatasetKind::Shapes, 800, 500, Arch::Resnet8, 0.5, 20);
                classes.train.batch_size = 64;
                classes.train.lr = 3e-3;
                // F1 needs a network big enough for the data to over-fit it: the lab's demo size (the
                // small F2 family's baseline barely over-fits, its eval loss rising under 10%).
                let fig1 = match data {
                    Some(_) => cifar("paper-quick-cifar10", 2500, 20),
                    None => {
                        let mut e = base("paper-quick-fig1", DatasetKind::Shapes, 2000, 1000, Arch::Resnet8, 1.0, 16);
                        e.train.batch_size = 64;
                        e.train.lr = 3e-3;
                        e
                    }
                };
                Protocol {
                    budget,
                    classes,
                    fig1,
                    faces: faces("paper-quick-faces", 600, 400, 0.5, 12),
                    human: Err(NOT_AT_THIS_BUDGET.into()),
                    // One rate each side of the paper's 40% boundary keeps the grid inside 15 minutes.
                    rates: vec![0.2, 0.6],
                    f3_rates: vec![0.6],
                    seeds: vec![0, 1],
                    t1_seeds: (0..5).collect(),
                    quant_bits: vec![(2, 4), (4, 4), (8, 8)],
                    dropout_p: vec![0.1, 0.3, 0.5],
                    prune_ratio: vec![0.5, 0.75, 0.9],
                }
            }
            Budget::Standard => {
                let mut classes = cifar("paper-standard-cifar10", 2000, 20);
                classes.model.arch = Arch::Resnet14;
                classes.model.width = 0.5;
                Protocol {
                    budget,
                    fig1: cifar("paper-standard-fig1", 5000, 30),
                    human: Ok(human(&classes, human_labels)),
                    classes,
                    faces: faces("paper-standard-faces", 1500, 1000, 1.0, 40),
                    rates: vec![0.1, 0.2, 0.3, 0.5, 0.6],
                    f3_rates: vec![0.2, 0.6],
                    seeds: vec![0, 1],
                    t1_seeds: (0..5).collect(),
                    quant_bits: vec![(2, 4), (4, 4), (8, 8)],
                    dropout_p: vec![0.1, 0.3, 0.5],
                    prune_ratio: vec![0.5, 0.75, 0.9],
                }
            }
            Budget::Smoke => {
                let mut classes = base("paper-smoke-shapes", DatasetKind::Shapes, 120, 60, Arch::Resnet8, 0.25, 3);
                classes.train.batch_size = 32;
                classes.train.lr = 3e-3;
                Protocol {
                    budget,
                    fig1: classes.clone(),
                    classes,
                    faces: faces("paper-smoke-faces", 100, 60, 0.25, 3),
                    human: Err(NOT_AT_THIS_BUDGET.into()),
                    rates: vec![0.2, 0.6],
                    f3_rates: vec![0.6],
                    seeds: vec![0, 1],
                    t1_seeds: vec![0, 1],
                    quant_bits: vec![(4, 4), (8, 8)],
                    dropout_p: vec![0.1, 0.3],
                    prune_ratio: vec![0.5, 0.75],
                }
            }
            Budget::Full => {
                let mut classes = cifar("paper-full-cifar10", 0, 200);
                classes.data.augment = true;
                Protocol {
                    budget,
                    fig1: classes.clone(),
                    human: Ok(human(&classes, human_labels)),
                    classes,
                    faces: faces("paper-full-faces", 4000, 1000, 1.0, 60),
                    rates: vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                    f3_rates: vec![0.2, 0.4, 0.6],
                    seeds: (0..5).collect(),
                    t1_seeds: (0..5).collect(),
                    quant_bits: vec![(2, 4), (4, 4), (4, 8), (8, 8)],
                    dropout_p: vec![0.05, 0.1, 0.2, 0.3, 0.5],
                    prune_ratio: vec![0.25, 0.5, 0.75, 0.9],
                }
            }
        };
        let human = p.human.as_mut().ok();
        for e in [&mut p.classes, &mut p.fig1, &mut p.faces].into_iter().chain(human) {
            e.train.device = device;
        }
        p
    }

    /// F2H's experiment of a method on a label set, for one seed.
    pub fn human_experiment(family: &Experiment, regularizer: &Regularizer, set: &str, seed: u64) -> Experiment {
        let mut e = family.clone();
        e.regularizer = regularizer.clone();
        e.data.noise.set = set.into();
        e.train.seed = seed;
        e
    }

    /// F2H's runs: F2's seven methods on every label set of [`HUMAN_SETS`], per seed (none where the
    /// budget does not run it).
    pub fn human_plan(&self) -> Vec<Experiment> {
        let Ok(family) = &self.human else { return Vec::new() };
        let mut plan = Vec::new();
        for reg in self.fig2_methods() {
            for set in HUMAN_SETS {
                for &seed in &self.seeds {
                    plan.push(Self::human_experiment(family, &reg, set, seed));
                }
            }
        }
        plan
    }

    /// The paper's seven methods of Fig. 2 (`none` is the baseline), with its hyper-parameters.
    pub fn fig2_methods(&self) -> Vec<Regularizer> {
        let mut m = vec![
            Regularizer::None,
            self.early_stopping(&self.classes),
            Regularizer::WeightDecay(WeightDecay { value: 0.01, decoupled: true }),
            Regularizer::Dropout(Dropout { p: 0.1, position: Default::default() }),
            Regularizer::LabelSmoothing(LabelSmoothing { alpha: 0.1 }),
            self.pruning(&self.classes, 0.75),
        ];
        m.push(quantization(4, 4, BnMode::Fold));
        m
    }

    /// The six methods of Table 1: the paper applies early stopping to all of them on BP4D, so it has
    /// no row of its own (see the report for how that is read here). QAT keeps one batch norm per AU.
    pub fn table1_methods(&self) -> Vec<Regularizer> {
        vec![
            Regularizer::None,
            Regularizer::WeightDecay(WeightDecay { value: 0.01, decoupled: true }),
            Regularizer::Dropout(Dropout { p: 0.1, position: Default::default() }),
            Regularizer::LabelSmoothing(LabelSmoothing { alpha: 0.1 }),
            self.pruning(&self.faces, 0.75),
            quantization(4, 4, BnMode::Keep),
        ]
    }

    /// F3's settings, one panel per method: (panel name, the settings).
    pub fn fig3_panels(&self) -> Vec<(&'static str, Vec<Regularizer>)> {
        vec![
            ("quantization", self.quant_bits.iter().map(|&(w, a)| quantization(w, a, BnMode::Fold)).collect()),
            ("pruning", self.prune_ratio.iter().map(|&r| self.pruning(&self.classes, r)).collect()),
            (
                "dropout",
                self.dropout_p
                    .iter()
                    .map(|&p| Regularizer::Dropout(Dropout { p, position: Default::default() }))
                    .collect(),
            ),
        ]
    }

    /// Structured pruning of `ratio` after a dense quarter of the schedule ("F is pre-trained").
    pub fn pruning(&self, family: &Experiment, ratio: f64) -> Regularizer {
        Regularizer::Pruning(Pruning {
            ratio,
            at_epoch: (family.train.epochs / 4).max(1),
            criterion: Default::default(),
        })
    }

    /// Early stopping with a patience of a quarter of the schedule (at least 3 epochs); it keeps the
    /// best-validation weights whether or not patience runs out.
    pub fn early_stopping(&self, family: &Experiment) -> Regularizer {
        Regularizer::EarlyStopping(EarlyStopping { patience: (family.train.epochs / 4).max(3) })
    }

    /// `--extended`: every registered method made for noisy labels alone, then co-teaching with
    /// W4/A4, as (regularizer, robust method) pairs; the paper compared none of them.
    pub fn extended_methods(&self, family: &Experiment) -> Vec<(Regularizer, Robust)> {
        let w4a4 = quantization(4, 4, if family.data.dataset.is_multi_label() { BnMode::Keep } else { BnMode::Fold });
        let alone = Robust::all_defaults().into_iter().skip(1).map(|r| (Regularizer::None, r));
        let co_teaching = Robust::default_for("co_teaching").expect("a registered kind");
        alone.chain([(w4a4, co_teaching)]).collect()
    }

    /// `--extended`'s runs: its methods on F2's grid and on T1's seeds.
    pub fn extended_plan(&self) -> Vec<Experiment> {
        let mut plan = Vec::new();
        for (reg, robust) in self.extended_methods(&self.classes) {
            for &rate in &self.rates {
                for &seed in &self.seeds {
                    let mut e = Self::experiment(&self.classes, &Point { regularizer: reg.clone(), rate, seed });
                    e.robust = robust.clone();
                    plan.push(e);
                }
            }
        }
        for (reg, robust) in self.extended_methods(&self.faces) {
            for &seed in &self.t1_seeds {
                let mut e = Self::experiment(&self.faces, &Point { regularizer: reg.clone(), rate: FACES_NOISE, seed });
                e.robust = robust.clone();
                plan.push(e);
            }
        }
        plan
    }

    /// The experiment of one grid point of a family.
    pub fn experiment(family: &Experiment, point: &Point) -> Experiment {
        let mut e = family.clone();
        e.regularizer = point.regularizer.clone();
        e.data.noise.rate = point.rate;
        e.train.seed = point.seed;
        e
    }

    /// F1's points: the baseline and W4/A4 at s = 40%, per seed.
    pub fn f1_points(&self) -> Vec<(Point, Point)> {
        let q = quantization(4, 4, BnMode::Fold);
        self.seeds
            .iter()
            .map(|&seed| {
                (
                    Point { regularizer: Regularizer::None, rate: F1_RATE, seed },
                    Point { regularizer: q.clone(), rate: F1_RATE, seed },
                )
            })
            .collect()
    }

    /// Every experiment the budget trains (duplicates between claims included; the runner trains each
    /// once).
    pub fn plan(&self) -> Vec<Experiment> {
        let mut plan = Vec::new();
        for (b, q) in self.f1_points() {
            plan.push(Self::experiment(&self.fig1, &b));
            plan.push(Self::experiment(&self.fig1, &q));
        }
        for reg in self.fig2_methods() {
            for &rate in &self.rates {
                for &seed in &self.seeds {
                    plan.push(Self::experiment(&self.classes, &Point { regularizer: reg.clone(), rate, seed }));
                }
            }
        }
        for (_, settings) in self.fig3_panels() {
            for reg in settings.iter().chain([&Regularizer::None]) {
                for &rate in &self.f3_rates {
                    for &seed in &self.seeds {
                        plan.push(Self::experiment(&self.classes, &Point { regularizer: reg.clone(), rate, seed }));
                    }
                }
            }
        }
        for reg in self.table1_methods() {
            for &seed in &self.t1_seeds {
                plan.push(Self::experiment(&self.faces, &Point { regularizer: reg.clone(), rate: FACES_NOISE, seed }));
            }
        }
        plan.extend(self.human_plan());
        plan
    }
}

/// Why `quick` does not run F2H.
pub const NOT_AT_THIS_BUDGET: &str =
    "CIFAR-10N's labels need the whole official CIFAR-10 in its order; run `--budget standard` or `full` with --data";

/// F2H's family: F2's data, model and schedule (the whole training set at `full`, a subset at
/// `standard`), its labels replaced by a CIFAR-10N set instead of synthetic noise.
fn human(classes: &Experiment, labels: &str) -> Experiment {
    let mut e = classes.clone();
    e.name = classes.name.replace("cifar10", "cifar10n");
    e.data.noise = crate::config::NoiseConfig {
        kind: NoiseKind::Human,
        labels: labels.into(),
        set: HUMAN_SETS[0].into(),
        ..Default::default()
    };
    e
}

/// Annotation noise of the faces family: 20% of each AU's labels flipped, concentrated on weak
/// (ambiguous) activations, as annotators disagree.
pub const FACES_NOISE: f64 = 0.2;

fn faces(name: &str, train: usize, test: usize, width: f64, epochs: usize) -> Experiment {
    let mut e = base(name, DatasetKind::Faces, train, test, Arch::Resnet8, width, epochs);
    e.data.noise.kind = NoiseKind::Ambiguous;
    e.data.noise.rate = FACES_NOISE;
    e.train.batch_size = 64;
    e.train.lr = 2e-3;
    e
}

/// QAT with the paper's choices: first and last layers at W8/A8, EMA momentum 0.9.
pub fn quantization(weight_bits: u32, act_bits: u32, bn: BnMode) -> Regularizer {
    Regularizer::Quantization(Quantization { weight_bits, act_bits, first_last_bits: 8, bn, ema_momentum: 0.9 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_planned_experiment_is_valid_and_methods_share_their_data() {
        for budget in [Budget::Quick, Budget::Standard, Budget::Full, Budget::Smoke] {
            let p = Protocol::new(budget, Some("data/cifar10"), DeviceKind::Cpu, HUMAN_LABELS);
            let plan = p.plan();
            for e in &plan {
                e.validate().unwrap_or_else(|m| panic!("{budget:?}: {m}: {e:?}"));
            }
            // Fair by construction: per family, only the regularizer, noise rate and seed differ.
            for e in &plan {
                let families = [&p.classes, &p.fig1, &p.faces].into_iter().chain(p.human.as_ref().ok());
                let family = families.into_iter().find(|f| f.name == e.name).unwrap();
                assert_eq!(e.model, family.model);
                assert_eq!(e.train.epochs, family.train.epochs);
                assert_eq!(e.data.train_subset, family.data.train_subset);
            }
        }
    }
}
