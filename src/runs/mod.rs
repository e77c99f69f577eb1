//! Run records on disk: `runs/<id>/` with `experiment.toml`, `metrics.jsonl`, `summary.json` and the
//! weights as safetensors. Every file is written atomically (temp file, fsync, rename), so a crash or a
//! Ctrl-C never leaves a half-written record.

use crate::config::Experiment;
pub mod record;

use anyhow::{Context, Result};
pub use record::{kib, EpochMetrics, ModelSize, Status, Summary};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const EXPERIMENT_FILE: &str = "experiment.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
/// Weights the run keeps (last epoch, or best-validation under early stopping).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Where an unfinished run can be resumed from (see `train::checkpoint`); removed once it ends.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Default folder for run records.
pub fn default_root() -> PathBuf {
    std::env::var("QAT_LAB_RUNS").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("runs"))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_default()
    ));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The folder of one run.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `root/<utc timestamp>-<name>-<regularizer>[-<tag>]` (with a suffix if taken) and writes
    /// the experiment. A sweep's tag is the grid index, so that ids stay apart across cluster nodes.
    pub fn create(root: &Path, exp: &Experiment, tag: Option<&str>) -> Result<RunDir> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create the runs folder {}; choose another with --out", root.display()))?;
        let now = time::OffsetDateTime::now_utc();
        let stamp = now
            .format(&time::macros::format_description!("[year][month][day]-[hour][minute][second]"))
            .unwrap_or_default();
        let mut base = format!("{stamp}-{}-{}", slug(&exp.name), slug(&exp.method_label()));
        if let Some(tag) = tag {
            base = format!("{base}-{}", slug(tag));
        }
        // create_dir is the test and the claim at once: two runs starting in the same second (a
        // sweep's parallel runs, another process) never share a folder.
        let mut n = 1;
        let path = loop {
            let path = if n == 1 { root.join(&base) } else { root.join(format!("{base}-{n}")) };
            match std::fs::create_dir(&path) {
                Ok(()) => break path,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let dir = RunDir { path };
        write_atomic(&dir.path.join(EXPERIMENT_FILE), exp.to_toml().as_bytes())?;
        Ok(dir)
    }

    /// An existing run folder, to resume.
    pub fn open(path: &Path) -> Result<RunDir> {
        if !path.join(EXPERIMENT_FILE).is_file() {
            anyhow::bail!("{} is not a run folder (no {EXPERIMENT_FILE}); runs live under runs/<id>/", path.display());
        }
        Ok(RunDir { path: path.to_path_buf() })
    }

    pub fn id(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    }

    /// Rewrites `metrics.jsonl` with every epoch so far (small, and atomic).
    pub fn write_metrics(&self, metrics: &[EpochMetrics]) -> Result<()> {
        let mut text = String::new();
        for m in metrics {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        write_atomic(&self.path.join(METRICS_FILE), text.as_bytes())
    }

    pub fn write_summary(&self, summary: &Summary) -> Result<()> {
        write_atomic(&self.path.join(SUMMARY_FILE), serde_json::to_string_pretty(summary)?.as_bytes())
    }

    pub fn weights_path(&self) -> PathBuf {
        self.path.join(WEIGHTS_FILE)
    }
}

fn slug(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').chars().take(40).collect()
}

/// A run read back from disk.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    pub experiment: Experiment,
    pub metrics: Vec<EpochMetrics>,
    /// `None` if the run never got as far as writing one.
    pub summary: Option<Summary>,
}

impl RunRecord {
    /// The class or label names of the run's outputs, from its summary. Records of format 0 did not
    /// store them; their multi-label runs all had the paper's 12 AUs, in the paper's order.
    pub fn label_names(&self) -> Vec<String> {
        match &self.summary {
            Some(s) if !s.classes.is_empty() => s.classes.clone(),
            _ if self.experiment.data.dataset.is_multi_label() => crate::data::faces::au_names(),
            _ => Vec::new(),
        }
    }

    pub fn id(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    }

    /// Whether the run ended as planned (completed, or early-stopped): only such runs enter means.
    pub fn finished_ok(&self) -> bool {
        matches!(self.summary.as_ref().map(|s| s.status), Some(Status::Completed | Status::EarlyStopped))
    }

    /// Whether the run ended early (stopped, killed, failed) with a checkpoint to go on from.
    pub fn resumable(&self) -> bool {
        !self.is_result() && self.dir.join(CHECKPOINT_FILE).is_file()
    }

    /// Whether the run has ended for good (including by diverging): a multi-run command reuses it
    /// instead of training it again.
    pub fn is_result(&self) -> bool {
        self.finished_ok() || matches!(self.summary.as_ref().map(|s| s.status), Some(Status::Diverged))
    }
}

/// Reads a run folder. Missing metrics or summary are allowed (a run that just started or crashed).
pub fn load(dir: &Path) -> Result<RunRecord> {
    let exp_path = dir.join(EXPERIMENT_FILE);
    if !exp_path.is_file() {
        anyhow::bail!("{} is not a run folder (no {EXPERIMENT_FILE}); runs live under runs/<id>/", dir.display());
    }
    let experiment = Experiment::load(&exp_path, &[])?;
    let mut metrics = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join(METRICS_FILE)) {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            metrics.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}: line {} is not valid", dir.join(METRICS_FILE).display(), i + 1))?,
            );
        }
    }
    let summary = match std::fs::read_to_string(dir.join(SUMMARY_FILE)) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid", dir.join(SUMMARY_FILE).display()))?,
        ),
        Err(_) => None,
    };
    Ok(RunRecord { dir: dir.to_path_buf(), experiment, metrics, summary })
}

/// A run folder that could not be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub dir: PathBuf,
    pub reason: String,
}

/// Every run folder under a root: the records read, and the folders that could not be.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub records: Vec<RunRecord>,
    pub unreadable: Vec<Unreadable>,
}

impl Scan {
    /// One line per unreadable record (path and reason), for readers to print beside what they show.
    pub fn unreadable_note(&self) -> Option<String> {
        if self.unreadable.is_empty() {
            return None;
        }
        let mut out = format!("{} run record(s) could not be read and are left out:", self.unreadable.len());
        for u in &self.unreadable {
            out.push_str(&format!("\n  {}: {}", u.dir.display(), u.reason));
        }
        Some(out)
    }
}

/// Reads every run folder (one holding an `experiment.toml`) under `root`, oldest first.
pub fn scan(root: &Path) -> Scan {
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| p.join(EXPERIMENT_FILE).is_file()).collect(),
        Err(_) => return Scan::default(),
    };
    dirs.sort();
    let mut scan = Scan::default();
    for d in dirs {
        match load(&d) {
            Ok(r) => scan.records.push(r),
            Err(e) => scan.unreadable.push(Unreadable { dir: d, reason: format!("{e:#}") }),
        }
    }
    scan
}

/// Every readable run under `root`, oldest first ([`scan`] also says which could not be read).
pub fn list(root: &Path) -> Vec<RunRecord> {
    scan(root).records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_names_are_unique() {
        let root = tempfile::tempdir().unwrap();
        let exp = Experiment { name: "Fig 1: baseline".into(), ..Default::default() };
        let a = RunDir::create(root.path(), &exp, None).unwrap();
        let b = RunDir::create(root.path(), &exp, Some("g7")).unwrap();
        assert!(b.id().ends_with("-g7"), "{}", b.id());
        assert_ne!(a.path, b.path);
        assert!(a.id().contains("fig-1-baseline-baseline"), "{}", a.id());
        let m = EpochMetrics { epoch: 1, eval_acc: 0.5, ..Default::default() };
        a.write_metrics(&[m.clone(), EpochMetrics { epoch: 2, ..m.clone() }]).unwrap();
        let rec = load(&a.path).unwrap();
        assert_eq!(rec.experiment, exp);
        assert_eq!(rec.metrics.len(), 2);
        assert!(rec.summary.is_none());
        assert_eq!(list(root.path()).len(), 2);
        // No temp files left behind.
        assert!(std::fs::read_dir(&a.path).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".tmp")));
        assert!(load(root.path()).unwrap_err().to_string().contains("not a run folder"));
    }
}
