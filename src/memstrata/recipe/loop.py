"""The training job: epochs of train + validate, measured, checkpointed, resumable, rank-aware.

`train(cfg)` runs the whole recipe in this process (under torchrun: this rank)
and returns the run's summary dict (what `memstrata train --json` prints).

[Note: what is measured]
Per epoch: the training wall time (first batch requested -> last optimizer step
finished; CUDA synchronised), images/s over it, the *data-wait* time -- how long
the step loop was blocked in ``next()`` on the loader (plus, for the baseline,
the host->device copy call) -- as a fraction of the training time, the mean
training loss, and validation top-1 with its own wall time.  `wall_s` is the
cumulative wall clock since the run started (model set-up, store building,
validation and checkpoints included), continued across --resume, so it is what
the top-1 vs wall-time plot's x axis shows.  On CUDA the wait is host-side:
the GPU may still run queued work while the host waits.

[Note: exact resume]
A checkpoint is written after each epoch's validation: model, optimizer (momentum
buffers), scheduler (its step count), every rank's RNG states (torch CPU and
CUDA, Python, NumPy), the baseline's persistent sampler generator, and the
history.  Nothing draws random numbers between that point and the next epoch's
first batch in either a straight or a resumed run, so a resumed run's next
epoch sees the same batches, the same dropout masks and the same DataLoader
worker seeds.  memstrata's loader needs no state: its order and augmentation are
functions of (seed, epoch, sample).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import RecipeConfig, RecipeInputError
from .data import make_pipelines
from .optim import build_model, build_optimizer, build_scheduler

__all__ = ["train", "DistContext", "dist_context", "checkpoint_path", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------ distributed context
class DistContext:
    """rank / world size from torchrun's environment; `init()` starts the process group (gloo or nccl)."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.started = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def init(self, device: torch.device) -> None:
        dist = torch.distributed
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def dist_context() -> DistContext:
    return DistContext()


def resolve_device(cfg: RecipeConfig, dc: DistContext) -> torch.device:
    from ..data.loader import cuda_available

    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if cuda_available() else "cpu"
    if kind == "cuda":
        if not cuda_available():
            raise RecipeInputError("--device cuda: CUDA is not available on this machine")
        torch.cuda.set_device(dc.local_rank)
        return torch.device("cuda", dc.local_rank)
    return torch.device("cpu")


# ------------------------------------------------------------------ checkpoints
def checkpoint_path(cfg: RecipeConfig) -> Path:
    return Path(cfg.checkpoint).expanduser() / "checkpoint.pt"


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, cfg: RecipeConfig) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeInputError(f"--resume: no checkpoint at {str(path)!r}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG states
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is a user-level problem
        raise RecipeInputError(f"--resume: {str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise RecipeInputError(f"--resume: {str(path)!r} is not a memstrata train checkpoint (format {CHECKPOINT_FORMAT})")
    want = cfg.resume_key()
    diff = [f"{k}: checkpoint {ck['config'].get(k)!r}, now {want[k]!r}" for k in want if ck["config"].get(k) != want[k]]
    if diff:
        raise RecipeInputError(f"--resume: the checkpoint was written with other settings ({'; '.join(diff)})")
    return ck


# ------------------------------------------------------------------ the job
def _batch_to(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    if x.device != device:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    if channels_last and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train(cfg: RecipeConfig, *, log: Callable[[str], None] | None = None, progress: bool = True,
          plot: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary (see [Note: what is measured]).

    stop_after: train at most this many epochs in this process, then return (the
    schedule still spans `cfg.epochs`; continue with `resume=True`), e.g. for a
    time-limited job slot.
    """
    if stop_after is not None and stop_after <= 0:
        raise RecipeInputError(f"stop_after must be a positive number of epochs, got {stop_after}")
    t_start = time.perf_counter()
    dc = dist_context()
    if dc.world_size != cfg.world_size:
        raise RecipeInputError(f"config says world_size={cfg.world_size} but the environment has WORLD_SIZE={dc.world_size}")
    device = resolve_device(cfg, dc)
    dc.init(device)
    try:
        return _train(cfg, dc, device, t_start, log or (lambda s: None), progress and dc.rank == 0, plot, stop_after)
    finally:
        if dc.started:
            dc.barrier()  # every rank is done with collectives (and checkpoint files) before the group goes
            torch.distributed.destroy_process_group()


def _train(cfg, dc, device, t_start, log, progress, plot, stop_after):
    cuda = device.type == "cuda"
    pipes = make_pipelines(cfg, device, dc.rank, dc.world_size, dc.local_rank)
    mgr = None
    try:
        net = build_model(cfg.model, pipes.num_classes, cfg.seed).to(device)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        opt = build_optimizer(net, cfg)
        steps = len(pipes.train)
        sched = build_scheduler(opt, cfg, steps)
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        history: list[dict[str, Any]] = []
        start_epoch, wall_before = 0, 0.0
        ck_path = checkpoint_path(cfg) if cfg.checkpoint else None
        if cfg.resume:
            ck = _load_checkpoint(ck_path, cfg)
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch, wall_before, history = ck["epoch"], ck["wall_s"], list(ck["history"])
            if pipes.sampler_generator is not None:
                pipes.sampler_generator.set_state(ck["sampler_generator"])
            rngs = ck["rng"]
            _set_rng_state(rngs[dc.rank] if dc.rank < len(rngs) else rngs[0])
            log(f"resumed from {ck_path} after epoch {start_epoch}")
        model: nn.Module = net
        if cfg.compile:
            model = torch.compile(net)
        if dc.active:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[dc.local_rank] if cuda else None)
        if cfg.budget:
            from ..manager import Manager

            mgr = Manager(model, budget=cfg.budget, nvme_dir=cfg.nvme_dir, model_name=cfg.model)  # DDP: its module
        amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
        setup_s = time.perf_counter() - t_start

        end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
        from .pairsync import EpochRendezvous

        pair = EpochRendezvous.from_env() if dc.rank == 0 and not dc.active else None  # [Note: epoch-aligned pairs]
        paused = 0.0  # seconds spent waiting for the other contender of a bench pair: not this run's work
        for epoch in range(start_epoch, end_epoch):
            pair_wait = pair.wait(epoch) if pair is not None and epoch >= 1 else 0.0
            paused += pair_wait
            rec = _train_epoch(cfg, dc, device, pipes, model, opt, sched, crit, amp, mgr, epoch, steps, progress)
            t_val = time.perf_counter()
            top1, n_val = _evaluate(dc, device, pipes, model, amp, cuda)
            rec["val_s"] = time.perf_counter() - t_val
            rec["top1"] = top1
            rec["val_images"] = n_val
            rec["wall_s"] = wall_before + time.perf_counter() - t_start - paused
            rec["pair_wait_s"] = pair_wait
            history.append(rec)
            log(_epoch_line(rec, cfg.epochs))
            if ck_path is not None:
                rngs = dc.gather(_rng_state())
                if dc.rank == 0:
                    _save_checkpoint(ck_path, {
                        "format": CHECKPOINT_FORMAT, "config": cfg.resume_key(), "epoch": epoch + 1,
                        "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": rngs, "wall_s": rec["wall_s"], "history": history,
                        "sampler_generator": pipes.sampler_generator.get_state() if pipes.sampler_generator is not None
                        else None,
                    })
                dc.barrier()
        wall = wall_before + time.perf_counter() - t_start - paused
        out = _summary(cfg, dc, device, pipes, history, wall, setup_s, start_epoch)
        out["manager"] = _manager_summary(mgr)
        out["pair_wait_s"] = paused
        out["checkpoint"] = str(ck_path) if ck_path is not None else None
        if plot is not None and dc.rank == 0 and history:
            from .report import plot_top1

            plot_top1(plot, [out])
            out["plot"] = plot
        out["_model"] = net  # for in-process callers (tests); dropped before printing
        return out
    finally:
        if mgr is not None:
            mgr.close()
        pipes.close()


def _train_epoch(cfg, dc, device, pipes, model, opt, sched, crit, amp, mgr, epoch, steps, progress):
    from ..progress import BenchProgress
    from .probe import EpochProbe

    cuda = device.type == "cuda"
    model.train()
    probe = EpochProbe()
    pipes.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    wait = 0.0
    t0 = time.perf_counter()
    it = iter(pipes.train)
    with BenchProgress(steps, not progress, f"epoch {epoch + 1}/{cfg.epochs}", stderr=True) as bar:
        k = 0
        while True:
            tw = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = _batch_to(x, y, device, cuda)
            tc, tcpu = time.perf_counter(), time.thread_time()
            wait += tc - tw
            step_ctx = mgr.step(x) if mgr is not None else nullcontext()
            with step_ctx:
                with amp():
                    out = model(x)
                    loss = crit(out, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            b = int(y.shape[0])
            seen += b
            loss_sum += loss.detach().double() * b
            probe.step(time.perf_counter() - tc, time.thread_time() - tcpu)  # CPU: the step's compute (on CUDA: its host-side launch time)
            k += 1
            if progress and (not cuda or k % 20 == 0 or k == steps):
                bar.describe(f"loss {float(loss.detach()):.3f}  lr {sched.get_last_lr()[0]:.4g}")
            bar.tick()
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    tot_loss, tot_seen = dc.all_sum([float(loss_sum), float(seen)], device)
    orders = dc.gather(_order_digest(pipes, epoch)) if dc.active else None
    return {"epoch": epoch + 1, "rank_orders": orders, "train_s": dt, "images": seen, "images_all_ranks": int(tot_seen),
            "samples_per_s": tot_seen / dt if dt > 0 else None, "data_wait_s": wait,
            "data_wait_fraction": wait / dt if dt > 0 else None, "loss": tot_loss / tot_seen if tot_seen else None,
            "lr": sched.get_last_lr()[0], **probe.finish()}


def _order_digest(pipes, epoch: int) -> dict[str, Any] | None:
    """This rank's sample order of `epoch` (sha1 of the int64 indices, length, first ones), to compare across runs."""
    import hashlib

    if pipes.kind == "memstrata":
        o = np.asarray(pipes.train.order(epoch), dtype=np.int64)
    elif pipes.train_sampler is not None:  # DistributedSampler, already set_epoch'ed (iterating draws nothing global)
        o = np.asarray(list(pipes.train_sampler), dtype=np.int64)
    else:
        return None  # single-process RandomSampler: iterating it would advance its generator
    return {"n": int(len(o)), "sha1": hashlib.sha1(o.tobytes()).hexdigest(), "head": o[:8].tolist()}


@torch.no_grad()
def _evaluate(dc, device, pipes, model, amp, cuda) -> tuple[float | None, int]:
    model.eval()
    correct, total = 0.0, 0.0
    for x, y in pipes.val:
        x, y = _batch_to(x, y, device, cuda)
        with amp():
            out = model(x)
        correct += float((out.argmax(1) == y).sum())
        total += int(y.shape[0])
    correct, total = dc.all_sum([correct, total], device)
    return (correct / total if total else None), int(total)


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}%"
    return (f"epoch {r['epoch']}/{epochs}  train {r['train_s']:.1f} s  {r['samples_per_s']:.1f} images/s  "
            f"data wait {100 * r['data_wait_fraction']:.0f}%  loss {r['loss']:.4f}  val top-1 {top1}  "
            f"(val {r['val_s']:.1f} s, wall {r['wall_s']:.1f} s)")


def _summary(cfg, dc, device, pipes, history, wall, setup_s, start_epoch) -> dict[str, Any]:
    later = [r for r in history if r["epoch"] >= 2] or history
    tt = sum(r["train_s"] for r in later)
    n = sum(r["images_all_ranks"] for r in later)
    w = sum(r["data_wait_s"] for r in later)
    steps = [r["step_s_median"] for r in later if r.get("step_s_median") is not None]
    return {
        "name": "baseline" if cfg.baseline else "memstrata",
        "model": cfg.model, "epochs": len(history), "wall_s": wall,
        "samples_per_s": n / tt if tt > 0 else None,
        "samples_per_s_stat": "training images / s over epochs 2.. (all ranks)" if len(history) > 1
        else "training images / s of epoch 1",
        "data_wait_fraction": w / tt if tt > 0 else None,
        "step_s_median": statistics.median(steps) if steps else None,
        "cpu_s_per_image": sum(r.get("cpu_s", 0.0) + r.get("children_cpu_s", 0.0) for r in later) / n if n else None,
        # with one intra-op thread: the steps' own CPU, and everything else the run used (loader threads or
        # DataLoader workers, the batch hand-over): see recipe/probe.py
        "compute_cpu_s_per_image": sum(r.get("compute_thread_cpu_s", 0.0) for r in later) / n if n else None,
        "pipeline_cpu_s_per_image": sum(r.get("cpu_s", 0.0) + r.get("children_cpu_s", 0.0)
                                        - r.get("compute_thread_cpu_s", 0.0) for r in later) / n if n else None,
        "top1": history[-1]["top1"] if history else None,
        "per_epoch": history, "setup_s": setup_s, "resumed_at_epoch": start_epoch if cfg.resume else None,
        "device": str(device), "world_size": dc.world_size, "train_images": pipes.train_images,
        "val_images": pipes.val_images, "classes": pipes.num_classes, "store": pipes.store_dirs,
        "store_built_by_ranks": [r for r, b in enumerate(dc.gather(pipes.built_here)) if b],
        "loader_stats": dc.gather(dict(pipes.train.stats) if pipes.kind == "memstrata" else None),
        "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
        "config": cfg.to_dict(),
    }


def _manager_summary(mgr) -> dict[str, Any] | None:
    if mgr is None:
        return None
    rep = mgr.report()
    return {"budget": rep.get("budget"), "enabled": rep.get("enabled"), "shapes": rep.get("shapes"),
            "steps": len(rep.get("steps", []))}
