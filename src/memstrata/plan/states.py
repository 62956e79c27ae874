"""Which optimizer-state buckets go to NVMe: a pure function of sizes, a budget and bandwidths.

>>> from memstrata.hardware import profile
>>> # 64 MiB of AdamW states (64 parameters of 128 Ki elements x 8 bytes), 40 MiB of fast tier for them
>>> p = plan_states([1 << 17] * 64, state_bytes_per_element=8, fast_budget=40 << 20, hierarchy=profile("cpu"),
...                 bucket_bytes=8 << 20)
>>> len(p.buckets), p.tiers.count("nvme"), p.nvme_bytes >> 20, p.fast_bytes >> 20, p.window  # 8 MiB buckets
(8, 6, 48, 40, 3)
>>> round(p.io_seconds * 1e3), p.stall_seconds > 0   # 24 MiB each way inside the step, ~20 ms of compute
(41, True)

The result feeds the runtime without either importing the other:
``StatePlacement.from_plan(p)`` (runtime/states.py) takes `buckets`, `tiers`
and the ring depth (`window`).

[Note: what the state planner models]
* Memory: the fast tier holds every kept bucket's states all the time, plus
  the runtime's ring of ``window`` arenas (state_arenas.py), each as large as
  the largest NVMe bucket.  Parameters, gradients and activations are not
  counted: `fast_budget` is what the caller sets aside for states.
* Bytes moved inside a step: the runtime reverses the step order every step,
  so the ``window`` buckets a step leaves in the ring are the next step's
  first ones (no read), and their writes land during the next forward and
  backward.  Inside the step the disk reads and writes the NVMe bytes less
  those: ``moved = nvme_bytes - min(n, window) * mean NVMe bucket``, which at
  the planned optimum is about ``all states - fast_budget`` each way, whatever
  the bucket size: the floor of any placement that keeps at most
  `fast_budget` of states in memory at every instant (at the step's start
  memory is full, so everything else is read after it starts; at its end
  everything else was written before it ends).
  ``io = moved/read_bw + moved/write_bw + 2*latency`` per request inside the
  step (reads and writes share the device, so they add).
* Deferred updates (``forward_seconds`` > 0; [Note: deferred updates] in
  runtime/deferred.py): the NVMe buckets are stepped in the next forward, just
  before their module runs, in the same order every step (not reversed), so
  the window of the ring's I/O is the step's compute plus the forward's: in the
  formulas below ``step_seconds`` becomes ``step_seconds + forward_seconds``.
  The bytes moved inside it are the same: the ring's last ``window`` buckets
  are written during backward, and backward's post-accumulate-grad hooks read
  the next step's first ``window`` buckets into the arenas those writes free.
* Stall: the I/O overlaps the optimizer step's own compute (``step_seconds``:
  measured, or estimated as ``touch_factor`` bytes of memory traffic per state
  byte at the tier-0 bandwidth; AdamW fp32 touches ~28 bytes per 8 state
  bytes, 3.5x) and ``overlap_seconds`` of other work the caller says hides it.
  Two bounds: the disk's throughput (``io``), and each arena's cycle: stepped
  (c = step_seconds / NVMe buckets), written, read again for the bucket
  ``window`` places later, each request at about half the disk (``SHARED``:
  the other lane uses the rest), the read started at the next bucket boundary
  (one more c); ``window`` arenas take turns, so the NVMe buckets inside the
  step need ``inside * cycle / window``.  Predicted stall =
  max(0, max(io, cycles) - step_seconds - overlap_seconds).  Where the disk
  path burns CPU (``host_cost_per_byte`` > 0) that cost is added, unhidden.
* Choice: for each ring depth in `WINDOWS` and each candidate largest NVMe
  bucket m, the buckets of size <= m are taken largest first, skipping any
  that overshoots what the budget needs (the closest overshoot finishes the
  cover), and also largest first until it holds, then the smallest taken
  dropped while it still holds; the candidate with the least predicted time
  wins (ties: fewer NVMe bytes, then the deeper ring).  (A min-sum cover is
  subset sum; tests/test_states.py checks the greedy against brute force over
  subsets and depths.)  The bucket size is searched too (`bucket_bytes` and
  its halvings), at a charged ``per_bucket_seconds`` of Python overhead per
  bucket.  Not modelled: host DRAM as a middle tier (the runtime has
  `Placement.HOST`), gradient or parameter tiering, page-cache effects, I/O
  contention with the data loader, a disk whose bandwidth changes under the
  run (on the CPU box it moved between ~1.1 and ~2.5 GB/s within minutes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..decisions import InfeasibleBudgetError
from ..hardware import Hierarchy, format_size

DEFAULT_STATE_BUCKET_BYTES = 64 * 1024 * 1024
WINDOW = 3  # the smallest ring: one bucket read ahead, one stepped, one written behind
SHARED = 2.0  # a read or write takes about twice its time alone while the other lane uses the disk
WINDOWS = (3, 4, 6, 8, 12, 16)  # ring depths searched (runtime: StatePlacement.prefetch_depth = window - 2)


@dataclass(frozen=True)
class StatePlan:
    """Per bucket of parameter indices: 'keep' (fast tier) or 'nvme'; and what that is predicted to cost."""

    buckets: tuple[tuple[int, ...], ...]
    tiers: tuple[str, ...]
    bucket_state_bytes: tuple[int, ...]
    fast_bytes: int  # predicted peak of states on the fast tier (kept + window)
    nvme_bytes: int
    io_seconds: float  # NVMe reads + writes per step
    step_seconds: float  # the optimizer step's own compute
    overlap_seconds: float  # other work the caller said hides I/O
    host_seconds: float  # CPU time the disk path takes from compute (not hidden)
    stall_seconds: float  # [Note: what the state planner models]: I/O the step cannot hide
    window: int = 3  # arenas of the runtime's ring (NVMe buckets on the fast tier at once)
    forward_seconds: float = 0.0  # the next forward's compute, hiding I/O too with deferred updates
    below: str = "NVMe"  # what the lower tier is, for `describe` (pinned host RAM below HBM on CUDA)

    @property
    def predicted_seconds(self) -> float:
        """Predicted optimizer-step time: its compute, plus I/O it cannot hide, plus the disk path's CPU cost."""
        return self.step_seconds + self.stall_seconds + self.host_seconds

    def describe(self) -> str:
        n = sum(t == "nvme" for t in self.tiers)
        return (f"optimizer states: {n}/{len(self.tiers)} buckets on {self.below} ({format_size(self.nvme_bytes)}), "
                f"fast tier peak {format_size(self.fast_bytes)} (ring of {self.window}); "
                f"I/O {self.io_seconds * 1e3:.1f} ms/step inside the step against "
                f"{(self.step_seconds + self.forward_seconds + self.overlap_seconds) * 1e3:.1f} ms of overlap"
                f"{' (deferred to the next forward)' if self.forward_seconds else ''}: predicted stall "
                f"{self.stall_seconds * 1e3:.1f} ms")


def buckets_of(state_bytes: Sequence[int], bucket_bytes: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive parameter indices, about `bucket_bytes` of states each (at least one parameter each)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    out, cur, acc = [], [], 0
    for i, n in enumerate(state_bytes):
        if cur and acc + n > bucket_bytes:
            out.append(tuple(cur))
            cur, acc = [], 0
        cur.append(i)
        acc += n
    if cur:
        out.append(tuple(cur))
    return tuple(out)


def _pick(sizes: list[int], cap: int, need: int) -> list[int]:
    """Indices of buckets of size <= cap, few bytes, summing to >= need (all of them if they cannot).

    Largest first, skipping a bucket that would overshoot `need` while a smaller one may still land
    closer; the overshooting bucket that lands closest finishes the cover.
    """
    cand = sorted((i for i, s in enumerate(sizes) if s <= cap), key=lambda i: (-sizes[i], -i))
    chosen, acc, finish = [], 0, None
    for i in cand:
        if acc + sizes[i] < need:
            chosen.append(i)
            acc += sizes[i]
        elif finish is None or sizes[i] < sizes[finish]:
            finish = i
    if finish is not None:
        chosen.append(finish)
    return sorted(chosen)


def _pick_trim(sizes: list[int], cap: int, need: int) -> list[int]:
    """The other greedy: largest first until `need` is met, then drop the smallest taken while it still is."""
    cand = sorted((i for i, s in enumerate(sizes) if s <= cap), key=lambda i: (-sizes[i], -i))
    chosen, acc = [], 0
    for i in cand:
        if acc >= need:
            break
        chosen.append(i)
        acc += sizes[i]
    for i in sorted(chosen, key=lambda i: sizes[i]):
        if acc - sizes[i] >= need and len(chosen) > 1:
            chosen.remove(i)
            acc -= sizes[i]
    return sorted(chosen)


def plan_states(
    param_numels: Sequence[int],
    *,
    state_bytes_per_element: int,
    fast_budget: int,
    hierarchy: Hierarchy | None = None,
    read_bandwidth: float | None = None,
    write_bandwidth: float | None = None,
    latency: float = 0.0,
    host_cost_per_byte: float = 0.0,
    step_seconds: float | None = None,
    overlap_seconds: float = 0.0,
    touch_factor: float = 3.5,
    bucket_bytes: int = DEFAULT_STATE_BUCKET_BYTES,
    bucket_splits: int = 3,
    per_bucket_seconds: float = 50e-6,
    window: int | Sequence[int] = WINDOWS,
    forward_seconds: float = 0.0,
    below: str = "NVMe",
) -> StatePlan:
    """Place optimizer-state buckets on the fast tier or NVMe ([Note: what the state planner models]).

    `param_numels`: elements per parameter, in the optimizer's order;
    `state_bytes_per_element`: state bytes per parameter element (AdamW fp32: 8,
    SGD momentum: 4, Adagrad: 4); `fast_budget`: bytes of fast tier for states.
    Bandwidths come from `hierarchy.nvme_tier()` unless given.  Buckets of
    `bucket_bytes` and of its `bucket_splits` halvings are tried.  Raises
    `InfeasibleBudgetError` when even every bucket on NVMe does not fit.
    `forward_seconds`: the forward's compute, when the runtime defers the NVMe
    buckets' updates to it (`TieredOptimizer(..., model=)`: its I/O window is
    the step plus the next forward); 0 for updates inside the step.  `below`:
    the lower tier's name in `describe()` ("host RAM" when the bandwidths given are PCIe's: the tier below
    HBM on CUDA; the model is the same: [Note: deferred host buckets] in runtime/deferred.py).
    """
    if state_bytes_per_element < 0 or fast_budget < 0:
        raise ValueError("state_bytes_per_element and fast_budget must be >= 0")
    windows = (window,) if isinstance(window, int) else tuple(window)
    if not windows or min(windows) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    nv = hierarchy.nvme_tier() if hierarchy is not None else None
    if read_bandwidth is None or write_bandwidth is None:
        if nv is None:
            raise ValueError("plan_states needs NVMe bandwidths: pass hierarchy= with an NVMe tier, "
                             "or read_bandwidth= and write_bandwidth=")
        read_bandwidth = nv.read_bandwidth if read_bandwidth is None else read_bandwidth
        write_bandwidth = nv.write_bandwidth if write_bandwidth is None else write_bandwidth
        latency = latency or nv.latency
        host_cost_per_byte = host_cost_per_byte or nv.host_cost_per_byte
    if read_bandwidth <= 0 or write_bandwidth <= 0:
        raise ValueError("NVMe read and write bandwidths must be > 0")
    per_param = [int(n) * int(state_bytes_per_element) for n in param_numels]
    total = sum(per_param)
    if step_seconds is None:
        if hierarchy is None:
            raise ValueError("plan_states needs step_seconds= (measured) or hierarchy= to estimate it")
        step_seconds = total * touch_factor / hierarchy.fast_bandwidth
    bw = (read_bandwidth, write_bandwidth, latency, host_cost_per_byte)
    best: StatePlan | None = None
    smallest_need = None
    for k in range(bucket_splits + 1):  # the given bucket size and its halvings: a smaller window
        b = max(1, bucket_bytes >> k)
        try:
            cand = _plan_buckets(buckets_of(per_param, b), per_param, fast_budget, bw, step_seconds,
                                 overlap_seconds, windows, per_bucket_seconds, forward_seconds)
        except _Infeasible as e:
            smallest_need = e.need if smallest_need is None else min(smallest_need, e.need)
            continue
        if best is None or (round(cand.predicted_seconds, 12), cand.nvme_bytes, len(cand.buckets)) < (
                round(best.predicted_seconds, 12), best.nvme_bytes, len(best.buckets)):
            best = cand
    if best is not None and below != best.below:
        best = replace(best, below=below)
    if best is None:
        raise InfeasibleBudgetError(
            fast_budget, int(smallest_need or 0),
            f"optimizer states need a window of {min(windows)} NVMe buckets on the fast tier (the largest parameter's "
            f"states: {format_size(max(per_param, default=0))}): a larger budget, or parameters split finer")
    return best


class _Infeasible(Exception):
    def __init__(self, need: int) -> None:
        self.need = need


def pipeline_stall(nvme_sizes: Sequence[int], window: int, step_seconds: float, overlap_seconds: float,
                   bw: tuple[float, float, float, float], forward_seconds: float = 0.0) -> tuple[float, float, int]:
    """(in-window I/O seconds, predicted stall seconds, bytes moved inside the window) of the arena ring
    ([Note: what the state planner models]); `forward_seconds`: the next forward's compute, which also hides
    the I/O when the NVMe buckets' updates are deferred to it ([Note: deferred updates] in runtime/deferred.py)."""
    read_bandwidth, write_bandwidth, latency, _ = bw
    step_seconds = step_seconds + forward_seconds  # the compute the ring's buckets are spread over
    n = len(nvme_sizes)
    if n == 0:
        return 0.0, 0.0, 0
    nb = sum(nvme_sizes)
    avg = nb / n
    resident = min(n, window) * avg  # left in the ring by the last step, stepped first: no read, no wait
    moved = nb - resident
    inside = max(0, n - window)
    io = moved / read_bandwidth + moved / write_bandwidth + 2 * latency * inside
    c = step_seconds / n  # compute per NVMe bucket, the kept buckets interleaved with it included
    # Each arena cycles: stepped (c), written behind, read for the bucket `window` places later (each
    # request shares the disk with the other lane: about twice its time alone), the read started at the
    # next bucket boundary (up to one more c).  `window` arenas take turns, so a bucket is ready every
    # cycle / window seconds at best.
    cycle = inside * (2 * c + SHARED * (avg / write_bandwidth + avg / read_bandwidth + 2 * latency)) / window
    stall = max(0.0, max(io, cycle) - step_seconds - overlap_seconds)
    return io, stall, int(moved)


def _plan_buckets(buckets, per_param, fast_budget, bw, step_seconds, overlap_seconds, windows,
                  per_bucket_seconds, forward_seconds=0.0) -> StatePlan:
    host_cost_per_byte = bw[3]
    sizes = [sum(per_param[i] for i in b) for b in buckets]
    total = sum(sizes)

    def cost(chosen: list[int], window: int) -> tuple[float, float, float, int, int, float]:
        nb = sum(sizes[i] for i in chosen)
        io, stall, moved = pipeline_stall([sizes[i] for i in chosen], window, step_seconds, overlap_seconds, bw,
                                          forward_seconds)
        host = 2 * moved * host_cost_per_byte + per_bucket_seconds * len(sizes)
        fast = total - nb + min(len(chosen), window) * max((sizes[i] for i in chosen), default=0)
        return step_seconds + stall + host, io, stall, nb, fast, host

    options: list[tuple[list[int], int]] = []
    if total <= fast_budget:
        options.append(([], min(windows)))
    least = total
    for window in windows:
        for cap in sorted(set(sizes)):
            need = total + min(window * cap, total) - fast_budget  # NVMe bytes for kept + ring to fit
            for chosen in (_pick(sizes, cap, max(need, 1)), _pick_trim(sizes, cap, max(need, 1))):
                fast = cost(chosen, window)[4]
                least = min(least, fast)
                if fast <= fast_budget:
                    options.append((chosen, window))
    if not options:
        raise _Infeasible(least)
    # least predicted time; then fewest NVMe bytes; then the deeper ring (more slack for a slow disk)
    best, window = min(options, key=lambda o: (round(cost(*o)[0], 9), cost(*o)[3], -o[1]))
    _, io, stall, nb, fast, host = cost(best, window)
    return StatePlan(
        buckets=buckets,
        tiers=tuple("nvme" if i in best else "keep" for i in range(len(buckets))),
        bucket_state_bytes=tuple(sizes),
        fast_bytes=fast,
        nvme_bytes=nb,
        io_seconds=io,
        step_seconds=step_seconds,
        overlap_seconds=overlap_seconds,
        host_seconds=host,
        stall_seconds=stall,
        window=window if best else WINDOW,
        forward_seconds=forward_seconds if best else 0.0,
    )


__all__ = ["StatePlan", "plan_states", "pipeline_stall", "buckets_of", "DEFAULT_STATE_BUCKET_BYTES", "WINDOW",
           "WINDOWS"]
