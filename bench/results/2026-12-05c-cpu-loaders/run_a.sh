#!/bin/bash
# run under: flock /work/bench.lock /tmp/loader-c/run_a.sh
cd /tmp/loader-c/snap
R=/work/wt/loader/bench/results/2026-12-05c-cpu-loaders
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE MEMSTRATA_CACHE=/tmp/loader-b/cache
PY=/work/main/.venv/bin/python
{ date -u; uptime; cat /proc/pressure/cpu; echo "snapshot of $SNAP"; } > $R/run-a.meta
COLUMNS=220 $PY -m memstrata bench --scenario loader --contenders memstrata,ffcv --repeats 3 --epochs 10 \
    --data /tmp/loader-b/synth1024 --store /tmp/loader-b/store1024 --run-timeout 300 --quiet \
    --log-dir /tmp/loader-c/logs-a --json $R/loader-memstrata-ffcv.json --plot $R/loader-memstrata-ffcv.png > $R/table-memstrata-ffcv.txt 2>&1
{ date -u; uptime; cat /proc/pressure/cpu; } >> $R/run-a.meta
