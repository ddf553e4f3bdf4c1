// Persistent tile schedulers of the FP8 GEMM. A CTA asks `next(m_block, n_block)` until it returns false;
// the producer warp and the math warpgroups of a CTA walk the same sequence independently.
//
// GroupedScheduler: tiles in groups of kGroupN consecutive N-blocks; inside a group the M-block varies
// fastest. The ~num_SMs tiles in flight at once then share a few B panels (kept in L2) and stream A.
// Tile t goes to CTA t % gridDim.x (static round robin: every tile costs the same).
//
// The side-aware scheduler of the packed-B GEMM plugs in here with the same interface.
#pragma once
#include <cstdint>

namespace l2side::fp8_gemm {

__host__ __device__ constexpr uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

template <uint32_t SHAPE_N, uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t kGroupN>
struct GroupedScheduler {
  static constexpr uint32_t kNumNBlocks = ceil_div(SHAPE_N, BLOCK_N);

  uint32_t num_m_blocks, num_tiles, tile;

  __device__ __forceinline__ explicit GroupedScheduler(uint32_t shape_m)
      : num_m_blocks(ceil_div(shape_m, BLOCK_M)), num_tiles(ceil_div(shape_m, BLOCK_M) * kNumNBlocks),
        tile(blockIdx.x) {}

  // Tile t -> (m_block, n_block); exposed for tests of the order.
  __device__ __forceinline__ static void tile_coords(uint32_t t, uint32_t num_m_blocks, uint32_t& m_block,
                                                     uint32_t& n_block) {
    const uint32_t per_group = num_m_blocks * kGroupN;
    const uint32_t group = t / per_group;
    const uint32_t first_n = group * kGroupN;
    const uint32_t in_group = t - group * per_group;
    m_block = in_group % num_m_blocks;  // (the last group may be narrower: t < num_tiles keeps it inside)
    n_block = first_n + in_group / num_m_blocks;
  }

  __device__ __forceinline__ bool next(uint32_t& m_block, uint32_t& n_block) {
    if (tile >= num_tiles) return false;
    tile_coords(tile, num_m_blocks, m_block, n_block);
    tile += gridDim.x;
    return true;
  }
};

}  // namespace l2side::fp8_gemm
