/// Blocks of `memory::LARGE` bytes and more: on huge pages, kept for reuse (see `qat_lab::memory`).
#[global_allocator]
static ALLOCATOR: qat_lab::memory::HugePages = qat_lab::memory::HugePages;

fn main() -> std::process::ExitCode {
    // candle allocates a fresh buffer for every tensor op. The large ones never reach glibc (the
    // allocator above keeps them); for the rest, glibc's defaults would make each one over 128 KiB a
    // new mmap whose pages fault in again every step. Serving everything under memory::LARGE from the
    // heap and never trimming it keeps the pages.
    // SAFETY: mallopt only changes allocator thresholds, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, qat_lab::memory::LARGE as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    qat_lab::cli::main()
}
