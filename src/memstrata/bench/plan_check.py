"""Predicted vs measured, plan by plan: where the planner's model of the machine is off.

    python -m memstrata.bench.plan_check --model resnet50 --batch 256 --res 224 --amp bf16 --json FILE

Runs one model under several plans in one process, each through a fresh
`Manager` (warm-up, measured trace, plan, then `--steps` managed steps), and
reports for each the simulator's predicted step time and peak next to the
measured ones.  The plans isolate one cost each:

* keep            the runtime's hooks alone (no copies, no recompute)
* planned         the planner's plan at the budget
* recompute-only  the planner restricted to recomputation
* all-recompute   every unit recomputed in full (recompute cost model)
* all-host        every saved activation through host memory (copy cost model)

Measured step = the fastest managed step (forward + backward, synchronised);
peak = the largest managed step's `max_memory_allocated` on CUDA, the sampled
heap on CPU.  Tuning is off: each row is the named plan and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any, Callable

import torch

CANDIDATES = ("keep", "planned", "recompute-only", "all-recompute", "all-host")


def _planner(name: str) -> Callable:
    from memstrata.plan.api import plan
    from memstrata.plan.forced import forced_plan

    if name == "keep":
        return lambda tr, h, b: forced_plan(tr, "keep", h)
    if name == "planned":
        return lambda tr, h, b: plan(tr, h, b)
    if name == "recompute-only":
        return lambda tr, h, b: plan(tr, h, b, tiers=())
    if name == "all-recompute":
        return lambda tr, h, b: forced_plan(tr, "recompute", h)
    if name == "all-host":
        return lambda tr, h, b: forced_plan(tr, "host", h)
    raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, *, budget: str, steps: int,
            amp: torch.dtype | None, nvme_dir: str) -> dict[str, Any]:
    from memstrata.manager import Manager

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mgr = Manager(model, budget=budget, planner=_planner(name), nvme_dir=nvme_dir, warmup_steps=2, tune=False)
    row: dict[str, Any] = {"name": name}
    try:
        for _ in range(2 + 1 + steps):
            with mgr.step(x):
                with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                    out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 -- one failing plan must not hide the others
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        mgr.close()
        return row
    rep = mgr.report()
    mgr.close()
    steps_ = rep["steps"]
    managed = [s for s in steps_ if s["mode"] == "managed"]
    warm = [s for s in steps_ if s["mode"] == "warmup"]
    (shape,) = rep["shapes"].values()
    plan = shape.get("plan") or {}
    peaks = [s["peak_bytes"] for s in managed if s.get("peak_bytes") is not None]
    stats = managed[-1].get("stats") or {} if managed else {}
    row.update(
        status="ok",
        counts=plan.get("counts"),
        budget_bytes=shape.get("budget_bytes"),
        unmanaged_step_s=min(s["seconds"] for s in warm) if warm else None,
        predicted_step_s=plan.get("predicted_step_time"),
        measured_step_s=min(s["seconds"] for s in managed) if managed else None,
        predicted_peak_bytes=managed[-1].get("predicted_peak_bytes") if managed else None,
        measured_peak_bytes=max(peaks) if peaks else None,
        unmanaged_peak_bytes=shape.get("observed_peak"),
        demand_fetches=stats.get("demand_fetches"),
        recomputed_units=stats.get("recomputed_units"),
        misaligned=stats.get("misaligned"),
        trace_time_scale=plan.get("trace_time_scale"),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memstrata.bench.plan_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--budget", default="50%", help="the Manager's budget (size or percentage of its traced peak)")
    p.add_argument("--steps", type=int, default=4, help="managed steps per plan (default 4)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of " + ", ".join(CANDIDATES))
    p.add_argument("--nvme", default=None, metavar="DIR")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE")
    a = p.parse_args(argv)
    import torchvision
    from rich.console import Console
    from rich.table import Table

    from memstrata.hardware import format_size

    names = [c.strip() for c in a.candidates.split(",") if c.strip()]
    for n in names:
        if n not in CANDIDATES:
            p.error(f"unknown candidate {n!r}; choose from {', '.join(CANDIDATES)}")
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available")
    device = torch.device(dev)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, weights=None, num_classes=1000).to(device)
    x = torch.randn(a.batch, 3, a.res, a.res, device=device)
    y = torch.randint(0, 1000, (a.batch,), device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    nvme = a.nvme or tempfile.mkdtemp(prefix="memstrata-plan-check-")
    rows = []
    console = Console(stderr=True)
    for n in names:
        console.print(f"plan_check: {n} …")
        rows.append(measure(model, x, y, n, budget=a.budget, steps=a.steps, amp=amp, nvme_dir=nvme))
    t = Table(title=f"{a.model} · batch {a.batch} · {a.res}px · {dev} · amp {a.amp}: predicted vs measured")
    for c in ("plan", "decisions", "pred ms", "meas ms", "meas/pred", "unmanaged ms", "pred peak", "meas peak", "status"):
        t.add_column(c)
    ms = lambda v: f"{v * 1e3:.1f}" if v is not None else "-"  # noqa: E731
    fs = lambda v: format_size(v) if v is not None else "-"  # noqa: E731
    for r in rows:
        ratio = (r["measured_step_s"] / r["predicted_step_s"]
                 if r.get("measured_step_s") and r.get("predicted_step_s") else None)
        counts = " ".join(f"{k}:{v}" for k, v in (r.get("counts") or {}).items() if v)
        t.add_row(r["name"], counts or "-", ms(r.get("predicted_step_s")), ms(r.get("measured_step_s")),
                  f"{ratio:.2f}" if ratio else "-", ms(r.get("unmanaged_step_s")), fs(r.get("predicted_peak_bytes")),
                  fs(r.get("measured_peak_bytes")), r["status"] + (f": {r['reason'][:70]}" if r.get("reason") else ""))
    Console(width=200).print(t)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "res": a.res, "device": dev, "amp": a.amp,
                       "budget": a.budget, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "rows": rows}, f, indent=1)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
