#!/bin/bash
# One locked run (flock /work/bench.lock bash run.sh TAG), from bench/results/2026-12-05e-cpu-states/ (a copy of 05d's, REPEATS added); the machine's CPU steal share (/proc/stat) over the whole bench is logged too.
# SEQ (tokens per sample, default 256 = the bench's CPU default), STEPS (timed steps per repeat, default 2).
# REPEATS (alternating repeats, default 3).
set -u
TAG=${1:-gpt2-350m}
SEQ=${SEQ:-256}
STEPS=${STEPS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=/work/main/.venv/bin/python
SRC=${SRC:-$ROOT/src}  # a frozen copy of the commit, so edits during the run do not leak into it
export PYTHONPATH=$SRC OMP_WAIT_POLICY=PASSIVE
mkdir -p /tmp/sc-nvme
{
  echo "start $(date -u +%FT%TZ) $(uptime)"
  echo "commit $(cat "$SRC/../COMMIT" 2>/dev/null || git -C "$ROOT" rev-parse HEAD)"
  echo "seq $SEQ steps $STEPS"
  $PY -m memstrata probe --nvme /tmp/sc-nvme --json --no-cache > "$HERE/$TAG.probe.json"
  echo "disk before: $($PY "$HERE/../../disk_rw.py" /tmp/sc-nvme 512)"
  steal0=$(awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  $PY -m memstrata bench --model gpt2-350m --budget 50% --contenders unmanaged,memstrata --repeats ${REPEATS:-3} --steps $STEPS \
      --warmup 2 --threads 1 --seq $SEQ --batch 1 --nvme /tmp/sc-nvme --json "$HERE/$TAG.json" \
      --log-dir /tmp/scx/logs-$TAG --quiet > "$HERE/$TAG.table.txt" 2>&1
  echo "bench rc $?"
  steal1=$(awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  echo "steal over the bench: $(echo "$steal0 $steal1" | awk '{printf "%.1f%% of all CPU time", 100*($3-$1)/($4-$2)}')"
  echo "disk after: $($PY "$HERE/../../disk_rw.py" /tmp/sc-nvme 512)"
  echo "end $(date -u +%FT%TZ) $(uptime)"
} > "$HERE/$TAG.log" 2>&1
rm -rf /tmp/sc-nvme
