#!/usr/bin/env bash
# The GPU check, as one run on a machine with an NVIDIA GPU, driver >= 580 and the CUDA 13 libraries
# (found through the Python `nvidia-*` packages or on disk): the GPU ops' tests against the CPU kernels,
# the CUDA bench (with PyTorch eager in the same invocation), the float bench again with cudarc's event
# tracking on and with full f32 GEMMs, a per-kernel profile, and the demo and Fig. 1 presets on CUDA.
#
# Prepare here (no GPU needed; the toolchain's header says what it installs):
#   source ../shared/tools/cuda-toolchain.sh
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#   CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --lib --no-run   # prints the test binary
#   mkdir -p .cuda-bin && xz -T2 -c target/cuda/release/qat-lab > .cuda-bin/qat-lab.xz
#   xz -T2 -c <that test binary> > .cuda-bin/qat-lab-tests.xz
#   cp ../shared/datasets/cifar10-sample/cifar-10-sample-binary.tar.gz .cuda-bin/   (.cuda-bin is ignored)
# Run there, from the repository root, with OUT set to a folder for the reports:
#   bash benches/gpu-check.sh [tests] [bench] [events] [fp32] [profile] [demos] [fig1]   (default: all)
# `profile` times 1,200 kernels in the middle of float training steps with Nsight Compute (ncu) and sums
# them by kernel: the GPU's busy time per step (steps counted by Adam launches, one per each of
# ResNet-20's 59 parameters), to hold against the step's wall time.
set -u
parts=${*:-tests bench events fp32 profile demos fig1}
want() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
xz -dc .cuda-bin/qat-lab.xz > /tmp/qat-lab && chmod +x /tmp/qat-lab
xz -dc .cuda-bin/qat-lab-tests.xz > /tmp/qat-lab-tests && chmod +x /tmp/qat-lab-tests
lib=$(python3 -c "import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], 'lib'))" 2>/dev/null)
[ -e "$lib/libcublas.so.13" ] || lib=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -n 1)")
for pkg in curand cuda_runtime cuda_nvrtc; do
  d=$(python3 -c "import nvidia.$pkg, os; print(os.path.join(list(nvidia.$pkg.__path__)[0], 'lib'))" 2>/dev/null) && lib="$lib:$d"
done
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
if want tests; then
  echo "== GPU ops against the CPU kernels (full f32 GEMMs)"
  QAT_LAB_TF32=0 timeout 180 /tmp/qat-lab-tests gpu --test-threads=1 2>&1 | tee "$OUT/tests.txt" | tail -n 40
fi
if want bench; then
  echo "== CUDA bench"
  # The PyTorch reference runs six networks (float and the two W4/A4 QAT ones, two layouts each).
  timeout 360 /tmp/qat-lab bench --device cuda --steps 20 --warmup 5 --rounds 5 2>&1 | tee "$OUT/bench_cuda.txt"
fi
if want events; then
  echo "== CUDA bench, float, cudarc event tracking on"
  QAT_LAB_CUDA_EVENTS=1 timeout 60 /tmp/qat-lab bench --device cuda --steps 20 --warmup 5 --rounds 3 --only float --no-torch 2>&1 | tee "$OUT/bench_cuda_events.txt" | tail -n 6
fi
if want fp32; then
  echo "== CUDA bench, float, full f32 GEMMs (QAT_LAB_TF32=0)"
  QAT_LAB_TF32=0 timeout 60 /tmp/qat-lab bench --device cuda --steps 20 --warmup 5 --rounds 3 --only float --no-torch 2>&1 | tee "$OUT/bench_cuda_fp32.txt" | tail -n 6
fi
if want profile; then
  echo "== Kernel times of float training steps (ncu)"
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  timeout 180 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 1500 --launch-count 1200 \
    /tmp/qat-lab bench --device cuda --only float --no-torch --steps 6 --warmup 2 --rounds 1 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 benches/kernel_times.py "$OUT/ncu.csv" 59 | tee "$OUT/kernel_times.txt"
fi
if want demos; then
  echo "== Demo presets on CUDA"
  for p in demo-shapes demo-digits; do
    /usr/bin/time -f "$p: %e s wall, %M KiB peak" timeout 90 /tmp/qat-lab run $p --device cuda --plain --out /tmp/runs 2>&1 | tail -n 6 | tee -a "$OUT/demos_cuda.txt"
  done
fi
if want fig1; then
  echo "== Fig. 1 on CUDA"
  for p in fig1-baseline fig1-w4a4; do
    /usr/bin/time -f "$p: %e s wall" timeout 90 /tmp/qat-lab run $p --device cuda --data .cuda-bin/cifar-10-sample-binary.tar.gz --set train.epochs=20 --plain --out /tmp/runs 2>&1 | tail -n 8 | tee -a "$OUT/fig1_cuda.txt"
  done
fi
