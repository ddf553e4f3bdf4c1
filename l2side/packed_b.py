"""Side-aware packed FP8 weights for the GEMM (issue 4): `pack_b(b, b_scales, block_n=128) -> PackedB`.

B [N, K] e4m3 is cut into tiles of block_n rows x 128 bytes of K (zero-padded beyond N and K). Each tile is
stored as the SWIZZLE_128B shared-memory image the wgmma reads (row r at byte r * 128, its 16-byte unit u at
unit position u ^ (r % 8)): block_n * 128 bytes = block_n / 32 chunks of 4 KiB, so a kernel fetches a tile
with block_n / 32 TMA loads of 4 KiB (one per chunk) that land ready for the wgmma.

Every N-block is assigned a side (`side_plan.packing_plan`: plan_sides' exclusive blocks on their side,
left-over blocks on both sides) and all its chunks are placed on that side of one side-aware allocation:
side s's N-blocks are laid out one after the other in side s's chunk sequence, each as its K-tiles in
order, each tile as chunks_per_tile consecutive side-s chunks; the i-th side-s chunk is chunk
2i + (side(base + 2i * 4096) ^ s). Without an L2 split (or with layout="plain") every N-block is on side 0
and chunk i = i. See docs/packed-b.md.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from . import side_plan, sides

BLOCK_K = side_plan.BLOCK_K          # bytes (fp8 elements) of K per tile
ROWS_PER_CHUNK = sides.CHUNK_BYTES // BLOCK_K   # 32 rows of 128 bytes = one 4 KiB chunk
MAX_BLOCK_N = 256
LAYOUTS = ("auto", "sides", "plain")
BASE_ALIGN = 2 * sides.CHUNK_BYTES  # chunk pairs (2i, 2i+1) must be two halves of an 8 KiB-aligned range
TILE_BOX_ALIGN = 16 * sides.CHUNK_BYTES  # a side's tile of up to 256 rows loads as one TMA box from a base so aligned
KERNEL_NAME = "l2side_pack_b"

__all__ = ["pack_b", "PackedB", "PackedLayout", "check_block_n"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_block_n(block_n) -> int:
    if not isinstance(block_n, (int, np.integer)) or isinstance(block_n, bool):
        raise ValueError(f"block_n must be an int, got {block_n!r}")
    block_n = int(block_n)
    if not (ROWS_PER_CHUNK <= block_n <= MAX_BLOCK_N) or block_n % ROWS_PER_CHUNK \
            or (block_n * BLOCK_K) % sides.CHUNK_BYTES:
        raise ValueError(f"block_n must be a multiple of 32 in [32, {MAX_BLOCK_N}] (a tile of block_n x 128 "
                         f"bytes is then whole 4 KiB chunks), got {block_n}")
    return block_n


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """The host-side arithmetic of a packed B (no tensors; the same on any machine)."""
    n: int
    k: int
    block_n: int
    paired: bool          # True: side-aware pair layout; False: plain (all N-blocks on side 0, chunk i = i)
    side_mask: int        # the AND constant of side(addr) (0 in the plain layout)
    stored: tuple         # stored[s]: N-blocks of side s, in packed order

    @classmethod
    def create(cls, n: int, k: int, block_n: int, sms_per_side, side_mask: int, paired: bool) -> "PackedLayout":
        block_n = check_block_n(block_n)
        n_blocks = _ceil_div(n, block_n)
        if paired:
            stored = side_plan.packing_plan(n_blocks, tuple(sms_per_side))
        else:
            stored, side_mask = (tuple(range(n_blocks)), ()), 0
        return cls(n, k, block_n, bool(paired), int(side_mask), stored)

    @property
    def n_blocks(self) -> int:
        return _ceil_div(self.n, self.block_n)

    @property
    def k_tiles(self) -> int:
        return _ceil_div(self.k, BLOCK_K)

    @property
    def chunks_per_tile(self) -> int:
        return self.block_n // ROWS_PER_CHUNK

    @property
    def chunks_per_block(self) -> int:
        return self.k_tiles * self.chunks_per_tile

    @property
    def used_chunks(self) -> tuple:
        """Chunks of side 0's and side 1's sequences that hold tiles."""
        return tuple(len(self.stored[s]) * self.chunks_per_block for s in (0, 1))

    @property
    def total_chunks(self) -> int:
        return side_plan.packed_chunks_needed(self.stored, self.k_tiles, self.chunks_per_tile, self.paired)

    @property
    def nbytes(self) -> int:
        return self.total_chunks * sides.CHUNK_BYTES

    @property
    def kind(self) -> str:
        """'sides' (side-aware pair layout) or 'plain'."""
        return "sides" if self.paired else "plain"

    def block_side(self) -> np.ndarray:
        """int32 [n_blocks]: the side storing each N-block; 2 where both sides store it (a left-over block)."""
        out = np.full(self.n_blocks, -1, dtype=np.int32)
        for s in (0, 1):
            for nb in self.stored[s]:
                out[nb] = s if out[nb] < 0 else 2
        return out

    def block_pos(self) -> np.ndarray:
        """int32 [2, n_blocks]: position j of N-block n in side s's sequence of N-blocks, -1 if s does not
        store it. Its first side-s chunk has sequence index j * chunks_per_block (block_first)."""
        out = np.full((2, self.n_blocks), -1, dtype=np.int32)
        for s in (0, 1):
            for j, nb in enumerate(self.stored[s]):
                out[s, nb] = j
        return out

    def block_first(self) -> np.ndarray:
        """int32 [2, n_blocks]: side-s sequence index of N-block n's first chunk (-1 if not stored on s).
        Tile (n, kb), part p is the side-s chunk of sequence index block_first[s, n] + kb * cpt + p."""
        pos = self.block_pos()
        return np.where(pos >= 0, pos * self.chunks_per_block, -1).astype(np.int32)

    def side_blocks(self) -> np.ndarray:
        """int32 [2, max(1, len(stored[0]), len(stored[1]))]: stored[s], padded with -1."""
        width = max(1, len(self.stored[0]), len(self.stored[1]))
        out = np.full((2, width), -1, dtype=np.int32)
        for s in (0, 1):
            out[s, :len(self.stored[s])] = self.stored[s]
        return out

    def chunk_of(self, i, side: int, base: int) -> np.ndarray:
        """Chunk index (from base) of side-`side` sequence indices i (int or array): the kernels' formula."""
        i = np.asarray(i, dtype=np.uint64)
        if not self.paired:
            return i.astype(np.int64)
        even = np.uint64(2) * i
        addr = np.uint64(base) + even * np.uint64(sides.CHUNK_BYTES)
        parity = sides._popcount64(addr & np.uint64(self.side_mask)).astype(np.uint64) & np.uint64(1)
        return (even + (parity ^ np.uint64(side))).astype(np.int64)

    def tile_chunks(self, n_block: int, k_tile: int, base: int, side: int | None = None) -> np.ndarray:
        """The chunk indices (chunks_per_tile of them, in order) holding tile (n_block, k_tile) on `side`
        (default: the first side storing the N-block)."""
        first = self.block_first()
        if side is None:
            side = 0 if first[0, n_block] >= 0 else 1
        if first[side, n_block] < 0:
            raise ValueError(f"N-block {n_block} is not stored on side {side}")
        i0 = int(first[side, n_block]) + k_tile * self.chunks_per_tile
        return self.chunk_of(np.arange(i0, i0 + self.chunks_per_tile), side, base)

    def unpack_chunks(self, base: int) -> np.ndarray:
        """int64 [n_blocks, k_tiles, chunks_per_tile]: the chunk holding each part of each tile (for N-blocks
        on both sides, side 0's copy)."""
        first = self.block_first()
        side = np.where(first[0] >= 0, 0, 1)
        i0 = first[side, np.arange(self.n_blocks)].astype(np.int64)
        i = (i0[:, None, None] + np.arange(self.k_tiles)[None, :, None] * self.chunks_per_tile
             + np.arange(self.chunks_per_tile)[None, None, :])
        out = np.empty(i.shape, dtype=np.int64)
        for s in (0, 1):
            sel = side == s
            out[sel] = self.chunk_of(i[sel], s, base)
        return out

    def chunk_owner(self, base: int) -> np.ndarray:
        """int32 [total_chunks, 4]: (side, N-block, K-tile, part) that each chunk of the buffer holds, -1 rows
        for unused chunks."""
        out = np.full((self.total_chunks, 4), -1, dtype=np.int32)
        cpb, cpt = self.chunks_per_block, self.chunks_per_tile
        for s in (0, 1):
            count = self.used_chunks[s]
            if not count:
                continue
            i = np.arange(count)
            c = self.chunk_of(i, s, base)
            out[c, 0] = s
            out[c, 1] = np.asarray(self.stored[s], dtype=np.int32)[i // cpb]
            out[c, 2] = (i % cpb) // cpt
            out[c, 3] = i % cpt
        return out

    def swizzle_perm(self) -> np.ndarray:
        """int64 [block_n * 128]: byte t of the unswizzled tile (row-major block_n x 128) is byte perm[t] of
        the tile image."""
        r = np.arange(self.block_n)[:, None, None]
        u = np.arange(8)[None, :, None]
        byte = np.arange(side_plan.SWIZZLE_UNIT)[None, None, :]
        return (r * BLOCK_K + ((u ^ (r % 8)) * side_plan.SWIZZLE_UNIT) + byte).reshape(-1).astype(np.int64)


def unpack_bytes(data, layout: PackedLayout, base: int):
    """The packed buffer's bytes (uint8 torch tensor, any device, total_chunks * 4096 bytes; `base` the
    address its chunk indices are computed from) -> B's bytes, uint8 [N, K] (torch gathers; exact)."""
    import torch
    dev = data.device
    chunks = torch.from_numpy(layout.unpack_chunks(base).reshape(-1)).to(dev)
    tiles = data.view(-1, sides.CHUNK_BYTES).index_select(0, chunks)
    tile_bytes = layout.block_n * BLOCK_K
    tiles = tiles.view(-1, tile_bytes).index_select(1, torch.from_numpy(layout.swizzle_perm()).to(dev))
    b = (tiles.view(layout.n_blocks, layout.k_tiles, layout.block_n, BLOCK_K).permute(0, 2, 1, 3)
         .reshape(layout.n_blocks * layout.block_n, layout.k_tiles * BLOCK_K))
    return b[:layout.n, :layout.k].contiguous()


def _fail(msg: str):
    raise ValueError(f"pack_b: {msg}")


def _check(b, b_scales, block_n, layout, *, need_cuda: bool = True):
    """The arguments of pack_b (block_n back, checked); need_cuda=False: everything but the device (a weight
    kept on the CPU until it is packed, l2side.PackedWeight)."""
    import torch
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    try:
        block_n = check_block_n(block_n)
    except ValueError as e:
        _fail(str(e))
    if not isinstance(b, torch.Tensor):
        _fail(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype != torch.float8_e4m3fn:
        _fail(f"b must have dtype torch.float8_e4m3fn, got {b.dtype}")
    if b.dim() != 2:
        _fail(f"b must be 2-D [N, K], got shape {tuple(b.shape)}")
    n, k = b.shape
    if n == 0 or k == 0:
        _fail(f"b must not be empty, got shape {tuple(b.shape)}")
    if k % 16:
        _fail(f"b's K ({k}) must be a multiple of 16 (rows are moved in 16-byte units)")
    if b.stride(1) != 1 or (n > 1 and b.stride(0) < k):
        _fail(f"b must have contiguous rows (stride(1) == 1, stride(0) >= K), got strides {tuple(b.stride())}")
    if not isinstance(b_scales, torch.Tensor):
        _fail(f"b_scales must be a torch.Tensor, got {type(b_scales).__name__}")
    if b_scales.dtype != torch.float32:
        _fail(f"b_scales must have dtype torch.float32, got {b_scales.dtype}")
    want = (_ceil_div(n, 128), _ceil_div(k, 128))
    if tuple(b_scales.shape) != want:
        _fail(f"b_scales must have shape [ceil(N/128), ceil(K/128)] = {list(want)}, got {tuple(b_scales.shape)}")
    if need_cuda and not b.is_cuda:
        _fail(f"b must be a CUDA tensor, got one on {b.device}")
    if b_scales.device != b.device:
        _fail(f"b_scales must be on b's device {b.device}, got {b_scales.device}")
    return block_n


def _allocate(nbytes: int, device):
    """One side-aware allocation of nbytes with a 64 KiB-aligned start (8 KiB below 64 KiB; large ones start
    4 MiB-aligned; small ones are sub-allocated at 512 B, so a little more is taken and the aligned part used).
    8 KiB for the chunk pairs, 64 KiB so that the GEMM loads each side-pure tile as one box
    (fp8_gemm.side_tile_boxes)."""
    import torch
    from .memory import empty
    align = TILE_BOX_ALIGN if nbytes >= TILE_BOX_ALIGN else BASE_ALIGN
    raw = empty(nbytes, dtype=torch.uint8, device=device)
    if raw.data_ptr() % align:
        del raw
        raw = empty(nbytes + align, dtype=torch.uint8, device=device)
        offset = -raw.data_ptr() % align
        raw = raw[offset:offset + nbytes]
    assert raw.data_ptr() % align == 0
    return raw


_kernels: dict = {}


def _pack_kernel(index: int):
    from . import jit
    kernel = _kernels.get(index)
    if kernel is None:
        source = (jit.KERNELS_DIR / "pack_b.cu").read_text()
        kernel = _kernels[index] = jit.load_kernel(source, KERNEL_NAME, name="pack_b", device=index)
    return kernel


def pack_b(b, b_scales, *, block_n: int = 128, layout: str = "auto") -> "PackedB":
    """Packs FP8 weights B [N, K] (float8_e4m3fn, rows contiguous, K % 16 == 0, CUDA) and their scales
    [ceil(N/128), ceil(K/128)] float32 into a side-aware PackedB on b's device (a GPU kernel; one-time cost).

    layout: "auto" (side-aware when the GPU's L2 is split, else plain), "sides" (side-aware; ValueError on a
    GPU without a split) or "plain" (every N-block on side 0, chunk i = i: for measurements / no split)."""
    import torch
    from .topology import topology
    block_n = _check(b, b_scales, block_n, layout)
    n, k = b.shape
    index = b.device.index if b.device.index is not None else torch.cuda.current_device()
    topo = topology(index)
    if layout == "sides" and not topo.split:
        _fail(f"layout='sides' needs a GPU with a split L2; {topo.device_name} has none (use 'auto' or 'plain')")
    paired = layout == "sides" or (layout == "auto" and topo.split)
    lay = PackedLayout.create(n, k, block_n, topo.sms_per_side, topo.side_mask, paired)
    return _pack(b, b_scales, lay, layout)


def _on(device):
    """torch.cuda.device(device) for a CUDA device (a no-op context for the CPU model the tests run)."""
    import contextlib
    import torch
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pack(b, b_scales, lay: PackedLayout, requested_layout: str) -> "PackedB":
    """Allocates the buffer and launches the pack kernel (arguments already checked)."""
    import torch
    from . import jit
    n, k = lay.n, lay.k
    device = b.device
    with _on(device):
        ld = b.stride(0) if n > 1 else k
        if b.data_ptr() % 16 or ld % 16:
            b, ld = b.clone(memory_format=torch.contiguous_format), k  # 16-byte loads need 16-byte rows
        data = _allocate(lay.nbytes, device)
        data.zero_()  # unused chunks (the shorter side's tail of pairs) are zeros, not garbage
        seq_blocks = torch.tensor(list(lay.stored[0]) + list(lay.stored[1]) or [0], dtype=torch.int32,
                                  device=device)
        grid = sum(lay.used_chunks)
        params = (jit.Params().ptr(b).i64(ld // 16).i32(n).i32(k // 16).ptr(data).u64(lay.side_mask)
                  .i32(int(lay.paired)).ptr(seq_blocks).i32(len(lay.stored[0])).i32(lay.used_chunks[0])
                  .i32(lay.k_tiles).i32(lay.chunks_per_tile).i32(lay.block_n))
        kernel = _pack_kernel(device.index)
        kernel.check_params(params)
        kernel.launch(grid, 256, params)
        scales = b_scales.to(dtype=torch.float32).contiguous().clone()
        # b (or its copy) and seq_blocks may be freed on return: torch reuses their memory on this stream only
        # after the kernel
        return PackedB(lay, data, scales, device, requested_layout=requested_layout)


_SERIALS = itertools.count()


class PackedB:
    """A side-aware packed FP8 weight (see the module doc and docs/packed-b.md). Build it with pack_b.

    Tensors (on `device`): data (uint8 [total_chunks * 4096], one side-aware allocation, 8 KiB-aligned; 64 KiB
    from 64 KiB on),
    scales (float32 [ceil(N/128), ceil(K/128)] contiguous, the given values), and the int32 tables a kernel
    takes: block_side [n_blocks], block_pos / block_first [2, n_blocks], side_blocks [2, max blocks/side]."""

    def __init__(self, layout: PackedLayout, data, scales, device, requested_layout: str = "auto"):
        import torch
        self._layout = layout
        # unique per object: a prepared GEMM launch (its tables, tensor map) is keyed by it, as a new weight may
        # be packed at a freed one's address with the same shape and another layout
        self.serial = next(_SERIALS)
        self.data = data
        self.scales = scales
        self.device = torch.device(device)
        self.requested_layout = requested_layout
        self.block_side = torch.from_numpy(layout.block_side()).to(self.device)
        self.block_pos = torch.from_numpy(layout.block_pos()).to(self.device)
        self.block_first = torch.from_numpy(layout.block_first()).to(self.device)
        self.side_blocks = torch.from_numpy(layout.side_blocks()).to(self.device)

    # --- geometry -----------------------------------------------------------------------------------------
    layout = property(lambda self: self._layout, doc="the PackedLayout (stored, paired, side_mask, ...)")
    n = property(lambda self: self._layout.n)
    k = property(lambda self: self._layout.k)
    shape = property(lambda self: (self._layout.n, self._layout.k))
    block_n = property(lambda self: self._layout.block_n)
    block_k = BLOCK_K
    n_blocks = property(lambda self: self._layout.n_blocks)
    k_tiles = property(lambda self: self._layout.k_tiles)
    chunks_per_tile = property(lambda self: self._layout.chunks_per_tile)
    chunks_per_block = property(lambda self: self._layout.chunks_per_block)
    side_mask = property(lambda self: self._layout.side_mask)
    kind = property(lambda self: self._layout.kind, doc="'sides' (side-aware) or 'plain'")
    side_aware = property(lambda self: self._layout.paired)
    plan = property(lambda self: self._layout.stored, doc="stored[s]: the N-blocks side s holds, in order")
    used_chunks = property(lambda self: self._layout.used_chunks)

    @property
    def dtype(self):
        import torch
        return torch.float8_e4m3fn

    @property
    def base(self) -> int:
        """The buffer's address (8 KiB-aligned, 64 KiB from 64 KiB on): chunk c is at base + c * 4096."""
        return self.data.data_ptr()

    def __repr__(self) -> str:
        return (f"PackedB(n={self.n}, k={self.k}, block_n={self.block_n}, kind={self.kind!r}, "
                f"blocks per side={[len(s) for s in self.plan]}, {self.data.numel() >> 10} KiB on {self.device})")

    # --- host-side views of the layout ----------------------------------------------------------------------
    def tile_chunks(self, n_block: int, k_tile: int, side: int | None = None) -> np.ndarray:
        """Chunk indices (in order) of tile (n_block, k_tile) in `data` (default side: the first storing it)."""
        return self._layout.tile_chunks(n_block, k_tile, self.base, side)

    def chunk_owner(self) -> np.ndarray:
        """int32 [total_chunks, 4]: (side, N-block, K-tile, part) each chunk holds; -1 rows where unused."""
        return self._layout.chunk_owner(self.base)

    def chunk_sides(self) -> np.ndarray:
        """The L2 side of every 4 KiB chunk of `data` by the address formula (l2side.side_of), uint8."""
        from .memory import side_of
        return side_of(self.data)

    # --- back to plain tensors ------------------------------------------------------------------------------
    def unpack(self):
        """(b [N, K] float8_e4m3fn, b_scales [ceil(N/128), ceil(K/128)] float32) on `device`; exact."""
        import torch
        with _on(self.device):
            b = unpack_bytes(self.data, self._layout, self.base).view(torch.float8_e4m3fn)
            return b, self.scales.clone()

    def to_unpacked(self) -> dict:
        """A plain dict of tensors and ints (torch.save-able, loads with weights_only=True):
        {"b", "b_scales", "block_n", "layout"}; PackedB.from_unpacked(d) or pack_b(**d) packs it again."""
        b, scales = self.unpack()
        return {"b": b, "b_scales": scales, "block_n": self.block_n, "layout": self.requested_layout}

    @classmethod
    def from_unpacked(cls, state: dict, device=None) -> "PackedB":
        """Packs a to_unpacked() dict (on `device` if given, else where its tensors are)."""
        b, scales = state["b"], state["b_scales"]
        if device is not None:
            b, scales = b.to(device), scales.to(device)
        return pack_b(b, scales, block_n=int(state.get("block_n", 128)), layout=state.get("layout", "auto"))

    def __reduce__(self):
        # pickle / torch.save(packed) store the unpacked form and pack again on load (on the saved device;
        # torch.load(map_location=...) moves the tensors first). torch.load needs weights_only=False for this
        # object (or save to_unpacked()).
        state = self.to_unpacked()
        return (_rebuild, (state["b"], state["b_scales"], state["block_n"], state["layout"]))

    def to(self, device) -> "PackedB":
        """The same weight packed on another CUDA device (self when it is already there)."""
        import torch
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"PackedB.to: a packed weight lives on a CUDA device, not {device}; use unpack() "
                             "or to_unpacked() for the plain tensors")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        b, scales = self.unpack()
        return pack_b(b.to(device), scales.to(device), block_n=self.block_n, layout=self.requested_layout)

    def cuda(self, device=None) -> "PackedB":
        return self.to(device if device is not None else "cuda")


def _rebuild(b, b_scales, block_n, layout):
    return pack_b(b, b_scales, block_n=block_n, layout=layout)
