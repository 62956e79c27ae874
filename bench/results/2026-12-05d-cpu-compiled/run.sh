#!/bin/bash
cd /tmp/hcomp/run-71b2142
date -u +%H:%M:%S > start.txt; uptime > uptime-before.txt
env OMP_WAIT_POLICY=PASSIVE PYTHONPATH=/tmp/hcomp/run-71b2142/src /work/main/.venv/bin/python -m memstrata bench \
  --model resnet18 --batch 64 --res 112 --device cpu --budgets 50%act,70%act --repeats 2 \
  --contenders unmanaged,memstrata,checkpoint,compile,compile_memory_budget,memstrata_compile \
  --run-timeout 1500 --json resnet18-b64-pareto.json --plot resnet18-b64-pareto.png --log-dir logs > resnet18-b64-pareto.log 2>&1
echo rc=$? >> resnet18-b64-pareto.log
uptime > uptime-after.txt; date -u +%H:%M:%S > end.txt
