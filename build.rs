//! Builds the CUDA kernels of `src/ops/gpu` to PTX when the `cuda` feature is on (nothing otherwise:
//! the CPU build needs no CUDA toolchain). nvcc comes from $NVCC or the PATH, the target from
//! $CUDA_COMPUTE_CAP (default 90, Hopper), as for candle's own kernels.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ops/gpu/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("qat_kernels.ptx");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/ops/gpu/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({nvcc}: {e}); see benches/gpu-check.sh"));
    assert!(status.success(), "nvcc failed on src/ops/gpu/kernels.cu");
}
