//! Sweeps and `paper` as Slurm job arrays: one array task per distinct grid point. Each task runs
//! the same qat-lab command with `--task $SLURM_ARRAY_TASK_ID`, so its grid point comes from the
//! preset itself and no list of commands can get out of step with it. Slurm does the scheduling,
//! the retries (`--requeue`) and the preemption; the runs write into one shared out folder, resume
//! from their checkpoints, and skip grid points already finished.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The resources and behaviour asked of Slurm (`--slurm` and its companion flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SlurmArgs {
    /// Write a Slurm job-array script (one task per grid point) into the out folder instead of
    /// training here; with --submit, also submit it.
    #[arg(long)]
    pub slurm: bool,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    pub partition: Option<String>,
    /// GPUs per task (the runs then train with --device cuda).
    #[arg(long, requires = "slurm")]
    pub gpus_per_task: Option<u32>,
    /// Cores per task; the task trains with as many threads (1 when not given).
    #[arg(long, requires = "slurm")]
    pub cpus_per_task: Option<u32>,
    /// Time limit per task, [D-]HH:MM:SS.
    #[arg(long, requires = "slurm")]
    pub time: Option<String>,
    /// Tasks running at once (the `%K` of --array).
    #[arg(long, requires = "slurm")]
    pub max_parallel: Option<usize>,
    /// Submit the script with sbatch and print the job id.
    #[arg(long, requires = "slurm")]
    pub submit: bool,
}

/// One job array: `tasks` runs of `command` (argv, without `--task`).
#[derive(Debug, Clone)]
pub struct ArrayJob {
    /// Names the job and its script (`<out>/slurm/<name>.sbatch`).
    pub name: String,
    pub tasks: usize,
    pub command: Vec<String>,
    /// The out folder: the script, and the tasks' logs under `slurm/`.
    pub out: PathBuf,
    /// Where the tasks start (relative paths in `command` are relative to it).
    pub workdir: PathBuf,
}

impl SlurmArgs {
    /// Refuses values Slurm would refuse later, with the flag's name.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.time {
            if !valid_time(t) {
                bail!("--time {t}: expected [D-]HH:MM:SS, e.g. --time 02:00:00 or --time 1-12:00:00");
            }
        }
        for (flag, v) in [("--cpus-per-task", self.cpus_per_task), ("--gpus-per-task", self.gpus_per_task)] {
            if v == Some(0) {
                bail!("{flag} 0: give at least 1, or leave the flag out");
            }
        }
        if self.max_parallel == Some(0) {
            bail!("--max-parallel 0 would run no task: give at least 1, or leave it out for no limit");
        }
        if let Some(p) = &self.partition {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                bail!("--partition {p:?}: a partition name is letters, digits, '-', '_' or '.'");
            }
        }
        Ok(())
    }

    /// The sbatch script of `job`.
    pub fn script(&self, job: &ArrayJob) -> String {
        let logs = job.out.join("slurm");
        let mut lines = vec![
            "#!/bin/bash".to_string(),
            format!("#SBATCH --job-name={}", job.name),
            format!(
                "#SBATCH --array=0-{}{}",
                job.tasks.saturating_sub(1),
                self.max_parallel.map(|k| format!("%{k}")).unwrap_or_default()
            ),
            format!("#SBATCH --output={}/%A_%a.out", logs.display()),
            format!("#SBATCH --chdir={}", job.workdir.display()),
            // A preempted or failed node puts the task back in the queue; it resumes from its checkpoint.
            "#SBATCH --requeue".to_string(),
            format!("#SBATCH --cpus-per-task={}", self.cpus_per_task.unwrap_or(1)),
        ];
        if let Some(g) = self.gpus_per_task {
            lines.push(format!("#SBATCH --gpus-per-task={g}"));
        }
        if let Some(p) = &self.partition {
            lines.push(format!("#SBATCH --partition={p}"));
        }
        if let Some(t) = &self.time {
            lines.push(format!("#SBATCH --time={t}"));
        }
        lines.push(String::new());
        lines.push(format!("# Written by qat-lab; task i trains grid point i of {} (0-based).", job.tasks));
        lines.push("set -eu".into());
        lines.push("export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"".into());
        // exec: Slurm's SIGTERM (preemption, scancel, requeue) reaches qat-lab itself, which stops cleanly.
        let argv: Vec<String> = job.command.iter().map(|a| shell_quote(a)).collect();
        lines.push(format!("exec {} --task \"$SLURM_ARRAY_TASK_ID\"", argv.join(" ")));
        lines.join("\n") + "\n"
    }

    /// Writes the script of `job` (and its log folder); returns the script's path.
    pub fn write(&self, job: &ArrayJob) -> Result<PathBuf> {
        let logs = job.out.join("slurm");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}; choose another --out", logs.display()))?;
        let path = logs.join(format!("{}.sbatch", job.name));
        crate::runs::write_atomic(&path, self.script(job).as_bytes())?;
        Ok(path)
    }
}

/// Submits a script with `sbatch --parsable`; returns the job id.
pub fn submit(script: &Path) -> Result<String> {
    let out = Command::new("sbatch").arg("--parsable").arg(script).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run sbatch ({e}): submit from a Slurm login node, or leave out --submit and copy the script there"
        )
    })?;
    if !out.status.success() {
        bail!("sbatch refused {}: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `jobid[;cluster]`.
    let id = text.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch answered {text:?}, not a job id");
    }
    Ok(id)
}

/// The task index this process was started for: `--task N` as given, checked against the array.
pub fn check_task(task: usize, tasks: usize) -> Result<()> {
    if task >= tasks {
        bail!("--task {task}: this grid has {tasks} points, so tasks run from 0 to {}", tasks.saturating_sub(1));
    }
    Ok(())
}

/// Job names are safe in a file name and on sbatch's command line.
pub fn job_name(parts: &[&str]) -> String {
    let joined = parts.join("-");
    let name: String =
        joined.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    format!("qat-lab-{}", name.trim_matches('-'))
}

fn valid_time(t: &str) -> bool {
    let (days, clock) = match t.split_once('-') {
        Some((d, c)) => (Some(d), c),
        None => (None, t),
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 3 && s.chars().all(|c| c.is_ascii_digit());
    let parts: Vec<&str> = clock.split(':').collect();
    days.is_none_or(digits)
        && parts.len() == 3
        && parts.iter().all(|p| digits(p))
        && parts[1].parse::<u32>().is_ok_and(|m| m < 60)
        && parts[2].parse::<u32>().is_ok_and(|s| s < 60)
}

/// Single-quotes `s` for bash unless it is plainly safe.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> ArrayJob {
        ArrayJob {
            name: job_name(&["sweep", "demo-sweep-digits"]),
            tasks: 6,
            command: vec!["/opt/qat lab/qat-lab".into(), "sweep".into(), "it's".into(), "--set".into(), "a=1".into()],
            out: PathBuf::from("/scratch/out"),
            workdir: PathBuf::from("/home/me"),
        }
    }

    #[test]
    fn the_script_asks_for_the_array_and_the_resources_and_runs_each_task_by_index() {
        let args = SlurmArgs {
            slurm: true,
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            cpus_per_task: Some(8),
            time: Some("1-02:00:00".into()),
            max_parallel: Some(3),
            submit: false,
        };
        args.validate().unwrap();
        let s = args.script(&job());
        for want in [
            "#SBATCH --job-name=qat-lab-sweep-demo-sweep-digits",
            "#SBATCH --array=0-5%3",
            "#SBATCH --output=/scratch/out/slurm/%A_%a.out",
            "#SBATCH --chdir=/home/me",
            "#SBATCH --requeue",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --gpus-per-task=1",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=1-02:00:00",
            "exec '/opt/qat lab/qat-lab' sweep 'it'\\''s' --set a=1 --task \"$SLURM_ARRAY_TASK_ID\"",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        let plain = SlurmArgs { slurm: true, ..Default::default() }.script(&job());
        assert!(plain.contains("#SBATCH --array=0-5\n") && !plain.contains("--gpus") && !plain.contains("--time"));
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        let bad = |a: SlurmArgs| a.validate().unwrap_err().to_string();
        assert!(bad(SlurmArgs { time: Some("2h".into()), ..Default::default() }).contains("--time 2h"));
        assert!(bad(SlurmArgs { time: Some("01:60:00".into()), ..Default::default() }).contains("--time"));
        assert!(bad(SlurmArgs { cpus_per_task: Some(0), ..Default::default() }).contains("--cpus-per-task 0"));
        assert!(bad(SlurmArgs { max_parallel: Some(0), ..Default::default() }).contains("--max-parallel 0"));
        assert!(bad(SlurmArgs { partition: Some("a b".into()), ..Default::default() }).contains("--partition"));
        assert!(SlurmArgs { time: Some("00:05:00".into()), ..Default::default() }.validate().is_ok());
        assert!(check_task(6, 6).unwrap_err().to_string().contains("from 0 to 5"));
        assert!(check_task(5, 6).is_ok());
    }
}
