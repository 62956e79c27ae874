"""The future access sequence: which sample each rank reads at each step of each epoch.

A seeded sampler fixes the order of every epoch in advance; these functions
reproduce torch's samplers exactly (tests compare them element by element), so
the store can plan placement clairvoyantly.  Conventions (`sampler=`):

``"random"``
    ``DataLoader(ds, sampler=RandomSampler(ds, generator=g))`` with
    ``g = torch.Generator(); g.manual_seed(seed)`` created once for the run.
    The generator persists across epochs; each fully consumed epoch draws two
    ``torch.randperm(n, generator=g)`` (the second for the empty
    ``num_samples % n`` tail), so epoch e is the (2e+1)-th permutation.  (Without a generator, RandomSampler
    seeds a fresh generator each epoch from the *global* RNG, which depends on
    everything else the program draws, so it cannot be predicted.)
``"dataloader"``
    ``DataLoader(ds, shuffle=True, generator=g)`` (non-persistent workers): each
    epoch's ``iter()`` first draws the workers' base seed from `g`
    (one int64 ``random_``), then the RandomSampler draws ``randperm``.
``"distributed"``
    ``DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle, seed,
    drop_last)`` with ``set_epoch(e)``: ``randperm`` from a generator seeded
    with ``seed + e``, padded (or cut) to a multiple of world_size, then
    ``indices[rank::world_size]``.
``"auto"``
    "distributed" when world_size > 1, else "random".
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["SAMPLERS", "epoch_order", "access_sequence", "node_sequence", "epoch_length"]

SAMPLERS = ("auto", "random", "dataloader", "distributed")


def _resolve(sampler: str, world_size: int) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "auto":
        return "distributed" if world_size > 1 else "random"
    if world_size > 1 and sampler != "distributed":
        raise ValueError(f"sampler={sampler!r} is single-process; use 'distributed' with world_size={world_size}")
    return sampler


def epoch_length(n: int, *, world_size: int = 1, sampler: str = "auto", sampler_drop_last: bool = False) -> int:
    """Samples one rank reads per epoch."""
    if _resolve(sampler, world_size) == "distributed":
        if sampler_drop_last and n % world_size:
            return math.ceil((n - world_size) / world_size)
        return math.ceil(n / world_size)
    return n


class _GeneratorReplay:
    """Replays a persistent generator epoch by epoch ('random'/'dataloader'), caching states."""

    def __init__(self, n: int, seed: int, draw_base_seed: bool):
        self.n, self.draw_base_seed = n, draw_base_seed
        g = torch.Generator()
        g.manual_seed(seed)
        self._states = [g.get_state()]  # state at the start of epoch e

    def perm(self, epoch: int) -> np.ndarray:
        g = torch.Generator()
        while len(self._states) <= epoch:
            g.set_state(self._states[-1])
            self._draw(g)
            self._states.append(g.get_state())
        g.set_state(self._states[epoch])
        return self._draw(g)

    def _draw(self, g: torch.Generator) -> np.ndarray:
        if self.draw_base_seed:
            torch.empty((), dtype=torch.int64).random_(generator=g)
        perm = torch.randperm(self.n, generator=g).numpy()
        # RandomSampler.__iter__ draws one more permutation for the `num_samples % n` tail (empty here)
        # once the epoch is consumed to the end, as DataLoader always does.
        torch.randperm(self.n, generator=g)
        return perm


_REPLAYS: dict = {}


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                sampler: str = "auto", sampler_drop_last: bool = False) -> np.ndarray:
    """Sample indices rank `rank` reads in epoch `epoch`, in order (int64 array)."""
    if n <= 0:
        raise ValueError(f"dataset is empty (n={n})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    kind = _resolve(sampler, world_size)
    if kind == "distributed":
        if shuffle:
            g = torch.Generator()
            g.manual_seed(seed + epoch)
            idx = torch.randperm(n, generator=g).numpy()
        else:
            idx = np.arange(n, dtype=np.int64)
        num = epoch_length(n, world_size=world_size, sampler=kind, sampler_drop_last=sampler_drop_last)
        total = num * world_size
        if total > n:
            reps = math.ceil(total / n)
            idx = np.tile(idx, reps)[:total] if total - n > n else np.concatenate([idx, idx[: total - n]])
        else:
            idx = idx[:total]
        return np.ascontiguousarray(idx[rank:total:world_size], dtype=np.int64)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    key = (n, seed, kind)
    rep = _REPLAYS.get(key)
    if rep is None:
        if len(_REPLAYS) > 16:
            _REPLAYS.clear()
        rep = _REPLAYS[key] = _GeneratorReplay(n, seed, draw_base_seed=(kind == "dataloader"))
    return rep.perm(epoch).astype(np.int64, copy=False)


def access_sequence(n: int, *, seed: int, epochs: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                    sampler: str = "auto", start_epoch: int = 0) -> np.ndarray:
    """Concatenated accesses of one rank over epochs [start_epoch, start_epoch + epochs)."""
    return np.concatenate([epoch_order(n, seed=seed, epoch=e, rank=rank, world_size=world_size, shuffle=shuffle,
                                       sampler=sampler) for e in range(start_epoch, start_epoch + epochs)])


def node_sequence(n: int, *, seed: int, epoch: int, ranks, world_size: int, batch_size: int = 1,
                  shuffle: bool = True, sampler: str = "auto") -> np.ndarray:
    """Accesses of a node's ranks in one epoch, interleaved batch by batch (ranks step together)."""
    orders = [epoch_order(n, seed=seed, epoch=epoch, rank=r, world_size=world_size, shuffle=shuffle, sampler=sampler)
              for r in ranks]
    L = len(orders[0])
    parts = []
    for s in range(0, L, batch_size):
        for o in orders:
            parts.append(o[s:s + batch_size])
    return np.concatenate(parts)
