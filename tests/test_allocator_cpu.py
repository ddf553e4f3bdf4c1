"""The caching allocator's logic on the CPU test double of the CUDA driver, and the probe's analysis."""
import random

import pytest

from conftest import run_python
from fake_allocator_scenarios import SCENARIOS
from l2side import _native as native


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_allocator_scenario(name):
    r = run_python(["tests/fake_allocator_scenarios.py", name], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok {name}" in r.stdout


def synthetic_latencies(mask, sm_sides, noise=15, seed=0):
    """What the SM probe measures on a GPU with this mask: 300 cycles near, 500 far, plus noise."""
    rng = random.Random(seed)
    offsets = native.sm_probe_offsets()
    rows = []
    for side in sm_sides:
        if side < 0:
            rows.append([])
            continue
        row = []
        for off in offsets:
            chunk_side = bin(off & mask).count("1") & 1  # relative to the probe page's first chunk
            row.append(int((300 if chunk_side == side else 500) + rng.uniform(-noise, noise)))
        rows.append(row)
    return rows


@pytest.mark.parametrize("mask", [0xB3000, 0xAB000, 0x1EF000])
def test_probe_analysis_finds_mask_and_sides(mask):
    rng = random.Random(mask)
    sm_sides = [0] + [rng.randrange(2) for _ in range(131)] + [-1] * 12  # SM 0 is side 0 by definition
    a = native.analyse_sm_latencies(synthetic_latencies(mask, sm_sides))
    assert a["split"] and a["hash_mask"] == mask
    assert list(a["sm_side"][:len(sm_sides)]) == sm_sides
    assert a["linearity"] == 1.0 and a["disagreeing_sms"] == 0
    assert 280 < a["near_cycles"] < 320 and 480 < a["far_cycles"] < 520


def test_probe_analysis_reports_no_split_on_a_flat_l2():
    offsets = native.sm_probe_offsets()
    rows = [[300 + (i * 7 + k) % 9 for k in range(len(offsets))] for i in range(16)]
    a = native.analyse_sm_latencies(rows)
    assert not a["split"] and a["hash_mask"] == 0
    assert set(a["sm_side"][:16]) == {0}


def test_probe_analysis_flags_noisy_sms():
    sm_sides = [0, 1] * 8
    rows = synthetic_latencies(0xB3000, sm_sides)
    # SM 3 sees bits 12 and 13 flip the side one way and bits 16, 17, 19 the other: no consistent side
    rows[3] = list(rows[2])
    for bit in (16, 17, 19):
        rows[3][1 + bit - 4] = rows[3][0] - 200
    a = native.analyse_sm_latencies(rows)
    assert a["disagreeing_sms"] >= 1


def test_probe_analysis_rejects_ragged_rows():
    with pytest.raises(ValueError, match="one latency per probe offset"):
        native.analyse_sm_latencies([[300, 500]])
