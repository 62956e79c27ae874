"""Cache placement policies over a known access sequence: Belady (clairvoyant) and LRU.

Pure functions and small online caches, no torch objects.  The same
`BeladyCache` drives the loader's runtime placement and the benchmark's
simulation, so the benchmark measures the policy the loader really runs.

[Note: tiers as nested caches]
Tiers are exclusive (a sample is served by the fastest tier that holds it),
and both Belady's MIN and LRU are *stack algorithms* (Mattson et al. 1970):
with unit-size items the content of a cache of capacity C is a subset of the
content of one of capacity C' > C at every instant.  So the optimal (or LRU)
placement over tiers of capacities c0, c1, ... is the nested-cache one, and
"hits in tier k" = hits(c0+..+ck) - hits(c0+..+c(k-1)).  `simulate_hit_rates`
uses this; with variable sizes (bytes) it is the usual size-aware
approximation of both policies.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["NEVER", "next_use", "BeladyCache", "LRUCache", "make_cache", "simulate_hit_rates", "CacheSimResult",
           "POLICIES"]

NEVER = np.iinfo(np.int64).max  # "no further use": next_use value beyond any time
POLICIES = ("belady", "lru")


def next_use(seq) -> np.ndarray:
    """For each position t, the next position t' > t with seq[t'] == seq[t], or NEVER."""
    seq = np.asarray(seq)
    T = len(seq)
    nxt = np.full(T, NEVER, dtype=np.int64)
    if T == 0:
        return nxt
    order = np.argsort(seq, kind="stable")
    s = seq[order]
    same = s[1:] == s[:-1]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class BeladyCache:
    """Belady's MIN with bypass, capacity in bytes (or items with size 1).

    `access(key, next_time, size)` is called at each use with the time of the
    key's *next* use; it returns (hit, admitted, evicted_keys).  A missed key is
    admitted only if it will be needed sooner than the farthest-needed resident
    one (otherwise caching it could only displace something more urgent); a key
    that is never needed again leaves at once.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.used = 0
        self._next: dict = {}  # key -> next use time
        self._size: dict = {}
        self._heap: list = []  # (-next_use, key), lazily invalidated

    def __contains__(self, key) -> bool:
        return key in self._next

    def __len__(self) -> int:
        return len(self._next)

    def _drop(self, key) -> None:
        del self._next[key]
        self.used -= self._size.pop(key)

    def _farthest(self):
        h = self._heap
        while h:
            nu, key = h[0]
            if self._next.get(key) == -nu:
                return key, -nu
            heapq.heappop(h)
        return None, None

    def access(self, key, next_time: int, size: int = 1):
        hit = key in self._next
        evicted = []
        if hit:
            if next_time >= NEVER:
                self._drop(key)
                return True, False, [key]
            self._next[key] = next_time
            heapq.heappush(self._heap, (-next_time, key))
            return True, True, evicted
        if next_time >= NEVER or size > self.capacity:
            return False, False, evicted
        while self.used + size > self.capacity:
            far, far_t = self._farthest()
            if far is None or far_t <= next_time:
                return False, False, evicted  # bypass: everything resident is needed sooner
            heapq.heappop(self._heap)
            self._drop(far)
            evicted.append(far)
        self._next[key] = next_time
        self._size[key] = size
        self.used += size
        heapq.heappush(self._heap, (-next_time, key))
        if len(self._heap) > 4 * len(self._next) + 64:  # compact stale heap entries
            self._heap = [(-t, k) for k, t in self._next.items()]
            heapq.heapify(self._heap)
        return False, True, evicted

    def discard(self, key) -> bool:
        if key in self._next:
            self._drop(key)
            return True
        return False


class LRUCache:
    """Least-recently-used with capacity in bytes; same `access` signature (next_time ignored)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.used = 0
        self._d: OrderedDict = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def access(self, key, next_time: int = 0, size: int = 1):
        if key in self._d:
            self._d.move_to_end(key)
            return True, True, []
        if size > self.capacity:
            return False, False, []
        evicted = []
        while self.used + size > self.capacity:
            k, s = self._d.popitem(last=False)
            self.used -= s
            evicted.append(k)
        self._d[key] = size
        self.used += size
        return False, True, evicted

    def discard(self, key) -> bool:
        if key in self._d:
            self.used -= self._d.pop(key)
            return True
        return False


def make_cache(policy: str, capacity: int):
    if policy == "belady":
        return BeladyCache(capacity)
    if policy == "lru":
        return LRUCache(capacity)
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


@dataclass(frozen=True)
class CacheSimResult:
    """Hit counts of one policy over one sequence, per tier (fastest first), plus misses.

    `hit_rate[tier]` = hits served by that tier / accesses; `miss_rate` =
    accesses that went below the last tier (to the store's slowest level or
    the source).  `compulsory` accesses are first uses (misses for any
    policy); `warm_hit_rate` excludes them.
    """

    policy: str
    accesses: int
    compulsory: int
    capacities: dict
    hits: dict
    hit_rate: dict
    warm_hit_rate: dict
    miss_rate: float
    total_hit_rate: float = field(default=0.0)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "accesses": self.accesses, "compulsory": self.compulsory,
                "capacities": dict(self.capacities), "hits": dict(self.hits), "hit_rate": dict(self.hit_rate),
                "warm_hit_rate": dict(self.warm_hit_rate), "miss_rate": self.miss_rate,
                "total_hit_rate": self.total_hit_rate}


def _count_hits(seq, nxt, sizes, capacity: int, policy: str) -> int:
    cache = make_cache(policy, capacity)
    hits = 0
    acc = cache.access
    if sizes is None:
        for key, nu in zip(seq.tolist(), nxt.tolist()):
            hits += acc(key, nu, 1)[0]
    else:
        for key, nu in zip(seq.tolist(), nxt.tolist()):
            hits += acc(key, nu, int(sizes[key]))[0]
    return hits


def simulate_hit_rates(seq, capacities, policy: str = "belady", sizes=None) -> CacheSimResult:
    """Hit rate per tier of `policy` over access sequence `seq`.

    seq: sample ids in access order (e.g. `access_sequence(n, seed=0, epochs=3)`).
    capacities: ``{"device": c0, "host": c1}`` or a sequence of (name, capacity),
        fastest tier first, exclusive tiers; capacity in items, or in bytes when
        `sizes` (bytes per sample id) is given.
    policy: "belady" | "lru".

    >>> from memstrata.data.order import access_sequence
    >>> seq = access_sequence(1000, seed=0, epochs=3)
    >>> b = simulate_hit_rates(seq, {"host": 500}, "belady"); l = simulate_hit_rates(seq, {"host": 500}, "lru")
    >>> b.hit_rate["host"] > l.hit_rate["host"]
    True
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    items = list(capacities.items()) if isinstance(capacities, dict) else [tuple(x) for x in capacities]
    if not items:
        raise ValueError("need at least one tier capacity")
    seq = np.asarray(seq, dtype=np.int64)
    T = len(seq)
    nxt = next_use(seq)
    compulsory = int(len(np.unique(seq))) if T else 0
    hits, rates, warm, cum, prev = {}, {}, {}, 0, 0
    for name, cap in items:
        if cap < 0:
            raise ValueError(f"tier {name!r}: capacity must be >= 0, got {cap}")
        cum += int(cap)
        h = _count_hits(seq, nxt, sizes, cum, policy) if cum > 0 else 0
        hits[name] = h - prev
        prev = h
    for name, h in hits.items():
        rates[name] = h / T if T else 0.0
        warm[name] = h / (T - compulsory) if T > compulsory else 0.0
    return CacheSimResult(policy=policy, accesses=T, compulsory=compulsory, capacities=dict(items), hits=hits,
                          hit_rate=rates, warm_hit_rate=warm, miss_rate=(T - prev) / T if T else 0.0,
                          total_hit_rate=prev / T if T else 0.0)
