#!/bin/bash
# The acceptance run (under the shared lock: flock /work/bench.lock bash run.sh TAG), from the worktree root's
# bench/results/2026-12-05-cpu-states/.  Writes TAG.* here.
set -u
TAG=${1:-gpt2-350m}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=/work/main/.venv/bin/python
SRC=${SRC:-$ROOT/src}  # a frozen copy of the commit, so edits during the run do not leak into it
export PYTHONPATH=$SRC OMP_WAIT_POLICY=PASSIVE
mkdir -p /tmp/sb-nvme
{
  echo "start $(date -u +%FT%TZ) $(uptime)"
  echo "commit $(cat "$SRC/../COMMIT" 2>/dev/null || git -C "$ROOT" rev-parse HEAD)"
  $PY -m memstrata probe --nvme /tmp/sb-nvme --json --no-cache > "$HERE/$TAG.probe.json"
  echo "disk before: $($PY "$HERE/../../disk_rw.py" /tmp/sb-nvme 512)"
  $PY -m memstrata bench --model gpt2-350m --budget 50% --contenders unmanaged,memstrata --repeats 3 --steps 3 \
      --warmup 1 --threads 1 --nvme /tmp/sb-nvme --json "$HERE/$TAG.json" --log-dir /tmp/st/logs-$TAG --quiet \
      > "$HERE/$TAG.table.txt" 2>&1
  echo "bench rc $?"
  echo "disk after: $($PY "$HERE/../../disk_rw.py" /tmp/sb-nvme 512)"
  echo "end $(date -u +%FT%TZ) $(uptime)"
} > "$HERE/$TAG.log" 2>&1
