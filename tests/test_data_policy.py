"""Clairvoyant (Belady) placement against LRU on multi-epoch seeded sequences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstrata.data import BeladyCache, access_sequence, next_use, simulate_hit_rates
from memstrata.data.policy import NEVER


def test_next_use():
    assert next_use([1, 2, 1, 1, 3]).tolist() == [2, NEVER, 3, NEVER, NEVER]


@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_belady_beats_lru(frac):
    n = 400
    seq = access_sequence(n, seed=0, epochs=4)
    cap = {"host": int(frac * n)}
    b = simulate_hit_rates(seq, cap, "belady")
    l = simulate_hit_rates(seq, cap, "lru")
    assert b.hit_rate["host"] > l.hit_rate["host"] + 0.05
    # Belady on random permutations keeps ~capacity/n of the warm accesses
    assert b.warm_hit_rate["host"] == pytest.approx(frac, abs=0.03)


def test_tiers_partition_hits():
    seq = access_sequence(200, seed=1, epochs=3)
    r = simulate_hit_rates(seq, [("device", 50), ("host", 50)], "belady")
    whole = simulate_hit_rates(seq, {"all": 100}, "belady")
    assert r.hits["device"] + r.hits["host"] == whole.hits["all"]
    assert r.hits["device"] > 0 and r.hits["host"] > 0
    full = simulate_hit_rates(seq, {"host": 200}, "lru")
    assert full.warm_hit_rate["host"] == 1.0 and full.compulsory == 200


def test_byte_capacities():
    seq = access_sequence(50, seed=2, epochs=3)
    sizes = np.random.default_rng(0).integers(100, 1000, size=50)
    r = simulate_hit_rates(seq, {"host": int(sizes.sum() // 2)}, "belady", sizes=sizes)
    assert 0 < r.hit_rate["host"] < 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=120), st.integers(0, 16))
def test_belady_never_worse_than_lru(seq, cap):
    b = simulate_hit_rates(seq, {"c": cap}, "belady")
    l = simulate_hit_rates(seq, {"c": cap}, "lru")
    assert b.hits["c"] >= l.hits["c"]


def test_belady_capacity_respected():
    c = BeladyCache(10)
    seq = access_sequence(30, seed=0, epochs=2)
    nxt = next_use(seq)
    for k, nu in zip(seq.tolist(), nxt.tolist()):
        c.access(k, nu, 3)
        assert c.used <= 10
