// Persistent tile schedulers of the FP8 GEMM. A CTA asks `next(m_block, n_block)` until it returns false;
// the producer warp and the math warpgroups of a CTA walk the same sequence independently.
//
// GroupedScheduler: tiles in groups of kGroupM consecutive M-blocks (0: all of them); inside a group the
// M-block varies fastest, then the N-block. The ~num_SMs tiles in flight at once then form a block of
// kGroupM x (SMs / kGroupM) tiles, which read kGroupM A panels and SMs / kGroupM B panels at about the same
// K offset: with 8 x 16.5 on 132 SMs, 91% of the tile loads hit in L2 (32 x 4, all M-blocks first, was 83%
// on paper and 70% measured at M=4096). Tile t goes to CTA t % gridDim.x (static round robin: every tile
// costs the same).
//
// kMaxSplit > 1 (split along K, fp8_gemm.cuh sums the partial tiles): tiles [0, tail_first) are one unit
// each; every later tile is `splits` units (run-time, <= kMaxSplit), one per contiguous range of K blocks,
// consecutive so they run at the same time. tail_first = 0 is plain split-K (small M, fewer tiles than
// SMs); tail_first = the tiles of the full waves splits only the last, partial wave's tiles, so it ends
// sooner (a stream-K-like tail: 4096 x 7168 x 16384 is 13.6 waves of 128 x 128 tiles; opt-in, it measured
// slower on the H100: docs/perf-notes.md, session 4).
//
// The side-aware scheduler of the packed-B GEMM plugs in here with the same interface.
#pragma once
#include <cstdint>

namespace l2side::fp8_gemm {

__host__ __device__ constexpr uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// kClusterN > 1: the CTAs of a cluster take N-blocks c*j .. c*j + c-1 of the same M-block (they share the A
// tile, each loading 1/c of it with TMA multicast); the scheduler then walks units of kClusterN N-blocks,
// one unit per cluster at a time, so both CTAs of a cluster always run the same number of tiles.
// (The launcher uses clusters only when the N-block count is a multiple of kClusterN.)
template <uint32_t SHAPE_N, uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t kGroupM, uint32_t kClusterN = 1,
          uint32_t kMaxSplit = 1>
struct GroupedScheduler {
  static constexpr uint32_t kNumNBlocks = ceil_div(SHAPE_N, BLOCK_N);
  static constexpr uint32_t kNumNUnits = kNumNBlocks / kClusterN;
  static_assert(kNumNBlocks % kClusterN == 0, "the N-block count must be a multiple of the cluster size");
  static_assert(kMaxSplit == 1 || kClusterN == 1, "split-K runs without clusters");

  uint32_t num_m_blocks, group_m, tail_first, splits, num_units, unit, rank;

  __device__ __forceinline__ GroupedScheduler(uint32_t shape_m, uint32_t cluster_rank, uint32_t tail_first_ = 0,
                                              uint32_t splits_ = 1)
      : num_m_blocks(ceil_div(shape_m, BLOCK_M)),
        group_m(kGroupM == 0 ? ceil_div(shape_m, BLOCK_M) : kGroupM),
        unit(blockIdx.x / kClusterN), rank(cluster_rank) {
    const uint32_t tiles = num_m_blocks * kNumNUnits;
    splits = kMaxSplit > 1 ? splits_ : 1;
    tail_first = splits > 1 ? min(tail_first_, tiles) : tiles;
    num_units = tail_first + (tiles - tail_first) * splits;
  }

  // Unit u -> (m_block, N-unit); exposed for tests of the order.
  __device__ __forceinline__ static void unit_coords(uint32_t u, uint32_t num_m_blocks, uint32_t group_m,
                                                     uint32_t& m_block, uint32_t& n_unit) {
    const uint32_t per_group = group_m * kNumNUnits;
    const uint32_t group = u / per_group;
    const uint32_t first_m = group * group_m;
    const uint32_t width = min(group_m, num_m_blocks - first_m);  // the last group may be narrower
    const uint32_t in_group = u - group * per_group;
    m_block = first_m + in_group % width;
    n_unit = in_group / width;
  }

  // The next unit: its tile (index in this order), its K range `split` of `n_splits`.
  __device__ __forceinline__ bool next(uint32_t& m_block, uint32_t& n_block, uint32_t& tile, uint32_t& split,
                                       uint32_t& n_splits) {
    if (unit >= num_units) return false;
    uint32_t n_unit;
    if (unit < tail_first) {
      tile = unit, split = 0, n_splits = 1;
    } else {
      const uint32_t u = unit - tail_first;
      tile = tail_first + u / splits, split = u % splits, n_splits = splits;
    }
    unit_coords(tile, num_m_blocks, group_m, m_block, n_unit);
    n_block = n_unit * kClusterN + rank;
    unit += gridDim.x / kClusterN;
    return true;
  }
};

}  // namespace l2side::fp8_gemm
