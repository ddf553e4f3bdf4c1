"""Which L2 side serves which B tiles of a GEMM (issue 4), as plain arithmetic.

The GEMM computes D[M, N] = A[M, K] @ B[N, K]^T in tiles of BLOCK_M x BLOCK_N. With side-aware packed B,
every N-block's B tiles live on one L2 side, and only SMs on that side compute the N-block's output tiles,
so every B byte an SM reads comes from its near side.

Balance: side s should get a share of the output tiles equal to its share of the SMs. Whole N-blocks go to
one side each; when the count does not divide, the N-blocks left over are *shared*: stored on both sides,
their M-blocks split between the sides so that the tile counts match the SM counts as closely as possible.

Packed layout: the side-s chunks (4 KiB) of a side-aware buffer, in order, hold side s's N-blocks one after
the other, each as its K-tiles in order, each K-tile as `chunks_per_tile` consecutive chunks. In a buffer
that starts 4 MiB-aligned, the i-th side-s chunk is the one of chunk pair i (chunks 2i, 2i+1) that is on side
s: chunk 2i + (side(base + 2i * 4 KiB) ^ s) -- one AND, one POPC, one XOR per chunk.

Packing a weight (`l2side.pack_b`, docs/packed-b.md) does not know M: `packing_plan` stores plan_sides'
exclusive N-blocks (which do not depend on M) on their side and every left-over N-block on both sides, so the
plan of any M finds its tiles. A tile's bytes are the SWIZZLE_128B shared-memory image (`swizzle_128b`).
A *plain* layout (no split, or asked for) keeps every N-block on side 0 with chunk i = i (`paired=False`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .sides import CHUNK_BYTES, chunk_sides


@dataclasses.dataclass(frozen=True)
class SidePlan:
    n_blocks: int                 # N-blocks
    m_blocks: int                 # M-blocks
    stored: tuple                 # stored[s]: the N-blocks whose B tiles side s holds, in packed order
    m_range: tuple                # m_range[s][j]: (first, end) M-blocks side s computes of stored[s][j]

    def tiles(self, side: int) -> int:
        return sum(end - first for first, end in self.m_range[side])

    def owner(self, m_block: int, n_block: int) -> int:
        """The side that computes output tile (m_block, n_block)."""
        for s in (0, 1):
            for n, (first, end) in zip(self.stored[s], self.m_range[s]):
                if n == n_block and first <= m_block < end:
                    return s
        raise ValueError(f"tile ({m_block}, {n_block}) is outside the plan")


def plan_sides(n_blocks: int, m_blocks: int, sms_per_side: tuple) -> SidePlan:
    """Splits N-blocks (and, for left-over N-blocks, their M-blocks) between the two sides in proportion to
    their SM counts."""
    if n_blocks < 1 or m_blocks < 1:
        raise ValueError(f"need at least one N-block and one M-block, got {n_blocks} x {m_blocks}")
    s0, s1 = sms_per_side
    if s0 < 0 or s1 < 0 or s0 + s1 == 0:
        raise ValueError(f"sms_per_side must be two non-negative counts, not both 0: {sms_per_side}")
    share0 = s0 / (s0 + s1)
    # Exclusive N-blocks: each side gets the whole blocks its share covers; alternate sides so that both
    # sides walk the whole N range (neighbouring N-blocks share A rows in L2 at the same time).
    whole0 = int(n_blocks * share0)
    whole1 = int(n_blocks * (1 - share0)) if s1 else 0
    if not s0:
        whole0 = 0
    order = _interleave(n_blocks, whole0, whole1)
    stored = ([], [])
    m_range = ([], [])
    for n, side in order:
        if side in (0, 1):
            stored[side].append(n)
            m_range[side].append((0, m_blocks))
    # Left-over N-blocks: split their M-blocks so that side 0's tile count approaches its target.
    shared = [n for n, side in order if side == 2]
    target0 = round(n_blocks * m_blocks * share0)
    have0 = whole0 * m_blocks
    for i, n in enumerate(shared):
        remaining = len(shared) - i
        want0 = min(m_blocks, max(0, round((target0 - have0) / remaining)))
        if want0 > 0:
            stored[0].append(n)
            m_range[0].append((0, want0))
        if want0 < m_blocks:
            stored[1].append(n)
            m_range[1].append((want0, m_blocks))
        have0 += want0
    return SidePlan(n_blocks, m_blocks, (tuple(stored[0]), tuple(stored[1])),
                    (tuple(m_range[0]), tuple(m_range[1])))


def _interleave(n_blocks: int, whole0: int, whole1: int):
    """(n_block, side) with side 0/1 for exclusive blocks spread evenly over N, 2 for the left-overs."""
    out = []
    taken0 = taken1 = 0
    for n in range(n_blocks):
        # give the block to the side that is furthest behind its quota at this point of the walk
        due0 = whole0 * (n + 1) / n_blocks - taken0
        due1 = whole1 * (n + 1) / n_blocks - taken1
        if taken0 < whole0 and (due0 >= due1 or taken1 >= whole1):
            out.append((n, 0))
            taken0 += 1
        elif taken1 < whole1:
            out.append((n, 1))
            taken1 += 1
        else:
            out.append((n, 2))
    return out


def side_chunk_index(i: int, side: int, base: int, side_mask: int) -> int:
    """Index (in 4 KiB chunks from `base`) of the i-th chunk on `side` of a buffer at 4 MiB-aligned `base`."""
    even = 2 * i
    parity = bin((base + even * CHUNK_BYTES) & side_mask).count("1") & 1
    return even + (parity ^ side)


def chunk_index(i: int, side: int, base: int, side_mask: int, paired: bool = True) -> int:
    """Index of the i-th side-`side` chunk: side_chunk_index in the paired (side-aware) layout, i in the plain
    one (paired=False: every N-block on side 0, chunks in order)."""
    if not paired:
        if side:
            raise ValueError("the plain layout has only side 0")
        return i
    return side_chunk_index(i, side, base, side_mask)


def _stored(plan) -> tuple:
    """plan.stored of a SidePlan, or a (side 0, side 1) tuple of N-block lists as it is."""
    return tuple(tuple(s) for s in getattr(plan, "stored", plan))


def packing_plan(n_blocks: int, sms_per_side: tuple) -> tuple:
    """stored[s] for a packed weight (M unknown): the exclusive N-blocks of plan_sides (the same for every
    m_blocks) on their side, then every left-over N-block on both sides (each side that has SMs), in N order.

    For every m_blocks, plan_sides(n_blocks, m_blocks, sms_per_side).stored[s] is a subset of the result's
    stored[s] (and in the same relative order), so a GEMM of any M finds each (N-block, side) it uses."""
    if n_blocks < 1:
        raise ValueError(f"need at least one N-block, got {n_blocks}")
    plan = plan_sides(n_blocks, 1, sms_per_side)  # validates sms_per_side
    s0, s1 = sms_per_side
    share0 = s0 / (s0 + s1)
    whole0 = int(n_blocks * share0) if s0 else 0
    whole1 = int(n_blocks * (1 - share0)) if s1 else 0
    stored = ([], [])
    left_over = []
    for n, side in _interleave(n_blocks, whole0, whole1):
        (stored[side] if side in (0, 1) else left_over).append(n)
    for s, sms in ((0, s0), (1, s1)):
        if sms:
            stored[s].extend(left_over)
    out = (tuple(stored[0]), tuple(stored[1]))
    assert all(set(plan.stored[s]) <= set(out[s]) for s in (0, 1))
    return out


def packed_chunks_needed(plan, k_tiles: int, chunks_per_tile: int, paired: bool = True) -> int:
    """Chunks of the packed buffer: both sides' chunk sequences interleave pairwise, so the larger wins
    (plain layout: side 0's chunks). `plan`: a SidePlan or a stored tuple."""
    stored = _stored(plan)
    per_side = [len(stored[s]) * k_tiles * chunks_per_tile for s in (0, 1)]
    if not paired:
        if per_side[1]:
            raise ValueError("the plain layout stores every N-block on side 0")
        return per_side[0]
    return 2 * max(per_side)


BLOCK_K = 128        # bytes of K per tile (fp8: 128 elements) = one 128-byte swizzle row
SWIZZLE_UNIT = 16    # SWIZZLE_128B permutes 16-byte units within each 128-byte row, by row % 8


def swizzle_128b(rows: np.ndarray) -> np.ndarray:
    """numpy reference of TMA's SWIZZLE_128B shared-memory image of a box of 128 bytes x R rows (R any):
    row r at byte r * 128, its 16-byte unit u at unit position u ^ (r % 8). rows: uint8 [..., R, 128]."""
    rows = np.asarray(rows)
    if rows.shape[-1] != BLOCK_K:
        raise ValueError(f"rows must be 128 bytes wide, got {rows.shape}")
    r = rows.shape[-2]
    units = rows.reshape(*rows.shape[:-1], 8, SWIZZLE_UNIT)
    out = np.empty_like(units)
    for row in range(r):
        for u in range(8):
            out[..., row, u ^ (row % 8), :] = units[..., row, u, :]
    return out.reshape(rows.shape)


def b_tiles(b: np.ndarray, block_n: int) -> np.ndarray:
    """numpy reference of packed B's tile images: b uint8 [N, K] (fp8 bytes) -> [n_blocks, k_tiles,
    block_n * 128], tile (nb, kb) = swizzle_128b of rows [nb*block_n, +block_n) x bytes [kb*128, +128),
    zero-padded beyond N and K."""
    b = np.asarray(b, dtype=np.uint8)
    n, k = b.shape
    n_blocks, k_tiles = -(-n // block_n), -(-k // BLOCK_K)
    padded = np.zeros((n_blocks * block_n, k_tiles * BLOCK_K), dtype=np.uint8)
    padded[:n, :k] = b
    tiles = padded.reshape(n_blocks, block_n, k_tiles, BLOCK_K).transpose(0, 2, 1, 3)
    return swizzle_128b(tiles).reshape(n_blocks, k_tiles, block_n * BLOCK_K)


def pack_reference(tiles: np.ndarray, plan, base: int, side_mask: int, paired: bool = True) -> np.ndarray:
    """numpy reference of the packing permutation: tiles[n_block, k_tile] is one tile's bytes (already in
    the layout the kernel's shared memory wants), returns the packed buffer's bytes (unused chunks zero).
    plan: a SidePlan or a stored tuple; paired=False: the plain layout (chunk i = i, side 0 only)."""
    n_blocks, k_tiles, tile_bytes = tiles.shape
    if tile_bytes % CHUNK_BYTES:
        raise ValueError(f"a tile must be a whole number of 4 KiB chunks, got {tile_bytes} bytes")
    cpt = tile_bytes // CHUNK_BYTES
    stored = _stored(plan)
    out = np.zeros(packed_chunks_needed(stored, k_tiles, cpt, paired) * CHUNK_BYTES, dtype=np.uint8)
    for side in (0, 1):
        for j, n in enumerate(stored[side]):
            for k in range(k_tiles):
                for part in range(cpt):
                    i = (j * k_tiles + k) * cpt + part
                    c = chunk_index(i, side, base, side_mask, paired)
                    out[c * CHUNK_BYTES:(c + 1) * CHUNK_BYTES] = tiles[n, k, part * CHUNK_BYTES:(part + 1) * CHUNK_BYTES]
    return out


def check_packed_sides(plan, k_tiles: int, cpt: int, base: int, side_mask: int) -> bool:
    """Every chunk that holds side s's tiles is on side s (the property the GEMM relies on)."""
    stored = _stored(plan)
    sides_of = chunk_sides(base, packed_chunks_needed(stored, k_tiles, cpt) * CHUNK_BYTES, side_mask)
    for side in (0, 1):
        for i in range(len(stored[side]) * k_tiles * cpt):
            if sides_of[side_chunk_index(i, side, base, side_mask)] != side:
                return False
    return True
