//! The lab's own costs: time to render one frame with 8 runs x 200 epochs on a 200x60 screen (goal:
//! under 2 ms), and CPU used while the lab sits idle on its setup screen (goal: near 0%).
//! Run: `cargo bench --bench lab`.

use portable_pty::{native_pty_system, CommandBuilder, PtySize};
use qat_lab::config::{Experiment, Regularizer};
use qat_lab::train::EpochMetrics;
use qat_lab::ui::app::{App, RunState, RunView, Screen};
use qat_lab::ui::setup::SetupForm;
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::time::{Duration, Instant};

fn app_with_runs(runs: usize, epochs: usize) -> App {
    let mut app = App::new(SetupForm::new(Vec::new(), 2, false));
    for r in 0..runs {
        let mut e = Experiment { regularizer: Regularizer::all_defaults()[r % 7].clone(), ..Default::default() };
        e.train.epochs = epochs;
        let mut v = RunView::queued(e);
        v.state = if r % 2 == 0 { RunState::Running } else { RunState::Done };
        v.record.metrics = (1..=epochs)
            .map(|i| {
                let t = i as f64 + r as f64;
                EpochMetrics {
                    epoch: i,
                    train_loss: 2.0 * (-t / 30.0).exp(),
                    eval_loss: 0.8 + 0.001 * (t - 40.0).powi(2) / 10.0,
                    eval_acc: 0.6 + 0.3 * (t / 200.0).sin().abs(),
                    train_acc: 0.9,
                    memorized: (t / 200.0).min(1.0),
                    ..Default::default()
                }
            })
            .collect();
        app.runs.push(v);
    }
    app
}

fn frame_times(screen: Screen, w: u16, h: u16, frames: usize) -> (f64, f64) {
    let mut app = app_with_runs(8, 200);
    app.screen = screen;
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    for _ in 0..20 {
        term.draw(|f| qat_lab::ui::views::draw(f, &app)).unwrap();
    }
    let mut times: Vec<f64> = (0..frames)
        .map(|i| {
            app.selected = i % 8;
            let t = Instant::now();
            term.draw(|f| qat_lab::ui::views::draw(f, &app)).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times.iter().sum::<f64>() / frames as f64, times[frames * 99 / 100])
}

/// utime + stime of a process in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn idle_cpu_percent(seconds: u64) -> Option<f64> {
    let pty = native_pty_system();
    let pair = pty.openpty(PtySize { rows: 24, cols: 80, pixel_width: 0, pixel_height: 0 }).ok()?;
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_qat-lab"));
    cmd.cwd(env!("CARGO_MANIFEST_DIR"));
    cmd.env("TERM", "xterm-256color");
    cmd.env("QAT_LAB_RUNS", std::env::temp_dir().join("qat-lab-bench-runs"));
    let mut child = pair.slave.spawn_command(cmd).ok()?;
    let mut reader = pair.master.try_clone_reader().ok()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.process_id()?;
    let t0 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(seconds));
    let t1 = cpu_ticks(pid)?;
    let _ = child.kill();
    let hz = 100.0; // USER_HZ on Linux
    Some((t1 - t0) as f64 / hz / seconds as f64 * 100.0)
}

use std::io::Read;

fn main() {
    println!("lab render, 8 runs x 200 epochs:");
    for (name, screen, w, h) in [
        ("live    200x60", Screen::Live, 200, 60),
        ("compare 200x60", Screen::Compare, 200, 60),
        ("live     80x24", Screen::Live, 80, 24),
    ] {
        let (mean, p99) = frame_times(screen, w, h, 300);
        println!("  {name}: {mean:.3} ms/frame mean, {p99:.3} ms p99 (goal < 2 ms: {:.1}x under)", 2.0 / mean);
    }
    match idle_cpu_percent(5) {
        Some(p) => println!("idle lab (setup screen, 5 s): {p:.2}% of one core"),
        None => println!("idle CPU: could not measure (no /proc or no pty)"),
    }
}
