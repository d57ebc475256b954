#!/usr/bin/env bash
# Re-examines the old study's 20_per_class_start_0 cell (issue #28 item 1):
# CE at 20/class and CE+Gini+KL from step 0, 5 seeds, per-seed values kept.
cd "$(dirname "$0")/../../../.."
S="taskset -c 1 .venv/bin/python experiments/study.py --config=experiments/configs/fashion_mnist.py --workdir=workdirs/start0_check --seeds=5"
export PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2
echo "start $(date -u +%FT%TZ)"
$S --study=scarcity --cells=20_per_class --objectives=ce
$S --study=start --regime=20 --cells=20_per_class_start_0
echo "exit $? $(date -u +%FT%TZ)"
