#!/usr/bin/env bash
# The test suite's time (`make test`, the README's command) for several
# pytest-xdist worker counts (TEST_WORKERS), alternated (a slow spell of a
# shared machine hits each count), each run from an empty JAX compilation
# cache as a fresh clone has it; set-up, if not done yet, happens before the
# first count and is timed with it. Prints one line per run: workers,
# pytest's result line, wall, user and system seconds.
#
#   experiments/bench_suite.sh 3 2 3 2
set -u
cd "$(dirname "$0")/.."
counts=("$@")
[ $# -gt 0 ] || counts=(3 2)
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
TIMEFORMAT="wall=%R user=%U sys=%S"
for n in "${counts[@]}"; do
  rm -rf "${cache:?}"/*
  log=$(mktemp)
  { time env JAX_COMPILATION_CACHE_DIR="$cache" \
      make -s test TEST_WORKERS="$n" > "$log" 2>&1; } 2> "$log.time"
  echo "workers=$n $(tail -n 1 "$log" | tr -d '=') $(cat "$log.time")"
  rm -f "$log" "$log.time"
done
