"""Side-aware packed B (l2side.pack_b, issue 4): layout arithmetic against side_plan's numpy reference and a
numpy model of the pack kernel, validation and the kernel's nvcc compile on any machine; on a GPU the kernel
itself: exact unpack, every chunk on its N-block's side, the swizzled tile image, save/load, bad inputs."""
import ctypes
import io
import itertools
import struct

import numpy as np
import pytest

from conftest import requires_gpu, requires_hopper, requires_nvcc

torch = pytest.importorskip("torch")
from l2side import jit, packed_b, side_plan, sides  # noqa: E402
from l2side.packed_b import PackedLayout, unpack_bytes  # noqa: E402

MASKS = [sides.side_mask(0xB3000), sides.side_mask(0xAB000)]
BASES = [0x7F0000C00000, 0x7F0001000000 + 0x2000 * 37]   # 4 MiB-aligned; 8 KiB-aligned (small buffers)
SMS = [(66, 66), (67, 65), (66, 0), (1, 131)]


def random_b(n, k, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, k), dtype=np.uint8)


def run_kernel_model(rows16, ld16, n, k16, out, base, side_mask, paired, seq_blocks, blocks0, chunks0, k_tiles,
                     cpt, block_n, grid):
    """numpy transliteration of kernels/pack_b.cu with its parameters: one 'CTA' per chunk of the grid, 256
    'threads' of 16 bytes. rows16: B as 16-byte units, flat (row r, unit c at r * ld16 + c); out: the packed
    buffer as [chunks, 256, 16] (base: its address for the side formula)."""
    t = np.arange(256)
    rr, p = t >> 3, t & 7
    u = p ^ (rr & 7)
    per_block = k_tiles * cpt
    for x in range(grid):
        side = int(x >= chunks0)
        i = x - chunks0 if side else x
        j, rem = divmod(i, per_block)
        kb, part = divmod(rem, cpt)
        nb = int(seq_blocks[blocks0 + j if side else j])
        if paired:
            even = 2 * i
            chunk = even + ((bin((base + even * 4096) & side_mask).count("1") & 1) ^ side)
        else:
            chunk = i
        row = nb * block_n + part * 32 + rr
        col16 = kb * 8 + u
        ok = (row < n) & (col16 < k16)
        out[chunk] = 0
        out[chunk, ok] = rows16[row[ok] * ld16 + col16[ok]]


def kernel_model(b, lay: PackedLayout, base: int) -> np.ndarray:
    """The kernel model on a numpy B, writing a buffer that pretends to start at `base`."""
    n, k = b.shape
    out = np.zeros((lay.total_chunks, 256, 16), dtype=np.uint8)
    run_kernel_model(b.reshape(-1, 16), k // 16, n, k // 16, out, base, lay.side_mask, lay.paired,
                     list(lay.stored[0]) + list(lay.stored[1]), len(lay.stored[0]), lay.used_chunks[0],
                     lay.k_tiles, lay.chunks_per_tile, lay.block_n, sum(lay.used_chunks))
    return out.reshape(-1)


class FakeKernel:
    """Stands in for the JIT-loaded pack kernel on the CPU: decodes the launch's parameter buffer by the
    kernel's signature and runs the model on the memory the pointers name (CPU tensors)."""
    SIGNATURE = "QqiiQQiQiiiii"   # b, ld16, n, k16, out, side_mask, paired, seq_blocks, blocks0, chunks0, ...

    def __init__(self):
        self.launches = []

    def check_params(self, params):
        assert params.sizes == [struct.calcsize(c) for c in self.SIGNATURE]

    def launch(self, grid, block, params):
        assert block == 256 and isinstance(params, jit.Params)
        v = [struct.unpack_from("<" + c, params.buffer, off)[0] for c, off in zip(self.SIGNATURE, params.offsets)]
        b_ptr, ld16, n, k16, out_ptr, side_mask, paired, seq_ptr, blocks0, chunks0, k_tiles, cpt, block_n = v
        self.launches.append(v)
        def mem(ptr, nbytes, dtype=np.uint8):
            return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=dtype)
        rows16 = mem(b_ptr, ((n - 1) * ld16 + k16) * 16).reshape(-1, 16)
        seq = mem(seq_ptr, 4 * max(1, blocks0 + (grid - chunks0) // (k_tiles * cpt)), np.int32)
        n_chunks = 2 * max(chunks0, grid - chunks0) if paired else grid
        out = np.frombuffer((ctypes.c_uint8 * (n_chunks * 4096)).from_address(out_ptr), dtype=np.uint8)
        run_kernel_model(rows16, ld16, n, k16, out.reshape(-1, 256, 16), out_ptr, side_mask, paired,
                         seq, blocks0, chunks0, k_tiles, cpt, block_n, grid)


# ----------------------------------------------------------------------------------------------------------
# CPU: the plan a packed weight stores

@pytest.mark.parametrize("n_blocks,sms", list(itertools.product([1, 2, 3, 7, 8, 17, 56, 57, 192], SMS)))
def test_packing_plan_covers_every_m(n_blocks, sms):
    stored = side_plan.packing_plan(n_blocks, sms)
    assert set(stored[0]) | set(stored[1]) == set(range(n_blocks))
    for s in (0, 1):
        assert len(set(stored[s])) == len(stored[s])
        if sms[s] == 0:
            assert stored[s] == ()
    for m_blocks in (1, 2, 3, 5, 32, 33):
        plan = side_plan.plan_sides(n_blocks, m_blocks, sms)
        for s in (0, 1):
            pos = [stored[s].index(nb) for nb in plan.stored[s]]  # a subsequence: same relative order
            assert pos == sorted(pos)


def test_packing_plan_shares_only_the_left_overs():
    stored = side_plan.packing_plan(7, (66, 66))
    assert stored == ((0, 2, 4, 6), (1, 3, 5, 6))
    assert side_plan.packing_plan(8, (66, 66)) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert side_plan.packing_plan(5, (132, 0)) == ((0, 1, 2, 3, 4), ())


# ----------------------------------------------------------------------------------------------------------
# CPU: the swizzled tile image

def test_swizzle_128b_is_the_unit_xor_row_rule():
    rows = random_b(40, 128, seed=1)
    img = side_plan.swizzle_128b(rows).reshape(-1)
    for r in range(40):
        for u in range(8):
            dst = r * 128 + (u ^ (r % 8)) * 16
            assert img[dst:dst + 16].tobytes() == rows[r, u * 16:(u + 1) * 16].tobytes()
    # first 8 rows of an image of byte values = unit index: row r holds unit u ^ r at position u
    units = np.repeat(np.arange(8, dtype=np.uint8), 16)[None, :].repeat(8, 0)
    img = side_plan.swizzle_128b(units)
    assert [int(img[3, p * 16]) for p in range(8)] == [p ^ 3 for p in range(8)]


@pytest.mark.parametrize("block_n", [32, 64, 96, 128, 256])
def test_swizzle_perm_inverts_the_image(block_n):
    lay = PackedLayout.create(block_n, 128, block_n, (66, 66), MASKS[0], True)
    rows = random_b(block_n, 128, seed=block_n)
    img = side_plan.swizzle_128b(rows).reshape(-1)
    assert (img[lay.swizzle_perm()] == rows.reshape(-1)).all()


def test_b_tiles_pad_with_zeros():
    b = random_b(200, 272)
    tiles = side_plan.b_tiles(b, 64)
    assert tiles.shape == (4, 3, 64 * 128)
    last = tiles[3, 2].reshape(64, 128)  # rows 192..255 (8 real), bytes 256..383 (16 real)
    unswz = last.reshape(-1)[PackedLayout.create(200, 272, 64, (66, 66), MASKS[0], True).swizzle_perm()]
    unswz = unswz.reshape(64, 128)
    assert (unswz[:8, :16] == b[192:200, 256:272]).all()
    assert not unswz[8:].any() and not unswz[:, 16:].any()


# ----------------------------------------------------------------------------------------------------------
# CPU: the whole layout (reference, kernel model, unpack, sides, tables)

CASES = [(200, 272, 32), (200, 272, 64), (200, 272, 96), (200, 272, 128), (200, 272, 256), (2112, 512, 128),
         (130, 16, 128), (1, 128, 32), (7 * 128, 384, 128)]


@pytest.mark.parametrize("case,mask,base,paired",
                         [(c, m, b, p) for c in CASES for m in MASKS for b in BASES for p in (True, False)
                          if p or (m == MASKS[0] and b == BASES[0])])
def test_layout_against_reference_and_kernel_model(case, mask, base, paired):
    n, k, block_n = case
    b = random_b(n, k, seed=n + k + block_n)
    lay = PackedLayout.create(n, k, block_n, (66, 66), mask, paired)
    assert lay.chunks_per_tile == block_n // 32
    ref = side_plan.pack_reference(side_plan.b_tiles(b, block_n), lay.stored, base, lay.side_mask, paired)
    assert ref.size == lay.nbytes
    model = kernel_model(b, lay, base)
    assert (model == ref).all(), "the kernel's index math is the reference layout"
    # exact unpack (the same torch code PackedB.unpack runs on the GPU)
    got = unpack_bytes(torch.from_numpy(ref), lay, base).numpy()
    assert got.shape == (n, k) and (got == b).all()
    # which chunk holds what; every used chunk on its side
    owner = lay.chunk_owner(base)
    used = owner[:, 0] >= 0
    assert used.sum() == sum(lay.used_chunks)
    assert not ref.reshape(-1, 4096)[~used].any(), "unused chunks are zero"
    if paired:
        chunk_sides = sides.chunk_sides(base, lay.nbytes, mask)
        assert (chunk_sides[used] == owner[used, 0]).all()
        assert side_plan.check_packed_sides(lay.stored, lay.k_tiles, lay.chunks_per_tile, base, mask)
    else:
        assert lay.stored[1] == () and lay.side_mask == 0
        assert (owner[:, 1] == np.repeat(np.arange(lay.n_blocks), lay.chunks_per_block)).all()
    # tile_chunks agrees with chunk_owner, for every copy of every tile
    for s in (0, 1):
        for nb in lay.stored[s]:
            for kb in range(lay.k_tiles):
                c = lay.tile_chunks(nb, kb, base, s)
                assert (owner[c] == [[s, nb, kb, p] for p in range(lay.chunks_per_tile)]).all()


def test_tables():
    lay = PackedLayout.create(7 * 128 - 5, 300, 128, (66, 66), MASKS[0], True)
    assert lay.stored == ((0, 2, 4, 6), (1, 3, 5, 6))
    assert lay.block_side().tolist() == [0, 1, 0, 1, 0, 1, 2]
    assert lay.block_pos().tolist() == [[0, -1, 1, -1, 2, -1, 3], [-1, 0, -1, 1, -1, 2, 3]]
    cpb = lay.chunks_per_block
    assert cpb == 3 * 4
    assert lay.block_first().tolist() == [[0, -1, cpb, -1, 2 * cpb, -1, 3 * cpb],
                                          [-1, 0, -1, cpb, -1, 2 * cpb, 3 * cpb]]
    assert lay.side_blocks().tolist() == [[0, 2, 4, 6], [1, 3, 5, 6]]
    assert all(t.dtype == np.int32 for t in (lay.block_side(), lay.block_pos(), lay.block_first(),
                                             lay.side_blocks()))
    plain = PackedLayout.create(7 * 128, 300, 128, (66, 66), MASKS[0], False)
    assert plain.kind == "plain" and plain.side_blocks().tolist() == [list(range(7)), [-1] * 7]
    assert plain.total_chunks == 7 * cpb


def _side_tiles(lay, base):
    """(side, its chunk offset c0, first sequence index i) of every side-pure tile of a pair layout at `base`."""
    first = lay.block_first()
    for s in (0, 1):
        for nb in lay.stored[s]:
            for kb in range(lay.k_tiles):
                i = int(first[s, nb]) + kb * lay.chunks_per_tile
                yield s, nb, kb, i, sides.side_of_address(base + 2 * i * 4096, lay.side_mask) ^ s


def _box_chunks(box_args, base, c2, c3):
    """The 4 KiB chunks (from `base`) a 4-D box of side_tile_boxes reads at coordinates (0, 0, c2, c3), in the
    order it lands them in shared memory."""
    ptr, _, _, strides, box = box_args
    return [(ptr - base + (c2 + b) * strides[1] + (c3 + u) * strides[2]) // 4096
            for u in range(box[3]) for b in range(box[2])]


@pytest.mark.parametrize("block_n", [64, 128, 256])
@pytest.mark.parametrize("mask", MASKS + [sides.side_mask(0x9000)])  # (the last: bit 13 not in the mask)
@pytest.mark.parametrize("base", [0, 1 << 22])
def test_tile_boxes_load_exactly_the_sides_chunks(block_n, mask, base):
    """fp8_gemm.side_tile_boxes (the kernel's one-box side-pure tile load): for every tile of every side, the box
    over map c0 (c0 = side(pair i) ^ side, coordinates (0, 0, 0, i / 2)) reads, in shared-memory order, exactly
    the tile's chunks (tile_chunks); None where the chunk offsets vary inside a tile."""
    from l2side import fp8_gemm
    lay = PackedLayout.create(13 * block_n, 700, block_n, (66, 66), mask, True)
    boxes = fp8_gemm.side_tile_boxes(lay.side_mask, base, block_n, lay.total_chunks)
    units = block_n // 64
    if mask & (units * 16384 - 1) & ~0x3FFF:
        assert boxes is None
        return
    assert boxes is not None
    for s, nb, kb, i, c0 in _side_tiles(lay, base):
        _, _, dims, _, box = boxes[c0]
        assert box == (128, 32, 2, units) and dims[3] * 4 == lay.total_chunks
        got = _box_chunks(boxes[c0], base, 0, i // 2)
        assert got == lay.tile_chunks(nb, kb, base, s).tolist()
        assert max(got) < lay.total_chunks


@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_cluster_tile_boxes_load_the_tile_in_two_halves(block_n):
    """Clusters of 2 (fp8_gemm.cuh, the box branch): CTA c multicasts half of each side-pure tile, units
    [c U/2, (c+1) U/2) at shared offset c U/2 x 8 KiB, or with one unit its pair c at c x 4 KiB. The two halves, in
    shared-memory order, are the tile's chunks (tile_chunks), as the one box of a CTA without cluster."""
    from l2side import fp8_gemm
    base = 1 << 22
    lay = PackedLayout.create(13 * block_n, 700, block_n, (66, 66), MASKS[0], True)
    boxes = fp8_gemm.side_tile_boxes(lay.side_mask, base, block_n, lay.total_chunks, cluster_n=2)
    units = block_n // 64
    for s, nb, kb, i, c0 in _side_tiles(lay, base):
        if units >= 2:  # CTA c: units i / 2 + c U/2 ... into the c-th half
            got = [x for c in (0, 1) for x in _box_chunks(boxes[c0], base, 0, i // 2 + c * (units // 2))]
        else:  # CTA c: pair c of the one unit, at c x 4 KiB
            got = [x for c in (0, 1) for x in _box_chunks(boxes[c0], base, c, i // 2)]
        assert got == lay.tile_chunks(nb, kb, base, s).tolist()
    assert fp8_gemm.side_tile_boxes(lay.side_mask, base, block_n, lay.total_chunks, cluster_n=4) is None


def test_tile_boxes_only_where_a_tile_is_one_box():
    from l2side import fp8_gemm
    mask = MASKS[1]
    assert fp8_gemm.side_tile_boxes(mask, 1 << 22, 128, 64) is not None
    assert fp8_gemm.side_tile_boxes(mask, 1 << 22, 96, 64) is None   # 3 chunks per tile
    assert fp8_gemm.side_tile_boxes(mask, 1 << 22, 32, 64) is None   # 1 chunk: the chunk load is the tile
    assert fp8_gemm.side_tile_boxes(mask, 8192, 128, 64) is None     # base not aligned to the tile's 32 KiB
    assert fp8_gemm.side_tile_boxes(0, 1 << 22, 128, 64) is None     # plain
    assert fp8_gemm.side_tile_boxes(mask, 1 << 22, 256, 64) is None  # 0xAB000 has bit 15: offsets vary in 64 KiB
    assert fp8_gemm.side_tile_boxes(MASKS[0], 1 << 22, 256, 64) is not None  # 0xB3000 has not


@pytest.mark.parametrize("n,k,block_n,paired,col", [(200, 272, 64, True, 0), (900, 400, 96, True, 16),
                                                    (900, 400, 128, False, 0), (300, 512, 32, True, 8),
                                                    (1, 64, 32, True, 8)])
def test_pack_glue_with_the_kernel_model(monkeypatch, n, k, block_n, paired, col):
    """pack_b's host side (copy of misaligned rows, 8 KiB-aligned buffer, parameter buffer in the kernel's
    order, tables, unpack) on CPU tensors, with the kernel replaced by its model."""
    fake = FakeKernel()
    monkeypatch.setattr(packed_b, "_pack_kernel", lambda index: fake)

    def allocate(nbytes, device):   # CPU memory, 8 KiB-aligned like the side-aware buffer
        raw = torch.full((nbytes + 8192,), 0xAB, dtype=torch.uint8)
        off = -raw.data_ptr() % 8192
        return raw[off:off + nbytes]
    monkeypatch.setattr(packed_b, "_allocate", allocate)
    wide = torch.from_numpy(random_b(n, k + 32, seed=n + col))
    b = wide[:, col:col + k].view(torch.float8_e4m3fn)   # row stride k + 32; col 8: not 16-byte aligned
    scales = torch.rand(-(-n // 128), -(-k // 128)).t().contiguous().t()
    lay = PackedLayout.create(n, k, block_n, (66, 66), MASKS[0], paired)
    p = packed_b._pack(b, scales, lay, "auto")
    assert len(fake.launches) == 1
    launched = fake.launches[0]
    assert launched[1] == ((k + 32) // 16 if col % 16 == 0 and n > 1 else k // 16)
    assert launched[4] == p.base and p.base % 8192 == 0 and launched[5] == lay.side_mask
    ref = side_plan.pack_reference(side_plan.b_tiles(b.view(torch.uint8).numpy(), block_n), lay.stored, p.base,
                                   lay.side_mask, paired)
    assert (p.data.numpy() == ref).all()
    b2, s2 = p.unpack()
    assert torch.equal(b2.view(torch.uint8), b.view(torch.uint8)) and torch.equal(s2, scales)
    assert p.scales.is_contiguous() and p.scales.data_ptr() != scales.data_ptr()
    assert p.block_pos.tolist() == lay.block_pos().tolist() and p.block_first.dtype == torch.int32
    assert p.side_blocks.tolist() == lay.side_blocks().tolist() and p.block_side.tolist() == lay.block_side().tolist()
    state = p.to_unpacked()
    assert set(state) == {"b", "b_scales", "block_n", "layout"} and state["block_n"] == block_n
    assert (p.n, p.k, p.n_blocks, p.k_tiles, p.chunks_per_tile) == (n, k, lay.n_blocks, lay.k_tiles, block_n // 32)
    assert p.kind == ("sides" if paired else "plain") and p.layout is lay and "PackedB(" in repr(p)


# ----------------------------------------------------------------------------------------------------------
# CPU: validation (everything before the device is touched)

def fp8(n, k, device="cpu"):
    return torch.zeros(n, k, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)


def scales_for(n, k, device="cpu"):
    return torch.ones(-(-n // 128), -(-k // 128), dtype=torch.float32, device=device)


@pytest.mark.parametrize("b,scales,kwargs,match", [
    (np.zeros((4, 16)), None, {}, "b must be a torch.Tensor"),
    (torch.zeros(4, 16), None, {}, "b must have dtype torch.float8_e4m3fn"),
    (fp8(1, 64).view(-1), None, {}, "b must be 2-D"),
    (fp8(0, 64), None, {}, "b must not be empty"),
    (fp8(4, 40), None, {}, r"K \(40\) must be a multiple of 16"),
    (fp8(64, 32).t(), None, {}, "b must have contiguous rows"),
    (fp8(4, 64), "not a tensor", {}, "b_scales must be a torch.Tensor"),
    (fp8(4, 64), torch.ones(1, 1, dtype=torch.float16), {}, "b_scales must have dtype torch.float32"),
    (fp8(200, 272), torch.ones(2, 2), {}, r"b_scales must have shape .*\[2, 3\]"),
    (fp8(4, 64), None, {"block_n": 48}, "block_n must be a multiple of 32"),
    (fp8(4, 64), None, {"block_n": 0}, "block_n must be a multiple of 32"),
    (fp8(4, 64), None, {"block_n": 288}, "block_n must be a multiple of 32"),
    (fp8(4, 64), None, {"block_n": 128.0}, "block_n must be an int"),
    (fp8(4, 64), None, {"block_n": True}, "block_n must be an int"),
    (fp8(4, 64), None, {"layout": "near"}, "layout must be one of"),
    (fp8(4, 64), None, {}, "b must be a CUDA tensor"),
])
def test_validation(b, scales, kwargs, match):
    if scales is None:
        scales = scales_for(*b.shape) if isinstance(b, torch.Tensor) and b.dim() == 2 else torch.ones(1, 1)
    with pytest.raises(ValueError, match=match):
        packed_b.pack_b(b, scales, **kwargs)


def test_check_block_n_accepts_the_rule():
    assert [packed_b.check_block_n(v) for v in (32, 64, 96, 128, 160, 192, 224, 256)] == \
        [32, 64, 96, 128, 160, 192, 224, 256]


@requires_nvcc
def test_pack_kernel_compiles_for_sm90a():
    cubin = jit.compile((jit.KERNELS_DIR / "pack_b.cu").read_text(), name="pack_b", arch="sm_90a")
    assert len(cubin) > 1000
    assert packed_b.KERNEL_NAME.encode() in cubin


@requires_nvcc
def test_load_path_microbenchmark_compiles_for_sm90a():
    """scripts/load_paths.cu (TMA tiles vs bulk copies vs side-aware chunks) stays buildable for kernel work."""
    from pathlib import Path
    src = (Path(__file__).resolve().parents[1] / "scripts" / "load_paths.cu").read_text()
    assert b"l2side_load_paths" in jit.compile(src, name="load_paths", arch="sm_90a")


# ----------------------------------------------------------------------------------------------------------
# GPU: the kernel

@pytest.fixture(scope="module")
def topo():
    import l2side
    return l2side.topology(0)


def gpu_b(n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = torch.randint(0, 256, (n, k), dtype=torch.uint8, device="cuda", generator=g).view(torch.float8_e4m3fn)
    scales = torch.rand(-(-n // 128), -(-k // 128), device="cuda", generator=g) + 0.5
    return b, scales


def check_packed(p, b, scales, topo, expect_layout):
    import l2side
    assert p.kind == expect_layout and p.layout.paired == p.side_aware
    assert (p.n, p.k) == tuple(b.shape) and p.device == b.device
    assert p.data.dtype == torch.uint8 and p.data.is_cuda and p.data.numel() == p.layout.nbytes
    assert l2side.is_side_aware(p.data) and p.base % 8192 == 0
    assert p.scales.dtype == torch.float32 and p.scales.is_contiguous() and p.scales.device == b.device
    assert torch.equal(p.scales, scales.float())
    for t in (p.block_side, p.block_pos, p.block_first, p.side_blocks):
        assert t.dtype == torch.int32 and t.is_cuda
    b2, s2 = p.unpack()
    assert b2.dtype == torch.float8_e4m3fn and b2.shape == b.shape
    assert torch.equal(b2.view(torch.uint8), b.view(torch.uint8)), "unpack(pack(b)) == b bitwise"
    assert torch.equal(s2, scales)
    owner = p.chunk_owner()
    used = owner[:, 0] >= 0
    assert used.sum() == sum(p.used_chunks)
    if p.side_aware:
        assert p.side_mask == topo.side_mask
        chunk_sides = p.chunk_sides()
        assert len(chunk_sides) == len(owner)
        assert (chunk_sides[used] == owner[used, 0]).all(), "every used chunk is on its N-block's side"
        c = np.flatnonzero(used)[:: max(1, used.sum() // 64)]
        assert all(topo.side_of_address(p.base + int(x) * 4096) == owner[x, 0] for x in c)
    else:
        assert p.plan[1] == () and p.side_mask == 0


@pytest.mark.parametrize("n,k", [(2112, 512), (2112, 7168), (7168, 512), (7168, 7168), (24576, 512),
                                 (24576, 7168), (200, 272)])
@pytest.mark.gpu
@requires_gpu
def test_roundtrip_and_sides(n, k, topo):
    b, scales = gpu_b(n, k, seed=n ^ k)
    p = packed_b.pack_b(b, scales)
    check_packed(p, b, scales, topo, "sides" if topo.split else "plain")
    if topo.split and (n, k) == (2112, 7168):
        import l2side
        assert l2side.check_sides(p.data, samples=512) >= 0.95, "sides measured by latency follow the formula"


@pytest.mark.parametrize("n,k,block_n", [(200, 272, 32), (200, 272, 64), (200, 272, 96), (200, 272, 256),
                                         (2112, 512, 96), (2112, 7168, 256), (1, 16, 32), (129, 144, 64)])
@pytest.mark.gpu
@requires_gpu
def test_block_n_variants(n, k, block_n, topo):
    b, scales = gpu_b(n, k, seed=block_n)
    p = packed_b.pack_b(b, scales, block_n=block_n)
    assert p.block_n == block_n and p.chunks_per_tile == block_n // 32
    check_packed(p, b, scales, topo, "sides" if topo.split else "plain")


@pytest.mark.parametrize("n,k", [(2112, 512), (200, 272)])
@pytest.mark.gpu
@requires_gpu
def test_plain_layout(n, k, topo):
    b, scales = gpu_b(n, k, seed=3)
    scales = scales.t().contiguous().t()               # any strides: kept as a contiguous copy
    p = packed_b.pack_b(b, scales, layout="plain")
    check_packed(p, b, scales, topo, "plain")
    assert p.requested_layout == "plain"


@pytest.mark.parametrize("n,k,block_n,layout", [(200, 272, 64, "auto"), (2112, 512, 128, "auto"),
                                                (900, 400, 96, "auto"), (900, 400, 128, "plain")])
@pytest.mark.gpu
@requires_gpu
def test_whole_buffer_equals_numpy_reference(n, k, block_n, layout):
    b, scales = gpu_b(n, k, seed=11)
    p = packed_b.pack_b(b, scales, block_n=block_n, layout=layout)
    ref = side_plan.pack_reference(side_plan.b_tiles(b.view(torch.uint8).cpu().numpy(), block_n), p.plan,
                                   p.base, p.side_mask, p.side_aware)
    got = p.data.cpu().numpy()
    assert got.shape == ref.shape and (got == ref).all()


@pytest.mark.gpu
@requires_gpu
def test_tile_image_is_the_swizzled_tile():
    n, k, block_n = 1000, 400, 128     # last N-block and last K-tile are partial
    b, scales = gpu_b(n, k, seed=5)
    p = packed_b.pack_b(b, scales, block_n=block_n)
    bu = b.view(torch.uint8)
    for nb, kb in [(0, 0), (3, 1), (p.n_blocks - 1, p.k_tiles - 1)]:
        rows = torch.zeros(block_n, 128, dtype=torch.uint8, device="cuda")
        part = bu[nb * block_n:(nb + 1) * block_n, kb * 128:(kb + 1) * 128]
        rows[:part.shape[0], :part.shape[1]] = part
        r = torch.arange(block_n, device="cuda")[:, None]
        pos = torch.arange(8, device="cuda")[None, :] ^ (r % 8)        # unit u goes to position u ^ (r % 8)
        image = torch.empty(block_n, 8, 16, dtype=torch.uint8, device="cuda")
        image[r.expand(-1, 8), pos] = rows.view(block_n, 8, 16)
        for side in (0, 1):
            if p.layout.block_pos()[side, nb] < 0:
                continue
            chunks = torch.from_numpy(p.tile_chunks(nb, kb, side)).cuda()
            got = p.data.view(-1, 4096)[chunks].reshape(block_n, 8, 16)
            assert torch.equal(got, image), (nb, kb, side)


@pytest.mark.gpu
@requires_gpu
def test_strided_and_misaligned_inputs(topo):
    big, _ = gpu_b(300, 1024, seed=7)
    for start, k in [(16, 512), (8, 512), (32, 992)]:   # ld 1024; column 8 is not 16-byte aligned: copied
        b = big[:, start:start + k]
        scales = scales_for(300, k, "cuda")
        p = packed_b.pack_b(b, scales)
        check_packed(p, b, scales, topo, "sides" if topo.split else "plain")
    b = big[:1, 8:8 + 256]                              # one row: any row stride
    check_packed(packed_b.pack_b(b, scales_for(1, 256, "cuda")), b, scales_for(1, 256, "cuda"), topo,
                 "sides" if topo.split else "plain")


@pytest.mark.gpu
@requires_gpu
def test_bad_inputs_on_the_gpu(topo):
    b, scales = gpu_b(256, 256)
    with pytest.raises(ValueError, match="b_scales must be on b's device"):
        packed_b.pack_b(b, scales.cpu())
    with pytest.raises(ValueError, match="b_scales must have shape"):
        packed_b.pack_b(b, scales[:1])
    with pytest.raises(ValueError, match="contiguous rows"):
        packed_b.pack_b(b.t(), scales)
    with pytest.raises(ValueError, match="dtype"):
        packed_b.pack_b(b.view(torch.uint8), scales)
    if not topo.split:
        with pytest.raises(ValueError, match="split"):
            packed_b.pack_b(b, scales, layout="sides")


@pytest.mark.gpu
@requires_gpu
def test_to_save_and_load(tmp_path):
    import l2side
    b, scales = gpu_b(300, 272, seed=9)
    p = l2side.pack_b(b, scales, block_n=64)
    assert isinstance(p, l2side.PackedB)
    assert p.to("cuda") is p and p.to(torch.device("cuda", 0)) is p
    with pytest.raises(ValueError, match="CUDA device"):
        p.to("cpu")
    # the unpacked form: plain tensors and ints, loads with weights_only=True
    buf = io.BytesIO()
    torch.save(p.to_unpacked(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    q = l2side.PackedB.from_unpacked(state)
    assert q.block_n == 64 and torch.equal(q.unpack()[0].view(torch.uint8), b.view(torch.uint8))
    # the object itself pickles as its unpacked form and is packed again on load
    path = tmp_path / "packed.pt"
    torch.save({"w": p}, path)
    r = torch.load(path, weights_only=False)["w"]
    assert isinstance(r, l2side.PackedB) and r.block_n == 64 and r.kind == p.kind
    assert torch.equal(r.unpack()[0].view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(r.scales, scales)
    if torch.cuda.device_count() > 1:
        s = p.to("cuda:1")
        assert s.device == torch.device("cuda", 1) and s.data.device == s.device
        assert torch.equal(s.unpack()[0].view(torch.uint8).cpu(), b.view(torch.uint8).cpu())


# ----------------------------------------------------------------------------------------------------------
# PackedWeight: a packed weight as an nn.Module (state_dict = the unpacked form)

def cpu_weight(n, k, seed=0):
    b = torch.from_numpy(random_b(n, k, seed)).view(torch.float8_e4m3fn)
    scales = torch.rand(-(-n // 128), -(-k // 128), generator=torch.Generator().manual_seed(seed)) + 0.5
    return b, scales


def test_packed_weight_module_on_the_cpu(tmp_path):
    import l2side
    b, s = cpu_weight(300, 272)
    m = l2side.PackedWeight(b, s, block_n=64)
    assert m.packed is None and m.device == torch.device("cpu") and m.shape == (300, 272)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scales"}
    assert torch.equal(sd["weight"].view(torch.uint8), b.view(torch.uint8)) and torch.equal(sd["weight_scales"], s)
    # inside a model: saved, loaded with weights_only=True, into a model holding another weight of that shape
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), l2side.PackedWeight(b, s, block_n=64))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert {"1.weight", "1.weight_scales", "0.weight", "0.bias"} == set(state)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), l2side.PackedWeight(*cpu_weight(300, 272, seed=1), block_n=64))
    other.load_state_dict(state)
    assert torch.equal(other[1].unpacked()[0].view(torch.uint8), b.view(torch.uint8))
    # dtype conversions leave it FP8; .cpu() on the CPU changes nothing
    other.half()
    other.cpu()
    assert other[1].unpacked()[0].dtype == torch.float8_e4m3fn and other[1].packed is None
    assert other[0].weight.dtype == torch.float16
    assert "n=300, k=272, block_n=64, on cpu" in repr(other)


def test_packed_weight_module_errors():
    import l2side
    b, s = cpu_weight(300, 272)
    m = l2side.PackedWeight(b, s)
    with pytest.raises(ValueError, match="CUDA device"):
        m(torch.zeros(4, 272).to(torch.float8_e4m3fn), torch.ones(4, 3))
    with pytest.raises(ValueError, match="b_scales must have shape"):
        l2side.PackedWeight(b, s[:1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        l2side.PackedWeight(b.view(torch.uint8), s)
    with pytest.raises(ValueError, match="block_n must be a multiple of 32"):
        l2side.PackedWeight(b, s, block_n=48)
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({})
    assert m.load_state_dict({}, strict=False).missing_keys == ["weight", "weight_scales"]
    b2, s2 = cpu_weight(200, 272)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        m.load_state_dict({"weight": b2, "weight_scales": s2})
    with pytest.raises(RuntimeError, match="b_scales must have shape"):
        m.load_state_dict({"weight": b, "weight_scales": s2[:, :1]})


@pytest.mark.gpu
@requires_hopper
def test_packed_weight_module_on_the_gpu():
    import l2side
    b, s = l2side.quantize_weight(torch.randn(1000, 1536, device="cuda"))
    a, sa = l2side.quantize_activation(torch.randn(130, 1536, device="cuda"))
    m = l2side.PackedWeight(b, s, block_n=64)
    assert m.packed is not None and m.device.type == "cuda" and m.packed.block_n == 64
    want = l2side.gemm(a, sa, l2side.pack_b(b, s, block_n=64))
    assert torch.equal(m(a, sa), want) and torch.equal(m(a, sa, side_mode="far"), want)
    sd = m.state_dict()
    assert sd["weight"].is_cuda and torch.equal(sd["weight"].view(torch.uint8), b.view(torch.uint8))
    # to the CPU (plain tensors) and back (packed again)
    m.cpu()
    assert m.packed is None and torch.equal(m.unpacked()[0].view(torch.uint8), b.view(torch.uint8).cpu())
    with pytest.raises(ValueError, match="CUDA device"):
        m(a, sa)
    m.cuda()
    assert m.packed is not None and torch.equal(m(a, sa), want)
    # a GPU module loads a CPU checkpoint and packs it on its device
    other = l2side.PackedWeight(*l2side.quantize_weight(torch.randn(1000, 1536, device="cuda")), block_n=64)
    other.load_state_dict({key: v.cpu() for key, v in sd.items()})
    assert other.packed is not None and torch.equal(other(a, sa), want)
    # A that does not fit, or on another device: the GEMM's own errors
    with pytest.raises(ValueError):
        m(a[:, :1024].contiguous(), sa[:, :8].contiguous())
    with pytest.raises(ValueError):
        m(a.cpu(), sa.cpu())
