#!/usr/bin/env bash
# Fetch (and, for DeepSpeed, build) the peers' wheels that bench/gpu_check.sh installs on a GPU machine whose
# image lacks them (the device image: torch 2.11.0+cu130, Python 3.12, no network), into .whl/ (git-ignored).
# Needs pip with network here and, for the DeepSpeed wheel, a Python with torch (its setup.py imports it).
# Usage: bench/gpu_wheels.sh [PYTHON_WITH_TORCH]     (default: .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
W="$ROOT/.whl"
mkdir -p "$W"
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# torchao 0.17: its C++ extensions are built for torch 2.11 (CPUOffloadOptimizer itself is Python);
# trl: transformers and accelerate are on the image; pydantic & co. and hjson: DeepSpeed's imports the image lacks
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$W" \
    torchao==0.17.0 trl==1.16.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
# DeepSpeed ships only an sdist: a py3-none-any wheel with no prebuilt ops (CPU Adam is JIT-built on first use)
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q wheel setuptools
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$tmp"
cp "$tmp"/deepspeed-*.whl "$W"/
ls -l "$W"
