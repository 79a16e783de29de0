#!/usr/bin/env bash
# Builds the CUDA test and benchmark here (nvcc 13.0, sm_90, no GPU needed) and stages what the
# GPU machine lacks in .device/ (git-ignored): the binaries, libbenchmark, and the Eigen, Catch2
# and Google Benchmark headers for an on-device rebuild. Then scripts/device_check.sh runs there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/cuda/bin
build=${MHC_BUILD_DIR:-build-cuda}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMHC_WARNINGS_AS_ERRORS=ON -DMHC_CUDA=ON -DCMAKE_CUDA_FLAGS=-lineinfo >/dev/null
cmake --build "$build" -j "${MHC_JOBS:-2}" --target cuda_test_cuda_layer cuda_bench_cuda_layer
mkdir -p .device/bin .device/lib .device/include
cp "$build"/tests/cuda_test_cuda_layer "$build"/bench/cuda_bench_cuda_layer .device/bin/
lib=$(readlink -f /usr/lib/x86_64-linux-gnu/libbenchmark.so)
for name in libbenchmark.so libbenchmark.so.1debian "$(basename "$lib")"; do cp "$lib" .device/lib/$name; done
for h in eigen3 catch2 benchmark; do
  [ -d .device/include/$h ] || cp -r /usr/include/$h .device/include/
done
du -sh .device
