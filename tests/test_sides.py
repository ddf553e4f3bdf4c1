"""Side arithmetic of the address invariant, against brute force."""
import random

import numpy as np
import pytest

from l2side import sides

H100_MASK = 0xB3000


def brute_side(address, mask):
    return bin(address & mask).count("1") % 2


def test_side_mask_adds_the_page_bit():
    assert sides.side_mask(H100_MASK) == 0x2B3000
    assert sides.side_mask(H100_MASK, split=False) == 0


def test_side_mask_rejects_bits_outside_the_page():
    with pytest.raises(ValueError, match="below 21"):
        sides.side_mask(1 << 22)


@pytest.mark.parametrize("mask", [0x2B3000, 0x2AB000, 0x3EF000])
def test_chunk_sides_match_brute_force(mask):
    rng = random.Random(1)
    for _ in range(50):
        start = rng.randrange(0, 1 << 40)
        nbytes = rng.randrange(1, 1 << 22)
        got = sides.chunk_sides(start, nbytes, mask)
        first, last = start // 4096, (start + nbytes - 1) // 4096
        want = [brute_side(c * 4096, mask) for c in range(first, last + 1)]
        assert got.tolist() == want


def test_chunk_sides_empty():
    assert sides.chunk_sides(4096, 0, 0x2B3000).size == 0


def test_side_constant_inside_a_chunk():
    mask = sides.side_mask(H100_MASK)
    for base in range(0, 1 << 23, 4096 * 37):
        s = sides.side_of_address(base, mask)
        assert all(sides.side_of_address(base + off, mask) == s for off in (1, 17, 2048, 4095))


def test_chunk_pairs_are_on_opposite_sides():
    mask = sides.side_mask(H100_MASK)
    for pair in range(4096):
        even = pair * 2 * 4096
        assert sides.side_of_address(even, mask) != sides.side_of_address(even + 4096, mask)


def test_near_chunk_picks_the_chunk_on_the_sms_side():
    mask = sides.side_mask(H100_MASK)
    base = 0x7F0000400000  # 4 MiB aligned
    for pair in range(2048):
        for sm_side in (0, 1):
            chunk = sides.near_chunk(pair, sm_side, base, mask)
            assert chunk in (2 * pair, 2 * pair + 1)
            assert sides.side_of_address(base + chunk * 4096, mask) == sm_side


def test_4mib_aligned_buffers_share_sides_at_equal_offsets():
    mask = sides.side_mask(H100_MASK)
    a, b = 0x7F0000400000, 0x7F1234C00000  # both 4 MiB aligned
    sa = sides.chunk_sides(a, 64 << 20, mask)
    sb = sides.chunk_sides(b, 64 << 20, mask)
    assert np.array_equal(sa, sb)
    assert abs(int(sa.sum()) - sa.size // 2) == 0  # exactly half the chunks on each side
