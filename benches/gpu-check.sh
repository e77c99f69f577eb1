#!/usr/bin/env bash
# The GPU check, as one run on a machine with an NVIDIA GPU, driver >= 580 and the CUDA 13 libraries
# (found through the Python `nvidia-*` packages or on disk): the CUDA bench (with PyTorch in the same
# invocation), a CPU bench at 2 threads with PyTorch also at 2 threads, and the Fig. 1 pair on CUDA.
#
# Prepare here (no GPU needed; see BENCHMARKS.md):
#   source ../shared/tools/cuda-toolchain.sh && CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#   mkdir -p .cuda-bin && xz -T2 -c target/cuda/release/qat-lab > .cuda-bin/qat-lab.xz
#   cp <cifar-10 .tar.gz> .cuda-bin/cifar-10-sample-binary.tar.gz      (not committed: .cuda-bin is ignored)
# Run there, from the repository root, with OUT set to a folder for the reports: bash benches/gpu-check.sh
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
xz -dc .cuda-bin/qat-lab.xz > /tmp/qat-lab && chmod +x /tmp/qat-lab
lib=$(python3 -c "import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], 'lib'))" 2>/dev/null)
[ -e "$lib/libcublas.so.13" ] || lib=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -n 1)")
for pkg in curand cuda_runtime cuda_nvrtc; do
  d=$(python3 -c "import nvidia.$pkg, os; print(os.path.join(list(nvidia.$pkg.__path__)[0], 'lib'))" 2>/dev/null) && lib="$lib:$d"
done
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
lscpu | grep -E "Model name|^CPU\(s\)"
echo "== CUDA bench"; timeout 120 /tmp/qat-lab bench --device cuda --steps 20 --warmup 5 2>&1 | tee "$OUT/bench_cuda.txt"
echo "== CPU bench, 2 threads"; RAYON_NUM_THREADS=2 timeout 120 /tmp/qat-lab bench --device cpu --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_cpu2.txt"
echo "== Fig. 1 on CUDA"
for p in fig1-baseline fig1-w4a4; do
  timeout 90 /tmp/qat-lab run $p --device cuda --data .cuda-bin/cifar-10-sample-binary.tar.gz --set train.epochs=20 --plain --out /tmp/runs 2>&1 | tail -n 30 | tee -a "$OUT/fig1_cuda.txt"
done
