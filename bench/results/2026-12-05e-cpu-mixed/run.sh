#!/bin/bash
# One locked run (flock /work/bench.lock bash run.sh TAG) from a frozen copy of the commit (SRC=/tmp/mw-frozen/src):
# gpt2-124m with bf16 parameters and fp32 master weights (MasterWeights over AdamW) on both arms, state budget 50%
# of the 12 bytes per parameter. CPU bf16 matmuls are slow on this box (no AVX-512: 18x fp32), so few tokens.
set -u
TAG=${1:-gpt2-124m-bf16}
SEQ=${SEQ:-32}
STEPS=${STEPS:-2}
REPEATS=${REPEATS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=/work/main/.venv/bin/python
SRC=${SRC:-$ROOT/src}
export PYTHONPATH=$SRC OMP_WAIT_POLICY=PASSIVE
mkdir -p /tmp/mw-nvme
{
  echo "start $(date -u +%FT%TZ) $(uptime)"
  echo "commit $(cat "$SRC/../COMMIT" 2>/dev/null || git -C "$ROOT" rev-parse HEAD)"
  echo "seq $SEQ steps $STEPS repeats $REPEATS"
  $PY -m memstrata probe --nvme /tmp/mw-nvme --json > "$HERE/$TAG.probe.json"
  steal0=$(awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  $PY -m memstrata bench --model gpt2-124m --precision bf16 --budget 50% --contenders unmanaged,memstrata \
      --repeats $REPEATS --steps $STEPS --warmup 2 --threads 1 --seq $SEQ --batch 1 --nvme /tmp/mw-nvme \
      --json "$HERE/$TAG.json" --log-dir /tmp/mwx/logs-$TAG --quiet > "$HERE/$TAG.table.txt" 2>&1
  echo "bench rc $?"
  steal1=$(awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  echo "steal over the bench: $(echo "$steal0 $steal1" | awk '{printf "%.1f%% of all CPU time", 100*($3-$1)/($4-$2)}')"
  echo "end $(date -u +%FT%TZ) $(uptime)"
} > "$HERE/$TAG.log" 2>&1
rm -rf /tmp/mw-nvme
