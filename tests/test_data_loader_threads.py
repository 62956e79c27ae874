"""The CPU batch builders' intra-op threads: one each, however many builders there are."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

_CHILD = textwrap.dedent("""
    import json, sys, threading
    import torch
    from memstrata.data import TieredLoader, TrainAugment, synth_imagefolder

    class Recording(TrainAugment):  # records the intra-op threads of the thread that builds each batch
        def __call__(self, *a, **k):
            seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return super().__call__(*a, **k)

    seen = []
    root = synth_imagefolder(sys.argv[1] + "/src", images=8, classes=2, progress=False, size=(48, 40), workers=1)
    for workers in (1, 2):
        lo = TieredLoader(root, 4, augment=Recording(size=32), num_workers=workers, prefetch=2,
                          store_dir=sys.argv[1] + "/s", progress=False, device="cpu")
        for _ in lo:
            pass
        lo.close()
    print(json.dumps({"main": torch.get_num_threads(), "builders": seen}))
""")


@pytest.mark.parametrize("omp", ["2"])
def test_batch_builders_use_one_intra_op_thread_and_leave_the_callers(tmp_path, omp):
    """With OMP_NUM_THREADS=2 (torch's default: every core), one builder (num_workers=1) ran its per-sample ops
    with 2 OpenMP threads: 144 images/s against ~2,000 with one on the busy 2-core box (2026-12-05)."""
    env = dict(os.environ, OMP_NUM_THREADS=omp, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["main"] == int(omp)  # the training thread keeps its setting
    assert len(got["builders"]) == 2 * 2  # 2 batches per loader
    assert all(not on_main and n == 1 for on_main, n in got["builders"]), got["builders"]
