"""A/B: TieredLoader with the previous fused CPU kernel (commit c7f77a2's augment.py) against this one.

Same process, same store, alternating; CPU seconds of the whole process (all threads) per image and
images/s, epochs 2.. of each repeat; medians.  The two kernels' outputs are checked equal first.
Usage: PYTHONPATH=src python bench/loader_ab.py ROOT STORE OLD_AUGMENT_PY [--workers 2] [--repeats 5] [--old-label L]
(OLD_AUGMENT_PY: `git show c7f77a2:src/memstrata/data/augment.py > old_augment.py`)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("store")
    ap.add_argument("old")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--old-label", default="previous (c7f77a2)", help="the previous kernel's row label")
    a = ap.parse_args(argv)
    import memstrata.data.augment as aug_mod
    from memstrata.data import TieredLoader

    spec = importlib.util.spec_from_file_location("old_augment", a.old)
    old = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["old_augment"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    kernels = {a.old_label: old.resized_crop_fused, "this commit": aug_mod.resized_crop_fused}
    lo = TieredLoader(a.root, 128, seed=0, epochs=a.epochs, device="cpu", store_dir=a.store, num_workers=a.workers,
                      progress=False)
    ref = {}
    for name, fn in kernels.items():  # same bits
        aug_mod.resized_crop_fused = fn
        lo.set_epoch(0)
        ref[name] = next(iter(lo))[0].clone()
    same = torch.equal(*ref.values())
    res = {k: {"cpu_us": [], "ips": []} for k in kernels}
    for _ in range(a.repeats):
        for name, fn in kernels.items():
            aug_mod.resized_crop_fused = fn
            lo.set_epoch(0)
            for _x in lo:  # epoch 1: warm
                pass
            c0, t0, n = time.process_time(), time.perf_counter(), 0
            for e in range(1, a.epochs):
                lo.set_epoch(e)
                for _x, y in lo:
                    n += len(y)
            res[name]["cpu_us"].append((time.process_time() - c0) / n * 1e6)
            res[name]["ips"].append(n / (time.perf_counter() - t0))
    lo.close()
    print(f"outputs equal: {same}; workers {a.workers}; {a.repeats} alternating repeats; medians")
    print(f"{'kernel':<22} {'CPU us/image':>12} {'images/CPU-s':>12} {'images/s':>9}  repeats (CPU us/image)")
    for name, r in res.items():
        cu = statistics.median(r["cpu_us"])
        print(f"{name:<22} {cu:12.1f} {1e6 / cu:12,.0f} {statistics.median(r['ips']):9,.0f}  "
              + ", ".join(f"{v:.0f}" for v in r["cpu_us"]))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
