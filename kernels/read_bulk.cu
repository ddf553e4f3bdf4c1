// The read-only floor of a memory-bound benchmark row (benchmarks/bench_gemm.py; variants in scripts/floor_check.py):
// the bytes read once with TMA bulk copies into shared memory, the load path the GEMM itself uses. On the H100 it
// reads 2-11% faster than kernels/read_stream.cu's ld.global.cg stream (docs/perf-notes.md, session 19). One thread
// per CTA keeps kStages chunks of kChunk bytes in flight; chunk c of the buffer goes to CTA c mod gridDim.x.
// Nothing is read back from shared memory: the copies land and are overwritten. The macros below set the chunk and
// the depth (defaults: 16 KiB x 8 = 128 KiB in flight per CTA, one CTA per SM).
#include <cstdint>

#ifndef L2SIDE_READ_BULK_CHUNK
#define L2SIDE_READ_BULK_CHUNK 16384
#endif
#ifndef L2SIDE_READ_BULK_STAGES
#define L2SIDE_READ_BULK_STAGES 8
#endif
constexpr unsigned kChunk = L2SIDE_READ_BULK_CHUNK;   // bytes per bulk copy (a multiple of 16)
constexpr int kStages = L2SIDE_READ_BULK_STAGES;      // copies in flight per CTA

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void wait_parity(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

// data: 16-byte aligned; bytes: a multiple of 16. Launch with 32 threads and kChunk * kStages bytes of dynamic
// shared memory.
extern "C" __global__ void __launch_bounds__(32) l2side_read_bulk(const char* __restrict__ data,
                                                                  unsigned long long bytes) {
  extern __shared__ __align__(128) unsigned char stage[];
  __shared__ __align__(8) uint64_t full[kStages];
  if (threadIdx.x != 0) return;
  const unsigned long long chunks = (bytes + kChunk - 1) / kChunk;
  for (int s = 0; s < kStages; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[s])) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");

  auto issue = [&](unsigned long long c, int s) {
    const unsigned long long offset = c * kChunk;
    const unsigned long long left = bytes - offset;
    const unsigned size = left < kChunk ? static_cast<unsigned>(left) : kChunk;
    bulk_load(smem_addr(stage + s * kChunk), data + offset, size, smem_addr(&full[s]));
  };
  // the t-th chunk of this CTA is chunk blockIdx.x + t * gridDim.x, in stage t mod kStages
  unsigned long long c = blockIdx.x;
  for (int s = 0; s < kStages && c < chunks; ++s, c += gridDim.x) issue(c, s);
  unsigned long long t = 0;
  for (unsigned long long done = blockIdx.x; done < chunks; done += gridDim.x, ++t) {
    const int s = static_cast<int>(t % kStages);
    wait_parity(smem_addr(&full[s]), static_cast<unsigned>((t / kStages) & 1));
    if (c < chunks) {
      issue(c, s);
      c += gridDim.x;
    }
  }
}
