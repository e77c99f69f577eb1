//! A run's peak memory, estimated before it starts from the model, the batch and the data, and the
//! memory the machine has left: a run that cannot fit is refused with both figures instead of
//! aborting mid-way.
//!
//! The factors are measured peaks (maximum resident set) of `qat-lab run` with a margin of about
//! 20%; BENCHMARKS.md gives the measurements.

use crate::config::{DeviceKind, Experiment};
use crate::data::DataSize;
use crate::model::resnet::NetSpec;
use anyhow::{bail, Result};

/// The process before any data: code, thread stacks, the allocator's pools (measured ~50 MiB).
const PROCESS: u64 = 64 << 20;
/// Copies of every image alive at once while a dataset is prepared (raw, subset, standardised;
/// measured 2.6).
const DATA_COPIES: u64 = 3;
/// The model's tensors: weights, gradients, two optimiser moments (and an early-stopping snapshot).
const MODEL_COPIES: u64 = 5;
/// Images per evaluation batch ([`super::trainer::evaluate`]). It keeps no graph, so a few maps of
/// the largest layer's size are alive at once (measured 5.5 on ResNet-20, 6.8 on ResNet-8).
const EVAL_BATCH: u64 = 500;
const EVAL_COPIES: f64 = 8.0;

/// A run's memory, by what holds it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub process: u64,
    pub data: u64,
    pub model: u64,
    /// The larger of a training step's activations and gradients, and an evaluation batch's.
    pub activations: u64,
    /// Where the counts of the data are an upper bound (see [`DataSize::exact`]).
    pub exact: bool,
}

impl Footprint {
    /// The estimate for `exp` on data of `size`.
    pub fn estimate(exp: &Experiment, size: &DataSize) -> Footprint {
        let image_bytes = size.shape.iter().product::<usize>() as u64 * 4;
        let spec = NetSpec {
            arch: exp.model.arch,
            width: exp.model.width,
            input: size.shape,
            outputs: size.outputs,
            per_label_heads: false,
        };
        let net = spec.size();
        let per_image = net.conv_outputs_per_image as f64 * 4.0;
        let batch = exp.train.batch_size.min(size.train.max(1)) as f64;
        let method = crate::methods::build(exp);
        let networks = method.networks() as f64;
        let train = networks * batch * per_image * method.step_copies().unwrap_or(STEP_COPIES);
        let eval =
            EVAL_BATCH.min(size.test.max(1) as u64) as f64 * net.largest_output_per_image as f64 * 4.0 * EVAL_COPIES;
        Footprint {
            process: PROCESS,
            data: (size.train + size.test) as u64 * image_bytes * DATA_COPIES,
            model: (networks * (net.params as u64 * 4 * MODEL_COPIES) as f64) as u64,
            activations: train.max(eval) as u64,
            exact: size.exact,
        }
    }

    pub fn total(&self) -> u64 {
        self.process + self.data + self.model + self.activations
    }

    /// What lives in host memory on `device`: on a GPU the activations and the model do not.
    pub fn host(&self, device: DeviceKind) -> u64 {
        match device {
            DeviceKind::Cpu => self.total(),
            DeviceKind::Cuda => self.process + self.data,
        }
    }

    /// One line: the total and its parts.
    pub fn describe(&self) -> String {
        format!("{} {}", self.total_text(), self.parts())
    }

    fn total_text(&self) -> String {
        format!("{}{}", if self.exact { "about " } else { "at most " }, bytes(self.total()))
    }

    fn parts(&self) -> String {
        format!("(data {}, activations {}, model {})", bytes(self.data), bytes(self.activations), bytes(self.model))
    }

    /// Refuses a run whose host memory exceeds `available` (unknown: nothing to check against).
    pub fn check(&self, exp: &Experiment, available: Option<u64>) -> Result<()> {
        let Some(available) = available else { return Ok(()) };
        let needs = self.host(exp.train.device);
        if needs > available {
            bail!(
                "this run needs {} of memory {} at batch {} on {} (width {}), but only {} is available: lower train.batch_size, data.train_subset or data.test_subset, or model.width, or free memory",
                self.total_text(),
                self.parts(),
                exp.train.batch_size,
                exp.model.arch.name(),
                exp.model.width,
                bytes(available)
            );
        }
        Ok(())
    }
}

/// Convolution outputs' worth of tensors that a training step keeps per image (forward results for
/// the backward pass, and the gradients), measured 2.5 (ResNet-20) to 3.4 (ResNet-8) in float; a
/// method that keeps more says so ([`crate::methods::Method::step_copies`]).
const STEP_COPIES: f64 = 4.0;

/// Memory the machine can still give this process: the kernel's `MemAvailable`, lowered to what the
/// cgroup (a container's or a Slurm job's limit) leaves. `None` where neither can be read.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_available(&t));
    let cgroup = cgroup_left(
        std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().as_deref(),
        std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok().as_deref(),
    );
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup v2 limit minus its use; `None` without a limit (`max`) or a readable use.
fn cgroup_left(max: Option<&str>, current: Option<&str>) -> Option<u64> {
    let max: u64 = max?.trim().parse().ok()?;
    let current: u64 = current?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Bytes as MiB or GiB, one decimal.
pub fn bytes(n: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let mib = n as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatasetKind, Regularizer, Robust};

    fn demo() -> Experiment {
        Experiment::load(&crate::config::resolve_preset("demo"), &[]).unwrap()
    }

    fn size(train: usize) -> DataSize {
        DataSize { shape: [3, 32, 32], train, test: 1000, outputs: 10, exact: true }
    }

    #[test]
    fn grows_with_the_batch_and_the_data_and_matches_the_measured_peak() {
        let mut exp = demo();
        exp.model.arch = crate::config::Arch::Resnet20;
        exp.train.batch_size = 512;
        // Measured peak of this run (1024 train / 256 test, ResNet-20, batch 512): 1,065 MiB.
        let fp = Footprint::estimate(&exp, &DataSize { test: 256, ..size(1024) });
        let mib = fp.total() >> 20;
        assert!((1065..1065 * 2).contains(&mib), "{}", fp.describe());
        exp.train.batch_size = 128;
        let smaller = Footprint::estimate(&exp, &DataSize { test: 256, ..size(1024) });
        assert!(smaller.activations < fp.activations / 3, "{smaller:?} vs {fp:?}");
        assert!(Footprint::estimate(&exp, &size(50_000)).data > 10 * Footprint::estimate(&exp, &size(2_000)).data);
    }

    #[test]
    fn folded_quantization_needs_more_than_the_baseline() {
        let mut base = demo();
        // At the demo's batch of 64 an evaluation batch of 500 needs more than a training step.
        base.train.batch_size = 256;
        let mut qat = base.clone();
        qat.regularizer = Regularizer::default_for("quantization").unwrap();
        let (a, b) = (Footprint::estimate(&base, &size(3000)), Footprint::estimate(&qat, &size(3000)));
        assert!(b.activations > a.activations, "{a:?} {b:?}");
        let mut two = base.clone();
        two.robust = Robust::default_for("co_teaching").unwrap();
        let c = Footprint::estimate(&two, &size(3000));
        assert_eq!((c.activations, c.model), (2 * a.activations, 2 * a.model), "co-teaching trains two networks");
    }

    #[test]
    fn a_run_that_cannot_fit_is_refused_with_both_figures() {
        let exp = demo();
        let fp = Footprint::estimate(&exp, &size(3000));
        assert!(fp.check(&exp, Some(fp.total() + 1)).is_ok());
        assert!(fp.check(&exp, None).is_ok(), "unknown memory refuses nothing");
        let err = fp.check(&exp, Some(100 << 20)).unwrap_err().to_string();
        assert!(err.contains("100 MiB is available") && err.contains(&bytes(fp.total())), "{err}");
        assert!(err.contains("train.batch_size"), "{err}");
        // On a GPU only the data and the process must fit in host memory.
        let mut gpu = exp.clone();
        gpu.train.device = DeviceKind::Cuda;
        assert!(fp.check(&gpu, Some(fp.process + fp.data)).is_ok());
    }

    #[test]
    fn the_expected_size_of_every_builtin_dataset() {
        let mut exp = demo();
        let size = DataSize::expected(&exp.data).unwrap();
        assert_eq!((size.train, size.test, size.exact), (3000, 1000, true), "{size:?}");
        exp.data.dataset = DatasetKind::Cifar10;
        exp.data.train_subset = 0;
        let cifar = DataSize::expected(&exp.data).unwrap();
        assert_eq!((cifar.train, cifar.exact), (50_000, false));
        assert!(Footprint::estimate(&exp, &cifar).describe().starts_with("at most"));
        exp.data.dataset = DatasetKind::Folder;
        assert_eq!(DataSize::expected(&exp.data), None, "a folder's size is known after loading");
    }

    #[test]
    fn reads_meminfo_and_cgroup_limits() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(cgroup_left(Some("max\n"), Some("5\n")), None);
        assert_eq!(cgroup_left(Some("1000\n"), Some("400\n")), Some(600));
        assert_eq!(cgroup_left(Some("1000\n"), None), None);
        assert_eq!(bytes(1536 << 20), "1.5 GiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
    }
}
