#!/bin/bash
# run under: flock /work/bench.lock /tmp/loader-c/run_b.sh   (every peer, both core sets; then the one-core floor)
cd /tmp/loader-c/snap
R=/work/wt/loader/bench/results/2026-12-05c-cpu-loaders
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE MEMSTRATA_CACHE=/tmp/loader-b/cache
PY=/work/main/.venv/bin/python
{ date -u; uptime; cat /proc/pressure/cpu; echo "snapshot of $SNAP"; } > $R/run-b.meta
COLUMNS=220 $PY -m memstrata bench --scenario loader --repeats 1 --epochs 3 \
    --data /tmp/loader-b/synth1024 --store /tmp/loader-b/store1024 --run-timeout 240 --quiet \
    --log-dir /tmp/loader-c/logs-b --json $R/loader-all.json --plot $R/loader-all.png > $R/table-all.txt 2>&1
{ date -u; uptime; cat /proc/pressure/cpu; } >> $R/run-b.meta
{ date -u; uptime; } > $R/run-c.meta
taskset -c 0 $PY /work/wt/loader/bench/loader_floor.py /tmp/loader-b/synth1024 /tmp/loader-b/store1024 --json $R/floor.json > $R/floor.txt 2>&1
{ date -u; uptime; } >> $R/run-c.meta
