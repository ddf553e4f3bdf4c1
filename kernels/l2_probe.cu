// L2 side probes: which L2 partition ("side") an SM is on, which address bits flip the side inside a
// 2 MiB page, and which side a physical page starts on. Compiled to PTX once (any GPU) and loaded by the
// native allocator. Every measurement is a chain of dependent atomics timed with clock64: an atomic must
// reach the address's home L2 slice (~300 cycles on an H100 when it is on the SM's side, ~500 when not),
// whereas plain L2 reads of far lines are served from a near-side copy and show no difference.

#include "sm_side.cuh"

__device__ __forceinline__ unsigned l2side_nsmid() {
  unsigned n;
  asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
  return n;
}

__device__ __forceinline__ unsigned l2side_atomic_read(const char* p) {
  unsigned v;
  asm volatile("atom.global.add.u32 %0, [%1], 0;" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Average cycles of one atomic at `address`, the best of `trials` chains of `reps`. The atomics add 0, so
// live data is left as it was; each one's address depends on the value the previous one returned.
__device__ __forceinline__ unsigned l2side_chain_latency(const char* address, int reps, int trials) {
  unsigned best = 0xffffffffu;
  unsigned v = l2side_atomic_read(address);  // brings the line into L2
  const char* p = address + (v == 0x7fffffffu ? 4 : 0);
  for (int t = 0; t < trials; ++t) {
    long long start = clock64();
    for (int r = 0; r < reps; ++r) {
      v = l2side_atomic_read(p);
      p = address + (v == 0x7fffffffu ? 4 : 0);  // a data dependency the compiler cannot remove
    }
    long long stop = clock64();
    unsigned cycles = static_cast<unsigned>((stop - start) / reps);
    best = cycles < best ? cycles : best;
  }
  if (p == nullptr) asm volatile("trap;");  // keeps the chain alive; never taken
  return best;
}

// One measuring block per SM: blocks claim their SM; later blocks on a claimed SM leave at once.
// out[smid * n_offsets + k] = cycles to reach base + offsets[k] from that SM. Each SM walks the offsets
// starting at its own index so that concurrent SMs mostly hit different addresses.
extern "C" __global__ void l2side_sm_latency(const char* base, const unsigned* offsets, int n_offsets,
                                             int reps, int trials, unsigned* claim, unsigned* out,
                                             unsigned* nsmid_out) {
  if (threadIdx.x != 0) return;
  const unsigned smid = l2side::sm_id();
  if (blockIdx.x == 0) *nsmid_out = l2side_nsmid();
  if (atomicCAS(claim + smid, 0u, 1u) != 0u) return;
  for (int i = 0; i < n_offsets; ++i) {
    const int k = (i + static_cast<int>(smid)) % n_offsets;
    out[smid * n_offsets + k] = l2side_chain_latency(base + offsets[k], reps, trials);
  }
}

// Side of the first 4 KiB chunk of each of `n_pages` pages mapped at base + i * page_stride, relative to
// SM 0's side. Block b measures page b % n_pages from whatever SM it runs on, comparing the page's chunk 0
// with the chunk at `flip_offset` (on the other side by construction). vote = side, or 255 = no decision.
extern "C" __global__ void l2side_page_sides(const char* base, int n_pages, unsigned long long page_stride,
                                             unsigned flip_offset, int reps, int trials, int min_gap,
                                             const signed char* sm_side, unsigned char* votes) {
  if (threadIdx.x != 0) return;
  const int page = blockIdx.x % n_pages;
  const char* p = base + page * page_stride;
  const int my_side = sm_side[l2side::sm_id()];
  const int first = static_cast<int>(l2side_chain_latency(p, reps, trials));
  const int flipped = static_cast<int>(l2side_chain_latency(p + flip_offset, reps, trials));
  const int gap = first > flipped ? first - flipped : flipped - first;
  unsigned char vote = 255;
  if (my_side >= 0 && gap >= min_gap) vote = static_cast<unsigned char>(my_side ^ (first < flipped ? 0 : 1));
  votes[blockIdx.x] = vote;
}

// Side (relative to SM 0's) of arbitrary addresses, e.g. of live tensors: block b measures address
// b % n from its SM; near when the latency is under `threshold` cycles. vote = side, or 255 = no SM side.
extern "C" __global__ void l2side_address_sides(const unsigned long long* addresses, int n, int reps, int trials,
                                                int threshold, const signed char* sm_side, unsigned char* votes) {
  if (threadIdx.x != 0) return;
  const char* p = reinterpret_cast<const char*>(addresses[blockIdx.x % n]);
  const int my_side = sm_side[l2side::sm_id()];
  const int cycles = static_cast<int>(l2side_chain_latency(p, reps, trials));
  votes[blockIdx.x] = my_side < 0 ? 255 : static_cast<unsigned char>(my_side ^ (cycles < threshold ? 0 : 1));
}
