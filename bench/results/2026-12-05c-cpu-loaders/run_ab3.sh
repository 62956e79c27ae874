#!/bin/bash
# run under: flock /work/bench.lock /tmp/loader-c/run_ab3.sh   (A3: memstrata vs FFCV, 3 repeats; then B2: every peer, 1 repeat)
cd /tmp/loader-c/snap3
R=/work/wt/loader/bench/results/2026-12-05c-cpu-loaders
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE MEMSTRATA_CACHE=/tmp/loader-b/cache
PY=/work/main/.venv/bin/python
{ date -u; uptime; cat /proc/pressure/cpu; echo "snapshot of $(cat COMMIT)"; } > $R/run-a3.meta
COLUMNS=240 $PY -m memstrata bench --scenario loader --contenders memstrata,ffcv --repeats 3 --epochs 3 --min-timed-s 10 \
    --data /tmp/loader-b/synth1024 --store /tmp/loader-b/store1024 --run-timeout 300 --quiet \
    --log-dir /tmp/loader-c/logs-a3 --json $R/loader-memstrata-ffcv-a3.json --plot $R/loader-memstrata-ffcv-a3.png > $R/table-memstrata-ffcv-a3.txt 2>&1
{ date -u; uptime; cat /proc/pressure/cpu; } >> $R/run-a3.meta
if [ "$(date -u +%H%M)" -lt 1840 ]; then
{ date -u; uptime; cat /proc/pressure/cpu; echo "snapshot of $(cat COMMIT)"; } > $R/run-b2.meta
COLUMNS=240 $PY -m memstrata bench --scenario loader --repeats 1 --epochs 3 --min-timed-s 5 \
    --data /tmp/loader-b/synth1024 --store /tmp/loader-b/store1024 --run-timeout 240 --quiet \
    --log-dir /tmp/loader-c/logs-b2 --json $R/loader-all-b2.json --plot $R/loader-all-b2.png > $R/table-all-b2.txt 2>&1
{ date -u; uptime; cat /proc/pressure/cpu; } >> $R/run-b2.meta
fi
