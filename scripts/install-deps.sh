#!/usr/bin/env bash
# Installs what building mhc's tests, benchmarks and examples needs on Debian 12 (root or sudo).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake libeigen3-dev catch2 libbenchmark-dev libomp-dev >/dev/null
