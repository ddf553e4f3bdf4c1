"""The side plan of the side-aware GEMM (issue 4): tile ownership, balance, and the packing permutation
against a numpy reference."""
import itertools

import numpy as np
import pytest

from l2side import side_plan
from l2side.sides import side_mask

SHAPES = [(1, 1), (7, 1), (7, 3), (56, 32), (57, 32), (192, 1), (17, 33), (256, 32), (2, 5)]
SMS = [(66, 66), (67, 65), (66, 0), (1, 131)]


def tiles_by_side(plan):
    count = np.zeros((plan.m_blocks, plan.n_blocks), dtype=int)
    for s in (0, 1):
        for n, (first, end) in zip(plan.stored[s], plan.m_range[s]):
            count[first:end, n] += 1
    return count


@pytest.mark.parametrize("shape,sms", list(itertools.product(SHAPES, SMS)))
def test_every_tile_is_computed_exactly_once(shape, sms):
    n_blocks, m_blocks = shape
    plan = side_plan.plan_sides(n_blocks, m_blocks, sms)
    assert (tiles_by_side(plan) == 1).all()
    assert plan.tiles(0) + plan.tiles(1) == n_blocks * m_blocks


@pytest.mark.parametrize("shape,sms", list(itertools.product(SHAPES, SMS)))
def test_tiles_follow_the_sm_counts(shape, sms):
    n_blocks, m_blocks = shape
    plan = side_plan.plan_sides(n_blocks, m_blocks, sms)
    target0 = n_blocks * m_blocks * sms[0] / sum(sms)
    assert abs(plan.tiles(0) - target0) <= 1, (plan.tiles(0), target0)
    if sms[1] == 0:
        assert plan.stored[1] == ()


def test_odd_block_count_is_shared_between_sides():
    plan = side_plan.plan_sides(7, 4, (66, 66))
    shared = set(plan.stored[0]) & set(plan.stored[1])
    assert len(shared) == 1
    assert plan.tiles(0) == plan.tiles(1) == 14


def test_exclusive_blocks_alternate_over_n():
    plan = side_plan.plan_sides(8, 2, (66, 66))
    assert plan.stored == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_owner_and_bad_input():
    plan = side_plan.plan_sides(3, 2, (66, 66))
    assert {plan.owner(m, n) for m in range(2) for n in range(3)} == {0, 1}
    with pytest.raises(ValueError, match="outside"):
        plan.owner(5, 0)
    with pytest.raises(ValueError, match="N-block"):
        side_plan.plan_sides(0, 1, (66, 66))
    with pytest.raises(ValueError, match="sms_per_side"):
        side_plan.plan_sides(4, 1, (0, 0))


@pytest.mark.parametrize("mask", [0xB3000, 0xAB000])
def test_side_chunk_index_lands_on_the_side(mask):
    sm = side_mask(mask)
    base = 0x7F0000C00000  # 4 MiB aligned
    for side in (0, 1):
        seen = set()
        for i in range(3000):
            c = side_plan.side_chunk_index(i, side, base, sm)
            assert bin((base + c * 4096) & sm).count("1") % 2 == side
            seen.add(c)
        assert len(seen) == 3000


@pytest.mark.parametrize("mask", [0xB3000, 0xAB000])
def test_packing_is_a_permutation_onto_the_right_sides(mask):
    sm = side_mask(mask)
    base = 0x7F0001000000
    rng = np.random.default_rng(0)
    n_blocks, k_tiles, cpt = 7, 3, 4  # 7 N-blocks of 16 KiB tiles (128 x 128 fp8), one shared
    plan = side_plan.plan_sides(n_blocks, 5, (66, 66))
    tiles = rng.integers(0, 256, size=(n_blocks, k_tiles, cpt * 4096), dtype=np.uint8)
    packed = side_plan.pack_reference(tiles, plan, base, sm)
    assert side_plan.check_packed_sides(plan, k_tiles, cpt, base, sm)
    # unpack with the kernel's addressing and compare
    for side in (0, 1):
        for j, n in enumerate(plan.stored[side]):
            for k in range(k_tiles):
                got = b"".join(
                    packed[c * 4096:(c + 1) * 4096].tobytes()
                    for c in (side_plan.side_chunk_index((j * k_tiles + k) * cpt + p, side, base, sm)
                              for p in range(cpt)))
                assert got == tiles[n, k].tobytes()
    used = sum(len(plan.stored[s]) for s in (0, 1)) * k_tiles * cpt
    assert packed.size // 4096 - used <= 2 * k_tiles * cpt, "little padding"


def test_pack_reference_rejects_partial_chunks():
    plan = side_plan.plan_sides(2, 1, (66, 66))
    with pytest.raises(ValueError, match="4 KiB"):
        side_plan.pack_reference(np.zeros((2, 1, 1000), np.uint8), plan, 0, side_mask(0xB3000))
