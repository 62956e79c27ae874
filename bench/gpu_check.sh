#!/usr/bin/env bash
# GPU check: the GPU test tier, then `memstrata bench` for ResNet-50 and
# EfficientNet-B0 at half the unmanaged peak (bf16 autocast, 224x224, batch 256).
# Whole script < 8 minutes (timeouts sum to 450 s; on an H200 on 2026-11-28 the parts
# took 36 s tests, 9 s probe, ~190 s ResNet-50, 21 s plan_check, ~24 s per
# EfficientNet-B0 run): every part has its own `timeout`; a part that fails or
# times out is recorded in env.json, its partial JSON kept, and the script goes on.
#
# A 15-minute device lease (start ~1.5 min): two calls back to back on the warm machine, prepared on
# 2026-12-05 (not run: no machine was lent that session), peers' wheels in .whl (carry it):
#   call 1 (~330 s, caps 460 s): T_TESTS=120 T_PROBE=15 T_BENCH=170 T_CHECK=40 T_BENCH2=90 REPEATS=2 REPEATS2=1 \
#       CONTENDERS=unmanaged,memstrata,checkpoint CONTENDERS2=unmanaged,memstrata,checkpoint RUN_TIMEOUT=50 \
#       bench/gpu_check.sh tests probe bench check bench2
#   call 2 (~250-320 s, caps 320 s): T_STATES=320 \
#       S_CONTENDERS=unmanaged,memstrata,memstrata_lowpeak,torchao_cpu_offload,memstrata_lowpeak_grads,torchao_cpu_offload_grads,deepspeed_zero_offload,fsdp2_cpu_offload \
#       bench/gpu_check.sh states
#   call 3, only if >= 5 min of device time are left: T_PEERS=280 PEER_RUN_TIMEOUT=280 \
#       PEER_CONTENDERS=unmanaged,memstrata,compile,compile_memory_budget,trl_offload bench/gpu_check.sh peers
#   (2026-12-06: calls 1 + 2 + the start, ~1.5 min, are ~740 s of a 900 s lease, so the peers no longer fit beside
#   them; the states part holds the newest unmeasured work (issue 12): if the lease is shorter, run `tests states` first.  memstrata_compile
#   recompiles ResNet-50 once per setting it tries, 1-3 settings, 2-6 min estimated: give it a call of its own.
#   The states part's equal-peak pairs memstrata_lowpeak / torchao_cpu_offload and memstrata_lowpeak_grads /
#   torchao_cpu_offload_grads are ~15-25 s each; leave fsdp2_cpu_offload out if short (no CUDA target).
#   S_PRECISION=bf16 runs the states part with bf16 parameters and MasterWeights (fp32 masters and moments) on the
#   unmanaged and memstrata arms, the peers skipped with the reason (default fp32).
#   Not measured on GPU.)
# .whl (bench/gpu_wheels.sh makes it) for the image (torch 2.11.0+cu130, Python 3.12): torchao 0.17.0 (its extensions are built for torch
# 2.11), trl 1.16.0 (transformers/accelerate are on the image), deepspeed 0.19.8 (py3 wheel built here from the
# sdist: its CPU Adam is JIT-built there), hjson, pydantic 2.14 + pydantic-core (cp312), annotated-types,
# typing-inspection, typing-extensions 4.16.
#
# Usage (from anywhere; runs against the checkout it lives in, no install needed):
#   OUT=/some/dir bench/gpu_check.sh [PART ...]      parts: tests probe bench check bench2 data recipe peers states
# Without OUT, results go to bench/results/<date>-<gpu>/.
#
# Files written (at most 8, the device runner brings back only 8):
#   env.json                date, GPU, torch, git commit, each part's exit status and seconds,
#                           `memstrata probe --json` of this machine (measured tiers), and
#                           plan_check: predicted vs measured step time and peak, plan by plan
#   gpu_tests.log           pytest -m gpu output (and the probe's and data part's console output)
#   bench.log               both models' bench console output (tables)
#   resnet50.json, efficientnet_b0.json   bench result lists
#   resnet50.png            bar chart
#   data_train.json         (T_DATA > 0) loader vs torchvision vs synthetic-on-GPU, ResNet-50 epoch-2 images/s
#   resnet50_peers.json, resnet50_peers.png   (T_PEERS > 0) the compile and TRL peers next to memstrata: ResNet-50
#                           at PEER_BUDGETS (default 50%; a list such as 30%,50%,70% gives the Pareto table and chart)
#   states.json             (T_STATES > 0) optimizer-state bench: gpt2-1.5b AdamW, states budget 50% of them,
#                           unmanaged vs memstrata vs torchao/FSDP2/DeepSpeed offload (console output in bench.log)
#   worker_logs.tar.gz      every bench run's spec, result and log (tracebacks of failed runs)
#
# Knobs (environment): PYTHON (default: the first of python3, python, .venv/bin/python with torch),
# REPEATS (2, ResNet-50), REPEATS2 (1, EfficientNet-B0), STEPS (8), WARMUP (2), BATCH (256), RES (224), BUDGET (50%),
# T_TESTS (60 s), T_PROBE (20 s), T_BENCH (210 s, ResNet-50), T_CHECK (40 s, plan_check), T_BENCH2 (120 s,
# EfficientNet-B0), T_DATA (0 s: off; give it ~150 s: 60 s was too short on the H200), MAX_RUN_S (3: cap on one run's timed steps),
# RUN_TIMEOUT (50 s per run), CONTENDERS (ResNet-50's: all but disk_offload_hooks, since on a GPU save_on_cpu is
# the offload peer), CONTENDERS2 (EfficientNet-B0's: unmanaged, memstrata and the two checkpointing peers),
# DEVICE (cuda; cpu for a smoke test), T_PEERS (0 s: off; 300 s when `peers` is named: every compile run compiles
# ResNet-50 forward and backward first, ~1-2 min, untimed), PEER_BUDGETS (50%), PEER_CONTENDERS (unmanaged,
# memstrata, checkpoint, compile, compile_memory_budget, trl_offload), PEER_RUN_TIMEOUT (150 s per run).
# trl_offload needs `trl` importable (pip install trl; it does not change torch); without it the row says
# "not installed".  A part whose T_* is 0 is skipped.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then   # the first interpreter that has torch
    for c in python3 python "$ROOT/.venv/bin/python"; do
        if "$c" -c 'import torch' >/dev/null 2>&1; then PY="$c"; break; fi
    done
    PY="${PY:-python3}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Peers the device image lacks (torchao, trl, deepspeed and what deepspeed needs) travel as wheels in
# $ROOT/.whl (git-ignored; see the device README): installed into a scratch folder, after src on the path.
WHEELS_INSTALLED=""
if [ "${WHEELS:-1}" != 0 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/memstrata-gpu-check-site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
        WHEELS_INSTALLED="$(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
    else
        WHEELS_INSTALLED="install failed"
    fi
fi
export WHEELS_INSTALLED

REPEATS="${REPEATS:-2}"; REPEATS2="${REPEATS2:-1}"; STEPS="${STEPS:-8}"; WARMUP="${WARMUP:-2}"
BATCH="${BATCH:-256}"; RES="${RES:-224}"; BUDGET="${BUDGET:-50%}"
T_TESTS="${T_TESTS:-60}"; T_PROBE="${T_PROBE:-20}"; T_BENCH="${T_BENCH:-210}"; T_BENCH2="${T_BENCH2:-120}"; T_DATA="${T_DATA:-0}"; T_CHECK="${T_CHECK:-40}"
T_RECIPE="${T_RECIPE:-0}"; T_PEERS="${T_PEERS:-0}"; T_STATES="${T_STATES:-0}"
S_MODEL="${S_MODEL:-gpt2-1.5b}"; S_BATCH="${S_BATCH:-4}"; S_SEQ="${S_SEQ:-1024}"; S_BUDGET="${S_BUDGET:-50%}"; S_PRECISION="${S_PRECISION:-fp32}"
S_CONTENDERS="${S_CONTENDERS:-unmanaged,memstrata,memstrata_lowpeak,memstrata_lowpeak_grads,torchao_cpu_offload,torchao_cpu_offload_grads,fsdp2_cpu_offload,deepspeed_zero_offload}"
S_STEPS="${S_STEPS:-3}"; S_WARMUP="${S_WARMUP:-2}"; S_MAX_S="${S_MAX_S:-12}"; S_RUN_TIMEOUT="${S_RUN_TIMEOUT:-90}"
# Parts as arguments: `bench/gpu_check.sh tests bench recipe` runs only those (names: tests probe bench check
# bench2 data recipe); without arguments the defaults above apply (data and recipe off).  A part asked for
# by name whose T_* is 0 gets its sized default (data 150 s, recipe 240 s, states 400 s).
if [ "$#" -gt 0 ]; then
    want=" $* "
    for p in tests probe bench check bench2 data recipe peers states; do
        case "$want" in *" $p "*) ;; *) case "$p" in
            tests) T_TESTS=0;; probe) T_PROBE=0;; bench) T_BENCH=0;; check) T_CHECK=0;;
            bench2) T_BENCH2=0;; data) T_DATA=0;; recipe) T_RECIPE=0;; peers) T_PEERS=0;; states) T_STATES=0;; esac;; esac
    done
    case "$want" in *" data "*) [ "$T_DATA" = 0 ] && T_DATA=150;; esac
    case "$want" in *" recipe "*) [ "$T_RECIPE" = 0 ] && T_RECIPE=240;; esac
    case "$want" in *" peers "*) [ "$T_PEERS" = 0 ] && T_PEERS=300;; esac
    case "$want" in *" states "*) [ "$T_STATES" = 0 ] && T_STATES=400;; esac
    for a in "$@"; do case " tests probe bench check bench2 data recipe peers states " in *" $a "*) ;; *)
        echo "gpu_check: unknown part '$a' (tests probe bench check bench2 data recipe peers states)" >&2; exit 2;; esac; done
fi
MAX_RUN_S="${MAX_RUN_S:-3}"; RUN_TIMEOUT="${RUN_TIMEOUT:-50}"
CONTENDERS="${CONTENDERS:-unmanaged,memstrata,checkpoint,selective_checkpoint,save_on_cpu,microbatch}"
CONTENDERS2="${CONTENDERS2:-unmanaged,memstrata,checkpoint,selective_checkpoint}"
PEER_CONTENDERS="${PEER_CONTENDERS:-unmanaged,memstrata,checkpoint,compile,compile_memory_budget,trl_offload}"
PEER_BUDGETS="${PEER_BUDGETS:-50%}"; PEER_RUN_TIMEOUT="${PEER_RUN_TIMEOUT:-150}"

GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo unknown)"
if [ -z "${OUT:-}" ]; then
    slug="$(echo "$GPU_NAME" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-' | sed 's/^nvidia-//')"
    OUT="$ROOT/bench/results/$(date +%Y-%m-%d)-${slug:-gpu}"
fi
mkdir -p "$OUT"
NVME="$(mktemp -d "${TMPDIR:-/tmp}/memstrata-gpu-check-nvme.XXXXXX")"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/memstrata-gpu-check-logs.XXXXXX")"
trap 'rm -rf "$NVME" "$LOGS"' EXIT

PARTS=""   # "name rc seconds;" entries for env.json

part() {   # part NAME TIMEOUT_S LOGFILE CMD...
    local name="$1" limit="$2" log="$3"; shift 3
    local t0 rc
    if [ "$limit" = 0 ]; then echo "== $name: skipped (timeout 0)" | tee -a "$log"; return; fi
    t0=$(date +%s)
    echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$log"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$log"
    PARTS="${PARTS}${name} ${rc} $(( $(date +%s) - t0 ));"
}

write_env() {
    PARTS="$PARTS" OUT="$OUT" PROBE="$LOGS/probe.json" PLAN_CHECK="$LOGS/plan_check.json" "$PY" - <<'EOF' || echo '{"error": "could not write env.json"}' >"$OUT/env.json"
import datetime, json, os, platform, subprocess
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
       "python": platform.python_version()}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["cudnn"] = torch.backends.cudnn.version()
except Exception as e:
    env["torch_error"] = repr(e)
try:
    import torchvision
    env["torchvision"] = torchvision.__version__
except Exception as e:
    env["torchvision_error"] = repr(e)
# GIT_COMMIT: for copies of the tree without .git (the device runner sends no history)
env["git_commit"] = os.environ.get("GIT_COMMIT") or sh("git", "rev-parse", "HEAD") or "unknown"
env["git_dirty"] = bool(sh("git", "status", "--porcelain", "--untracked-files=no"))
env["wheels_installed"] = os.environ.get("WHEELS_INSTALLED", "")
from importlib.metadata import PackageNotFoundError, version as _version
env["peer_versions"] = {}
for mod in ("torchao", "trl", "deepspeed", "transformers", "accelerate", "triton"):
    try:  # metadata only: importing deepspeed or trl costs seconds of device time
        env["peer_versions"][mod] = _version(mod)
    except PackageNotFoundError:
        env["peer_versions"][mod] = "not installed"
env["driver"] = sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
try:
    with open(os.environ["PROBE"]) as f:
        env["probe"] = json.load(f)
except (OSError, ValueError) as e:
    env["probe"] = f"unavailable ({type(e).__name__})"
try:
    with open(os.environ["PLAN_CHECK"]) as f:
        env["plan_check"] = json.load(f)
except (OSError, ValueError) as e:
    env["plan_check"] = f"unavailable ({type(e).__name__})"
env["parts"] = [{"name": n, "exit": int(rc), "seconds": int(sec), "ok": rc == "0"}
                for n, rc, sec in (p.split() for p in os.environ["PARTS"].split(";") if p.strip())]
with open(os.path.join(os.environ["OUT"], "env.json"), "w") as f:
    json.dump(env, f, indent=1)
EOF
}

write_env
echo "memstrata gpu_check: $GPU_NAME -> $OUT"

# 1. GPU test tier.  --continue-on-collection-errors: a CPU-only test module that
#    cannot import here (a missing dev package) must not hide the GPU tests.
part gpu_tests "$T_TESTS" "$OUT/gpu_tests.log" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider -m gpu --continue-on-collection-errors -o addopts="" \
    --timeout 60 tests

# 1b. This machine's tiers, measured (PCIe both ways, HBM, NVMe at $NVME): what the
#     profiles assume vs what is here.  Folded into env.json.
part probe "$T_PROBE" "$OUT/gpu_tests.log" \
    bash -c '"$0" -m memstrata.cli probe --nvme "$1" --json >"$2"' "$PY" "$NVME" "$LOGS/probe.json"

# 2-3. The benchmark.  `memstrata bench` through the CLI when it is registered there.
if "$PY" -m memstrata.cli bench --help >/dev/null 2>&1; then
    BENCH=("$PY" -m memstrata.cli bench)
else
    BENCH=("$PY" -m memstrata.bench)
fi
bench_model() {   # bench_model MODEL TIMEOUT CONTENDERS REPEATS
    local model="$1" limit="$2" cont="$3" reps="$4"
    part "bench_$model" "$limit" "$OUT/bench.log" \
        "${BENCH[@]}" --model "$model" --batch "$BATCH" --res "$RES" --amp bf16 --device "${DEVICE:-cuda}" \
        --budget "$BUDGET" --repeats "$reps" --steps "$STEPS" --warmup "$WARMUP" --contenders "$cont" \
        --max-seconds "$MAX_RUN_S" --run-timeout "$RUN_TIMEOUT" --nvme "$NVME" --quiet \
        --log-dir "$LOGS/$model" --json "$OUT/$model.json" $( [ "$model" = resnet50 ] && echo --plot "$OUT/$model.png" )
}
bench_model resnet50 "$T_BENCH" "$CONTENDERS" "$REPEATS"

# 3b. Predicted vs measured, plan by plan (keep / planned / recompute-only / all-recompute /
#     all-host), ResNet-50 at the bench's shape: where the planner's machine model is off.
part plan_check "$T_CHECK" "$OUT/bench.log" \
    "$PY" -m memstrata.bench.plan_check --model resnet50 --batch "$BATCH" --res "$RES" --amp bf16 \
    --device "${DEVICE:-cuda}" --steps 3 --nvme "$NVME" --json "$LOGS/plan_check.json"

bench_model efficientnet_b0 "$T_BENCH2" "$CONTENDERS2" "$REPEATS2"

# 4. The data side (issue: tiered sample store): ResNet-50 epoch-2 images/s with the
#    memstrata loader vs torchvision's, and vs synthetic tensors already on the GPU
#    (the ceiling).  Its console output goes to gpu_tests.log (8 files come back at most).
part data_train "$T_DATA" "$OUT/gpu_tests.log" \
    "${BENCH[@]}" --scenario data-train --device "${DEVICE:-cuda}" --epochs 2 --images 2048 --quiet \
    --json "$OUT/data_train.json"

# 5. The whole job (issue: the recipe): `memstrata train` vs `--baseline`, ResNet-50, bf16, channels_last,
#    two epochs over a synthetic set, the machine's cores as workers (not measured on GPU yet: size it there).
part recipe "$T_RECIPE" "$OUT/gpu_tests.log" \
    "${BENCH[@]}" --scenario recipe --device "${DEVICE:-cuda}" --model resnet50 --res 224 --epochs 2 \
    --images 8192 --repeats 1 --quiet --json "$OUT/recipe.json"

# 6. The compile and TRL peers (issue 10): torch.compile unmanaged, torch.compile with activation_memory_budget
#    at the budgets' fractions, TRL's stream-overlapped offload, next to memstrata and checkpoint; the same
#    allocator settings for every arm (each worker inherits this environment, PYTORCH_CUDA_ALLOC_CONF included).
#    Compilation happens in untimed setup steps.
part bench_peers "$T_PEERS" "$OUT/bench.log" \
    "${BENCH[@]}" --model resnet50 --batch "$BATCH" --res "$RES" --amp bf16 --device "${DEVICE:-cuda}" \
    --budgets "$PEER_BUDGETS" --repeats 1 --steps "$STEPS" --warmup "$WARMUP" --contenders "$PEER_CONTENDERS" \
    --max-seconds "$MAX_RUN_S" --run-timeout "$PEER_RUN_TIMEOUT" --nvme "$NVME" --quiet \
    --log-dir "$LOGS/resnet50_peers" --json "$OUT/resnet50_peers.json" --plot "$OUT/resnet50_peers.png"

# 7. Optimizer states (issue 12): a ~1.5B GPT-2 with AdamW (fp32 states: 12.5 GB) at a states budget of half
#    of them (HBM over pinned host RAM, updates deferred to the forward), against the peers' CPU offload; and the
#    equal-peak pairs: memstrata_lowpeak (every state bucket in host RAM, deferred) vs torchao_cpu_offload, and
#    memstrata_lowpeak_grads (gradients to host RAM too) vs torchao_cpu_offload_grads.  8 contenders x 1 repeat,
#    2 warm-up + 3 timed steps, each run capped at 12 s of timed steps and 90 s in all (the model is built on the
#    GPU); estimated ~170-240 s in all (bench/results/2026-12-05d-cpu-states/GPU_PART.md plus ~20 s per new arm).
#    Not --quiet: a line per finished run.
#    DeepSpeed's CPU Adam is JIT-built in the background from the bench's start.  Not measured on GPU yet.
part states "$T_STATES" "$OUT/bench.log" \
    "${BENCH[@]}" --model "$S_MODEL" --device "${DEVICE:-cuda}" --batch "$S_BATCH" --seq "$S_SEQ" \
    --budget "$S_BUDGET" --precision "$S_PRECISION" --repeats 1 --steps "$S_STEPS" --warmup "$S_WARMUP" --contenders "$S_CONTENDERS" \
    --max-seconds "$S_MAX_S" --run-timeout "$S_RUN_TIMEOUT" --nvme "$NVME" --log-dir "$LOGS/states" \
    --json "$OUT/states.json"

tar -czf "$OUT/worker_logs.tar.gz" -C "$LOGS" . 2>/dev/null || true
write_env
echo "memstrata gpu_check: done; parts: $PARTS"
ls -l "$OUT"
