#!/bin/bash
# the locked measurement of the recipe helper (2026-12-05c)
OUT=/tmp/rc/out; mkdir -p $OUT; cd /tmp/rc/frozen
export PYTHONPATH=/tmp/rc/frozen/src OMP_WAIT_POLICY=PASSIVE
PY=/work/main/.venv/bin/python
echo "commit $(cat /tmp/rc/frozen/COMMIT)" > $OUT/commit.txt
date -u > $OUT/start.txt
uptime > $OUT/uptime-before-default.txt
$PY -m memstrata bench --scenario recipe --repeats 3 --json $OUT/recipe-default.json --plot $OUT/recipe-default.png --log-dir $OUT/logs-default > $OUT/recipe-default.txt 2>&1
uptime > $OUT/uptime-after-default.txt
# the named model, same setting
$PY -m memstrata bench --scenario recipe --model mobilenet_v3_small --repeats 2 --json $OUT/recipe-mobilenet.json --plot $OUT/recipe-mobilenet.png --log-dir $OUT/logs-mobilenet > $OUT/recipe-mobilenet.txt 2>&1
uptime > $OUT/uptime-after-mobilenet.txt
# the demo from a fresh cache (dataset generation and machine probe included), as `make demo` runs it
rm -rf /tmp/rc/democache /tmp/rc/demo; mkdir -p /tmp/rc/demo; cd /tmp/rc/demo
uptime > $OUT/uptime-before-demo.txt
( time XDG_CACHE_HOME=/tmp/rc/democache/xdg MEMSTRATA_CACHE=/tmp/rc/democache $PY -m memstrata demo ) > $OUT/demo.log 2>&1
uptime > $OUT/uptime-after-demo.txt
cp /tmp/rc/demo/memstrata-demo-* $OUT/ 2>/dev/null
date -u > $OUT/end.txt
