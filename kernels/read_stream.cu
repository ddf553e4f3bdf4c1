// A read-only stream with ld.global.cg (no L1 allocation, so L2 and DRAM see every byte): bench_gemm's floor until
// session 19, now one of the readers scripts/floor_check.py compares (kernels/read_bulk.cu's TMA bulk copies read
// faster). It writes nothing unless a practically impossible fold appears (the loads must not be dead).
// Grid-stride with kUnroll loads in flight per thread: 4 x 16 B x 2048 threads = 128 KiB per SM in flight.
#include <cstdint>

constexpr int kThreads = 512;
constexpr int kUnroll = 4;

extern "C" __global__ void __launch_bounds__(kThreads) l2side_read_stream(
    const uint4* __restrict__ data, unsigned long long n, unsigned* sink) {
  const unsigned long long stride = (unsigned long long)gridDim.x * kThreads;
  unsigned long long i = (unsigned long long)blockIdx.x * kThreads + threadIdx.x;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcg(data + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w;
    }
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcg(data + i);
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) *sink = 1;
}
