"""One benchmark run in its own process: one contender, one model, one repeat.

    python -m memstrata.bench.worker --spec spec.json --out result.json

The spec is a JSON object (see `RunSpec`); the result is a JSON object with
``status`` in ok / oom / skipped / error, and for ok runs the per-step times,
samples/s and the measured peak (`memstrata.bench.peak`).  The worker always
tries to write a result; a traceback, if any, goes to stderr (the harness keeps
it in the run's log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any

from .failures import is_oom, one_line
from .spec import RunSpec
from .timing import timed_steps


def run(spec: RunSpec) -> dict[str, Any]:
    from .gpt2 import is_gpt2

    if is_gpt2(spec.model):  # the optimizer-state bench: states_contenders.py
        from .states_contenders import run_states

        return run_states(spec)
    import torch
    import torchvision

    from . import contenders
    from .peak import (PeakMeter, anon_rss, exact_host_allocator_active, trim_host_allocator,
                       use_default_host_allocator)

    result: dict[str, Any] = {"name": spec.contender, "setting": spec.setting, "spec": asdict(spec), "status": "error",
                              "reason": ""}
    result["torch"] = torch.__version__
    if spec.threads:
        torch.set_num_threads(spec.threads)
    result["threads"] = torch.get_num_threads()
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    # every arm inherits the harness's environment: the same CUDA allocator settings for all (recorded to show it)
    result["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    device = torch.device(spec.device)
    if device.type == "cuda":
        if device.index is None:  # set_device and the memory stats want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        result["gpu"] = torch.cuda.get_device_name(device)

    contender = contenders.make(spec.contender)
    torch.manual_seed(spec.seed)
    model = torchvision.models.get_model(spec.model, weights=None, num_classes=spec.num_classes)
    model.to(device)
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(spec.seed + 1)
    x = torch.randn(spec.batch, 3, spec.res, spec.res, generator=gen).to(device)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (spec.batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.amp]
    scaler = None
    if amp_dtype is torch.float16:
        scaler = torch.amp.GradScaler(device.type)
    ctx = contenders.StepContext(
        model=model, optimizer=opt, x=x, y=y, device=device, amp_dtype=amp_dtype, scaler=scaler,
        budget_bytes=spec.budget_bytes, microbatches=spec.microbatches, nvme_dir=spec.nvme_dir,
        unmanaged_peak_bytes=spec.unmanaged_peak_bytes, memory_budget_fraction=spec.memory_budget_fraction,
    )
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def live_state() -> int:
        # what the process holds in tensors and heap, to see what a contender keeps between steps
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else anon_rss()

    if spec.plan_only:
        return _planning_run(spec, ctx, result, sync)
    if spec.plan_path and spec.contender == "memstrata":
        from .plan_once import load_plan

        ctx.plan = load_plan(spec.plan_path)
        result["plan_path"] = spec.plan_path
    trim_host_allocator()
    state0 = live_state()
    try:
        contender.prepare(ctx)
    except contenders.SkipContender as e:
        result.update(status="skipped", reason=str(e))
        return result

    try:
        losses: list[float] = []  # every step's loss, in order (setup and warm-up included)
        t0 = time.perf_counter()
        for _ in range(contender.setup_steps):
            losses.append(float(contender.step(ctx)))
        sync()
        result["setup_s"] = time.perf_counter() - t0

        def momentum_bytes() -> int:
            # SGD momentum buffers appear at the first optimizer step; everything else
            # that grew since the model was built stays with the contender ("kept").
            return sum(
                st["momentum_buffer"].numel() * st["momentum_buffer"].element_size()
                for st in opt.state.values() if st.get("momentum_buffer") is not None
            )

        exact = device.type == "cpu" and spec.cpu_peak == "exact" and exact_host_allocator_active()
        peak_reading = None
        t0 = time.perf_counter()
        for _ in range(spec.warmup - 1 if exact else spec.warmup):
            losses.append(float(contender.step(ctx)))
        if exact:
            # [Note: allocator-held memory] in peak.py: the last warm-up step (an extra step
            # when there is no warm-up) is metered with the exact host allocator; then glibc
            # gets its usual thresholds back for the timed steps.
            meter = PeakMeter(device)
            meter.start()
            kept = anon_rss() - state0 - momentum_bytes()
            losses.append(float(contender.step(ctx)))
            peak_reading = meter.stop()
            use_default_host_allocator()
        sync()
        result["warmup_s"] = time.perf_counter() - t0

        meter = PeakMeter(device)
        meter.start()
        if not exact:
            kept = (meter.baseline_bytes if device.type == "cuda" else anon_rss()) - state0 - momentum_bytes()
        timed, step_times, cpu_times, total = timed_steps(lambda: contender.step(ctx), sync, spec.steps,
                                                          spec.max_seconds)
        losses += timed
        timed_reading = meter.stop()
        reading = peak_reading or timed_reading
    except Exception as e:  # noqa: BLE001 -- every failure becomes a result
        traceback.print_exc()
        result.update(status="oom" if is_oom(e) else "error", reason=one_line(e))
        return result
    finally:
        try:
            contender.close()
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    median = statistics.median(step_times)
    result.update(
        status="ok",
        steps_done=len(step_times),
        step_times=step_times,
        step_cpu_times=cpu_times,
        step_time_median=median,
        samples_per_s=spec.batch / median,
        samples_per_s_total=spec.batch * len(step_times) / total,
        peak_bytes=reading.peak_bytes,
        peak_total_bytes=reading.peak_total_bytes,
        baseline_bytes=reading.baseline_bytes,
        peak_method=reading.method + (" (exact host allocator, last warm-up step)" if exact else ""),
        kept_bytes=kept,
        losses=losses,
        notes=contender.notes(),
    )
    if device.type == "cpu":
        result["peak_rss_default_bytes"] = timed_reading.peak_bytes
    return result


def _planning_run(spec: RunSpec, ctx, result: dict[str, Any], sync) -> dict[str, Any]:
    """The memstrata planning run: plan (and fit) once, write the plan to `spec.plan_path`."""
    from . import contenders
    from .peak import PeakMeter
    from .plan_once import plan_once, write_plan

    if spec.contender != "memstrata" or not spec.plan_path or spec.budget_bytes is None:
        raise ValueError("a planning run needs contender memstrata, plan_path and budget_bytes")
    try:
        plan, info = plan_once(ctx, lambda: contenders.make("memstrata"), sync, lambda: PeakMeter(ctx.device),
                               int(spec.budget_bytes))
    except contenders.SkipContender as e:
        result.update(status="skipped", reason=str(e))
        return result
    if plan is None:
        raise RuntimeError("the planning run made no plan")
    write_plan(spec.plan_path, plan, info)
    result.update(status="ok", plan_path=spec.plan_path, plan=plan.to_dict(), plan_info=info)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memstrata.bench.worker")
    p.add_argument("--spec", required=True, help="JSON file with a RunSpec")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    a = p.parse_args(argv)
    with open(a.spec) as f:
        spec = RunSpec.from_dict(json.load(f))
    try:
        result = run(spec)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result = {"name": spec.contender, "status": "oom" if is_oom(e) else "error", "reason": one_line(e)}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=str)
    os.replace(tmp, a.out)
    print(f"{spec.contender}: {result['status']} {result.get('reason', '')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
