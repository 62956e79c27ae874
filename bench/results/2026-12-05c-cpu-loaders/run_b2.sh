#!/bin/bash
# run under: flock /work/bench.lock /tmp/loader-c/run_b2.sh   (every peer, both core sets, timed windows >= 10 s)
cd /tmp/loader-c/snap3
R=/work/wt/loader/bench/results/2026-12-05c-cpu-loaders
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE MEMSTRATA_CACHE=/tmp/loader-b/cache
PY=/work/main/.venv/bin/python
{ date -u; uptime; cat /proc/pressure/cpu; echo "snapshot of $SNAP"; } > $R/run-b2.meta
COLUMNS=240 $PY -m memstrata bench --scenario loader --repeats 1 --epochs 3 --min-timed-s 10 \
    --data /tmp/loader-b/synth1024 --store /tmp/loader-b/store1024 --run-timeout 240 --quiet \
    --log-dir /tmp/loader-c/logs-b2 --json $R/loader-all-b2.json --plot $R/loader-all-b2.png > $R/table-all-b2.txt 2>&1
{ date -u; uptime; cat /proc/pressure/cpu; } >> $R/run-b2.meta
