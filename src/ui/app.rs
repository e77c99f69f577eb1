//! Lab state and what keys and training events do to it. No terminal I/O here: the loop in
//! [`super::run_lab`] feeds events in and carries out the returned [`Command`]s, and the views only read.

use super::setup::SetupForm;
use crate::config::{Experiment, Regularizer, Robust};
use crate::runs::RunRecord;
use crate::train::events::BatchProgress;
use crate::train::{EpochMetrics, RunControl, RunInfo, Status, Summary, TrainEvent};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::time::Instant;

/// Screens of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    Setup,
    Live,
    Compare,
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Queued,
    Running,
    Paused,
    /// Finished (any status), or loaded from disk.
    Done,
}

/// One run as the lab sees it: its record (filled live from events) and live extras.
#[derive(Debug, Clone)]
pub struct RunView {
    /// Stable identity inside the lab (indices shift when runs are removed).
    pub uid: u64,
    pub record: RunRecord,
    pub info: Option<RunInfo>,
    pub batch: Option<BatchProgress>,
    pub state: RunState,
    pub control: Option<RunControl>,
    pub started: Option<Instant>,
    /// Included in the overlay charts and the compare table.
    pub checked: bool,
}

impl RunView {
    pub fn queued(experiment: Experiment) -> Self {
        Self {
            uid: next_uid(),
            record: RunRecord { dir: Default::default(), experiment, metrics: Vec::new(), summary: None },
            info: None,
            batch: None,
            state: RunState::Queued,
            control: None,
            started: None,
            checked: true,
        }
    }

    pub fn loaded(record: RunRecord) -> Self {
        Self {
            uid: next_uid(),
            record,
            info: None,
            batch: None,
            state: RunState::Done,
            control: None,
            started: None,
            checked: true,
        }
    }

    /// Class or label names: the live run's, else its record's.
    pub fn label_names(&self) -> Vec<String> {
        match &self.info {
            Some(info) => info.classes.clone(),
            None => self.record.label_names(),
        }
    }

    pub fn label(&self) -> String {
        self.record.experiment.method_label()
    }

    pub fn metrics(&self) -> &[EpochMetrics] {
        &self.record.metrics
    }

    pub fn summary(&self) -> Option<&Summary> {
        self.record.summary.as_ref()
    }

    /// Text for the state column.
    pub fn state_text(&self) -> String {
        match self.state {
            RunState::Queued => "queued".into(),
            RunState::Running => "running".into(),
            RunState::Paused => "paused".into(),
            RunState::Done => crate::report::status_name(&self.record).into(),
        }
    }

    /// Fraction of the run done, counting batches of the current epoch.
    pub fn progress(&self) -> f64 {
        let epochs = self.record.experiment.train.epochs.max(1) as f64;
        if self.state == RunState::Done {
            return 1.0;
        }
        let done = self.record.metrics.len() as f64;
        let partial = match &self.batch {
            Some(b) if b.epoch as f64 > done => b.batch as f64 / b.batches.max(1) as f64,
            _ => 0.0,
        };
        ((done + partial) / epochs).min(1.0)
    }

    /// Seconds left, from the time spent so far.
    pub fn eta_secs(&self) -> Option<f64> {
        let started = self.started?;
        let p = self.progress();
        (p > 0.01 && self.state != RunState::Done).then(|| started.elapsed().as_secs_f64() * (1.0 - p) / p)
    }
}

/// What `a` compares: the paper's seven regularizers, then each noisy-label loss alone.
fn every_method() -> Vec<(Regularizer, Robust)> {
    let regularizers = Regularizer::all_defaults().into_iter().map(|r| (r, Robust::None));
    let robust = Robust::all_defaults().into_iter().skip(1).map(|r| (Regularizer::None, r));
    regularizers.chain(robust).collect()
}

fn next_uid() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What the event loop must do after a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Quit,
    /// Start queued runs if slots are free.
    Schedule,
    /// Reload finished runs from the runs folder.
    LoadRuns,
}

/// The whole lab state.
/// A line for the status bar: what happened, and whether it went wrong (shown in red).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

impl Notice {
    pub fn info(text: impl Into<String>) -> Self {
        Self { text: text.into(), error: false }
    }
    pub fn error(text: impl Into<String>) -> Self {
        Self { text: text.into(), error: true }
    }
}

pub struct App {
    pub screen: Screen,
    pub setup: SetupForm,
    pub runs: Vec<RunView>,
    /// Run shown in detail on the live screen.
    pub selected: usize,
    pub log: Vec<String>,
    pub show_help: bool,
    pub ascii: bool,
    pub confirm_quit: bool,
    /// A message for the status line.
    pub status: Option<Notice>,
    /// Compare screen: plot accuracy (true) or eval loss.
    pub compare_acc: bool,
    /// Memory the machine had free when the lab opened, beside Setup's estimate (`None`: unknown).
    pub available_memory: Option<u64>,
}

impl App {
    pub fn new(setup: SetupForm) -> Self {
        Self {
            screen: Screen::Setup,
            setup,
            runs: Vec::new(),
            selected: 0,
            log: Vec::new(),
            show_help: false,
            ascii: false,
            confirm_quit: false,
            status: None,
            compare_acc: true,
            available_memory: None,
        }
    }

    pub fn running_count(&self) -> usize {
        self.runs.iter().filter(|r| matches!(r.state, RunState::Running | RunState::Paused)).count()
    }

    pub fn push_log(&mut self, line: String) {
        self.log.push(line);
        if self.log.len() > 500 {
            self.log.drain(..100);
        }
    }

    fn queue(&mut self, exps: Vec<Experiment>) -> Vec<Command> {
        let n = exps.len();
        let first = self.runs.len();
        for e in exps {
            self.runs.push(RunView::queued(e));
        }
        self.selected = first;
        self.screen = Screen::Live;
        self.status = Some(Notice::info(format!("queued {n} run{}", if n == 1 { "" } else { "s" })));
        vec![Command::Schedule]
    }

    /// Applies a key; returns what the loop must do.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Command> {
        let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
        if self.confirm_quit {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => vec![Command::Quit],
                _ if ctrl_c => vec![Command::Quit],
                _ => {
                    self.confirm_quit = false;
                    Vec::new()
                }
            };
        }
        if self.setup.editing.is_some() {
            match key.code {
                KeyCode::Enter | KeyCode::Esc => {
                    self.setup.toggle_edit();
                }
                KeyCode::Backspace => {
                    if let Some(t) = self.setup.editing.as_mut() {
                        t.pop();
                    }
                }
                KeyCode::Char(c) if !ctrl_c => {
                    if let Some(t) = self.setup.editing.as_mut() {
                        t.push(c);
                    }
                }
                _ => {}
            }
            return Vec::new();
        }
        if self.show_help {
            self.show_help = false;
            return Vec::new();
        }
        match key.code {
            // q quits from anywhere; Esc only from the first screen (elsewhere it would be too easy to hit).
            KeyCode::Char('q') => return self.ask_quit(),
            KeyCode::Esc if self.screen == Screen::Setup => return self.ask_quit(),
            _ if ctrl_c => return self.ask_quit(),
            KeyCode::Char('?') => self.show_help = true,
            KeyCode::Char('1') | KeyCode::F(1) => self.screen = Screen::Setup,
            KeyCode::Char('2') | KeyCode::F(2) => self.screen = Screen::Live,
            KeyCode::Char('3') | KeyCode::F(3) => self.screen = Screen::Compare,
            KeyCode::Tab => {
                self.screen = match self.screen {
                    Screen::Setup => Screen::Live,
                    Screen::Live => Screen::Compare,
                    Screen::Compare => Screen::Setup,
                }
            }
            KeyCode::Char('g') => {
                self.ascii = !self.ascii;
                let mode = if self.ascii { "ASCII" } else { "Unicode (braille)" };
                self.status = Some(Notice::info(format!("charts in {mode}")));
            }
            _ => {
                return match self.screen {
                    Screen::Setup => self.on_setup_key(key),
                    Screen::Live | Screen::Compare => self.on_runs_key(key),
                }
            }
        }
        Vec::new()
    }

    fn ask_quit(&mut self) -> Vec<Command> {
        if self.running_count() > 0 {
            self.confirm_quit = true;
            Vec::new()
        } else {
            vec![Command::Quit]
        }
    }

    fn on_setup_key(&mut self, key: KeyEvent) -> Vec<Command> {
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.setup.move_cursor(-1),
            KeyCode::Down | KeyCode::Char('j') => self.setup.move_cursor(1),
            KeyCode::Left | KeyCode::Char('h') => self.setup.cycle(-1),
            KeyCode::Right | KeyCode::Char('l') => self.setup.cycle(1),
            KeyCode::Enter if self.setup.toggle_edit() => {}
            KeyCode::Enter | KeyCode::Char('s') => match self.setup.build() {
                Ok(e) => return self.queue(vec![e]),
                Err(msg) => self.status = Some(Notice::error(msg)),
            },
            KeyCode::Char('b') => {
                // Baseline vs the chosen method (or vs W4/A4 when the baseline is chosen).
                let e = &self.setup.experiment;
                let other = if e.is_baseline() {
                    (Regularizer::default_for("quantization").expect("known"), Robust::None)
                } else {
                    (e.regularizer.clone(), e.robust.clone())
                };
                match self.setup.variants(&[(Regularizer::None, Robust::None), other]) {
                    Ok(v) => return self.queue(v),
                    Err(msg) => self.status = Some(Notice::error(msg)),
                }
            }
            KeyCode::Char('a') => {
                // Early stopping is one of the paper's six methods and needs held-out data, so every run
                // of the comparison gets the same 10% validation split (shown on the form) rather than
                // leaving the method out.
                let added_val = self.setup.experiment.data.val_fraction == 0.0;
                if added_val {
                    self.setup.experiment.data.val_fraction = 0.1;
                }
                let kinds = every_method();
                match self.setup.variants(&kinds) {
                    Ok(v) => {
                        let cmds = self.queue(v);
                        if added_val {
                            self.status = Some(Notice::info(format!(
                                "queued {} runs, each with a 10% validation split so early stopping can run",
                                kinds.len()
                            )));
                        }
                        return cmds;
                    }
                    Err(msg) => self.status = Some(Notice::error(msg)),
                }
            }
            _ => {}
        }
        Vec::new()
    }

    fn on_runs_key(&mut self, key: KeyEvent) -> Vec<Command> {
        let n = self.runs.len();
        match key.code {
            KeyCode::Up | KeyCode::Char('k') if n > 0 => self.selected = (self.selected + n - 1) % n,
            KeyCode::Down | KeyCode::Char('j') if n > 0 => self.selected = (self.selected + 1) % n,
            KeyCode::Char(' ') if n > 0 => self.runs[self.selected].checked = !self.runs[self.selected].checked,
            KeyCode::Char('p') if n > 0 => {
                let run = &mut self.runs[self.selected];
                if let Some(c) = &run.control {
                    match run.state {
                        RunState::Running => {
                            c.set_paused(true);
                            run.state = RunState::Paused;
                        }
                        RunState::Paused => {
                            c.set_paused(false);
                            run.state = RunState::Running;
                        }
                        _ => {}
                    }
                }
            }
            KeyCode::Char('x') if n > 0 => {
                let run = &mut self.runs[self.selected];
                match run.state {
                    RunState::Running | RunState::Paused => {
                        if let Some(c) = &run.control {
                            c.set_paused(false);
                            c.stop();
                        }
                        self.status = Some(Notice::info("stopping after this batch; the record is kept"));
                    }
                    RunState::Queued => {
                        self.runs.remove(self.selected);
                        self.selected = self.selected.min(self.runs.len().saturating_sub(1));
                    }
                    RunState::Done => {}
                }
            }
            KeyCode::Char('d') | KeyCode::Delete if n > 0 => {
                if matches!(self.runs[self.selected].state, RunState::Running | RunState::Paused) {
                    self.status = Some(Notice::error("stop the run first (x), then remove it (d)"));
                } else {
                    // Removes it from the lab only; the record stays on disk.
                    self.runs.remove(self.selected);
                    self.selected = self.selected.min(self.runs.len().saturating_sub(1));
                }
            }
            KeyCode::Char('r') => return vec![Command::LoadRuns],
            KeyCode::Char('m') => self.compare_acc = !self.compare_acc,
            _ => {}
        }
        Vec::new()
    }

    /// Applies a training event of the run with `uid`.
    pub fn on_train_event(&mut self, uid: u64, event: TrainEvent) {
        let Some(run) = self.runs.iter_mut().find(|r| r.uid == uid) else {
            return;
        };
        let label = run.label();
        match event {
            TrainEvent::Started(info) => {
                run.record.dir = info.dir.clone();
                let line = format!(
                    "[{label}] started {}: {} train images, {:.1}% labels wrong, {} params",
                    info.run_id,
                    info.train_size,
                    info.measured_noise_rate * 100.0,
                    info.params
                );
                run.info = Some(info);
                self.push_log(line);
            }
            TrainEvent::Batch(b) => run.batch = Some(b),
            TrainEvent::Epoch(m) => {
                run.record.metrics.push(m);
            }
            TrainEvent::Log(msg) => self.push_log(format!("[{label}] {msg}")),
            TrainEvent::Finished(s) => {
                run.state = RunState::Done;
                run.control = None;
                let mut line = format!("[{label}] {} after {} epochs", s.status.name(), s.epochs_run);
                if let Some(acc) = s.final_eval_acc {
                    line.push_str(&format!(", eval acc {:.1}%", acc * 100.0));
                }
                if let Some(m) = &s.message {
                    line.push_str(&format!(": {m}"));
                }
                let failed = matches!(s.status, Status::Failed | Status::Diverged);
                run.record.summary = Some(*s);
                if failed {
                    self.status = Some(Notice::error(line.clone()));
                }
                self.push_log(line);
            }
        }
    }

    /// Adds runs read from disk that the lab does not show yet; returns how many.
    pub fn add_loaded(&mut self, records: Vec<RunRecord>) -> usize {
        let mut added = 0;
        for r in records {
            if !self.runs.iter().any(|v| v.record.dir == r.dir) {
                let mut v = RunView::loaded(r);
                v.checked = false;
                self.runs.push(v);
                added += 1;
            }
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Summary;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn app() -> App {
        App::new(SetupForm::new(Vec::new(), 2, false))
    }

    #[test]
    fn typing_a_data_path() {
        let mut a = app();
        a.setup.cursor = crate::ui::setup::FIELDS.iter().position(|f| *f == crate::ui::setup::Field::Path).unwrap();
        a.on_key(key(KeyCode::Enter));
        for c in "/data/x".chars() {
            a.on_key(key(KeyCode::Char(c)));
        }
        a.on_key(key(KeyCode::Backspace));
        a.on_key(key(KeyCode::Char('y')));
        a.on_key(key(KeyCode::Enter));
        assert_eq!(a.setup.experiment.data.path, "/data/y");
        assert!(a.setup.editing.is_none());
    }

    #[test]
    fn all_methods_without_validation_adds_one_so_early_stopping_is_included() {
        let mut a = app();
        assert_eq!(a.setup.experiment.data.val_fraction, 0.0);
        let cmds = a.on_key(key(KeyCode::Char('a')));
        assert_eq!(cmds, vec![Command::Schedule]);
        assert_eq!(a.runs.len(), Regularizer::all_defaults().len() + crate::config::ROBUST_KINDS.len() - 1);
        for kind in &crate::config::ROBUST_KINDS[1..] {
            assert!(a.runs.iter().any(|r| r.record.experiment.robust.kind() == *kind), "{kind} is part of `a`");
        }
        assert!(a.runs.iter().any(|r| matches!(r.record.experiment.regularizer, Regularizer::EarlyStopping(_))));
        assert!(a.runs.iter().all(|r| r.record.experiment.data.val_fraction == 0.1), "the same split for all");
        assert!(a.status.as_ref().unwrap().text.contains("10% validation split"));
    }

    #[test]
    fn a_failed_run_is_shown_in_red_with_its_message() {
        let mut a = app();
        a.on_key(key(KeyCode::Enter));
        let uid = a.runs[0].uid;
        let summary = Summary {
            status: Status::Failed,
            message: Some("CIFAR-10 not found: run `qat-lab data fetch cifar10`".into()),
            ..Summary::started("n", "baseline", 0.4)
        };
        a.on_train_event(uid, TrainEvent::Finished(Box::new(summary)));
        let Notice { text, error } = a.status.clone().unwrap();
        assert!(error && text.contains("data fetch cifar10"), "{text}");
        assert_eq!(a.runs[0].state, RunState::Done);
        // Removing a finished run is allowed; a running one must be stopped first.
        a.on_key(key(KeyCode::Char('d')));
        assert!(a.runs.is_empty());
    }

    #[test]
    fn pause_and_stop_reach_the_worker() {
        let mut a = app();
        a.on_key(key(KeyCode::Enter));
        let control = crate::train::RunControl::default();
        a.runs[0].control = Some(control.clone());
        a.runs[0].state = RunState::Running;
        a.on_key(key(KeyCode::Char('p')));
        assert!(control.is_paused());
        assert_eq!(a.runs[0].state, RunState::Paused);
        a.on_key(key(KeyCode::Char('x')));
        assert!(control.is_stopping());
        assert!(!control.is_paused(), "stopping releases a pause");
    }
}
