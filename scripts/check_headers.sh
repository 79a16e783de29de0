#!/usr/bin/env bash
# Every public and detail header must compile on its own (self-contained includes), warning-free.
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${CXX:-c++}
eigen=$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)
status=0
for h in include/mhc/*.hpp include/mhc/detail/*.hpp; do
  if ! echo "#include \"${h#include/}\"" | $cxx -std=c++17 -Wall -Wextra -Wpedantic -Werror \
      -Iinclude $eigen -x c++ -fsyntax-only -; then
    echo "not self-contained: $h"
    status=1
  fi
done
[ $status = 0 ] && echo "all $(ls include/mhc/*.hpp include/mhc/detail/*.hpp | wc -l) headers compile on their own"
exit $status
