"""measure: named profiles, sizes, JSON round-trips."""

import json

import pytest

from memstrata.hardware import GB, GiB, PROFILES, Hierarchy, Tier, format_size, parse_size, profile

REQUIRED = ("h200", "h100", "a100-80gb", "rtx4090", "cpu")


@pytest.mark.parametrize("name", REQUIRED)
def test_required_profiles_exist_and_are_sane(name):
    h = profile(name)
    assert h.name == name
    assert h.source, "every profile cites where its figures come from"
    assert h.peak_flops > 0 and h.fast_bandwidth > 0
    assert h.tiers[0].read_bandwidth == 0 and h.tiers[0].write_bandwidth == 0  # nothing above tier 0
    for lower in h.tiers[1:]:
        assert lower.capacity > 0
        assert lower.read_bandwidth > 0 and lower.write_bandwidth > 0
    # tiers get slower (or no faster) going down
    bws = [t.read_bandwidth for t in h.tiers[1:]]
    assert bws == sorted(bws, reverse=True)
    if h.device == "cuda":
        assert [t.kind for t in h.tiers] == ["hbm", "pinned_dram", "nvme"]
    else:
        assert h.tiers[0].kind == "dram"


def test_profile_lookup_is_case_insensitive_and_rejects_unknown():
    assert profile("H200").name == "h200"
    with pytest.raises(ValueError, match="unknown profile 'tpu'.*h200"):
        profile("tpu")
    assert set(REQUIRED) <= set(PROFILES)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        ("0", 0),
        ("12GiB", 12 * GiB),
        ("12 gib", 12 * GiB),
        ("1.5GB", int(1.5 * GB)),
        ("512MiB", 512 * 1024**2),
        ("2k", 2000),
        ("3KiB", 3 * 1024),
        ("1TB", 1000**4),
        (" 7 B ", 7),
        (".5GiB", GiB // 2),
    ],
)
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-1GiB", "1e9", "12 GiB extra", "1,5GB", "abc", "12%"])
def test_parse_size_bad(text):
    with pytest.raises(ValueError, match="malformed size"):
        parse_size(text)


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(12 * GiB) == "12.00 GiB"
    assert format_size(5 * 1024**5) == "5120.00 TiB"


@pytest.mark.parametrize("name", REQUIRED)
def test_hierarchy_json_round_trip(name):
    h = profile(name)
    s = h.to_json()
    json.loads(s)  # valid JSON
    assert Hierarchy.from_json(s) == h


def test_tier_and_hierarchy_validation():
    with pytest.raises(ValueError, match="kind"):
        Tier("x", "tape", capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        Tier("x", "dram", capacity=-1)
    with pytest.raises(ValueError, match="unique"):
        Hierarchy("h", "cpu", (Tier("a", "dram", 1), Tier("a", "nvme", 1)), 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one tier"):
        Hierarchy("h", "cpu", (), 1.0, 1.0)


def test_transfer_time_and_budget_view():
    h = profile("h200")
    dram = h.tier("dram")
    assert dram.transfer_time(0, "read") == pytest.approx(dram.latency)
    assert dram.transfer_time(50 * GB, "write") == pytest.approx(1.0 + dram.latency)
    assert h.tier("hbm").transfer_time(1, "read") == float("inf")
    small = h.with_fast_capacity(8 * GiB)
    assert small.fast.capacity == 8 * GiB and small.tiers[1:] == h.tiers[1:]
    assert h.index("nvme") == 2
    with pytest.raises(KeyError):
        h.tier("tape")


def test_parse_budget_text_is_the_one_budget_parser():
    from memstrata.hardware import parse_budget_text

    assert parse_budget_text("50%") == (0.5, None)
    assert parse_budget_text(" 12GiB ") == (None, 12 * 1024**3)
    assert parse_budget_text("250%", max_percent=1000) == (2.5, None)
    for bad, msg in [("lots", "malformed budget"), ("150%", r"\(0, 100\]"), ("0%", r"\(0, 100\]"),
                     ("x%", "malformed budget"), ("0", "> 0 bytes")]:
        with pytest.raises(ValueError, match=msg):
            parse_budget_text(bad)
