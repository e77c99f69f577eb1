//! Thread set-up, done once at start-up.

/// Sets the compute thread count for candle and its GEMM (`RAYON_NUM_THREADS`) unless the user did.
/// Without it candle re-reads /proc/cpuinfo on every op. `reserve_for_ui` keeps one core free for a
/// responsive terminal when there are several.
///
/// It also runs candle's own element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`) unless
/// the user chose otherwise: the hot ops are ours and run on rayon, and candle's separate pool would
/// spin-wait between its ops on the cores rayon is using (measured: +5-20% training throughput on 2
/// cores, see BENCHMARKS.md).
pub fn configure(reserve_for_ui: bool) -> usize {
    // Safe: called from main before any other thread exists.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Ok(v) = std::env::var("RAYON_NUM_THREADS") {
        if let Ok(n) = v.parse::<usize>() {
            return n;
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = if reserve_for_ui && cores > 2 { cores - 1 } else { cores };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// Runs `f`, compute on `device`, on one of rayon's workers while the calling thread waits, when the
/// device is the CPU (GPU work stays on the calling thread, where its context is bound).
///
/// The hot CPU ops split their work with rayon. Called from outside the pool, every parallel section
/// hands its work to the workers and puts the caller to sleep until they are done, two wake-ups per
/// section (hundreds per training step); called from a worker, the section starts where the caller
/// already runs and the other workers steal from it. Measured on 2 cores: training +5.2% (paired,
/// 8 runs), eval +1.5%. Used per training step and per eval batch, not per run, so that runs that
/// train side by side never wait for each other longer than a step.
pub fn compute<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_work_runs_on_a_rayon_worker_and_returns_its_value() {
        assert_eq!(rayon::current_thread_index(), None, "the test itself runs outside the pool");
        let (worker, value) = compute(&candle_core::Device::Cpu, || (rayon::current_thread_index(), 41 + 1));
        assert!(worker.is_some(), "CPU work should run on one of rayon's workers");
        assert_eq!(value, 42);
    }
}
