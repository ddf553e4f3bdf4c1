// Read bandwidth of a side-aware buffer, by which L2 side each SM reads from (python -m l2side info).
// Chunk pairs (2j, 2j+1) of 4 KiB are on opposite sides; CTAs take batches of pairs from a counter.
//   mode 0 (naive): a CTA reads both chunks of its pairs       (every SM reads both sides)
//   mode 1 (near):  a CTA reads the chunk of each pair on its SM's side
//   mode 2 (far):   a CTA reads the chunk on the other side
// In modes 1 and 2 each side has its own counter: each half of the SMs walks all pairs, reading its chunk
// of each, so every mode reads the whole buffer. `passes` repeats the walk (an L2-resident buffer is read
// many times per launch, so launch overhead does not dominate).
#include <cstdint>

#include "sm_side.cuh"

constexpr int kThreads = 256;             // 256 x 16 B = one 4 KiB chunk per CTA pass
constexpr int kPairsPerGrab = 32;         // 128-256 KiB per grab: the counters stay far from a bottleneck
constexpr int kInFlight = 4;              // pairs whose loads are issued before the first use

extern "C" __global__ void __launch_bounds__(kThreads) l2side_side_read(
    const uint4* __restrict__ data, unsigned long long n_pairs, unsigned long long passes, unsigned long long side_mask,
    const signed char* __restrict__ sm_side, int mode, unsigned long long* counters, unsigned* sink) {
  __shared__ unsigned long long grabbed;
  const int my_side = sm_side[l2side::sm_id()] < 0 ? 0 : sm_side[l2side::sm_id()];
  const int want = mode == 2 ? my_side ^ 1 : my_side;
  unsigned long long* counter = counters + (mode == 0 ? 0 : my_side);
  const uintptr_t base = reinterpret_cast<uintptr_t>(data);
  uint4 acc = make_uint4(0, 0, 0, 0);
  while (true) {
    if (threadIdx.x == 0) grabbed = atomicAdd(counter, (unsigned long long)kPairsPerGrab);
    __syncthreads();
    const unsigned long long first = grabbed;
    __syncthreads();
    if (first >= n_pairs * passes) break;
    for (int group = 0; group < kPairsPerGrab; group += kInFlight) {
      uint4 v[2 * kInFlight];
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) {
        const unsigned long long index = first + group + i;
        v[2 * i] = v[2 * i + 1] = make_uint4(0, 0, 0, 0);
        if (index >= n_pairs * passes) continue;
        const unsigned long long even = 2 * (index % n_pairs);
        if (mode == 0) {
          v[2 * i] = __ldcg(data + even * kThreads + threadIdx.x);
          v[2 * i + 1] = __ldcg(data + (even + 1) * kThreads + threadIdx.x);
        } else {
          const int even_side = __popcll((base + even * 4096ull) & side_mask) & 1;
          v[2 * i] = __ldcg(data + (even + (even_side ^ want)) * kThreads + threadIdx.x);
        }
      }
#pragma unroll
      for (int i = 0; i < 2 * kInFlight; ++i) {
        acc.x ^= v[i].x; acc.y ^= v[i].y; acc.z ^= v[i].z; acc.w ^= v[i].w;
      }
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) *sink = 1;  // keeps the loads; practically never
}
