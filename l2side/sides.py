"""Side arithmetic of the address invariant, on the host (the kernels do the same with one AND + POPC).

For memory from l2side's allocator on a GPU with a split L2:
    side(addr) = popcount(addr & side_mask) & 1,   side_mask = hash_mask | 1 << 21
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CHUNK_BYTES = 4096          # the side never changes inside a 4 KiB chunk
PAGE_BYTES = 2 << 20        # physical page (VMM granularity)
PAGE_SIDE_BIT = 1 << 21     # bit 21 of a page's virtual address = the page's side


def side_mask(hash_mask: int, split: bool = True) -> int:
    """The constant kernels AND with: the in-page hash bits plus the page-side bit (0 without a split)."""
    if hash_mask >> 21:
        raise ValueError(f"hash_mask must only use bits below 21 (in-page bits), got {hash_mask:#x}")
    return (hash_mask | PAGE_SIDE_BIT) if split else 0


def side_of_address(address: int, mask: int) -> int:
    return bin(address & mask).count("1") & 1


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def chunk_sides(start: int, nbytes: int, mask: int) -> np.ndarray:
    """Side of every 4 KiB chunk that [start, start + nbytes) touches, as uint8 (first chunk first)."""
    if nbytes <= 0:
        return np.zeros(0, dtype=np.uint8)
    first = start // CHUNK_BYTES
    last = (start + nbytes - 1) // CHUNK_BYTES
    addresses = np.arange(first, last + 1, dtype=np.uint64) * np.uint64(CHUNK_BYTES)
    return (_popcount64(addresses & np.uint64(mask)) & 1).astype(np.uint8)


def near_chunk(pair: int, sm_side: int, base: int, mask: int) -> int:
    """Of chunk pair (2*pair, 2*pair + 1) of a buffer at `base`, the index of the one on `sm_side`.

    Bit 12 is in every hash mask seen (it must be, for pairs to split): the two chunks of a pair are on
    opposite sides, so one AND + POPC + XOR picks the near one.
    """
    even = 2 * pair
    return even + (side_of_address(base + even * CHUNK_BYTES, mask) ^ sm_side)


_bits_cache: dict = {}


def sm_side_bits(sm_side: Sequence[int]) -> list:
    """The kernels' %smid -> side table (l2side::sm_side in kernels/sm_side.cuh): bit i of word i // 64 = side
    of SM i, 4 words (absent ids, ids >= 256 and sides -1: 0)."""
    key = tuple(sm_side)
    bits = _bits_cache.get(key)
    if bits is None:
        bits = [0, 0, 0, 0]
        for smid, s in enumerate(key):
            if s == 1 and smid < 256:
                bits[smid >> 6] |= 1 << (smid & 63)
        _bits_cache[key] = bits
    return list(bits)
