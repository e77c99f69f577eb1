//! The interactive lab: ratatui + crossterm on a tokio loop. Training runs in worker threads and talks
//! to the lab only through [`crate::train::TrainEvent`]s; the lab reads those and run records, nothing else.

pub mod app;
pub mod setup;
pub mod views;

use crate::config::{self, Experiment};
use crate::runs::{self, RunRecord};
use crate::train::{self, RunOptions, TrainEvent};
use anyhow::Result;
use app::{App, Command, Notice, RunState, Screen};
use crossterm::event::{Event, KeyEventKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// Which screen the lab opens on.
pub enum LabStart {
    Setup,
    Compare(Vec<RunRecord>),
}

/// Frames are drawn at most this often (10 per second).
const FRAME: Duration = Duration::from_millis(100);

/// Builds the lab's initial state from the presets on disk.
pub fn initial_app(start: LabStart) -> App {
    let presets: Vec<(String, Experiment)> = config::list_presets()
        .into_iter()
        .filter_map(|p| {
            let name = p.path.file_stem()?.to_string_lossy().to_string();
            p.experiment.ok().map(|e| (name, e))
        })
        .collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cuda = candle_core::utils::cuda_is_available() && candle_core::Device::new_cuda(0).is_ok();
    let mut app = App::new(setup::SetupForm::new(presets, cores, cuda));
    app.available_memory = crate::train::footprint::available();
    app.setup.human_labels = [config::DatasetKind::Cifar10, config::DatasetKind::Cifar100]
        .into_iter()
        .filter_map(|d| {
            config::HumanLabels::of(d).map(|h| std::path::Path::new(crate::data::cifar_n::DEFAULT_DIR).join(h.file))
        })
        .filter(|p| p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    // Terminals that name themselves `dumb` draw no box or braille characters.
    if std::env::var("TERM").is_ok_and(|t| t == "dumb") {
        app.ascii = true;
        app.status = Some(Notice::info("TERM=dumb: ASCII mode (press g for Unicode if the terminal can draw it)"));
    }
    if let LabStart::Compare(records) = start {
        app.add_loaded(records);
        for r in &mut app.runs {
            r.checked = true;
        }
        app.screen = Screen::Compare;
    }
    app
}

/// The status line after `r`: how many runs were loaded, and which records could not be read (in red).
fn load_status(loaded: usize, root: &std::path::Path, unreadable: &[runs::Unreadable]) -> Notice {
    let text = format!("loaded {loaded} run(s) from {}", root.display());
    if unreadable.is_empty() {
        return Notice::info(text);
    }
    let names: Vec<String> = unreadable.iter().map(|u| u.dir.display().to_string()).collect();
    Notice::error(format!("{text}; {} unreadable (see the log): {}", names.len(), names.join(", ")))
}

/// Opens the lab in the terminal and runs it until the user quits. The terminal is restored on every
/// exit path, panics included (ratatui's `init` installs the hook).
pub fn run_lab(start: LabStart, runs_root: PathBuf) -> Result<()> {
    let app = initial_app(start);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let mut terminal = ratatui::init();
    let result = rt.block_on(event_loop(&mut terminal, app, runs_root));
    ratatui::restore();
    result
}

async fn event_loop(terminal: &mut ratatui::DefaultTerminal, mut app: App, runs_root: PathBuf) -> Result<()> {
    let (input_tx, mut input_rx) = unbounded_channel::<Event>();
    // SIGTERM / SIGHUP (a closed SSH session, `kill`): stop the runs, keep their records, restore the
    // terminal. Raw mode turns Ctrl-C into a key, which asks first.
    let (signal_tx, mut signal_rx) = unbounded_channel::<()>();
    let _ = ctrlc::set_handler(move || {
        let _ = signal_tx.send(());
    });
    spawn_input_thread(input_tx);
    let (train_tx, mut train_rx) = unbounded_channel::<(u64, TrainEvent)>();
    let mut workers: HashMap<u64, std::thread::JoinHandle<train::Summary>> = HashMap::new();
    let mut dirty = true;
    let mut last_draw = Instant::now() - FRAME;
    loop {
        if dirty && last_draw.elapsed() >= FRAME {
            terminal.draw(|f| views::draw(f, &app))?;
            dirty = false;
            last_draw = Instant::now();
        }
        // Idle: wake once a second only while something trains (ETA); otherwise sleep until input.
        let wait = if dirty {
            FRAME.saturating_sub(last_draw.elapsed())
        } else if app.running_count() > 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            Some(ev) = input_rx.recv() => {
                dirty = true;
                if let Event::Key(key) = ev {
                    if key.kind == KeyEventKind::Release {
                        continue;
                    }
                    app.status = None;
                    for cmd in app.on_key(key) {
                        match cmd {
                            Command::Quit => {
                                shutdown(&app, workers);
                                return Ok(());
                            }
                            Command::Schedule => schedule(&mut app, &runs_root, &train_tx, &mut workers),
                            Command::LoadRuns => {
                                let runs::Scan { records, unreadable } = runs::scan(&runs_root);
                                let n = app.add_loaded(records);
                                app.status = Some(load_status(n, &runs_root, &unreadable));
                                for u in &unreadable {
                                    app.push_log(format!("could not read {}: {}", u.dir.display(), u.reason));
                                }
                            }
                        }
                    }
                }
            }
            Some((uid, ev)) = train_rx.recv() => {
                let finished = matches!(ev, TrainEvent::Finished(_));
                app.on_train_event(uid, ev);
                if finished {
                    if let Some(h) = workers.remove(&uid) {
                        let _ = h.join();
                    }
                    schedule(&mut app, &runs_root, &train_tx, &mut workers);
                }
                dirty = true;
            }
            Some(()) = signal_rx.recv() => {
                shutdown(&app, workers);
                return Ok(());
            }
            _ = tokio::time::sleep(wait) => {
                if app.running_count() > 0 {
                    dirty = true;
                }
            }
        }
    }
}

/// Reads terminal events on a plain thread (crossterm's read blocks) and forwards them.
fn spawn_input_thread(tx: UnboundedSender<Event>) {
    std::thread::spawn(move || loop {
        match crossterm::event::poll(Duration::from_millis(500)) {
            Ok(true) => match crossterm::event::read() {
                Ok(ev) => {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
}

/// Starts queued runs while fewer than the chosen number are training.
fn schedule(
    app: &mut App,
    runs_root: &std::path::Path,
    train_tx: &UnboundedSender<(u64, TrainEvent)>,
    workers: &mut HashMap<u64, std::thread::JoinHandle<train::Summary>>,
) {
    while app.running_count() < app.setup.parallel {
        let Some(run) = app.runs.iter_mut().find(|r| r.state == RunState::Queued) else {
            break;
        };
        let opts = RunOptions { runs_root: runs_root.to_path_buf(), batch_events_every: 1, ..Default::default() };
        let (control, mut rx, handle) = train::spawn(run.record.experiment.clone(), opts);
        run.control = Some(control);
        run.state = RunState::Running;
        run.started = Some(Instant::now());
        let uid = run.uid;
        workers.insert(uid, handle);
        let tx = train_tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if tx.send((uid, ev)).is_err() {
                    break;
                }
            }
        });
    }
}

/// Stops every run and waits for each to write its record (they finish their current batch).
fn shutdown(app: &App, workers: HashMap<u64, std::thread::JoinHandle<train::Summary>>) {
    for r in &app.runs {
        if let Some(c) = &r.control {
            c.set_paused(false);
            c.stop();
        }
    }
    for (_, h) in workers {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloading_names_the_records_it_could_not_read() {
        let root = tempfile::tempdir().unwrap();
        let bad = root.path().join("20260101-000000-broken");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("experiment.toml"), "[train\n").unwrap();
        let scan = runs::scan(root.path());
        let Notice { text, error } = load_status(0, root.path(), &scan.unreadable);
        assert!(error && text.contains("1 unreadable") && text.contains("20260101-000000-broken"), "{text}");
        let Notice { text, error } = load_status(2, root.path(), &[]);
        assert!(!error && text.starts_with("loaded 2 run(s)"), "{text}");
    }
}
