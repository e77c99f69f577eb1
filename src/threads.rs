//! Thread set-up, done once at start-up.

/// Sets the compute thread count for candle and its GEMM (`RAYON_NUM_THREADS`) unless the user did.
/// Without it candle re-reads /proc/cpuinfo on every op. `reserve_for_ui` keeps one core free for a
/// responsive terminal when there are several.
pub fn configure(reserve_for_ui: bool) -> usize {
    if let Ok(v) = std::env::var("RAYON_NUM_THREADS") {
        if let Ok(n) = v.parse::<usize>() {
            return n;
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = if reserve_for_ui && cores > 2 { cores - 1 } else { cores };
    // Safe: called from main before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
