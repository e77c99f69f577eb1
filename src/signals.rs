//! One process-wide stop: Ctrl-C, SIGTERM or SIGHUP stops every run this process is training, after
//! its current batch. The handler is installed once (the OS keeps only one), and every headless
//! command registers its runs here, so a multi-run command stops as a whole, not just its first run.

use crate::train::RunControl;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

static STOPPING: AtomicBool = AtomicBool::new(false);
static ACTIVE: Mutex<Vec<RunControl>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Installs the handler (once per process). A first signal stops the registered runs and every later
/// one; a second exits at once with status 130.
pub fn install() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if STOPPING.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after the current batch (Ctrl-C again to quit at once)...");
            for c in active().iter() {
                c.stop();
            }
        });
    });
}

fn active() -> std::sync::MutexGuard<'static, Vec<RunControl>> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a stop was asked for: multi-run commands start nothing more.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Asks for the stop as a signal would (tests, and commands that stop on their own).
pub fn request_stop() {
    STOPPING.store(true, Ordering::SeqCst);
    for c in active().iter() {
        c.stop();
    }
}

/// Registers a run to be stopped by a signal; if one already came, it is stopped at once.
pub fn register(control: &RunControl) {
    active().push(control.clone());
    if stopping() {
        control.stop();
    }
}

/// Forgets a finished run.
pub fn unregister(control: &RunControl) {
    active().retain(|c| !c.same_as(control));
}
