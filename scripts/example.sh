#!/usr/bin/env bash
# Installs the dependencies (Debian 12), builds the main example and runs it.
#   bash scripts/example.sh [example arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${MHC_SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps.sh
build=${MHC_BUILD_DIR:-build}
example=${MHC_EXAMPLE:-train_stack}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)" --target "$example"
"$build/examples/$example" "$@"
