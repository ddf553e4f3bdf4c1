"""FP8 e4m3 GEMM with fine-grained scaling (the DeepGEMM recipe) on Hopper: `gemm(a, a_scales, b, b_scales)`.

    D[M,N] (bf16) = (a * a_scales) @ (b * b_scales)^T
    a        [M, K] float8_e4m3fn, rows contiguous (row stride a multiple of 16 bytes)
    a_scales [M, ceil(K/128)] float32, one per row per 128 of K.  Native layout: MN-major, i.e. strides
             (1, S) with S >= M and S % 4 == 0 (DeepGEMM's `get_col_major_tma_aligned_tensor`, and what
             `l2side.elementwise.per_token_cast_to_fp8(x, scale_layout="mn")` returns); any other layout
             (e.g. row-major) is accepted and copied into it (one small extra kernel per call).
    b        [N, K] float8_e4m3fn, rows contiguous (the weight, K-major: computes a @ b.T)
    b_scales [ceil(N/128), ceil(K/128)] float32, any strides
    out      [M, N] bfloat16, contiguous (allocated when not given)

The kernel (kernels/fp8_gemm/fp8_gemm.cuh) is compiled per (N, K, block config) — M is a run-time
argument — with nvcc for sm_90a and cached on disk (l2side.jit).

Block configuration (`gemm_config`): BLOCK_K = 128 (the scale granularity). Memory-bound (M < 512): BLOCK_M
64 (one math warpgroup) or, when M > 64, 128 (two); the tile minimises waves * (K blocks * (BLOCK_M + BLOCK_N) +
a fixed cost when BLOCK_N does not divide 128), where waves = ceil(tiles / SMs): every SM pulls its A and B
tiles from L2 at a per-SM rate, so the rows a tile loads per K block set its time (`_memory_bound_tile`;
BLOCK_N any multiple of 8 in 16..128, at most 64 for a 64-row tile when M > 64). Compute-bound: 192 x 128
tiles (three math warpgroups) when M >= 2048 and K <= 1024, else BLOCK_M 128 and BLOCK_N 64, 128 or 192
minimising waves * (BLOCK_N * cost_per_column + 16), weighted by their measured efficiency
(`_block_n_candidates`): the kernel is persistent, so the last wave's idle SMs are the cost that smaller tiles
buy back, and the +16 stands for the per-tile cost that does not shrink with BLOCK_N.
Every tile of one or two math warpgroups up to 128 columns wide uses double accumulators; memory-bound tiles up
to 64 wide also take two K blocks per stage when K is a multiple of 128.
Split-K (`GemmConfig.split_k`: each tile's K blocks in that many ranges on different CTAs, the last CTA of a
tile sums the fp32 partials in split order, so the result is deterministic) is available but not chosen by
default: it measured slower than the above on every DeepSeek shape (docs/perf-notes.md). Tail split
(`GemmConfig.tail_split`; with L2SIDE_GEMM_TAIL_SPLIT=1 chosen for M >= 512 by `tail_split_for`): only the
tiles of the last, partial wave are split that way, so the last wave ends sooner; opt-in, it measured slower.
Stages: as many as fit in shared memory next to the output tile, at most 12, and at most 16 K blocks in flight.
`GemmConfig.kblocks_per_stage` (2 or 4; K a multiple of 128): a stage holds that many K blocks, each operand
loaded by one 3-D TMA box (fewer TMA instructions; bitwise the same result): 2 for the memory-bound tiles above
(with double accumulators: 0-5% faster with L2 flushed, 2-18% with fresh inputs; perf-notes sessions 5 and 6).
It combines with split_k (opt-in by config; not measured yet) but not with the tail split.

`b` may also be a `PackedB` from `l2side.pack_b` (side-aware packed weight, docs/packed-b.md): then every SM
computes the tiles of the N-blocks stored on its own L2 side (`side_mode` switches this for measurements), and
memory-bound calls whose sides have fewer tiles than SMs split K (`packed_plan`).
"""
from __future__ import annotations

import dataclasses
import os
import struct
import threading

import torch

from . import _native, jit
from .sides import sm_side_bits

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)

BLOCK_K = 128
MAX_SMEM = 232448            # bytes of dynamic shared memory per block on sm_90
MAX_STAGES = 12
# K blocks in flight per CTA: 16 lets 2-K-block stages go 8 deep (thin small-M tiles 4-7% faster than 6 on the
# H100, perf-notes session 20); one K block per stage stays at MAX_STAGES (deeper measured equal, session 4)
MAX_KBLOCKS_IN_FLIGHT = 16
SB_CHUNK = 128               # K blocks of B scales staged in shared memory at a time (SmemLayout::kSbChunk)
GROUP_M = 8                  # M-blocks per raster group (scheduler.cuh); 0 = all
KERNEL_NAME = "l2side_fp8_gemm"
# extra nvcc options for every GEMM kernel (for kernel work: e.g. "-DL2SIDE_NO_SETMAXNREG")
EXTRA_OPTIONS = tuple(os.environ.get("L2SIDE_GEMM_NVCC_OPTIONS", "").split())


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    stages: int
    group_m: int = GROUP_M
    tma_store: bool = True     # epilogue through shared memory + TMA store (needs N % 8 == 0)
    cluster_n: int = 1         # 2 or 4: CTAs of a cluster on consecutive N-blocks share the A tile by TMA multicast
    double_acc: bool = False   # two wgmma accumulators: block k+1 runs on the tensor cores while k is promoted
    packed_b: bool = False     # B from l2side.pack_b's side-aware chunks, tiles from per-side queues
    split_k: int = 1           # > 1: each tile's K blocks in this many ranges on different CTAs, partials summed
    tail_split: int = 1        # > 1: only the tiles of the last, partial wave are split so (see split_schedule)
    kblocks_per_stage: int = 1  # 2 or 4: a stage holds that many K blocks, loaded by one 3-D TMA box per operand
    packed_tickets: bool = False  # packed B: ranks by ticket (one atomic per CTA) instead of the SM's rank + claims
    # % of each promotion's FFMA made yield points in the compiled cubin (l2side/sass_yield.py; opt-in, for the
    # A/B; slower on every row measured, perf-notes session 20). Not in the repr: the kernel source (whose first line prints the config) and its disk cache stay the same.
    ffma_yield: int = dataclasses.field(default=0, repr=False)

    @property
    def num_math_warpgroups(self) -> int:
        return self.block_m // 64

    @property
    def threads(self) -> int:
        return (self.num_math_warpgroups + 1) * 128

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory asked at launch (the layout of SmemLayout + 1024 for the base alignment)."""
        return smem_layout_bytes(self.block_m, self.block_n, self.stages, self.tma_store,
                                 self.kblocks_per_stage) + 1024


def smem_layout_bytes(block_m: int, block_n: int, stages: int, tma_store: bool = True,
                      kblocks_per_stage: int = 1) -> int:
    """Bytes of SmemLayout (fp8_gemm.cuh): [output tile] [A stages] [B stages] [A-scale stages] [barriers]
    [tile ring: 4 barriers + 4 u32] [split-K flags: 4 u32] [B scales: per math warpgroup 2 x 128 fp32]."""
    per_stage = (block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4) * kblocks_per_stage
    barriers_at = -(-(block_m * block_n * 2 * tma_store + stages * per_stage) // 8) * 8
    return barriers_at + 2 * stages * 8 + 4 * 8 + 4 * 4 + 4 * 4 + block_m // 64 * SB_CHUNK * 2 * 4


def max_stages(block_m: int, block_n: int, tma_store: bool, kblocks_per_stage: int = 1) -> int:
    """The most stages that fit (at most MAX_STAGES stages and MAX_KBLOCKS_IN_FLIGHT K blocks)."""
    stages = min(MAX_STAGES, MAX_KBLOCKS_IN_FLIGHT // kblocks_per_stage)
    while stages > 1 and smem_layout_bytes(block_m, block_n, stages, tma_store, kblocks_per_stage) + 1024 > MAX_SMEM:
        stages -= 1
    return stages


def d_chunk_cols(block_n: int) -> int:
    """Columns per TMA store of the output tile (d_chunk_cols in fp8_gemm.cuh)."""
    return 64 if block_n % 64 == 0 else block_n


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


COMPUTE_BOUND_M = 512


def _block_n_candidates():
    """Compute-bound (M >= COMPUTE_BOUND_M) BLOCK_N candidates, (BLOCK_N, relative time per column of a tile): only
    64, 128, 192 (on the H100, 128 x 112 / 96 tiles ran 0.78x / 0.75x the TFLOPS of 128 x 128, and 192 about
    0.9-1.05x: docs/perf-notes.md)."""
    return [(64, 1.4), (128, 1.0), (192, 1.05)]


# Memory-bound tiles (M < COMPUTE_BOUND_M): a tile's time is about its K blocks x the operand rows it loads per
# K block (BLOCK_M + BLOCK_N: every SM pulls its A and B tiles from L2 at a per-SM rate), plus a fixed cost
# for a width that does not divide 128 (its columns straddle two B-scale blocks), worth this many row x K
# blocks. Fitted on the H100 (perf-notes session 6: 56- vs 64-wide tiles at K = 2048 and 16384, ~0.7 us).
STRADDLE_COST = 240


def _memory_bound_tile(m: int, n: int, k: int, num_sms: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) minimising waves x (K blocks x (BLOCK_M + BLOCK_N) + straddle cost). BLOCK_N: multiples
    of 8 in 16..128; BLOCK_M 64, or 128 when M > 64 (two math warpgroups). A 64-row tile at M > 64 stays at most
    64 wide: one warpgroup's wgmma -> promotion chain then sets the pace (128 x 7168 x 2048: 64 x 112 tiles
    9.0 us against 128 x 64's 7.8, fresh inputs)."""
    kb = _ceil_div(k, BLOCK_K)
    best = None
    for block_m in (64, 128) if m > 64 else (64,):
        for block_n in range(16, 129, 8):
            if block_m == 64 and m > 64 and block_n > 64:
                continue
            waves = _ceil_div(_ceil_div(m, block_m) * _ceil_div(n, block_n), num_sms)
            cost = waves * (kb * (block_m + block_n) + (STRADDLE_COST if BLOCK_K % block_n else 0))
            key = (cost, -block_n, -block_m)
            if best is None or key < best[0]:
                best = (key, block_m, block_n)
    return best[1], best[2]


DOUBLE_ACC_MAX_BLOCK_N = 128  # tiles up to this wide (of 1-2 math warpgroups) get double accumulators
PACKED_DOUBLE_ACC_MAX_BLOCK_N = 64  # the same for packed B (packed_config), memory-bound tiles only
# Large M with very short K: 192 x 128 tiles (three math warpgroups, no room for double accumulators). H100:
# 4096 x 32768 x 512 137.7 us against 145.7 for 128 x 128 with double accumulators (session 7); at K = 1536 /
# 2048 the 128 x 128 double-accumulator tiles won (242-244 vs 247.8, 93.8-94.1 vs 98.4 us) and at K = 7168 /
# 16384 192-row tiles lost 4-11% already with single accumulators (docs/perf-notes.md, sessions 4 and 7).
THREE_WARPGROUPS_MIN_M, THREE_WARPGROUPS_MAX_K = 2048, 1024
# gemm_config splits the last partial wave only when L2SIDE_GEMM_TAIL_SPLIT=1: on the H100 it measured slower
# (docs/perf-notes.md, session 4: compiling the split path in costs ~10% on every whole tile, and the partial
# last wave already runs faster per tile than the naive wave count says)
TAIL_SPLIT = os.environ.get("L2SIDE_GEMM_TAIL_SPLIT", "0") == "1"


def gemm_config(m: int, n: int, k: int, num_sms: int = 132) -> GemmConfig:
    """The block configuration for a shape (see the module docstring for the rule)."""
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"gemm_config needs positive sizes, got m={m}, n={n}, k={k}")
    if m < COMPUTE_BOUND_M:
        block_m, block_n = _memory_bound_tile(m, n, k, num_sms)
    else:
        block_m = 192 if m >= THREE_WARPGROUPS_MIN_M and k <= THREE_WARPGROUPS_MAX_K else 128
        best = None
        for block_n, cost_per_column in [(128, 1.0)] if block_m == 192 else _block_n_candidates():
            waves = _ceil_div(_ceil_div(m, block_m) * _ceil_div(n, block_n), num_sms)
            key = (waves * block_n * cost_per_column + waves * 16, -block_n)
            if best is None or key < best[0]:
                best = (key, block_n)
        block_n = best[1]
    num_m_blocks = _ceil_div(m, block_m)
    # Double accumulators (block k+1's wgmma run on the tensor cores while block k is promoted) for every tile
    # of one or two math warpgroups up to 128 wide (wider, or three warpgroups: not enough registers). H100,
    # fresh inputs, us (perf-notes session 7): 4096 x 4096 x 7168 183 -> 175, 4096 x 7168 x 16384 720-750 ->
    # 711-721, 64 x 24576 x 1536 (96 wide) 18.0 -> 17.0-17.5; 128 x 2112 x 7168 11.6 -> 9.4 (sessions 5-7).
    # Memory-bound tiles up to 64 wide also take two K blocks per stage (one 3-D TMA box per operand: half
    # the TMA instructions; 64 x 7168 x 2048 6.6 -> 6.3 us, session 6).
    double_acc = block_m <= 128 and block_n <= DOUBLE_ACC_MAX_BLOCK_N
    kblocks_per_stage = 2 if m < COMPUTE_BOUND_M and block_n <= 64 and k % BLOCK_K == 0 else 1
    tma_store = n % 8 == 0
    # Compute-bound shapes whose tiles end in a partial wave split that wave's tiles along K (tail_split_for).
    tail_split = 1
    if m >= COMPUTE_BOUND_M and TAIL_SPLIT and block_m != 192:
        tail_split = tail_split_for(num_m_blocks * _ceil_div(n, block_n), _ceil_div(k, BLOCK_K), num_sms)
    # (cluster_n stays 1: A multicast in clusters of 2 / 4 measured no faster: docs/perf-notes.md)
    return GemmConfig(block_m=block_m, block_n=block_n,
                      stages=max_stages(block_m, block_n, tma_store, kblocks_per_stage), tma_store=tma_store,
                      double_acc=double_acc, tail_split=tail_split, kblocks_per_stage=kblocks_per_stage)


def schedule_tiles(m: int, n: int, config: GemmConfig) -> int:
    """Tiles the scheduler hands out (a cluster's CTAs take consecutive N-blocks as one)."""
    return _ceil_div(m, config.block_m) * (_ceil_div(n, config.block_n) // config.cluster_n)


def split_schedule(m: int, n: int, config: GemmConfig, num_sms: int) -> tuple[int, int]:
    """(tail_first, splits) of SplitKArgs: tiles [0, tail_first) of the schedule are one unit each, later ones
    `splits` units along K. split_k: every tile (tail_first 0). tail_split: the tiles that do not fill a
    whole wave of `num_sms` units — the last wave then ends sooner (none when the tiles fill whole waves)."""
    tiles = schedule_tiles(m, n, config)
    if config.split_k > 1:
        return 0, config.split_k
    partial = tiles % num_sms
    if config.tail_split > 1 and partial:
        return tiles - partial, config.tail_split
    return tiles, 1


def grid_size(m: int, n: int, config: GemmConfig, num_sms: int) -> int:
    """CTAs of the persistent grid: one per SM at most, whole clusters, no more than there are units of work
    (tiles, or more with split_schedule). Compute-bound shapes without splits, clusters or packed B take the
    fewest CTAs that need the same number of rounds, ceil(tiles / rounds): the same makespan in tiles with
    fewer SMs busy. H100, 4096 x 7168 x 16384 (1792 tiles: 128 CTAs x 14 instead of 132 with 76 of them doing
    a 14th): 711-713 -> 693 us with fresh inputs, 710-712 -> 696-698 with L2 flushed, two alternating rounds;
    4096 x 4096 x 7168 and 4096 x 7168 x 2048 (128 CTAs too) unchanged (perf-notes session 7)."""
    c = config.cluster_n
    tiles = schedule_tiles(m, n, config)
    first, splits = split_schedule(m, n, config, num_sms // c)
    units = first + (tiles - first) * splits
    grid = max(1, min(num_sms // c, units))
    if m >= COMPUTE_BOUND_M and c == 1 and splits == 1 and not config.packed_b:
        grid = _ceil_div(units, _ceil_div(units, grid))
    return c * grid


def split_k_workspace(m: int, n: int, config: GemmConfig, num_sms: int = 132) -> tuple[int, int]:
    """(fp32 partials, u32 counters) the split kernel needs for its split tiles (SplitKArgs in fp8_gemm.cuh;
    splits need cluster_n == 1, so a schedule tile is one tile)."""
    first, splits = split_schedule(m, n, config, num_sms)
    split_tiles = schedule_tiles(m, n, config) - first if splits > 1 else 0
    return split_tiles * config.block_m * config.block_n * splits, split_tiles * config.num_math_warpgroups


# The unit that completes a split tile reads the other S - 1 fp32 partials: each costs about this many K
# elements of the tile's own math (a 128 x 128 partial is 64 KiB, read at ~55 GB/s per SM, while the SM does
# ~10 dense FP8 TFLOPS: 64 KiB / 55 GB/s = 1.2 us = 2 * 128 * 128 * 360 FLOP / 10 TFLOPS).
SPLIT_REDUCE_K = 360


def tail_split_for(tiles: int, k_blocks: int, num_sms: int, max_split: int = 8, min_k_blocks: int = 8,
                   min_gain: float = 0.015) -> int:
    """The split of the last partial wave's tiles that ends the schedule soonest, in tile times: the full
    waves plus ceil(partial * S / SMs) rounds of 1/S of a tile (static round robin, units of a tile
    consecutive) plus the S - 1 partials the last unit reads; 1 unless that saves `min_gain` of the whole
    and each unit keeps `min_k_blocks` K blocks."""
    waves, partial = divmod(tiles, num_sms)
    if partial == 0 or waves == 0:
        return 1
    best, best_time = 1, waves + 1.0
    for s in range(2, max_split + 1):
        if _ceil_div(k_blocks, s) < min_k_blocks or (s - 1) * _ceil_div(k_blocks, s) >= k_blocks:
            continue
        t = waves + _ceil_div(partial * s, num_sms) / s + (s - 1) * SPLIT_REDUCE_K / (k_blocks * BLOCK_K)
        if t < best_time - 1e-9:
            best, best_time = s, t
    return best if best_time <= (waves + 1.0) * (1.0 - min_gain) else 1


# ---------------------------------------------------------------------------------------------- source
def mma_source(block_n: int) -> str:
    """The wgmma m64nNk32 e4m3 x e4m3 -> f32 wrapper for one N (operands from shared-memory descriptors)."""
    if block_n % 8 or not 8 <= block_n <= 256:
        raise ValueError(f"wgmma N must be a multiple of 8 in [8, 256], got {block_n}")
    n_acc = block_n // 2
    regs = ", ".join(f"%{i}" for i in range(n_acc))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_acc))
    return (
        "struct Mma {\n"
        f"  static constexpr uint32_t kN = {block_n};\n"
        "  __device__ __forceinline__ static void run(float* d, uint64_t desc_a, uint64_t desc_b, bool accumulate) {\n"
        "    asm volatile(\n"
        f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n_acc + 2}, 0;\\n"\n'
        f'        "wgmma.mma_async.sync.aligned.m64n{block_n}k32.f32.e4m3.e4m3 "\n'
        f'        "{{{regs}}}, %{n_acc}, %{n_acc + 1}, p, 1, 1;\\n}}\\n"\n'
        f"        : {outs}\n"
        '        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));\n'
        "  }\n"
        "};\n")


def gemm_source(n: int, k: int, config: GemmConfig) -> str:
    """The CUDA source of the kernel for one (N, K, config): the header, the wgmma wrapper, the entry."""
    if k % 16:
        raise ValueError(f"K must be a multiple of 16 (TMA rows of 16 bytes), got {k}")
    if config.tma_store and n % 8:
        raise ValueError(f"the TMA-store epilogue needs N % 8 == 0 (16-byte output rows), got N={n}; "
                         "use a config with tma_store=False")
    if config.cluster_n not in (1, 2, 4) or (_ceil_div(n, config.block_n) % config.cluster_n and not config.packed_b):
        raise ValueError(f"cluster_n must be 1, 2 or 4 and divide the N-block count ({_ceil_div(n, config.block_n)}),"
                         f" got {config.cluster_n}")
    if config.packed_b and (config.cluster_n not in (1, 2) or config.block_n % 32):
        raise ValueError("packed B needs cluster_n 1 or 2 and block_n a multiple of 32")
    if config.packed_tickets and not config.packed_b:
        raise ValueError("packed_tickets is a packed-B schedule: it needs packed_b")
    for name in ("split_k", "tail_split"):
        splits = getattr(config, name)
        if splits < 1:
            raise ValueError(f"{name} must be >= 1, got {splits}")
        if splits > 1:
            kb = _ceil_div(k, BLOCK_K)
            if splits > kb or (splits - 1) * _ceil_div(kb, splits) >= kb:
                raise ValueError(f"{name}={splits} leaves a range of K blocks empty (K has {kb} blocks of 128)")
            if config.cluster_n != 1 or (config.packed_b and name == "tail_split"):
                raise ValueError(f"{name} > 1 needs cluster_n == 1" + (" and an unpacked B" if name == "tail_split"
                                                                        else ""))
    if not 0 <= config.ffma_yield <= 100:
        raise ValueError(f"ffma_yield is a percentage (0..100), got {config.ffma_yield}")
    if config.kblocks_per_stage not in (1, 2, 4):
        raise ValueError(f"kblocks_per_stage must be 1, 2 or 4, got {config.kblocks_per_stage}")
    if config.kblocks_per_stage > 1 and (k % BLOCK_K or config.cluster_n != 1 or config.tail_split > 1):
        raise ValueError("kblocks_per_stage > 1 needs K a multiple of 128, cluster_n == 1 and no "
                         f"tail split (K={k}, {config})")
    if config.split_k > 1 and config.tail_split > 1:
        raise ValueError("split_k and tail_split are exclusive (split_k already splits every tile)")
    if config.double_acc and config.stages < 2:  # (K block j + 1 waits for a stage that only j's release frees)
        raise ValueError(f"double_acc needs at least 2 stages, got {config.stages}")
    if config.smem_bytes > MAX_SMEM:
        raise ValueError(f"the config needs {config.smem_bytes} bytes of shared memory, more than the {MAX_SMEM} "
                         f"a CTA can have (fewer stages or smaller tiles): {config}")
    if config.block_n > BLOCK_K + (config.block_n & -config.block_n):
        raise ValueError(f"block_n={config.block_n} lets a tile span three 128-wide B-scale blocks")
    return (
        f"// l2side FP8 GEMM: N={n} K={k} {config}\n"
        '#include "fp8_gemm/fp8_gemm.cuh"\n\n'
        + mma_source(config.block_n) +
        f"\nextern \"C\" __global__ void __launch_bounds__({config.threads}, 1) {KERNEL_NAME}(\n"
        "    __nv_bfloat16* d, const float* scales_b, uint32_t sb_stride_n, uint32_t sb_stride_k, uint32_t shape_m,\n"
        "    const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,\n"
        "    const __grid_constant__ CUtensorMap tmap_sa, const __grid_constant__ CUtensorMap tmap_d,\n"
        "    const __grid_constant__ CUtensorMap tmap_b_tiles0, const __grid_constant__ CUtensorMap tmap_b_tiles1,\n"
        "    const __grid_constant__ l2side::fp8_gemm::PackedBArgs packed,\n"
        "    const __grid_constant__ l2side::fp8_gemm::SplitKArgs split_k) {\n"
        f"  l2side::fp8_gemm::gemm_body<{n}, {k}, {config.block_m}, {config.block_n}, {config.stages}, "
        f"{config.group_m}, {'true' if config.tma_store else 'false'}, {config.cluster_n}, "
        f"{'true' if config.double_acc else 'false'}, {'true' if config.packed_b else 'false'}, "
        f"{max(config.split_k, config.tail_split)}, {config.kblocks_per_stage}, "
        f"{'true' if config.packed_tickets else 'false'}, Mma>(\n"
        "      d, scales_b, sb_stride_n, sb_stride_k, shape_m, tmap_a, tmap_b, tmap_sa, tmap_d, tmap_b_tiles0,\n"
        "      tmap_b_tiles1, packed, split_k);\n"
        "}\n")


def build(n: int, k: int, config: GemmConfig, arch: str = "sm_90a", options=()) -> bytes:
    """Compiles (cached on disk) the kernel for (N, K, config); needs nvcc, not a GPU. The cubin before
    `config.ffma_yield`'s edit (applied at load: l2side/sass_yield.add_yield_points)."""
    return jit.compile(gemm_source(n, k, config), name=f"fp8_gemm_n{n}_k{k}", options=EXTRA_OPTIONS + tuple(options),
                       arch=arch)


# ------------------------------------------------------------------------------------------ validation
def _fail(msg: str):
    raise ValueError(msg)


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device} with strides {tuple(t.stride())}"


def check_arguments(a, a_scales, b, b_scales, out=None, *, packed=None):
    """Validates the arguments (no CUDA call); returns (M, N, K). Every error names the argument.
    With `packed` (a PackedB standing for b, whose scales are b_scales) the checks of b are against it."""
    # (kept lean: it runs on every call that is not a repeat; see gemm's fast path)
    named = [("a", a), ("a_scales", a_scales)] + ([("b", b)] if packed is None else []) + [("b_scales", b_scales)]
    if out is not None:
        named.append(("out", out))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    operands = (("a", a),) if packed is not None else (("a", a), ("b", b))
    for name, t in operands:
        if t.dtype != torch.float8_e4m3fn:
            _fail(f"{name} must be float8_e4m3fn, got {t.dtype}")
        if t.dim() != 2:
            _fail(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    m, k = a.shape
    if packed is not None:
        n, kb_ = packed.n, packed.k
        if kb_ != k:
            _fail(f"a has K = {k} but the packed B was packed with K = {kb_}")
    else:
        n, kb_ = b.shape
        if kb_ != k:
            _fail(f"b must be [N, K] with the K of a ({k}), got shape {tuple(b.shape)} (D = a @ b.T)")
    if k == 0 or k % 16:
        _fail(f"K (a.shape[1] = {k}) must be a positive multiple of 16: TMA needs 16-byte rows")
    if n == 0:
        _fail(f"N (b.shape[0]) must be positive, got {n}")
    for name, t, rows in tuple((nm, t, m if nm == "a" else n) for nm, t in operands):
        if t.stride(1) != 1 or (rows > 1 and (t.stride(0) < k or t.stride(0) % 16)):
            _fail(f"{name} must have contiguous rows with a row stride that is a multiple of 16 elements "
                  f"(>= K); got {_describe(t)}; call .contiguous()")
    for name, t in (("a_scales", a_scales), ("b_scales", b_scales)):
        if t.dtype != torch.float32:
            _fail(f"{name} must be float32, got {t.dtype}")
    kb = _ceil_div(k, BLOCK_K)
    if a_scales.shape != (m, kb):
        _fail(f"a_scales must have shape [M, ceil(K/128)] = [{m}, {kb}], got {tuple(a_scales.shape)}")
    if b_scales.shape != (_ceil_div(n, BLOCK_K), kb):
        _fail(f"b_scales must have shape [ceil(N/128), ceil(K/128)] = [{_ceil_div(n, BLOCK_K)}, {kb}], "
              f"got {tuple(b_scales.shape)}")
    if any(s < 0 for s in b_scales.stride()):
        _fail(f"b_scales must have non-negative strides, got {tuple(b_scales.stride())}")
    if out is not None:
        if out.dtype != torch.bfloat16:
            _fail(f"out must be bfloat16, got {out.dtype}")
        if out.shape != (m, n):
            _fail(f"out must have shape [M, N] = [{m}, {n}], got {tuple(out.shape)}")
        if not out.is_contiguous():
            _fail(f"out must be contiguous, got strides {tuple(out.stride())}")
    for name, t in named:
        if not t.is_cuda:
            _fail(f"{name} must be a CUDA tensor, got device {t.device}")
    index = a.get_device()
    for name, t in named[1:]:
        if t.get_device() != index:
            what = "the packed B's scales" if (packed is not None and name == "b_scales") else name
            _fail(f"{what} is on {t.device} but a is on {a.device}: all tensors must be on one device"
                  + (" (use packed_b.to(a.device))" if packed is not None else ""))
    for name, t in operands:
        if t.data_ptr() % 16:
            _fail(f"{name} must start at a 16-byte-aligned address (TMA), got {t.data_ptr():#x}")
    return m, n, k


def _scales_are_native(sa, m: int) -> bool:
    """MN-major with a TMA-able column stride: used as is."""
    s0, s1 = sa.stride()
    return (s0 == 1 or m == 1) and s1 % 4 == 0 and s1 >= m and sa.data_ptr() % 16 == 0


def to_native_a_scales(a_scales):
    """a_scales [M, KB] in the kernel's layout: strides (1, ceil4(M)) (a copy unless already so)."""
    m, kb = a_scales.shape
    if _scales_are_native(a_scales, m):
        return a_scales
    padded = torch.empty((kb, _ceil_div(m, 4) * 4), dtype=torch.float32, device=a_scales.device)
    view = padded[:, :m].t()
    view.copy_(a_scales)
    return view


# ------------------------------------------------------------------------------------------ launching
class _Device:
    """Per-device state: the GPU's properties and the kernels loaded on it."""

    def __init__(self, index: int):
        props = torch.cuda.get_device_properties(index)
        if (props.major, props.minor) != (9, 0):
            raise RuntimeError(f"l2side.gemm needs a Hopper GPU (sm_90: H100/H200); device {index} is "
                               f"{props.name} (sm_{props.major}{props.minor})")
        self.index = index
        self.num_sms = props.multi_processor_count
        self.kernels: dict = {}


_devices: dict = {}
_lock = threading.Lock()


def _device(index: int) -> _Device:
    dev = _devices.get(index)
    if dev is None:
        with _lock:
            dev = _devices.get(index) or _Device(index)
            _devices[index] = dev
    return dev


def _resident_clusters(dev: _Device, n: int, k: int, config: GemmConfig) -> int:
    """How many clusters of the kernel of `config` (as launched: tma_store already settled for N) fit on the GPU
    at once (a clear error when none does)."""
    kernel = _kernel(dev, n, k, config)
    fit = _native.max_active_clusters(kernel.device, kernel.function, config.threads, config.smem_bytes,
                                      config.cluster_n)
    if fit < 1:
        _fail(f"no cluster of {config.cluster_n} CTAs of this kernel ({config.smem_bytes} bytes of shared memory "
              f"each) fits on device {dev.index}")
    return fit


def _kernel(dev: _Device, n: int, k: int, config: GemmConfig) -> jit.Kernel:
    key = (n, k, config)
    kernel = dev.kernels.get(key)
    if kernel is None:
        transform, edits = None, []
        if config.ffma_yield:
            from .sass_yield import add_yield_points

            def transform_image(cubin):
                image, count = add_yield_points(cubin, KERNEL_NAME, config.ffma_yield)
                edits.append(count)
                return image
            transform = (f"ffma_yield={config.ffma_yield}", transform_image)
        kernel = jit.load_kernel(gemm_source(n, k, config), KERNEL_NAME, name=f"fp8_gemm_n{n}_k{k}",
                                 options=EXTRA_OPTIONS, device=dev.index, transform=transform)
        # how many FFMA the yield pass changed (0 with ptxas output it does not recognise: the A/B says so)
        kernel.ffma_yield_edits = edits[-1] if edits else getattr(kernel, "ffma_yield_edits", 0)
        kernel.set_max_dynamic_smem(config.smem_bytes)
        dev.kernels[key] = kernel
    return kernel


_launch_cache: dict = {}   # _launch_key(...) -> the arguments of _native.launch but the stream (see _prepare)
_LAUNCH_CACHE_MAX = 4096


# struct PackedBArgs (fp8_gemm.cuh): 5 pointers, 2 x 4 x u64 SM bits (side 1, side 0), 10 x u32 (no padding)
_PACKED_ARGS = struct.Struct("<QQQQQ4Q4Q10I")
NO_PACKED_B = _PACKED_ARGS.pack(*([0] * 23))
# struct SplitKArgs (fp8_gemm.cuh): partials, counters, tail_first, splits
_SPLIT_K_ARGS = struct.Struct("<QQII")


def _split_k_args(m: int, n: int, config: GemmConfig, num_sms: int, index: int, stream: int) -> bytes:
    """SplitKArgs over this stream's workspace (sized in powers of two so that shapes share it; launches on
    one stream run in order, so they may)."""
    first, splits = split_schedule(m, n, config, num_sms)
    if splits == 1:
        return _SPLIT_K_ARGS.pack(0, 0, first, 1)
    partials, counters = split_k_workspace(m, n, config, num_sms)
    partials, counters = 1 << (partials - 1).bit_length(), 1 << (counters - 1).bit_length()
    p = jit.stream_scratch(f"fp8_gemm.split_k_partials.{partials}", index, stream, partials, torch.float32)
    c = jit.stream_scratch(f"fp8_gemm.split_k_counters.{counters}", index, stream, counters, torch.int32)
    return _SPLIT_K_ARGS.pack(p.data_ptr(), c.data_ptr(), first, splits)


def packed_b_args(base: int, side_mask: int, queue_blocks: int, block_first: int, workspace: int, sm_side,
                  queue_width: int, queue_len: tuple, n_blocks: int, mode: int, paired: int,
                  ctas: tuple = (0, 0), workers: tuple = (0, 0)) -> bytes:
    """The PackedBArgs struct the kernel takes by value (sm_side: side of each SM id, -1 for none; ctas and
    workers per queue from packed_schedule; paired: 0 plain, 1 side-aware, 2 side-aware with tile boxes)."""
    side0 = sm_side_bits([1 if side == 0 else 0 for side in sm_side])
    return _PACKED_ARGS.pack(base, side_mask, queue_blocks, block_first, workspace, *sm_side_bits(sm_side), *side0,
                             queue_width, queue_len[0], queue_len[1], n_blocks, mode, int(paired), *ctas, *workers)


def packed_schedule(sm_side, num_sms: int, mode: int, queue_len: tuple, m_blocks: int,
                    compute_bound: bool, splits: int = 1, cluster: int = 1) -> tuple[int, tuple, tuple]:
    """(mode, ctas, workers) of the packed-B kernel's static schedule (PackedBArgs), for a grid of one CTA per SM.
    ctas[q]: the CTAs side_mode sends to queue q (near: the SMs of side q, far: of the other side, ignore: the
    even-ranked SMs of side q and the odd-ranked of the other, PACKED_BY_PARITY: CTA parity); an empty queue's
    CTAs go to the other one. The modes fall back to PACKED_BY_PARITY (the mode returned) when the table cannot
    give every queue with tiles its CTAs (a GPU without a split, fewer SMs than the table; for ignore, sides that
    differ by more than one SM). workers[q]: how many of them take units (tiles, or `splits` K ranges of each
    tile) — all, or when compute-bound the fewest that need the same rounds (as grid_size does for the unpacked
    kernel). With clusters (`cluster` CTAs, num_sms counts clusters) near / far count the clusters of each side
    as its SMs // cluster (or its share of fewer clusters), the rest on the other (a cluster's rank is a ticket of
    its first SM's side's queue, or of the other when that one is full: fp8_gemm.cuh); ignore sends every second
    cluster of each side to the other side's queue (ctas as without clusters), PACKED_BY_PARITY where a side has
    none."""
    side1 = sum(1 for smid, s in enumerate(sm_side) if s == 1 and smid < 256)
    per_side = (num_sms - side1, side1)
    if cluster > 1:  # (each side's share of the clusters that run: all of them, or fewer when fewer fit)
        side0_sms = sum(1 for smid, s in enumerate(sm_side) if s == 0 and smid < 256)
        side0 = min(side0_sms // cluster, round(num_sms * side0_sms / max(1, side0_sms + side1)))
        per_side = (side0, num_sms - side0)
    ctas = ((num_sms + 1) // 2, num_sms // 2)
    if mode in (SIDE_MODES["near"], SIDE_MODES["far"]):
        by_side = per_side if mode == SIDE_MODES["near"] else (per_side[1], per_side[0])
        if min(by_side) >= 0 and all(by_side[q] > 0 or not queue_len[q] for q in (0, 1)):
            ctas = by_side
        else:
            mode = PACKED_BY_PARITY
    elif mode == SIDE_MODES["ignore"]:
        # ranks 0, 2, ... of side q and 1, 3, ... of the other: contiguous in each queue when the sides differ by
        # at most one SM (clusters: every second cluster of each side by ticket, whatever the sides)
        if min(per_side) > 0 and (cluster > 1 or abs(per_side[0] - per_side[1]) <= 1):
            ctas = tuple((per_side[q] + 1) // 2 + per_side[q ^ 1] // 2 for q in (0, 1))
        else:
            mode = PACKED_BY_PARITY
    if not queue_len[1]:
        ctas = (num_sms, 0)
    elif not queue_len[0]:
        ctas = (0, num_sms)
    workers = []
    for q in (0, 1):
        tiles = queue_len[q] * m_blocks * splits
        w = max(1, min(ctas[q], tiles)) if ctas[q] else 0
        if compute_bound and w:
            w = _ceil_div(tiles, _ceil_div(tiles, w))
        workers.append(w)
    return mode, ctas, tuple(workers)


def _kmajor_map(t, rows: int, k: int, box_rows: int, kblocks: int) -> bytes:
    """TMA map of a K-major e4m3 operand [rows, K] (A or B), 128-byte swizzle: boxes of one K block x box_rows,
    or with kblocks > 1 3-D boxes of that many consecutive K blocks over its [rows][K / 128][128] view (the tiles
    land one after another; K % 128 == 0, checked in gemm_source)."""
    row_bytes = t.stride(0) if rows > 1 else k
    if kblocks > 1:
        return jit.tensor_map(t.data_ptr(), "e4m3", (BLOCK_K, rows, _ceil_div(k, BLOCK_K)), (row_bytes, BLOCK_K),
                              (BLOCK_K, box_rows, kblocks), swizzle=128)
    return jit.tensor_map(t.data_ptr(), "e4m3", (k, rows), (row_bytes,), (BLOCK_K, box_rows), swizzle=128)


def _prepare(a, a_scales, b, b_scales, out, m: int, n: int, k: int, config: GemmConfig | None, index: int,
             stream: int, packed_args: bytes | None = None, packed_map: bytes | None = None, tile_maps=None,
             packed_grid: int = 0):
    """Everything a launch needs: the kernel, grid, block, shared memory and the parameter buffer (packed B: the
    grid its schedule was planned for, `packed_grid`)."""
    dev = _device(index)
    cfg = config or gemm_config(m, n, k, dev.num_sms)
    if cfg.tma_store and n % 8:
        cfg = dataclasses.replace(cfg, tma_store=False)
    kernel = _kernel(dev, n, k, cfg)
    sa = to_native_a_scales(a_scales)
    kb = _ceil_div(k, BLOCK_K)
    g = cfg.kblocks_per_stage
    # (in a cluster each CTA loads its share of A; with packed B a cluster shares B and each loads its own A)
    tmap_a = _kmajor_map(a, m, k, cfg.block_m // (1 if cfg.packed_b else cfg.cluster_n), g)
    # (packed B: packed_map, the packed buffer's map; unread by kernels built with -DL2SIDE_PACKED_BULK)
    tmap_b = packed_map if cfg.packed_b else _kmajor_map(b, n, k, cfg.block_n, g)
    tmap_sa = jit.tensor_map(sa.data_ptr(), "f32", (m, kb), (sa.stride(1) * 4,), (cfg.block_m, g), swizzle=0)
    if cfg.tma_store:
        chunk = d_chunk_cols(cfg.block_n)
        tmap_d = jit.tensor_map(out.data_ptr(), "bf16", (n, m), (n * 2,), (chunk, 64),
                                swizzle=128 if chunk == 64 else 0)
    else:
        tmap_d = tmap_a  # unused by the kernel
    params = (jit.Params().ptr(out).ptr(b_scales).u32(b_scales.stride(0)).u32(b_scales.stride(1)).u32(m)
              .tensor_map(tmap_a).tensor_map(tmap_b).tensor_map(tmap_sa).tensor_map(tmap_d)
              .tensor_map(tile_maps[0] if tile_maps else tmap_b).tensor_map(tile_maps[1] if tile_maps else tmap_b)
              .raw(packed_args or NO_PACKED_B, 8).raw(_split_k_args(m, n, cfg, dev.num_sms, index, stream), 8))
    kernel.check_params(params)
    # (packed B: one CTA per SM, or in clusters as many as fit; the static per-side schedule of PackedBArgs decides
    # which of them work)
    grid = packed_grid if cfg.packed_b else grid_size(m, n, cfg, dev.num_sms)
    if cfg.cluster_n > 1 and not cfg.packed_b:  # only as many clusters as can be resident at once (persistent grid)
        grid = min(grid, _resident_clusters(dev, n, k, cfg) * cfg.cluster_n)
    # what _native.launch takes, prepared once: (device, function, grid, block, smem, params, cluster, offsets)
    launch_args = (kernel.device, kernel.function, grid, cfg.threads, cfg.smem_bytes,
                   params.buffer, cfg.cluster_n, list(params.offsets))
    return launch_args, sa is a_scales


def _launch_key(a, a_scales, b, b_scales, out, config, stream):
    """Everything the validation and the prepared launch depend on: a hit means the same checks passed before
    (dtype, shape, strides, device and address of every tensor), so a repeated call skips them; and the stream,
    whose scratch (split-K, packed-B queues) the prepared launch points at."""
    return (stream, a.data_ptr(), a.shape, a.stride(), a.dtype, a.get_device(),
            a_scales.data_ptr(), a_scales.shape, a_scales.stride(), a_scales.dtype, a_scales.get_device(),
            b.data_ptr(), b.shape, b.stride(), b.dtype, b.get_device(),
            b_scales.data_ptr(), b_scales.shape, b_scales.stride(), b_scales.dtype, b_scales.get_device(),
            out.data_ptr(), out.shape, out.stride(), out.dtype, out.get_device(), config)


def _launch_cached(key, prepare, stream: int) -> None:
    """Launches the call prepared for `key`; on a miss `prepare()` -> (prepared, cacheable) makes it (not
    cached when a converted copy of a_scales lives only for this call)."""
    hit = _launch_cache.get(key)
    if hit is None:
        hit, cacheable = prepare()
        if cacheable:
            if len(_launch_cache) >= _LAUNCH_CACHE_MAX:
                _launch_cache.clear()
            _launch_cache[key] = hit
    _fire(hit, stream)


def _launch(a, a_scales, b, b_scales, out, m: int, n: int, k: int, config: GemmConfig | None) -> None:
    index = a.get_device()
    stream = _raw_stream(index)
    _launch_cached(_launch_key(a, a_scales, b, b_scales, out, config, stream),
                   lambda: _prepare(a, a_scales, b, b_scales, out, m, n, k, config, index, stream), stream)


def _fire(prepared, stream: int) -> None:
    """Launches a prepared call on `stream` (the current stream of its device)."""
    device, function, grid, block, smem, params, cluster, offsets = prepared
    _native.launch(device, function, grid, block, smem, stream, params, cluster, offsets)


SIDE_MODES = {"near": 0, "ignore": 1, "far": 2, "parity": 3}  # (parity: PACKED_BY_PARITY, for measurements)
PACKED_BY_PARITY = 3  # PackedBArgs.mode: queue and rank by CTA parity (side-ignored where the table cannot split)


def side_tile_boxes(side_mask: int, base: int, block_n: int, total_chunks: int, cluster_n: int = 1):
    """The two 4-D TMA maps (as tensor_map arguments: ptr, dtype, dims, strides, box) that load a side-pure tile
    of the pair layout as one box (fp8_gemm.cuh, "Tile boxes"), for chunk offsets c0 = 0 and 1; None where its
    tiles are not such boxes: odd chunk counts, tiles of a number of 16 KiB units that is not a power of two or
    whose side mask bits between 14 and the tile's alignment vary the chunk offset from unit to unit, a base not
    aligned to the tile, or no side mask (plain). In clusters of 2 each CTA multicasts half a tile: the box is
    half the units, or one pair of a one-unit tile."""
    chunks = block_n // 32
    units = chunks // 2
    if not side_mask or chunks % 2 or units & (units - 1) or not (side_mask >> 12) & 1:
        return None
    span = units * 16384
    if side_mask & (span - 1) & ~0x3FFF or base % span or total_chunks % 4:
        return None
    bit13 = (side_mask >> 13) & 1
    box = (BLOCK_K, 32, 2, units)
    if cluster_n == 2:
        box = (BLOCK_K, 32, 2, units // 2) if units >= 2 else (BLOCK_K, 32, 1, 1)
    elif cluster_n != 1:
        return None
    return tuple((base + c0 * 4096, "u8", (BLOCK_K, 32, 2, total_chunks // 4),
                  (BLOCK_K, 8192 + ((c0 ^ bit13) - c0) * 4096, 16384), box) for c0 in (0, 1))


def _queues(packed):
    """[2, width] int32 on the device: the N-blocks each side's queue hands out. An N-block stored on one side
    is in that side's queue; one stored on both (left over by the balance) goes to the queue with fewer."""
    cached = getattr(packed, "_gemm_queues", None)
    if cached is None:
        stored = packed.layout.stored
        only = [[nb for nb in stored[s] if nb not in stored[1 - s]] for s in (0, 1)]
        for nb in sorted(set(stored[0]) & set(stored[1])):
            only[0 if len(only[0]) <= len(only[1]) else 1].append(nb)
        width = max(1, len(only[0]), len(only[1]))
        table = torch.full((2, width), -1, dtype=torch.int32)
        for s in (0, 1):
            table[s, :len(only[s])] = torch.tensor(only[s], dtype=torch.int32)
        cached = (table.to(packed.device), width, (len(only[0]), len(only[1])))
        packed._gemm_queues = cached
    return cached


def packed_split_for(queue_tiles: tuple, ctas: tuple, k_blocks: int, max_split: int = 4, min_k_blocks: int = 16,
                     min_gain: float = 0.015) -> int:
    """Split-K of a packed-B call (1: none): queue q's tiles run on its ctas[q] CTAs, so a queue with fewer
    tiles than CTAs leaves SMs idle (64 x 2112 x 7168 with 64-wide tiles: 33 tiles for 132 SMs). In tile times
    the schedule takes max over q of ceil(tiles_q * S / ctas_q) rounds of ceil(K blocks / S) / K blocks of a
    tile, plus the S - 1 partials the summing unit reads (SPLIT_REDUCE_K); the best S <= max_split with
    `min_k_blocks` K blocks per range and no empty range, if it saves `min_gain`. (H200, events µs, perf-notes
    "packed B session 14": 56 K blocks split in 2-3 ranges of 19-28 gained 15-30%; 12 K blocks in 2 ranges of 6
    lost ~45%, 64 / 128 x 24576 x 1536 with 128-wide tiles, hence the 16.)"""
    def rounds(s):
        return max((_ceil_div(t * s, c) for t, c in zip(queue_tiles, ctas) if t and c), default=0)

    best, best_time = 1, float(rounds(1))
    for s in range(2, max_split + 1):
        per = _ceil_div(k_blocks, s)
        if per < min_k_blocks or (s - 1) * per >= k_blocks:
            continue
        t = rounds(s) * per / k_blocks + (s - 1) * SPLIT_REDUCE_K / (k_blocks * BLOCK_K)
        if t < best_time - 1e-9:
            best, best_time = s, t
    return best if best_time <= rounds(1) * (1.0 - min_gain) else 1


def packed_config(m: int, n: int, k: int, block_n: int, config: GemmConfig | None = None,
                  num_sms: int = 132) -> GemmConfig:
    """The block configuration of a packed-B call: `config` (or gemm_config's choice, adjusted below) on the
    packed tile width, with what the packed path does not have turned off: the tail split; split-K, clusters and
    several K blocks per stage unless `config` asks for them (opt-in: the cluster experiment of docs/packed-b.md,
    and 2 or 4 K blocks per stage, whose chunks follow one another in the packed sequence; not measured yet: a
    config from gemm_config, which picks 2 for thin memory-bound tiles, turns it on too). Without `config` the
    call then picks split-K from its queues (packed_split_for)."""
    cfg = config or gemm_config(m, n, k, num_sms)
    if config is None:
        # 64-row tiles only for M <= 64 and 128 otherwise (how the packed path was measured: the short-K
        # three-warpgroup rule and the 64-row tiles at M > 64 were measured unpacked), and double accumulators
        # by the packed width (gemm_config decided them for its own tile), as measured: memory-bound tiles up to
        # 64 wide (the packed kernel keeps 40 registers for its producer, so wider double accumulators spill)
        cfg = dataclasses.replace(cfg, block_m=64 if m <= 64 else 128,
                                  double_acc=m < COMPUTE_BOUND_M and block_n <= PACKED_DOUBLE_ACC_MAX_BLOCK_N)
    kblocks = cfg.kblocks_per_stage if config and cfg.cluster_n == 1 and k % BLOCK_K == 0 else 1
    stages = max_stages(cfg.block_m, block_n, cfg.tma_store and n % 8 == 0, kblocks)
    return dataclasses.replace(cfg, block_n=block_n, stages=min(cfg.stages, stages) if config else stages,
                               cluster_n=cfg.cluster_n if config else 1, packed_b=True,
                               split_k=cfg.split_k if config else 1, tail_split=1,
                               kblocks_per_stage=kblocks, tma_store=cfg.tma_store and n % 8 == 0)


def packed_plan(m: int, n: int, k: int, block_n: int, lengths: tuple, sm_side, num_sms: int,
                side_mode: str = "near", config: GemmConfig | None = None) -> tuple[GemmConfig, int, tuple, tuple]:
    """(config, mode, ctas, workers) of a packed-B call with queues of `lengths` N-blocks: packed_config, then
    the static schedule (packed_schedule) and, without `config`, split-K for memory-bound calls whose queues
    have fewer tiles than CTAs (packed_split_for; compute-bound tiles keep the kernel without the split path,
    as gemm_config does)."""
    cfg = packed_config(m, n, k, block_n, config, num_sms)
    m_blocks, units = _ceil_div(m, cfg.block_m), num_sms
    if cfg.cluster_n > 1:
        # (an experiment: the clusters, on consecutive M-blocks sharing each B tile, are the schedule's units: by
        # ticket of their first SM's side (near / ignore / far) or by cluster index (parity))
        if m_blocks % cfg.cluster_n or num_sms % cfg.cluster_n:
            _fail(f"packed B in clusters of {cfg.cluster_n} needs the M-blocks ({m_blocks}) and SMs "
                  f"({num_sms}) to be multiples of it")
        m_blocks, units = m_blocks // cfg.cluster_n, num_sms // cfg.cluster_n
    if units < 2 and all(lengths):  # (the kernel runs a queue per CTA: one CTA cannot take both)
        _fail(f"packed B with N-blocks on both sides needs at least 2 CTAs{' (clusters)' if cfg.cluster_n > 1 else ''}"
              f", got {units}")
    mode, ctas, workers = packed_schedule(sm_side, units, SIDE_MODES[side_mode], lengths, m_blocks,
                                          m >= COMPUTE_BOUND_M, cluster=cfg.cluster_n)
    if config is None and m < COMPUTE_BOUND_M and cfg.cluster_n == 1 and cfg.kblocks_per_stage == 1:
        cfg = dataclasses.replace(cfg, split_k=packed_split_for(tuple(q * m_blocks for q in lengths), ctas,
                                                                _ceil_div(k, BLOCK_K)))
    if cfg.split_k > 1:
        mode, ctas, workers = packed_schedule(sm_side, units, SIDE_MODES[side_mode], lengths, m_blocks,
                                              m >= COMPUTE_BOUND_M, cfg.split_k)
    return cfg, mode, ctas, workers


def packed_call_config(m: int, packed, side_mode: str = "near", config: GemmConfig | None = None) -> GemmConfig:
    """The block configuration l2side.gemm runs for `m` rows of A with this PackedB (its split-K included), e.g.
    to run the unpacked kernel with the same blocks: the two give the same bits."""
    from .topology import topology
    index = packed.data.get_device()
    lengths = _queues(packed)[2]
    return packed_plan(m, packed.n, packed.k, packed.block_n, lengths, topology(index).sm_side,
                       _device(index).num_sms, side_mode, config)[0]


def _gemm_packed(a, a_scales, packed, out, config, side_mode: str):
    """l2side.gemm with B from l2side.pack_b: each SM takes the tiles of the N-blocks stored on its side."""
    if side_mode not in SIDE_MODES:
        _fail(f"side_mode must be one of {sorted(SIDE_MODES)}, got {side_mode!r}")
    m, n, k = check_arguments(a, a_scales, None, packed.scales, out, packed=packed)
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    if not m:
        return out
    index = a.get_device()
    stream = _raw_stream(index)
    key = ("packed", packed.serial, _launch_key(a, a_scales, packed.data, packed.scales, out, config, stream),
           side_mode)

    def prepare():
        dev = _device(index)
        table, width, lengths = _queues(packed)
        lay = packed.layout
        from .topology import topology
        topo = topology(index)
        queues = jit.stream_scratch("fp8_gemm.rank_claims", index, stream, 32, torch.int32)  # (17 used)
        cfg, mode, ctas, workers = packed_plan(m, n, k, packed.block_n, lengths, topo.sm_side, dev.num_sms,
                                               side_mode, config)
        grid = dev.num_sms  # (one CTA per SM; in clusters the clusters that fit at once, the schedule's units)
        if cfg.cluster_n > 1:
            grid = min(dev.num_sms, _resident_clusters(dev, n, k, cfg) * cfg.cluster_n)
            if grid < dev.num_sms:
                cfg, mode, ctas, workers = packed_plan(m, n, k, packed.block_n, lengths, topo.sm_side, grid,
                                                       side_mode, config)
        # the packed buffer as rows of 128 bytes, boxes of one chunk (paired) or one tile (plain: contiguous); the
        # kernel's row coordinates are int32. (Kernels built with -DL2SIDE_PACKED_CHUNK_LOADS load every tile by
        # chunks, for A/Bs.)
        chunk_loads = "-DL2SIDE_PACKED_CHUNK_LOADS" in EXTRA_OPTIONS
        if lay.total_chunks * 32 >= 2 ** 31:
            _fail(f"packed B of {lay.nbytes} bytes is too large for the kernel's TMA row coordinates (< 256 GiB)")
        packed_map = jit.tensor_map(packed.base, "u8", (BLOCK_K, lay.total_chunks * 32), (BLOCK_K,),
                                    (BLOCK_K, 32 if lay.paired or cfg.cluster_n > 1 or chunk_loads else cfg.block_n),
                                    swizzle=0)
        tile_maps = None
        if not chunk_loads:
            boxes = side_tile_boxes(lay.side_mask, packed.base, cfg.block_n, lay.total_chunks,  # (plain: mask 0)
                                    cfg.cluster_n)
            try:  # (a driver that refuses the maps' interleaved strides leaves the chunk loads)
                tile_maps = tuple(jit.tensor_map(*box, swizzle=0) for box in boxes) if boxes else None
            except RuntimeError:
                tile_maps = None
        args = packed_b_args(packed.base, lay.side_mask if lay.paired else 0, table.data_ptr(),
                             packed.block_first.data_ptr(), queues.data_ptr(), topo.sm_side, width, lengths,
                             lay.n_blocks, mode, 2 if tile_maps else int(lay.paired), ctas, workers)
        if sum(ctas) * cfg.cluster_n != grid:  # (every rank of the schedule needs its CTA or cluster)
            _fail(f"internal: packed B schedule of {sum(ctas)} units for a grid of {grid} CTAs")
        return _prepare(a, a_scales, None, packed.scales, out, m, n, k, cfg, index, stream, packed_args=args,
                        packed_map=packed_map, tile_maps=tile_maps, packed_grid=grid)

    _launch_cached(key, prepare, stream)
    return out


def _is_packed(b) -> bool:
    from .packed_b import PackedB
    return isinstance(b, PackedB)


def gemm(a, a_scales, b, b_scales=None, out=None, *, config: GemmConfig | None = None, side_mode: str = "near"):
    """D = (a * a_scales) @ (b * b_scales)^T in bfloat16, on torch's current stream (see the module doc).

    b may be a PackedB from l2side.pack_b (then b_scales is omitted: the packed weight holds them): every SM
    then computes the tiles of N-blocks stored on its own L2 side, reading B only from its near side.
    side_mode ("near", "ignore": half of each side's SMs on each side's tiles, "far": every SM on the other
    side's tiles, "parity": queue and rank by CTA index, blind to the SMs) exists for measurements.

    Under torch.compile this goes through the custom ops torch.ops.l2side.fp8_gemm / fp8_gemm_out (which
    have fake implementations), so `torch.compile(fullgraph=True)` traces it (unpacked B only).
    """
    if not isinstance(b, torch.Tensor) and b is not None and _is_packed(b):
        if b_scales is not None:
            _fail("b_scales must be omitted with a packed B (l2side.pack_b keeps them)")
        return _gemm_packed(a, a_scales, b, out, config, side_mode)
    if b_scales is None:
        _fail("b_scales is required (it may be omitted only with a packed B from l2side.pack_b)")
    if torch.compiler.is_compiling():
        if config is not None:
            raise ValueError("config cannot be passed under torch.compile")
        if out is None:
            return torch.ops.l2side.fp8_gemm(a, a_scales, b, b_scales)
        torch.ops.l2side.fp8_gemm_out(a, a_scales, b, b_scales, out)
        return out
    if out is not None:  # fast path: the same tensors as an earlier, validated call
        try:
            stream = _raw_stream(a.get_device())
            hit = _launch_cache.get(_launch_key(a, a_scales, b, b_scales, out, config, stream))
        except Exception:  # noqa: BLE001 (not CUDA tensors, no CUDA: check_arguments says what is wrong)
            hit = None
        if hit is not None:
            _fire(hit, stream)
            return out
    m, n, k = check_arguments(a, a_scales, b, b_scales, out)
    if out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    if m:
        _launch(a, a_scales, b, b_scales, out, m, n, k, config)
    return out


def _register_ops() -> None:

    @torch.library.custom_op("l2side::fp8_gemm", mutates_args=())
    def fp8_gemm_op(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                    b_scales: torch.Tensor) -> torch.Tensor:
        m, n, k = check_arguments(a, a_scales, b, b_scales)
        out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
        if m:
            _launch(a, a_scales, b, b_scales, out, m, n, k, None)
        return out

    @fp8_gemm_op.register_fake
    def _(a, a_scales, b, b_scales):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)

    @torch.library.custom_op("l2side::fp8_gemm_out", mutates_args=("out",))
    def fp8_gemm_out_op(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                        out: torch.Tensor) -> None:
        m, n, k = check_arguments(a, a_scales, b, b_scales, out)
        if m:
            _launch(a, a_scales, b, b_scales, out, m, n, k, None)

    @fp8_gemm_out_op.register_fake
    def _(a, a_scales, b, b_scales, out):
        return None


_register_ops()
