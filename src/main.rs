#[global_allocator]
static ALLOCATOR: qat_lab::memory::HugePages = qat_lab::memory::HugePages;

fn main() -> std::process::ExitCode {
    // candle allocates a fresh buffer for every tensor op. With glibc's defaults each large one is a new
    // mmap whose pages fault in again every step (a quarter of the step time, and gigabytes of churn);
    // serving them from the heap and never trimming it keeps the pages.
    // SAFETY: mallopt only changes allocator thresholds, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    qat_lab::cli::main()
}
