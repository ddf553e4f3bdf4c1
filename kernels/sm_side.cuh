// Which SM a thread runs on, and that SM's L2 side, for every l2side kernel.
#pragma once

namespace l2side {

// The hardware SM id (%smid): what the topology probe's per-SM tables are indexed by.
__device__ __forceinline__ unsigned sm_id() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// The side of this SM from a table of 4 words of 64 bits (bit i: side of the SM whose id is i), the form
// kernels take the probe's sides in by value; ids past 255 are side 0.
template <class Word>
__device__ __forceinline__ unsigned sm_side(const Word* bits, unsigned id) {
  return id < 256 ? static_cast<unsigned>((bits[id >> 6] >> (id & 63)) & 1u) : 0u;
}
template <class Word>
__device__ __forceinline__ unsigned sm_side(const Word* bits) { return sm_side(bits, sm_id()); }

}  // namespace l2side
