#!/bin/bash
# Issue 9 "budget kept", five models, one locked run each (bench/budget_kept.py: b32, 128 px, budget "50%").
# From the repository root: bash bench/results/2026-12-05d-cpu-budget/run.sh
set -u
here=bench/results/2026-12-05d-cpu-budget
py=${PY:-/work/main/.venv/bin/python}
for m in resnet18 mobilenet_v3_large densenet121 resnext50_32x4d swin_t; do
  flock /work/bench.lock bash -c "echo \"$m before \$(date -u +%H:%M:%S) \$(uptime)\" >> $here/uptime.log;
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src $py bench/budget_kept.py $m >> $here/budget_kept.jsonl;
    echo \"$m after \$(date -u +%H:%M:%S) \$(uptime)\" >> $here/uptime.log"
done
