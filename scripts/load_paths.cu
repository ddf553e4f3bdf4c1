// How fast one producer thread per SM can stream 16 KiB stages into shared memory by each load path the
// FP8 GEMM uses or could use (scripts/load_paths.py; issue 4: why packed B loads slower than TMA tiles).
// Each CTA (one per SM) keeps kStages (a launch argument, <= kMaxStages) stages in flight: thread 0 waits for a stage's bytes, then refills it.
//   mode 0  TMA tensor tile: 128 rows x 128 bytes of a [rows, row_bytes] matrix (the unpacked B tile), in boxes of
//           box_rows rows
//   mode 1  4 bulk copies of 4 KiB, contiguous (a packed tile, plain layout)
//   mode 2  1 bulk copy of 16 KiB, contiguous
//   mode 3  4 bulk copies of 4 KiB from the SM's own L2 side (side-s chunk i at 2i + (side(2i) ^ s))
//   mode 4  as 3 from the other side
//   mode 5  as 3 with the side by CTA parity (side ignored)
//   mode 6  as 3 with chunks 0, 2 near and 1, 3 far (both sides, same chunk pattern: is it one side per SM
//           or the 8 KiB stride that is slower?)
//   mode 7  as 0 with every CTA on the same tiles in the same order (the A panel of a small-M GEMM)
// Stage g of CTA b is unit (b * iters + g) mod units: a CTA walks its own contiguous stretch, like a GEMM
// CTA walking K, and a buffer smaller than the L2 is read many times (L2-resident).
#include <cuda.h>

#include <cstdint>

#include "fp8_gemm/ptx.cuh"
#include "sm_side.cuh"

namespace lp = l2side::ptx;

constexpr uint32_t kMaxStages = 13;   // 13 x 16 KiB fits the 227 KiB of shared memory
constexpr uint32_t kStageBytes = 16384;

extern "C" __global__ void __launch_bounds__(128, 1) l2side_load_paths(
    const __grid_constant__ CUtensorMap tmap, const uint8_t* base, uint64_t side_mask, uint64_t sm_bits0,
    uint64_t sm_bits1, uint64_t sm_bits2, uint64_t sm_bits3, uint32_t mode, uint32_t iters, uint32_t units,
    uint32_t k_blocks, uint32_t kStages, uint32_t box_rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kMaxStages * kStageBytes);
  if (threadIdx.x != 0) return;
  for (uint32_t s = 0; s < kStages; ++s) lp::mbar_init(full + s, 1);
  lp::mbar_init_fence();
  if (mode == 0 || mode == 7) lp::prefetch_tensor_map(&tmap);
  const uint64_t bits[4] = {sm_bits0, sm_bits1, sm_bits2, sm_bits3};
  const uint32_t own = l2side::sm_side(bits);
  const uint32_t side = mode == 3 ? own : mode == 4 ? own ^ 1u : (blockIdx.x & 1u);
  for (uint32_t g = 0; g < iters; ++g) {
    const uint32_t s = g % kStages;
    if (g >= kStages) lp::mbar_wait(full + s, ((g / kStages) - 1) & 1);
    uint8_t* dst = smem + s * kStageBytes;
    lp::mbar_arrive_expect_tx(full + s, kStageBytes);
    // mode 7: every CTA streams the same tiles at about the same time (the small-M GEMM's A: one panel read by
    // every SM), the others each CTA its own range
    const uint64_t unit = (mode == 7 ? g : static_cast<uint64_t>(blockIdx.x) * iters + g) % units;
    if (mode == 0 || mode == 7) {
      const uint32_t row_block = static_cast<uint32_t>(unit / k_blocks), kb = static_cast<uint32_t>(unit % k_blocks);
      // the 128-row tile as 128 / box_rows boxes (the thin tiles of a small-M GEMM load 16- to 64-row boxes)
      for (uint32_t r = 0; r < 128; r += box_rows)
        lp::tma_load_2d(dst + r * 128, &tmap, full + s, static_cast<int32_t>(kb * 128),
                        static_cast<int32_t>(row_block * 128 + r));
    } else if (mode == 1) {
      for (uint32_t p = 0; p < 4; ++p) lp::bulk_load(dst + p * 4096, base + unit * kStageBytes + p * 4096, 4096, full + s);
    } else if (mode == 2) {
      lp::bulk_load(dst, base + unit * kStageBytes, kStageBytes, full + s);
    } else {
      for (uint32_t p = 0; p < 4; ++p) {
        const uint64_t even = 2 * (unit * 4 + p);
        const uint64_t addr = reinterpret_cast<uint64_t>(base) + even * 4096;
        const uint32_t want = mode == 6 ? own ^ (p & 1u) : side;
        const uint64_t chunk = even + ((__popcll(addr & side_mask) & 1u) ^ want);
        lp::bulk_load(dst + p * 4096, base + chunk * 4096, 4096, full + s);
      }
    }
  }
  for (uint32_t g = iters > kStages ? iters - kStages : 0; g < iters; ++g)
    lp::mbar_wait(full + g % kStages, (g / kStages) & 1);
#endif
}
