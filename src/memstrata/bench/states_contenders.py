"""The optimizer-state bench of `memstrata bench --model gpt2-*`: AdamW states kept, tiered, or offloaded by a peer.

A GPT-2-style decoder (bench/gpt2.py, randomly initialised, built directly
on the bench's device), fp32, AdamW (`adamw_kernel`: ``foreach=False`` on a CPU,
``fused=True`` on CUDA, pinned on every arm that runs torch's AdamW),
global-norm clipping at 1.0, random tokens.  The budget is the
fast-tier bytes for optimizer states (host RAM on a CPU box, HBM on CUDA): a
size, or a percentage of the AdamW states (8 bytes per parameter).

- ``unmanaged``: plain AdamW; every state on the fast tier.
- ``memstrata``: `TieredOptimizer` over the same AdamW, placement from
  `plan_states` for the budget, the probed NVMe bandwidths and the measured
  optimizer-step time of the first (untimed) step.  Its tiered buckets'
  updates (NVMe on a CPU, pinned host RAM on CUDA) are deferred to the next
  forward (``model=``, the library's default with a model; [Note: deferred
  updates] and [Note: deferred host buckets] in runtime/deferred.py),
  planned with a timed forward as extra overlap; ``MEMSTRATA_STATES_DEFER=0``
  turns that off for an A/B run.
- ``memstrata_lowpeak``: the same `TieredOptimizer` with every bucket below
  the fast tier whatever the budget (pinned host RAM on CUDA, NVMe files on
  a CPU), deferred as above: the state peak is a window of a few buckets,
  to compare with torchao at equal or lower peak ([Note: the low-peak
  arm]); ``memstrata_lowpeak_grads``: the gradients below too.
- ``torchao_cpu_offload``: torchao's `CPUOffloadOptimizer(params, AdamW)`
  (states and the step on the host; CUDA/XPU only: it asserts otherwise).
  ``torchao_cpu_offload_grads``: the same with ``offload_gradients=True``
  (the gradients leave the device too: torchao's lowest peak).
- ``fsdp2_cpu_offload``: `fully_shard` per block and at the root with
  `CPUOffloadPolicy` on a one-rank process group (gloo on CPU, nccl on CUDA);
  parameters, gradients and states live on the host.
- ``deepspeed_zero_offload``: DeepSpeed ZeRO stage 2 with
  ``offload_optimizer: cpu`` (DeepSpeedCPUAdam), one rank.

[Note: the state bench on CUDA]
HBM is the fast tier, pinned host RAM the slow one: memstrata's buckets below
the budget live in pinned host buffers and are streamed through HBM for the
step (H2D on the high-priority copy stream, D2H written behind; no host sync);
the step itself runs on the GPU.  torchao keeps every state (and a pinned copy
of every parameter and gradient) on the host and steps there (its default
``fused=True`` CPU AdamW); it copies gradients down in post-accumulate-grad
hooks, before `clip_grad_norm_` runs, so clipping does not reach its update
(its documented limit).  FSDP2 keeps parameters, gradients and states on the
host.  DeepSpeed's CPU Adam is JIT-built in the background while the others run
([Note: the DeepSpeed build] in states_prebuild.py).  The worker log has one
line per phase and step (build, prepare, each step).

Each runs in its own worker process (`memstrata.bench.worker` dispatches here
for GPT-2 models).  A peer that refuses this machine reports its own error as
the reason ("needs CUDA: ..."), one that is missing "not installed: ...".

[Note: the low-peak arm]
torchao's `CPUOffloadOptimizer` keeps no optimizer state on the device (its
state peak is ~0: only the small parameters it leaves on the GPU), so
``memstrata`` at a budget of half the states is not an equal-peak comparison.
``memstrata_lowpeak`` puts every state bucket below (budget ignored; buckets
of at most 64 MiB of states, at least 32 of them), read ahead one bucket
and written behind around the forward, so at most two buckets' states are
on the device at once.  A bucket is never smaller than one parameter: GPT-2's
tied embedding alone has 50257 x d states (643 MB for gpt2-1.5b, 309 MB for
gpt2-124m), so on CUDA the state peak is that bucket plus one more (at the
forward's start, where the embedding's update is applied and activations
are few; nothing is read ahead during backward, where the process peaks),
against torchao's ~0 states on the device.  On a CPU the NVMe ring's three
arenas are each as large as that bucket (~0.9 GB for gpt2-124m): the arm is
meant for CUDA.  Gradients stay on the device (as torchao's
default, ``offload_gradients=False``): the updates stay bit-exact with
clipping.  ``memstrata_lowpeak_grads`` also sends the gradients down when
final (`GradTieredOptimizer`; on CUDA the buckets then step on the host, as
torchao's do): the peak of ``torchao_cpu_offload_grads``, no deferral (a
tiered gradient is gone by the next forward), not bit-exact on CUDA (CPU
kernels).  Pairs at equal peak: memstrata_lowpeak / torchao_cpu_offload,
memstrata_lowpeak_grads / torchao_cpu_offload_grads.  Not measured on GPU.

[Note: steal while the disk is busy]
On the CPU box (a 2-vCPU VM whose disk is virtio) the hypervisor takes ~31%
of *each* vCPU as steal time while the disk moves data, reads or writes alike,
whatever the request size or the I/O threads' affinity, and ~0% otherwise
(measured 2026-12-05 evening, bench/results/2026-12-05d-cpu-states/README.md).
So every second the state ring keeps the disk busy also slows the training
thread by ~0.3 s, on top of any wait for the disk.  ``steal_share`` records the
machine's steal share over each run's timed steps, for every arm.

[Note: what "state peak" is]
``state_peak_bytes`` is what the budget limits: optimizer-state bytes on the
fast tier at their peak.  For ``memstrata`` that is the kept buckets' states
plus the arenas of the NVMe buckets (allocated once, so their size is the
peak) plus host-bucket states on tier 0 at their peak; for the others every
state is on the fast tier of this box (on CPU "offloaded to the host" is the
same RAM).  ``peak_bytes`` is the process's whole resident-set peak above the
model-built baseline (states, gradients, activations, staging), measured by
the kernel's high-water mark (VmHWM), as the activation bench does.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import time
import traceback
from dataclasses import asdict
from typing import Any

import torch

from . import gpt2
from .failures import is_oom, one_line
from .spec import RunSpec
from .timing import timed_steps

STATES_CONTENDERS = ("unmanaged", "memstrata", "memstrata_lowpeak", "memstrata_lowpeak_grads", "torchao_cpu_offload",
                     "torchao_cpu_offload_grads", "fsdp2_cpu_offload", "deepspeed_zero_offload")
STATE_BYTES_PER_PARAM = 8  # AdamW fp32: exp_avg + exp_avg_sq
PRECISIONS = {"fp32": 8, "bf16": 12}  # state bytes per parameter: bf16 parameters add the fp32 master (MasterWeights)
MASTER_WEIGHT_ARMS = ("unmanaged", "memstrata", "memstrata_lowpeak", "memstrata_lowpeak_grads")  # --precision bf16
# CPU: 256 tokens per step (was 64, bench/results/2026-12-05c-cpu-states/README.md): the state I/O per step is
# fixed by the model, the compute grows with the tokens; 64 measured the disk more than training (GPT-2 trains
# at 1024), 256 keeps gpt2-350m's 3-repeat run near 10 minutes on the CPU box.  Two warm-up steps: with
# deferred updates a timed step pays for the last one's updates (the first step's create the states).
CPU_DEFAULTS = dict(batch=1, seq=256, steps=3, warmup=2)
CUDA_DEFAULTS = dict(batch=8, seq=1024, steps=5, warmup=2)


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """The AdamW kernel every arm pins ([Note: per-bucket steps are the full step] in runtime/states.py).

    CPU: ``foreach=False``, torch's CPU default.  CUDA: ``fused=True``, the fastest kernel torch has and the
    one torchao documents for `CPUOffloadOptimizer` (there its step runs on the host, where torch has a fused
    AdamW too); a per-bucket fused step applies the same per-tensor formula as a full one."""
    return {"fused": True} if device.type == "cuda" else {"foreach": False}


def on_device_state_bytes(states: Any, device: torch.device) -> int:
    """Bytes of the optimizer states (tensors with ``dim() > 0``) that live on `device`'s kind of memory: on
    CUDA the states a peer keeps on the host are off the fast tier ([Note: what "state peak" is])."""
    return sum(v.numel() * v.element_size() for st in states for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0 and v.device.type == device.type)


def state_bytes(model: str, precision: str = "fp32") -> int:
    return gpt2.param_count(model) * PRECISIONS[precision]


def precision_label(precision: str) -> str:
    return "AdamW fp32" if precision == "fp32" else "bf16 params, AdamW over fp32 masters"


def make_adamw(params, device: torch.device, precision: str) -> torch.optim.Optimizer:
    """The bench's AdamW (`adamw_kernel`); with bf16 parameters over fp32 master weights (`MasterWeights`)."""
    kw = dict(lr=1e-4, weight_decay=0.1, **adamw_kernel(device))
    if precision == "fp32":
        return torch.optim.AdamW(params, **kw)
    from memstrata.runtime.master import MasterWeights

    return MasterWeights(params, torch.optim.AdamW, **kw)


def states_skip_reason(name: str, device: str) -> str | None:
    """Why `name` cannot run here, known before starting a worker (None: try it)."""
    mod = {"torchao_cpu_offload": "torchao", "torchao_cpu_offload_grads": "torchao",
           "deepspeed_zero_offload": "deepspeed"}.get(name)
    if mod and importlib.util.find_spec(mod) is None:
        return f"not installed: {mod} is not importable in this environment (pip install {mod})"
    if name == "deepspeed_zero_offload" and device != "cuda":
        # DeepSpeed does not refuse a CPU box: it JIT-builds its CPU accelerator's ops (minutes of c++) and would
        # "offload" from host RAM to host RAM.  [Note: the DeepSpeed build] in states_prebuild.py.
        return ("needs CUDA: ZeRO-Offload moves states from an accelerator to host RAM, the same memory on a CPU box "
                "(and DeepSpeed would first JIT-build its CPU ops for minutes)")
    return None


class SkipContender(Exception):
    """The contender cannot run here (the reason is its own message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Base:
    name = ""

    def __init__(self, spec: RunSpec, model: torch.nn.Module, device: torch.device) -> None:
        self.spec, self.model, self.device = spec, model, device
        self.opt: Any = None

    def prepare(self) -> None:
        self.opt = make_adamw(self.model.parameters(), self.device, self.spec.precision)

    def parameters(self):
        return self.model.parameters()

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.parameters()), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def state_peak_bytes(self) -> int:
        return on_device_state_bytes(self.opt.state.values(), self.device)

    def notes(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Unmanaged(_Base):
    name = "unmanaged"


def calibrate_step_seconds(numels: list[int], *, elements: int = 1 << 22, repeats: int = 4,
                           precision: str = "fp32") -> float:
    """Seconds of one AdamW (``foreach=False``) step over `numels` elements on this CPU, scaled from the
    fastest of `repeats` steps over a scratch parameter of `elements` elements (out of cache, like the model's);
    with ``precision="bf16"`` a bf16 parameter under `MasterWeights`."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    p = torch.randn(elements, generator=g).mul_(0.02).to(dtype).requires_grad_()
    p.grad = torch.randn(elements, generator=g).mul_(1e-3).to(dtype)
    opt = make_adamw([p], torch.device("cpu"), precision)
    opt.step()  # the states are made here
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t)
    return best * sum(numels) / elements


class Memstrata(_Base):
    """`TieredOptimizer` over the same AdamW, placed by `plan_states` before the first step."""

    name = "memstrata"
    plan: Any = None
    per_step: list[dict[str, float]] = []

    def prepare(self) -> None:
        from memstrata.hardware import profile
        from memstrata.plan.states import plan_states
        from memstrata.runtime.states import StatePlacement, TieredOptimizer

        super().prepare()
        self.inner = self.opt
        self.per_step: list[dict[str, float]] = []
        numels = [p.numel() for g in self.inner.param_groups for p in g["params"]]
        per = PRECISIONS[self.spec.precision]
        total = sum(numels) * per
        bucket = min(64 << 20, max(64 << 10, total // 32))
        kw: dict[str, Any] = {}
        hier = profile("h200" if self.device.type == "cuda" else "cpu")
        if self.device.type == "cuda":
            # [Note: states on CUDA] HBM over pinned host RAM: the buckets the planner sends down go to
            # the host tier (planned with its PCIe bandwidth), not to files.  Not measured on GPU yet.
            host = hier.host_tier()
            kw = dict(read_bandwidth=host.read_bandwidth, write_bandwidth=host.write_bandwidth, below="host RAM")
            if self.defer:  # [Note: deferred host buckets]: the copies overlap the next forward
                kw["forward_seconds"] = self._forward_seconds()
        else:
            if self.spec.nvme_read_bw and self.spec.nvme_write_bw:  # `memstrata probe` of the NVMe directory
                kw = dict(read_bandwidth=self.spec.nvme_read_bw, write_bandwidth=self.spec.nvme_write_bw)
            # The step compute that hides the I/O, measured on this CPU (a scratch AdamW step, scaled).
            kw["step_seconds"] = calibrate_step_seconds(numels, precision=self.spec.precision)
            if self.defer:  # [Note: deferred updates]: the next forward hides the I/O too
                kw["forward_seconds"] = self._forward_seconds()
        self.plan = plan_states(numels, state_bytes_per_element=per,
                                fast_budget=int(self.spec.budget_bytes), hierarchy=hier,
                                bucket_bytes=bucket, **kw)
        placement = StatePlacement.from_plan(self.plan)
        if self.device.type == "cuda":
            placement = StatePlacement(placement.buckets, tuple("host" if t == "nvme" else t for t in self.plan.tiers),
                                       placement.prefetch_depth)
        self.opt = TieredOptimizer(self.inner, placement, nvme_dir=self.spec.nvme_dir,
                                   model=self.model if self.defer else None)

    @property
    def defer(self) -> bool:
        """Deferred updates ([Note: deferred updates] in runtime/deferred.py): on, as in the library, unless
        MEMSTRATA_STATES_DEFER=0 (an A/B switch for the bench)."""
        return os.environ.get("MEMSTRATA_STATES_DEFER", "1") != "0"

    def _forward_seconds(self) -> float:
        """The fastest of two forwards (no grad) of the bench's batch: the compute deferred updates overlap."""
        c = gpt2.GPT2_MODELS[self.spec.model]
        idx = torch.zeros(self.spec.batch, self.spec.seq or CPU_DEFAULTS["seq"], dtype=torch.long, device=self.device)
        best = float("inf")
        with torch.no_grad():
            for _ in range(2):
                sync_now(self.device)
                t = time.perf_counter()
                self.model(idx.clamp_(max=c.vocab - 1))
                sync_now(self.device)
                best = min(best, time.perf_counter() - t)
        return best

    def _counters(self) -> dict[str, float]:
        s = self.opt.stats
        store = self.opt.mover.store
        # with deferred updates the NVMe buckets are stepped in the next forward: their time counts as step time
        return {"opt_step_s": sum(s.step_seconds) + s.deferred_seconds, "deferred_s": s.deferred_seconds,
                "compute_s": s.compute_seconds, "reads_waited_s": s.reads_waited_s,
                "writes_waited_s": s.writes_waited_s, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                "disk_busy_s": store.busy_seconds if store is not None else 0.0}

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        before = self._counters()
        loss = super().step(idx)
        after = self._counters()
        self.per_step.append({k: after[k] - before[k] for k in after})
        return loss

    def state_peak_bytes(self) -> int:
        if self.plan is None:
            return super().state_peak_bytes()
        params = [p for g in self.inner.param_groups for p in g["params"]]
        kept = sum(params[i].numel() * PRECISIONS[self.spec.precision]
                   for b, t in zip(self.plan.buckets, self.plan.tiers) if t == "keep" for i in b)
        s = self.opt.stats
        return kept + s.arena_bytes + (s.peak_resident_bytes if not s.arena_bytes else 0)

    def notes(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        s = self.opt.stats
        steps = max(1, s.steps)
        # [Note: the floor of the state pipeline]: per timed step (the first, which makes the states and
        # only writes, left out), medians: what the step spent, what the disk moved and how fast.
        timed = self.per_step[max(1, self.spec.warmup):] or self.per_step[-1:]
        med = {k: statistics.median(d[k] for d in timed) for k in (timed[0] if timed else {})}
        out = {"plan": self.plan.describe(), "predicted_opt_step_s": self.plan.predicted_seconds,
               "predicted_stall_s": self.plan.stall_seconds, "planned_step_compute_s": self.plan.step_seconds,
               "planned_io_s": self.plan.io_seconds, "ring": self.plan.window, "deferred": bool(self.opt._defer),
               "planned_forward_s": self.plan.forward_seconds,
               "nvme_bytes_per_step": (s.bytes_read + s.bytes_written) / steps,
               "reads_waited_s_per_step": s.reads_waited_s / steps, "writes_waited_s_per_step": s.writes_waited_s / steps,
               "opt_step_s": s.step_seconds, "arena_bytes": s.arena_bytes, "demand_fetches": s.demand_fetches,
               "o_direct": bool(self.opt.mover.store and self.opt.mover.store.direct), "timed_step_medians": med}
        if med:
            moved = med["bytes_read"] + med["bytes_written"]
            out["measured_stall_s"] = med["opt_step_s"] - med["compute_s"]
            out["nvme_bytes_per_timed_step"] = moved
            if med["disk_busy_s"] > 0:
                out["disk_gbps_while_busy"] = moved / med["disk_busy_s"] / 1e9
        return out

    def close(self) -> None:
        if self.plan is not None:
            self.opt.close(keep_states=False)


class MemstrataLowPeak(Memstrata):
    """Every state bucket below the fast tier, deferred ([Note: the low-peak arm])."""

    name = "memstrata_lowpeak"
    tier_grads = False  # memstrata_lowpeak_grads: the gradients below too, when final

    def prepare(self) -> None:
        from memstrata.runtime.grads import GradTieredOptimizer
        from memstrata.runtime.states import StatePlacement, TieredOptimizer

        _Base.prepare(self)
        self.inner = self.opt
        self.per_step = []
        params = [p for g in self.inner.param_groups for p in g["params"]]
        nbytes = [p.numel() * PRECISIONS[self.spec.precision] for p in params]
        bucket = min(64 << 20, max(64 << 10, sum(nbytes) // 32))
        tier = "host" if self.device.type == "cuda" else "nvme"
        u = StatePlacement.uniform(nbytes, tier, bucket)
        # three buckets read ahead (<= 192 MiB): a 64 MiB bucket's copy up (~1.3 ms at PCIe 5) against one
        # Linear's forward (~1-2 ms for gpt2-1.5b) leaves one bucket of read ahead too little slack
        placement = StatePlacement(u.buckets, u.tiers, prefetch_depth=3 if self.device.type == "cuda" else 1)
        self.plan = _LowPeakPlan(placement.buckets, tuple(placement.tiers), tier, self.tier_grads)
        if self.tier_grads:
            self.opt = GradTieredOptimizer(self.inner, placement, grads=placement, nvme_dir=self.spec.nvme_dir,
                                           model=self.model if self.defer else None)
        else:
            self.opt = TieredOptimizer(self.inner, placement, nvme_dir=self.spec.nvme_dir,
                                       model=self.model if self.defer else None)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.tier_grads:
            return super().step(idx)
        before = self._counters()
        logits = self.model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        self.opt.clip_grad_norm_(list(self.parameters()), 1.0)  # sees the tiered gradients
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        after = self._counters()
        self.per_step.append({k: after[k] - before[k] for k in after})
        return loss.detach()

    def state_peak_bytes(self) -> int:
        s = self.opt.stats
        return s.arena_bytes + (s.peak_resident_bytes if not s.arena_bytes else 0)


class MemstrataLowPeakGrads(MemstrataLowPeak):
    """`memstrata_lowpeak` with the gradients below too ([Note: the low-peak arm])."""

    name = "memstrata_lowpeak_grads"
    tier_grads = True


class _LowPeakPlan:
    """What `Memstrata.notes` reads from a plan, for the low-peak arm's fixed placement (nothing predicted)."""

    def __init__(self, buckets, tiers, tier: str, grads: bool) -> None:
        self.buckets, self.tiers = buckets, tiers
        self.window = 3
        self.predicted_seconds = self.stall_seconds = self.step_seconds = self.io_seconds = 0.0
        self.forward_seconds = 0.0
        self._text = (f"optimizer states: every bucket ({len(buckets)}) on {'host RAM' if tier == 'host' else 'NVMe'}, "
                      + ("gradients below too, stepped in step()" if grads else "deferred to the next forward")
                      + " (no plan: lowest peak)")

    def describe(self) -> str:
        return self._text


class TorchaoCPUOffload(_Base):
    name = "torchao_cpu_offload"
    offload_gradients = False

    def prepare(self) -> None:
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError as e:  # torchao, or a package it needs, is missing
            raise SkipContender(f"not installed: {one_line(e)}") from None

        try:
            self.opt = CPUOffloadOptimizer(self.model.parameters(), torch.optim.AdamW, lr=1e-4, weight_decay=0.1,
                                           offload_gradients=self.offload_gradients, **adamw_kernel(self.device))
        except AssertionError as e:  # "CPU Offload currently only supports CUDA & XPU"
            raise SkipContender(f"needs CUDA: torchao CPUOffloadOptimizer says: {e}") from None

    def state_peak_bytes(self) -> int:
        # the host optimizers' states, and those of `d_opt`: the parameters under `minimal_size` it keeps
        # on the device (LayerNorms, small biases)
        opts = list(self.opt.optim_dict.values()) + ([self.opt.d_opt] if self.opt.d_opt is not None else [])
        return on_device_state_bytes((st for o in opts for st in o.state.values()), self.device)


class TorchaoCPUOffloadGrads(TorchaoCPUOffload):
    """torchao with ``offload_gradients=True``: its lowest peak ([Note: the low-peak arm])."""

    name = "torchao_cpu_offload_grads"
    offload_gradients = True


class FSDP2CPUOffload(_Base):
    name = "fsdp2_cpu_offload"

    def prepare(self) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # CUDA: gloo for the CPU tensors too: with CPUOffloadPolicy the gradients are CPU DTensors, and
        # clip_grad_norm_'s reduction of their norms over the mesh needs a CPU backend (pytorch #148532: "No
        # backend type associated with device type cpu" under nccl alone)
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
        self._dist = dist
        policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for blk in self.model.h:
            fully_shard(blk, offload_policy=policy)
        fully_shard(self.model, offload_policy=policy)
        super().prepare()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class DeepSpeedZeroOffload(_Base):
    name = "deepspeed_zero_offload"

    def prepare(self) -> None:
        from .states_prebuild import wait_for_build

        why = wait_for_build() if self.device.type == "cuda" else None  # [Note: the DeepSpeed build]
        if why:
            raise SkipContender(why)
        try:
            import deepspeed
        except ImportError as e:  # deepspeed, or one of its dependencies (hjson, msgpack, pydantic, ...)
            raise SkipContender(f"not installed: {one_line(e)}") from None

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        cfg = {"train_micro_batch_size_per_gpu": self.spec.batch, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}},
               "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
        try:
            self.engine, self.opt, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                               config=cfg)
        except Exception as e:  # noqa: BLE001 - the peer's own refusal becomes the reason
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.device.type != "cuda":
                raise SkipContender(f"needs CUDA: deepspeed.initialize on this CPU box failed: {type(e).__name__}: {msg}"[:400]) from None
            raise

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.engine(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def state_peak_bytes(self) -> int:
        return state_bytes_of(self.opt, self.device)


def state_bytes_of(opt: Any, device: torch.device) -> int:
    inner = getattr(opt, "optimizer", opt)
    return on_device_state_bytes(getattr(inner, "state", {}).values(), device)


_CLASSES = {c.name: c for c in (Unmanaged, Memstrata, MemstrataLowPeak, MemstrataLowPeakGrads, TorchaoCPUOffload,
                                 TorchaoCPUOffloadGrads, FSDP2CPUOffload, DeepSpeedZeroOffload)}


def cpu_steal_jiffies() -> tuple[int, int] | None:
    """(steal, all) jiffies of every CPU of this (virtual) machine so far, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (v[7], sum(v)) if len(v) == 8 else None


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time the hypervisor took between two readings ([Note: steal while the
    disk is busy]: on the CPU box ~31% of each vCPU while the disk moves data, ~0% otherwise)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def say(text: str) -> None:
    """A progress line in the worker's log (the harness keeps it; a run killed by its timeout shows how far it got)."""
    print(f"[states {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync_now(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_states(spec: RunSpec) -> dict[str, Any]:
    """One worker run of the state bench (`memstrata.bench.worker.run` calls this for GPT-2 models)."""
    from .peak import PeakMeter, use_default_host_allocator

    result: dict[str, Any] = {"name": spec.contender, "spec": asdict(spec), "status": "error", "reason": "",
                              "torch": torch.__version__}
    if spec.threads:
        torch.set_num_threads(spec.threads)
    result["threads"] = torch.get_num_threads()
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    use_default_host_allocator()  # the steps run with glibc's usual thresholds on every arm
    if spec.precision != "fp32" and spec.contender not in MASTER_WEIGHT_ARMS:
        result.update(status="skipped", reason=f"--precision {spec.precision}: the bench runs MasterWeights on "
                                               f"unmanaged and the memstrata arms only (the peers have their own mixed "
                                               f"precision)")
        return result
    device = torch.device(spec.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        result["gpu"] = torch.cuda.get_device_name(device)
    torch.manual_seed(spec.seed)
    t_build = time.perf_counter()
    model = gpt2.build(spec.model, device)  # [Note: building on the device] in gpt2.py
    if spec.precision != "fp32":
        model.to(torch.bfloat16)  # the parameters in bf16; MasterWeights keeps their fp32 masters
    model.train()
    sync_now(device)
    result["build_s"] = time.perf_counter() - t_build
    say(f"{spec.contender}: {spec.model} built on {device} in {result['build_s']:.1f} s")
    cfg = gpt2.GPT2_MODELS[spec.model]
    seq = spec.seq or CPU_DEFAULTS["seq"]
    if seq > cfg.ctx:
        raise ValueError(f"--seq {seq} exceeds the context of {spec.model} ({cfg.ctx})")
    gen = torch.Generator().manual_seed(spec.seed + 1)
    idx = torch.randint(0, cfg.vocab, (spec.batch, seq + 1), generator=gen).to(device)
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["state_bytes_total"] = sum(p.numel() for p in model.parameters()) * PRECISIONS[spec.precision]
    result["precision"] = spec.precision
    contender = _CLASSES[spec.contender](spec, model, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    meter = PeakMeter(device)
    meter.start()  # baseline: the model alone; the peak covers states, gradients and activations
    try:
        t_prep = time.perf_counter()
        try:
            contender.prepare()
        except SkipContender as e:
            result.update(status="skipped", reason=str(e))
            say(f"{spec.contender}: skipped: {e}")
            return result
        sync()
        result["prepare_s"] = time.perf_counter() - t_prep
        say(f"{spec.contender}: prepared in {result['prepare_s']:.1f} s")
        losses: list[float] = []
        t0 = time.perf_counter()
        for i in range(spec.warmup):
            t1 = time.perf_counter()
            losses.append(float(contender.step(idx)))
            sync()
            say(f"{spec.contender}: warm-up step {i + 1}/{spec.warmup} {time.perf_counter() - t1:.2f} s")
        result["warmup_s"] = time.perf_counter() - t0

        def sync_and_say() -> None:
            sync()
            say(f"{spec.contender}: timed step done, {time.perf_counter() - t0:.1f} s after the first warm-up")

        steal0 = cpu_steal_jiffies()
        timed, step_times, cpu_times, total = timed_steps(lambda: contender.step(idx), sync_and_say, spec.steps,
                                                          spec.max_seconds)
        result["steal_share"] = steal_share(steal0, cpu_steal_jiffies())
        losses += timed
        reading = meter.stop()
        state_peak = contender.state_peak_bytes()
        notes = contender.notes()
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
        status="ok", steps_done=len(step_times), step_times=step_times, step_cpu_times=cpu_times,
        step_time_median=median, samples_per_s=spec.batch / median,
        samples_per_s_total=spec.batch * len(step_times) / total,
        peak_bytes=reading.peak_bytes, peak_total_bytes=reading.peak_total_bytes, baseline_bytes=reading.baseline_bytes,
        peak_method=reading.method, kept_bytes=None, losses=losses, notes=notes, state_peak_bytes=state_peak,
    )
    return result


__all__ = ["STATES_CONTENDERS", "state_bytes", "states_skip_reason", "run_states", "CPU_DEFAULTS", "CUDA_DEFAULTS",
           "PRECISIONS", "MASTER_WEIGHT_ARMS", "precision_label", "make_adamw"]
