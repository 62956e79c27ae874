"""`TieredLoader`: a drop-in for DataLoader(ImageFolder(root, transform), sampler=...) over the tiered store.

Tiers, fastest first (see DESIGN.md "The data side"):

* ``device`` -- a per-rank cache of stored uint8 samples in accelerator memory
  (CUDA only; capacity `budget.device`, off by default so training keeps its HBM);
* ``host``   -- the node's page cache over the store's chunk files: one copy per
  node shared by all ranks, kept to `budget.host` bytes by posix_fadvise;
* ``disk``   -- the store's chunk files (NVMe);
* ``source`` -- the JPEGs / the wrapped dataset: decoded on a miss (the first,
  building epoch) and written to the store.

[Note: clairvoyant placement]
The sampler's seed fixes every rank's accesses (order.py).  Per epoch the
loader runs `BeladyCache` over the known sequence: for the host tier over the
*node's* interleaved sequence (every rank computes the same plan and carries
out the part that concerns its own accesses, so the page cache is managed as
one node-wide tier), for the device tier over the rank's own sequence.  After
a sample is read, the plan says whether it stays (its next use is among the
soonest that fit) or is demoted (fadvise DONTNEED / dropped from HBM); a
background thread reads `prefetch` batches ahead, hinting WILLNEED one batch
further, so slower tiers are read before the consumer asks.

[Note: streams]  (CUDA only)  One side stream, `_copy_stream`, carries the
host->device upload and the augmentation of a batch produced by the background
thread; an event recorded there is waited on by the consumer's current stream
in `__next__`, and the outputs are `record_stream`ed to the consumer stream so
the allocator does not recycle them while the consumer still reads them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..hardware import Hierarchy, parse_size
from .augment import OutputPool, TrainAugment, resized_crop_loop
from .order import _resolve, epoch_length, epoch_order
from .policy import NEVER, BeladyCache, next_use
from .store import SampleStore

__all__ = ["TieredLoader", "DataBudget", "StoreDataset", "cuda_available"]


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a CUDA build without a driver
        return False


def _size(v) -> int | None:
    if v is None:
        return None
    return parse_size(v) if isinstance(v, str) else int(v)


@dataclass(frozen=True)
class DataBudget:
    """Bytes each tier may hold for the sample store.  Defaults are safe.

    device: accelerator memory per rank for cached samples (0 = off).
    host: host DRAM per *node* for the store's pages (None = half the RAM
        available now, or the DRAM tier of `hierarchy` if given).
    Sizes may be ints or strings such as "12GiB".
    """

    device: int | str = 0
    host: int | str | None = None

    def __post_init__(self):
        for name in ("device", "host"):
            v = _size(getattr(self, name))
            if v is not None and v < 0:
                raise ValueError(f"budget.{name} must be >= 0, got {getattr(self, name)!r}")

    def resolve(self, hierarchy: Hierarchy | None = None) -> tuple[int, int]:
        dev = _size(self.device) or 0
        host = _size(self.host)
        if host is None and hierarchy is not None:
            for t in hierarchy.tiers:
                if t.kind in ("dram", "pinned_dram"):
                    host = t.capacity
                    break
        if host is None:
            import psutil

            host = psutil.virtual_memory().available // 2
        return dev, host


class StoreDataset(torch.utils.data.Dataset):
    """Map-style view of a store: item i = (uint8 CHW tensor, label), decoded and stored on first access.

    Picklable, so it works with torch DataLoader workers (each worker opens the
    store files itself); pair it with `TrainAugment` on the batch.
    """

    def __init__(self, data, store_dir=None, *, max_side: int = 160, on_corrupt: str = "raise"):
        self.store = data if isinstance(data, SampleStore) else SampleStore(store_dir, data, max_side=max_side,
                                                                              on_corrupt=on_corrupt)

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, i: int):
        a, y = self.store.fetch(int(i))
        if a is None:
            raise IndexError(f"sample {i} ({self.store.source.describe(i)}) is corrupt and skipped")
        return torch.from_numpy(a).permute(2, 0, 1), y


class TieredLoader:
    """Batches of augmented images from the tiered store, in the sampler's exact order.

    Drop-in for::

        g = torch.Generator(); g.manual_seed(seed)
        DataLoader(ImageFolder(root, train_transform), batch_size=B,
                   sampler=RandomSampler(ds, generator=g))                # sampler="random"
        # or sampler=DistributedSampler(ds, seed=seed) + set_epoch(e)    # under torchrun

    Same samples, same order, same labels; each item is (images, labels) with
    images a float (B, 3, S, S) tensor on `device` (normalised; channels_last
    if the augment says so) and labels int64 on `device`.

    >>> loader = TieredLoader("/data/train", 256, seed=0, epochs=90, store_dir="/nvme/store")  # doctest: +SKIP
    >>> for epoch in range(90):                                                              # doctest: +SKIP
    ...     loader.set_epoch(epoch)
    ...     for images, labels in loader:   # both on the device; epoch 0 builds the store
    ...         ...

    seed, epochs, shuffle, sampler: the access order (see order.py; "auto" =
        DistributedSampler when world_size > 1, else RandomSampler with a
        persistent generator seeded with `seed`).  `epochs` is the planning
        horizon; iterating more epochs is allowed.
    rank, world_size: default from torch.distributed when initialised.
    device: default cuda:LOCAL_RANK when CUDA is available, else cpu.
    augment: a TrainAugment, or None to yield lists of uint8 CHW tensors.
    store_dir: the store directory (shared by the node's ranks); default
        ~/.cache/memstrata/data/<fingerprint>.
    budget: DataBudget (or dict); hierarchy: a Hierarchy for default capacities.
    num_workers: decode threads for samples not yet stored (0 = inline).
    prefetch: batches prepared ahead by a background thread (0 = synchronous).
    transform: a per-sample callable (e.g. a torchvision v2 transform such as
        ``v2.TrivialAugmentWide()``) on each uint8 CHW crop after the augment's
        crop + flip and before normalisation; it must return a uint8 CHW tensor.
    collate: a callable ``(images, labels) -> (images, labels)`` on each
        normalised batch, e.g. ``v2.RandomChoice([v2.MixUp(...), v2.CutMix(...)])``
        or per-sample ``v2.RandomErasing``.  See [Note: transform and collate hooks].
    """

    def __init__(self, data, batch_size: int, *, seed: int = 0, epochs: int = 1, shuffle: bool = True,
                 sampler: str = "auto", rank: int | None = None, world_size: int | None = None,
                 local_world_size: int | None = None, device=None, augment: TrainAugment | None = TrainAugment(),
                 store_dir=None, budget: DataBudget | dict | None = None, hierarchy: Hierarchy | None = None,
                 max_side: int = 160, num_workers: int | None = None, prefetch: int = 2, drop_last: bool = False,
                 on_corrupt: str = "raise", verify: str = "first", progress: bool = True, impl: str = "auto",
                 transform=None, collate=None):
        for name, v in (("batch_size", batch_size), ("epochs", epochs), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if augment is not None and (isinstance(augment, type) or not callable(getattr(augment, "params", None))):
            raise TypeError(f"augment must be an instance such as TrainAugment(size=224), or None, got {augment!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        dist = torch.distributed
        inited = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if inited else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if inited else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank}, world_size={self.world_size}")
        lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or self.world_size
        self.local_world_size = max(1, min(lws, self.world_size))
        node = self.rank // self.local_world_size
        self.node_ranks = list(range(node * self.local_world_size,
                                     min(self.world_size, (node + 1) * self.local_world_size)))
        self.sampler = _resolve(sampler, self.world_size)
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device() if cuda_available() else 0))}" \
                if cuda_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not cuda_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available")
        self.batch_size, self.seed, self.epochs, self.shuffle = int(batch_size), int(seed), int(epochs), shuffle
        self.augment, self.drop_last, self.progress, self.impl = augment, drop_last, progress, impl
        self.prefetch = int(prefetch)
        for name, fn in (("transform", transform), ("collate", collate)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        if transform is not None and augment is None:
            raise ValueError("transform applies to the augment's crops: pass an augment (a TrainAugment) too")
        self.transform, self.collate = transform, collate
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
        if isinstance(budget, dict):
            budget = DataBudget(**budget)
        self.budget = budget or DataBudget()
        self.device_capacity, self.host_capacity = self.budget.resolve(hierarchy)
        if self.device.type != "cuda":
            self.device_capacity = 0  # on CPU the host tier is where compute reads from
        self.store = SampleStore(store_dir, data, max_side=max_side, verify=verify, on_corrupt=on_corrupt)
        # Open the store's files here, before the decode and batch threads share the store: SampleStore._fds
        # marks the process as initialised before its descriptors exist, so two threads making the first call
        # at once could read a missing `_index_fd` (seen as AttributeError in a fresh data-train run).
        self.store._fds()
        self.n = self.store.n
        self.epoch = 0
        self._device_cache = BeladyCache(self.device_capacity)
        self._device_data: dict = {}
        # decode threads for samples not in the store yet (PIL releases the GIL while decoding)
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="memstrata-decode") \
            if self.num_workers > 0 else None
        # CPU batch builders: one batch per thread, each thread with one intra-op thread (torch's setting is
        # per thread), so small per-sample ops never wait on OpenMP barriers of a busy machine.
        self._batch_pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="memstrata-batch",
                                              initializer=torch.set_num_threads, initargs=(1,)) \
            if self.num_workers > 1 and self.prefetch > 0 else None
        self._out_pool = OutputPool(limit=self.prefetch + 4)
        self._copy_stream = None  # created lazily on the CUDA device, see [Note: streams]
        self._stats_mu = threading.Lock()
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # open epochs, closed by close()
        self.stats = {"device_hits": 0, "store_hits": 0, "source_reads": 0, "skipped": 0, "batches": 0}

    # ------------------------------------------------------------------ sampler protocol
    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: the next iteration yields epoch `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _epoch_len(self) -> int:
        return epoch_length(self.n, world_size=self.world_size, sampler=self.sampler)

    def __len__(self) -> int:
        L = self._epoch_len()
        return L // self.batch_size if self.drop_last else math.ceil(L / self.batch_size)

    def order(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """Sample indices this rank (or `rank`) reads in `epoch`, after drop_last."""
        o = epoch_order(self.n, seed=self.seed, epoch=epoch, rank=self.rank if rank is None else rank,
                        world_size=self.world_size, shuffle=self.shuffle, sampler=self.sampler)
        if self.drop_last:
            o = o[: len(o) // self.batch_size * self.batch_size]
        return o

    @property
    def labels(self):
        return self.store.source.labels()

    def __iter__(self):
        epoch = self.epoch
        if self.sampler != "distributed":
            self.epoch += 1  # a persistent generator advances by itself; set_epoch overrides
        return _EpochIterator(self, epoch)

    def close(self) -> None:
        """Stop the epochs still open (their threads end) and the decode threads; close the store."""
        for it in list(self._iterators):
            it.close()
        for p in (self._pool, self._batch_pool):
            if p is not None:
                p.shutdown(wait=False)
        self.store.close()

    # ------------------------------------------------------------------ placement plans
    def _next_uses(self, epoch: int, ranks) -> tuple[np.ndarray, np.ndarray]:
        """Node (or rank) sequence of epochs [epoch, epoch+1], interleaved per batch; next-use times.

        Returns (owner_pos, nxt): for each access of epoch `epoch` in node order,
        ((rank, position in that rank's epoch order), global next-use time or NEVER).
        """
        L = self._epoch_len()
        B = self.batch_size
        seqs, owners = [], []
        for e in (epoch, epoch + 1):
            orders = [self.order(e, r) for r in ranks]
            for s in range(0, L, B):
                for r, o in zip(ranks, orders):
                    part = o[s:s + B]
                    seqs.append(part)
                    if e == epoch:
                        owners.append(np.stack([np.full(len(part), r), np.arange(s, s + len(part))], 1))
        seq = np.concatenate(seqs)
        nxt = next_use(seq)
        m = sum(len(o) for o in owners)
        nxt = nxt[:m]
        if epoch + 1 >= self.epochs:  # beyond the planning horizon nothing is needed again
            nxt = np.where(nxt < m, nxt, NEVER)
        base = epoch * 10 ** 12  # global time stamps: later epochs are later
        nxt = np.where(nxt < NEVER, nxt + base, NEVER)
        return np.concatenate(owners), seq[:m], nxt

    def _host_plan(self, epoch: int):
        """{position in this rank's order: [sample ids to demote from the page cache after reading it]}."""
        total = sum(self.store.nbytes(i) for i in range(self.n))
        if total <= self.host_capacity:
            return {}  # everything fits: nothing is ever demoted
        owners, seq, nxt = self._next_uses(epoch, self.node_ranks)
        cache = BeladyCache(self.host_capacity)
        plan: dict = {}
        for (r, pos), key, nu in zip(owners.tolist(), seq.tolist(), nxt.tolist()):
            hit, admitted, evicted = cache.access(key, nu, self.store.nbytes(key))
            drop = evicted if admitted else evicted + [key]
            if r == self.rank and drop:
                plan[pos] = drop
        return plan

    def _device_next(self, epoch: int) -> np.ndarray:
        if self.device_capacity <= 0:
            return None
        owners, seq, nxt = self._next_uses(epoch, [self.rank])
        return nxt  # this rank only: owners[:, 1] == arange


class _Producer:
    """The producing side of one epoch: builds its batches (in order) for the consumer, `_EpochIterator`.

    It holds everything the background thread needs and nothing of the consumer, so the consumer can be
    garbage collected while the thread runs; see [Note: epoch iterator lifetime].
    """

    def __init__(self, loader: TieredLoader, epoch: int):
        self.L, self.epoch = loader, epoch
        self.order = loader.order(epoch)
        B = loader.batch_size
        self.batches = [self.order[s:s + B] for s in range(0, len(self.order), B)]
        self._tls = threading.local()  # per producer thread: reused uint8 crop buffer
        self._q: queue.Queue = queue.Queue(maxsize=max(1, loader.prefetch))
        self._stop = threading.Event()
        self._host_plan = loader._host_plan(epoch)
        self._dev_next = loader._device_next(epoch)

    def stop(self) -> None:
        """Ask the thread to end (it does within ~0.1 s, or after the batch it is building) and free the queue."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()

    # producer --------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        """Background thread: build batches (in parallel on CPU) and queue them in order."""
        L = self.L
        try:
            with self._progress() as bar:
                pool = L._batch_pool if L.device.type == "cpu" else None
                if pool is None and L.device.type == "cpu":
                    # One builder thread (num_workers <= 1): like the pool's threads, one intra-op thread, set for
                    # this thread only.  With torch's default (all cores) every per-sample op of ~32k+ elements
                    # forks an OpenMP team; on a busy 2-core box, with OpenMP's default spin-waiting, one worker
                    # ran at 144 images/s against 2,134 with one intra-op thread (2026-12-05-cpu-loaders).
                    torch.set_num_threads(1)
                if pool is None:
                    for b in range(len(self.batches)):
                        if self._stop.is_set() or not self._put(self._build(b)):
                            return
                        bar.advance()
                else:
                    from collections import deque

                    inflight: deque = deque()
                    depth = L.prefetch + L.num_workers
                    for b in range(len(self.batches) + 1):
                        if b < len(self.batches):
                            inflight.append(pool.submit(self._build, b))
                        while inflight and (len(inflight) >= depth or b == len(self.batches)):
                            item = inflight.popleft().result()
                            if self._stop.is_set() or not self._put(item):
                                for f in inflight:
                                    f.cancel()
                                return
                            bar.advance()
            self._put(StopIteration)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _progress(self):
        from .progress import progress_bar as _progress

        L = self.L
        building = L.progress and L.rank == 0 and L.store.count_complete() < L.n
        return _progress(building, len(self.batches), f"epoch {self.epoch}: building store {L.store.dir}")

    def _sync(self):
        with self._progress() as bar:
            for b in range(len(self.batches)):
                yield self._build(b)
                bar.advance()

    def _build(self, b: int):
        if b + 1 < len(self.batches):
            self.L.store.advise(self.batches[b + 1], "willneed")  # promote the next batch into the page cache
        return self._make_batch(self.batches[b], b * self.L.batch_size, self._host_plan, self._dev_next)

    def _make_batch(self, idx: np.ndarray, pos0: int, host_plan: dict, dev_next):
        L = self.L
        st = L.store
        dev = L.device
        on_cuda = dev.type == "cuda"
        imgs: list = [None] * len(idx)
        if on_cuda and L._device_data:
            for k, i in enumerate(idx.tolist()):
                t = L._device_data.get(i)
                if t is not None:
                    imgs[k] = t
                    with L._stats_mu:
                        L.stats["device_hits"] += 1
        need = [k for k in range(len(idx)) if imgs[k] is None]
        labels = [0] * len(idx)
        if need:
            complete_before = [st.is_complete(int(idx[k])) for k in need]
            got = st.fetch_many(idx[need], pool=L._pool)
            for k, (a, y), was in zip(need, got, complete_before):
                imgs[k] = a
                labels[k] = y
                with L._stats_mu:
                    L.stats["store_hits" if was else "source_reads"] += 1
        lab_src = st.source.labels()
        for k, i in enumerate(idx.tolist()):
            if imgs[k] is not None and lab_src is not None:
                labels[k] = int(lab_src[i])
            elif imgs[k] is not None and k not in need:
                labels[k] = st.label(i)
        # demote what the host plan says will not be needed soon (page cache is node-wide)
        for k in range(len(idx)):
            drop = host_plan.get(pos0 + k)
            if drop:
                st.advise(drop, "dontneed")
        keep = [k for k in range(len(idx)) if imgs[k] is not None]
        if len(keep) < len(idx):
            with L._stats_mu:
                L.stats["skipped"] += len(idx) - len(keep)
            idx = idx[keep]
            imgs = [imgs[k] for k in keep]
            labels = [labels[k] for k in keep]
            positions = [pos0 + k for k in keep]
        else:
            positions = list(range(pos0, pos0 + len(idx)))
        with L._stats_mu:
            L.stats["batches"] += 1
        y = torch.tensor(labels, dtype=torch.int64)
        if L.augment is None:
            out = [torch.as_tensor(a).permute(2, 0, 1) if not isinstance(a, torch.Tensor) else a.permute(2, 0, 1)
                   for a in imgs]
            if on_cuda:
                out = [t.to(dev) for t in out]
                y = y.to(dev)
            return out, y, None
        hs = [int(a.shape[0]) for a in imgs]
        ws = [int(a.shape[1]) for a in imgs]
        boxes, flips = L.augment.params(L.seed, self.epoch, idx, hs, ws)
        if not on_cuda and L.transform is not None:  # uint8 crops; transform + normalise run in __next__
            return resized_crop_loop(imgs, boxes, flips, L.augment.out_size).permute(0, 3, 1, 2), y, None
        if not on_cuda:
            scratch = getattr(self._tls, "scratch", None)
            if scratch is None and L.impl == "loop-u8":  # only the two-stage reference path stages uint8 batches
                scratch = self._tls.scratch = np.empty((L.batch_size,) + tuple(L.augment.out_size) + (3,), np.uint8)
            x = L.augment(imgs, boxes, flips, impl=L.impl, scratch=scratch, pool=L._out_pool)
            return x, y, None
        return self._make_cuda(idx, imgs, y, boxes, flips, positions, dev_next)

    def _make_cuda(self, idx, imgs, y, boxes, flips, positions, dev_next):
        L = self.L
        dev = L.device
        if L._copy_stream is None:
            L._copy_stream = torch.cuda.Stream(dev)  # uploads + augmentation off the consumer's stream
        stream = L._copy_stream
        with torch.cuda.device(dev):  # the producer thread's current device may differ
            return self._make_cuda_on(stream, idx, imgs, y, boxes, flips, positions, dev_next)

    def _make_cuda_on(self, stream, idx, imgs, y, boxes, flips, positions, dev_next):
        L = self.L
        dev = L.device
        Hm = max(int(a.shape[0]) for a in imgs)
        Wm = max(int(a.shape[1]) for a in imgs)
        host_k = [k for k, a in enumerate(imgs) if not isinstance(a, torch.Tensor)]
        with torch.cuda.stream(stream):
            padded = torch.zeros((len(imgs), Hm, Wm, 3), dtype=torch.uint8, device=dev)
            if host_k:
                staging = torch.zeros((len(host_k), Hm, Wm, 3), dtype=torch.uint8, pin_memory=True)
                sn = staging.numpy()
                for j, k in enumerate(host_k):
                    a = imgs[k]
                    sn[j, : a.shape[0], : a.shape[1]] = a
                up = staging.to(dev, non_blocking=True)
                # the pinned staging buffer must outlive the async copy: keep it referenced until the event
                padded[torch.as_tensor(host_k, device=dev)] = up
            else:
                staging = None
            for k, a in enumerate(imgs):
                if isinstance(a, torch.Tensor):
                    padded[k, : a.shape[0], : a.shape[1]] = a
            if L.transform is None:
                x = L.augment.apply_padded(padded, boxes, flips)
            else:  # uint8 crops for the transform (normalised in __next__)
                x = _unnormalised(L.augment).apply_padded(padded, boxes, flips)
                x = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
            yd = y.to(dev, non_blocking=True)
            # device tier: admit by next use (Belady), evict the farthest
            if dev_next is not None:
                for k, i in enumerate(idx.tolist()):
                    h, w = int(imgs[k].shape[0]), int(imgs[k].shape[1])
                    _, admitted, evicted = L._device_cache.access(i, int(dev_next[positions[k]]), h * w * 3)
                    for e in evicted:
                        L._device_data.pop(e, None)
                    if admitted and i not in L._device_data:
                        L._device_data[i] = padded[k, :h, :w].clone()
                    elif not admitted:
                        L._device_data.pop(i, None)
            ev = torch.cuda.Event()
            ev.record(stream)
        return x, yd, (ev, staging)


# [Note: epoch iterator lifetime]
# A consumer may leave an epoch early (`break`, an exception, `itertools.islice`).  The background
# thread must then end and the batches it queued must be freed, or every such epoch leaks a thread
# and `prefetch` + in-flight batches (issue 13: +1.9 GB RSS after 12 broken epochs, 63 threads
# after 60).  So the thread runs `_Producer._run` and holds only the producer; the consumer
# (`_EpochIterator`) holds the producer, and a `weakref.finalize` on the consumer stops the
# producer when the consumer is collected -- at once when the `for` loop drops it, since nothing
# else refers to it.  `close()` does the same explicitly and also waits for the thread;
# `TieredLoader.close()` closes the epochs still open (a consumer waiting in `next` then ends its
# epoch).  A stopped producer ends within one queue timeout (0.1 s), or after the batch it is
# building.


class _EpochIterator:
    """One epoch's batches, in order; prepared `prefetch` ahead by a background thread."""

    def __init__(self, loader: TieredLoader, epoch: int):
        self._p = p = _Producer(loader, epoch)
        self.L, self.epoch, self.order, self.batches = loader, epoch, p.order, p.batches
        self._k = 0
        self._done = False
        self._thread = None
        self._gen = p._sync() if loader.prefetch == 0 else None
        if loader.prefetch > 0:
            self._thread = threading.Thread(target=p._run, name=f"memstrata-prefetch-e{epoch}", daemon=True)
            self._thread.start()
        self._finalizer = weakref.finalize(self, p.stop)  # must not refer to self
        loader._iterators.add(self)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                item = next(self._gen)
            except StopIteration:
                self._done = True
                raise
        else:
            while True:
                try:
                    item = self._p._q.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self._p._stop.is_set():  # closed from another thread (TieredLoader.close)
                        self._done = True
                        raise StopIteration from None
            if item is StopIteration:
                self._done = True
                self._thread.join()
                raise StopIteration
            if isinstance(item, BaseException):
                self.close(wait=False)
                raise item
        x, y, sync = item
        if sync is not None:
            ev, _staging = sync
            cur = torch.cuda.current_stream(self.L.device)
            cur.wait_event(ev)  # invariant: x, y are complete on the copy stream before the consumer reads them
            x.record_stream(cur)
            y.record_stream(cur)
        self._k += 1
        return _apply_hooks(self.L, x, y)

    def close(self, wait: bool = True) -> None:
        """End this epoch early: stop the background thread (waiting for it unless `wait=False`), free batches."""
        self._done = True
        self._finalizer()  # _Producer.stop, once
        if self._gen is not None:
            self._gen.close()
        t = self._thread
        if wait and t is not None and t is not threading.current_thread():
            t.join()
            self._p.stop()  # what it queued before it saw the stop


# [Note: transform and collate hooks]
# torchvision v2 transforms and MixUp/CutMix draw from torch's global RNG.  They run in the consumer's
# thread, inside __next__, in batch order: batches are built by several producer threads, and the global
# generator is process-wide, so drawing there would make the values depend on thread timing (and would
# interleave with the training thread's own draws, e.g. dropout).  In the consumer they are reproducible
# for a torch.manual_seed and restorable with torch's RNG state, exactly like a DataLoader with
# num_workers=0 -- at the price of running on the training thread.  The crop + flip stays in the
# producers (a function of seed, epoch, sample); with a `transform` the producers hand over uint8 crops
# and the normalisation (the augment's mean/std, dtype, channels_last) follows the transform here.
def _unnormalised(aug):
    import dataclasses

    return dataclasses.replace(aug, normalize=False, channels_last=False, dtype=torch.float32)


def _apply_hooks(L: TieredLoader, x, y):
    if L.transform is not None:
        x = torch.stack([L.transform(s) for s in x])
        if x.dtype != torch.uint8:
            raise TypeError(f"transform must return uint8 CHW tensors, got {x.dtype}")
        aug = L.augment
        out = x.to(torch.float32)
        if aug.normalize:
            mean = torch.tensor(aug.mean, dtype=torch.float32, device=out.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(aug.std, dtype=torch.float32, device=out.device).view(1, 3, 1, 1) * 255.0
            out = out.sub_(mean).div_(std)
        else:
            out = out.mul_(1.0 / 255.0)
        if aug.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        x = out.to(aug.dtype)
    if L.collate is not None:
        x, y = L.collate(x, y)
    return x, y

