#!/usr/bin/env bash
# Runs the CUDA tests, compute-sanitizer and the CUDA benchmark on a GPU machine, from binaries
# built elsewhere with nvcc 13.0 for sm_90 (scripts/device_prepare.sh puts them in .device/).
# Falls back to compiling on the machine with its nvcc when the carried binaries do not run.
#   bash scripts/device_check.sh [info] [tests] [sanitize] [bench] [bench-quick]   (default: all)
# Logs go to $OUT (default ./out); a short summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info tests sanitize bench)
has() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

D=$PWD/.device
export PATH=$PATH:/usr/local/cuda/bin
export LD_LIBRARY_PATH=$D/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# cuBLAS may live only in the Python environment's wheels.
if ! ldconfig -p 2>/dev/null | grep -q libcublas.so.13 && [ ! -e /usr/local/cuda/lib64/libcublas.so.13 ]; then
  lib=$(find / -xdev -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1)
  [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname "$lib"):$LD_LIBRARY_PATH
fi

TEST=$D/bin/cuda_test_cuda_layer
BENCH=$D/bin/cuda_bench_cuda_layer
summary=()

runnable() { [ -x "$1" ] && ! ldd "$1" 2>&1 | grep -q "not found" && "$1" --help >/dev/null 2>&1; }

build_here() {  # fallback: compile on this machine
  local b=/tmp/mhc-build
  mkdir -p $b
  local flags=(-std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -Iinclude -Itests -Ibench
               -I$D/include/eigen3 -I$D/include)
  echo "== building on the device with $(nvcc --version | tail -1)"
  if ! runnable "$TEST"; then
    nvcc "${flags[@]}" tests/cuda/test_cuda_layer.cu tests/support/catch_main.cpp -o $b/test \
      > "$OUT/build.log" 2>&1 && TEST=$b/test
  fi
  if ! runnable "$BENCH"; then
    nvcc "${flags[@]}" bench/cuda/bench_cuda_layer.cu -L$D/lib -lbenchmark -lcublas -lpthread \
      -o $b/bench >> "$OUT/build.log" 2>&1 && BENCH=$b/bench
  fi
}

if has info; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit \
    --format=csv | tee "$OUT/gpu.txt"
  (ldd "$TEST"; ldd "$BENCH") > "$OUT/ldd.txt" 2>&1
  grep "not found" "$OUT/ldd.txt" && echo "(missing libraries above)"
fi
if ! runnable "$TEST" || ! runnable "$BENCH"; then
  summary+=("carried binaries: NOT runnable here, built on the device")
  build_here
else
  summary+=("carried binaries: run")
fi

if has tests; then
  start=$(date +%s)
  timeout ${MHC_TEST_TIMEOUT:-240} "$TEST" --durations yes > "$OUT/tests.log" 2>&1
  rc=$?
  summary+=("tests (full sizes): rc=$rc, $(( $(date +%s) - start )) s, $(grep -E '^(All tests passed|test cases:)' "$OUT/tests.log" | tail -1)")
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    start=$(date +%s)
    MHC_CUDA_TEST_SMALL=1 timeout ${MHC_SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 17 "$TEST" \
      > "$OUT/$tool.log" 2>&1
    rc=$?
    summary+=("compute-sanitizer $tool (small sizes): rc=$rc, $(( $(date +%s) - start )) s, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)")
  done
fi
if has memcheck; then
  MHC_CUDA_TEST_SMALL=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 17 "$TEST" \
    > "$OUT/memcheck.log" 2>&1
  summary+=("compute-sanitizer memcheck (small sizes): rc=$?, $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)")
fi
if has profile; then  # per-kernel device time of one layer forward + backward (ncu)
  for cfg in ${MHC_PROFILE_CONFIGS:-layer_fwd_bwd/T:8192/C:4096}; do
    MHC_BENCH_QUICK=1 MHC_BENCH_ITERS=1 timeout 300 ncu --clock-control none \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      --csv --print-units base "$BENCH" --benchmark_filter="^$cfg/" > "$OUT/profile.csv" 2> "$OUT/profile.err"
    summary+=("profile $cfg: rc=$?")
    python3 - "$OUT/profile.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, mi, vi = hdr.index("Kernel Name"), hdr.index("Metric Name"), hdr.index("Metric Value")
per = collections.OrderedDict()
for r in rows:
    if "fill_kernel" in r[ki] or "read_stream_kernel" in r[ki]: continue  # the benchmark's own
    name = r[ki].split("(")[0].split("<")[0].replace("void ", "").replace("mhc::cuda::detail::", "")
    d = per.setdefault((r[0], name), {})
    d[r[mi]] = float(r[vi].replace(",", ""))
agg = collections.OrderedDict()
for (_, name), d in per.items():
    a = agg.setdefault(name, [0, 0.0, 0.0])
    a[0] += 1; a[1] += d.get("gpu__time_duration.sum", 0) * 1e-3
    a[2] += (d.get("dram__bytes_read.sum", 0) + d.get("dram__bytes_write.sum", 0)) * 1e-6
print("%-40s %5s %10s %10s %8s" % ("kernel", "calls", "us / call", "MB / call", "GB/s"))
for name, (c, us, mb) in agg.items():
    print("%-40s %5d %10.1f %10.1f %8.0f" % (name[:40], c, us / c, mb / c, mb / us * 1e3 if us else 0))
PY
  done
fi
if has detail; then  # stall reasons of the heaviest kernels (ncu sections, one launch each)
  MHC_BENCH_QUICK=1 MHC_BENCH_ITERS=1 timeout 300 ncu --clock-control none \
    -k "regex:${MHC_DETAIL_KERNELS:-input_grad|project_mma}" --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SchedulerStats \
    --section SourceCounters --section InstructionStats \
    "$BENCH" --benchmark_filter="^layer_fwd_bwd/T:8192/C:4096/" > "$OUT/detail.txt" 2>&1
  summary+=("ncu detail: rc=$?")
  grep -E "^  [a-z_:]+.*\(|Duration|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Theoretical Occupancy|Stall|Warp Cycles Per Issued|Issue Slot|One or More|No Eligible" "$OUT/detail.txt" | head -60
fi
if has bench || has bench-quick; then
  q=0
  has bench-quick && ! has bench && q=1
  start=$(date +%s)
  MHC_BENCH_QUICK=$q timeout ${MHC_BENCH_TIMEOUT:-200} "$BENCH" --benchmark_out="$OUT/bench.json" --benchmark_out_format=json \
    > "$OUT/bench.log" 2>&1
  rc=$?
  summary+=("bench: rc=$rc, $(( $(date +%s) - start )) s")
fi

echo
echo "== tail of logs"
for f in tests memcheck racecheck; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f"; grep -vE '^\s*$' "$OUT/$f.log" | tail -25; }
done
[ -f "$OUT/bench.log" ] && sed -n '/## mhc CUDA summary/,$p' "$OUT/bench.log"
echo
echo "== summary"
for s in "${summary[@]}"; do echo "  $s"; done
