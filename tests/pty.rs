//! End to end in a pseudo-terminal: start the real binary, start a run with keystrokes, watch the chart
//! fill in, quit, and check the terminal was restored and the run recorded.

use portable_pty::{native_pty_system, CommandBuilder, PtySize};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Screen {
    parser: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl Screen {
    fn text(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }
    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            if ok(&t) {
                return t;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {what}; screen:\n{t}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Lab {
    /// Kept open for as long as the child uses the terminal.
    _master: Box<dyn portable_pty::MasterPty + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    screen: Screen,
}

fn start_lab(runs: &std::path::Path, args: &[&str]) -> Lab {
    start_lab_in(runs, args, "xterm-256color")
}

fn start_lab_in(runs: &std::path::Path, args: &[&str], term: &str) -> Lab {
    let pty = native_pty_system();
    let pair = pty.openpty(PtySize { rows: 30, cols: 100, pixel_width: 0, pixel_height: 0 }).unwrap();
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_qat-lab"));
    cmd.args(args);
    cmd.cwd(env!("CARGO_MANIFEST_DIR"));
    cmd.env("QAT_LAB_RUNS", runs);
    cmd.env("TERM", term);
    cmd.env("RAYON_NUM_THREADS", "2");
    let child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader().unwrap();
    let writer = pair.master.take_writer().unwrap();
    let screen = Screen {
        parser: Arc::new(Mutex::new(vt100::Parser::new(
            std::num::NonZeroU16::new(30).unwrap(),
            std::num::NonZeroU16::new(100).unwrap(),
            0,
        ))),
        raw: Arc::new(Mutex::new(Vec::new())),
    };
    let (parser, raw) = (screen.parser.clone(), screen.raw.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            parser.lock().unwrap().process(&buf[..n]);
            raw.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Lab { _master: pair.master, child, writer, screen }
}

/// Presses `q` in a lab with nothing running, waits for it to exit and checks the terminal.
fn quit_idle_lab(
    child: &mut Box<dyn portable_pty::Child + Send + Sync>,
    writer: &mut Box<dyn Write + Send>,
    screen: &Screen,
) {
    writer.write_all(b"q").unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_restored(screen);
}

fn assert_restored(screen: &Screen) {
    std::thread::sleep(Duration::from_millis(200));
    let raw = String::from_utf8_lossy(&screen.raw.lock().unwrap()).to_string();
    assert!(raw.contains("\x1b[?1049h"), "entered the alternate screen");
    assert!(raw.contains("\x1b[?1049l"), "left the alternate screen: terminal restored");
    assert!(raw.contains("\x1b[?25h"), "cursor shown again");
}

#[test]
fn start_a_run_watch_it_and_quit_cleanly() {
    let runs = tempfile::tempdir().unwrap();
    let Lab { _master, mut child, mut writer, screen } = start_lab(runs.path(), &[]);

    screen
        .wait_for("the setup screen", Duration::from_secs(20), |t| t.contains("Experiment") && t.contains("◀ demo ▶"));
    // Epochs: 20 -> 16 -> 10 (two steps left in the list), then start.
    let epochs_row = qat_lab::ui::setup::FIELDS.iter().position(|f| *f == qat_lab::ui::setup::Field::Epochs).unwrap();
    let down_to_epochs = "\x1b[B".repeat(epochs_row);
    writer.write_all(down_to_epochs.as_bytes()).unwrap();
    writer.write_all(b"\x1b[D\x1b[D").unwrap();
    screen.wait_for("epochs = 10", Duration::from_secs(5), |t| t.contains("◀ 10 ▶"));
    writer.write_all(b"\r").unwrap();
    let live = screen.wait_for("the chart to fill in", Duration::from_secs(60), |t| {
        let braille = t.chars().filter(|c| ('\u{2801}'..='\u{28FF}').contains(c)).count();
        t.contains("Runs") && braille > 40
    });
    assert!(live.contains("baseline"), "{live}");
    writer.write_all(b"q").unwrap();
    // While training, q asks first; y confirms.
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        if screen.text().contains("Quit?") {
            writer.write_all(b"y").unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "did not quit:\n{}", screen.text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_restored(&screen);
    let records = qat_lab::runs::list(runs.path());
    assert_eq!(records.len(), 1, "the run was recorded");
    let status = records[0].summary.as_ref().unwrap().status;
    assert!(matches!(status, qat_lab::train::Status::Stopped | qat_lab::train::Status::Completed), "{status:?}");
    assert!(!records[0].metrics.is_empty());
}

#[test]
fn sigterm_stops_the_runs_and_restores_the_terminal() {
    let runs = tempfile::tempdir().unwrap();
    let Lab { _master, mut child, mut writer, screen } = start_lab(runs.path(), &[]);
    screen.wait_for("the setup screen", Duration::from_secs(20), |t| t.contains("Experiment"));
    writer.write_all(b"\r").unwrap();
    screen.wait_for("a run to start", Duration::from_secs(30), |t| t.contains("1 running"));
    let pid = child.process_id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_restored(&screen);
    let records = qat_lab::runs::list(runs.path());
    assert_eq!(records.len(), 1);
    let status = records[0].summary.as_ref().unwrap().status;
    assert!(matches!(status, qat_lab::train::Status::Stopped | qat_lab::train::Status::Completed), "{status:?}");
}

/// `qat-lab compare DIR...` opens the compare screen on finished records; `r` adds the rest of runs/.
#[test]
fn compare_opens_records_directly() {
    let runs = tempfile::tempdir().unwrap();
    for reg in ["none", "quantization"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_qat-lab"))
            .args(["run", "demo-digits", "--set", "train.epochs=2", "--set", &format!("regularizer.kind={reg}")])
            .args(["--plain", "--out", runs.path().to_str().unwrap()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let dirs: Vec<String> = qat_lab::runs::list(runs.path()).iter().map(|r| r.dir.display().to_string()).collect();
    assert_eq!(dirs.len(), 2);
    let Lab { _master, mut child, mut writer, screen } = start_lab(runs.path(), &["compare", &dirs[0]]);
    let one = screen.wait_for("the compare table", Duration::from_secs(20), |t| t.contains("Final and best"));
    assert!(one.contains("baseline") && !one.contains("W4/A4"), "{one}");
    writer.write_all(b"r").unwrap();
    let both = screen.wait_for("the other run loaded", Duration::from_secs(10), |t| t.contains("W4/A4"));
    assert!(both.contains("loaded 1 run"), "{both}");
    quit_idle_lab(&mut child, &mut writer, &screen);
}

/// `TERM=dumb` gets the ASCII interface, and the status line says so.
#[test]
fn a_dumb_terminal_gets_the_ascii_interface() {
    let runs = tempfile::tempdir().unwrap();
    let Lab { _master, mut child, mut writer, screen } = start_lab_in(runs.path(), &[], "dumb");
    let t = screen.wait_for("the setup screen", Duration::from_secs(20), |t| t.contains("Experiment"));
    assert!(t.contains("ASCII mode"), "{t}");
    assert!(t.is_ascii(), "non-ASCII characters on a dumb terminal:\n{t}");
    quit_idle_lab(&mut child, &mut writer, &screen);
}
