#!/usr/bin/env bash
# The verdict in the background on a small machine: one shard per core
# (two single-core processes train ~25% more images/s than one on two cores,
# measured on a 2-core AMD EPYC), each appending to WORKDIR.shardI.out.
# At the lowest priority (nice 19): the machine's other work (tests,
# benchmarks) takes the cores when it needs them, the verdict the rest.
# Rerun the same command to resume: finished runs are kept. If the workdir
# was lost, add --recorded=experiments/results/.../verdict.json: the runs the
# committed file records are not trained again.
#
#   experiments/verdict_shards.sh fashion_mnist workdirs/verdict_fashion --per_class=20,500
#   experiments/verdict_shards.sh fonts workdirs/verdict_fonts --per_class=20,200 --batch=200 --candidates=3
set -u
cd "$(dirname "$0")/.."
mkdir -p "$(dirname "$2")"
config=$1 workdir=$2
shift 2
n=$(nproc)
for ((i = 0; i < n; i++)); do
  ( echo "start $(date -u +%FT%TZ)"
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2 taskset -c "$i" nice -n 19 .venv/bin/python \
      experiments/verdict.py --config="experiments/configs/$config.py" \
      --workdir="$workdir" --shard="$i/$n" "$@"
    echo "exit $? $(date -u +%FT%TZ)" ) >> "$workdir.shard$i.out" 2>&1 &
done
wait
