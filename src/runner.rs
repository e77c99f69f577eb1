//! The one runner behind every multi-run command (`sweep`, `paper`). It
//! - reuses grid points whose finished record is already in the out folder, resumes those whose run
//!   was cut short from its checkpoint (a killed command, a preempted cluster task, goes on where it
//!   stopped), and trains a point planned twice only once;
//! - trains the rest a few at a time, with a progress bar of runs done, runs left and the ETA;
//! - honours the process-wide stop ([`crate::signals`]): the current runs end as `stopped`, nothing
//!   more starts;
//! - names the records in the out folder it could not read.

use crate::config::Experiment;
use crate::runs::{self, RunRecord, Unreadable};
use crate::signals;
use crate::train::{self, RunOptions, Summary, TrainEvent};
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

/// How the runner trains.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Runs trained at the same time (they share the compute threads).
    pub parallel: usize,
    /// Draw a progress bar (else one line per finished run).
    pub progress: bool,
    /// The grid index of the plan's first experiment: run folders are tagged `g<index>`, so that
    /// ids stay apart across the tasks of a cluster job.
    pub first_index: usize,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self { parallel: 1, progress: false, first_index: 0 }
    }
}

/// What a batch of runs left behind.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One per planned experiment, in plan order: its finished record, when it has one.
    pub records: Vec<Option<RunRecord>>,
    /// Distinct planned experiments found finished in the out folder and not trained again.
    pub reused: usize,
    /// Runs trained by this call.
    pub trained: usize,
    /// A stop signal ended the batch early.
    pub stopped: bool,
    /// Summaries of the runs this call trained, in the order they finished.
    pub summaries: Vec<Summary>,
    /// Records in the out folder that could not be read.
    pub unreadable: Vec<Unreadable>,
}

impl Outcome {
    /// The finished records, in plan order.
    pub fn finished(&self) -> Vec<RunRecord> {
        self.records.iter().flatten().cloned().collect()
    }
}

/// The finished record of `exp` in a scan of the out folder, if any (the newest when there are several).
pub fn find_finished<'a>(records: &'a [RunRecord], exp: &Experiment) -> Option<&'a RunRecord> {
    records.iter().rev().find(|r| r.is_result() && &r.experiment == exp)
}

/// The newest record of `exp` that was cut short and can go on from its checkpoint, if any.
pub fn find_resumable<'a>(records: &'a [RunRecord], exp: &Experiment) -> Option<&'a RunRecord> {
    records.iter().rev().find(|r| r.resumable() && &r.experiment == exp)
}

/// Trains every experiment of `plan` that has no finished record under `out` yet.
pub fn run(plan: &[Experiment], out: &Path, opts: &RunnerOptions) -> Result<Outcome> {
    signals::install();
    let scan = runs::scan(out);
    let mut outcome = Outcome { unreadable: scan.unreadable.clone(), ..Default::default() };
    // The distinct experiments still to train, in plan order, with their grid index and the folder
    // of a cut-short run to resume.
    let mut todo: Vec<Todo> = Vec::new();
    for (i, exp) in plan.iter().enumerate() {
        if find_finished(&scan.records, exp).is_some() || todo.iter().any(|t| t.exp == exp) {
            continue;
        }
        let resume = find_resumable(&scan.records, exp).map(|r| r.dir.clone());
        todo.push(Todo { exp, index: opts.first_index + i, resume });
    }
    let resuming = todo.iter().filter(|t| t.resume.is_some()).count();
    if resuming > 0 {
        eprintln!("{resuming} cut-short run(s) go on from their checkpoints in {}", out.display());
    }
    let mut distinct: Vec<&Experiment> = Vec::new();
    for exp in plan {
        if !distinct.contains(&exp) {
            distinct.push(exp);
        }
    }
    outcome.reused = distinct.len() - todo.len();
    if outcome.reused > 0 {
        eprintln!("{} of {} runs already finished in {}: reused", outcome.reused, distinct.len(), out.display());
    }
    if let Some(note) = scan.unreadable_note() {
        eprintln!("{note}");
    }
    train_all(&todo, out, opts, &mut outcome)?;
    let after = runs::scan(out);
    outcome.records = plan.iter().map(|e| find_finished(&after.records, e).cloned()).collect();
    outcome.unreadable = after.unreadable;
    Ok(outcome)
}

struct Todo<'a> {
    exp: &'a Experiment,
    index: usize,
    resume: Option<std::path::PathBuf>,
}

struct Active {
    control: train::RunControl,
    events: tokio::sync::mpsc::UnboundedReceiver<TrainEvent>,
    handle: std::thread::JoinHandle<Summary>,
    epochs_seen: u64,
    epochs: u64,
}

fn train_all(todo: &[Todo], out: &Path, opts: &RunnerOptions, outcome: &mut Outcome) -> Result<()> {
    let total_epochs: u64 = todo.iter().map(|t| t.exp.train.epochs as u64).sum();
    let bar = if opts.progress && !todo.is_empty() {
        indicatif::ProgressBar::new(total_epochs)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {msg} | {elapsed} spent, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let message = |done: usize, running: usize| {
        format!("runs {done}/{} done, {running} running, {} left", todo.len(), todo.len() - done - running)
    };
    bar.set_message(message(0, 0));
    let mut queue = todo.iter();
    let mut active: Vec<Active> = Vec::new();
    let mut done = 0usize;
    let mut finished_epochs = 0u64;
    loop {
        while active.len() < opts.parallel.max(1) && !signals::stopping() {
            let Some(next) = queue.next() else { break };
            let exp = next.exp;
            let run_opts = RunOptions {
                runs_root: out.to_path_buf(),
                batch_events_every: 0,
                tag: Some(format!("g{}", next.index)),
                resume: next.resume.clone(),
            };
            let (control, events, handle) = train::spawn(exp.clone(), run_opts);
            signals::register(&control);
            active.push(Active { control, events, handle, epochs_seen: 0, epochs: exp.train.epochs as u64 });
        }
        if active.is_empty() {
            break;
        }
        let mut progressed = false;
        let mut i = 0;
        while i < active.len() {
            let mut ended = false;
            while let Ok(ev) = active[i].events.try_recv() {
                progressed = true;
                match ev {
                    TrainEvent::Epoch(_) => {
                        active[i].epochs_seen += 1;
                        bar.inc(1);
                    }
                    TrainEvent::Finished(_) => ended = true,
                    _ => {}
                }
            }
            if ended {
                let a = active.swap_remove(i);
                signals::unregister(&a.control);
                let summary = a.handle.join().map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
                // Runs that end early (early stopping, a failure) count all their epochs as done.
                finished_epochs += a.epochs;
                bar.set_position(finished_epochs + active.iter().map(|a| a.epochs_seen).sum::<u64>());
                done += 1;
                let line = format!(
                    "[{done}/{}] {} [{}]: {} after {} epochs{}",
                    todo.len(),
                    summary.name,
                    summary.label,
                    summary.status.name(),
                    summary.epochs_run,
                    summary.final_eval_acc.map(|a| format!(", final {:.2}%", a * 100.0)).unwrap_or_default()
                );
                if opts.progress {
                    bar.println(line);
                } else {
                    eprintln!("{line}");
                }
                outcome.trained += 1;
                outcome.summaries.push(summary);
            } else {
                i += 1;
            }
        }
        bar.set_message(message(done, active.len()));
        if !progressed {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    bar.finish_and_clear();
    outcome.stopped = signals::stopping();
    Ok(())
}
