#!/usr/bin/env bash
# Installs the dependencies (Debian 12), builds everything and runs the whole test suite.
#   bash scripts/test.sh                 Release build in build/, all tests
# Environment knobs (used by CI): MHC_BUILD_DIR, MHC_BUILD_TYPE (Release), MHC_SANITIZE (0/1),
# MHC_WERROR (0/1), MHC_SKIP_DEPS (0/1), MHC_TARGETS ("all"), MHC_JOBS (nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${MHC_SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps.sh
build=${MHC_BUILD_DIR:-build}
type=${MHC_BUILD_TYPE:-Release}
san=${MHC_SANITIZE:-0}
werror=${MHC_WERROR:-0}
jobs=${MHC_JOBS:-$(nproc)}
extra=()
if [ "$san" = 1 ]; then
  # Benchmarks and examples are not rebuilt under the sanitizers; the tests cover the headers.
  extra+=(-DMHC_SANITIZE=ON -DMHC_BUILD_BENCH=OFF -DMHC_BUILD_EXAMPLES=OFF -DMHC_CUDA=OFF)
fi
[ "$werror" = 1 ] && extra+=(-DMHC_WARNINGS_AS_ERRORS=ON)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE="$type" "${extra[@]}"
cmake --build "$build" -j "$jobs" --target ${MHC_TARGETS:-all}
ctest --test-dir "$build" --output-on-failure -j "$jobs"
