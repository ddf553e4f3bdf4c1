// l2side elementwise template: the loops every side-aware 1:1 kernel shares.
//
// A kernel is a generated `struct Op` (see l2side/elementwise/_codegen.py) with
//   VEC            elements per thread per 4 KiB chunk (16 bytes of the widest tensor)
//   CHUNK_ELEMS    elements per chunk = kThreads * VEC (4 KiB of the widest tensor)
//   Args           the by-value kernel argument: `Common _l2_c` first, then tensors and scalars
//   Regs           one thread's loaded vector of every input
//   load<ROWS, ALIGNED>(args, e, count, regs, policy)   loads elements [e, e + count)
//   compute_store<ROWS, ALIGNED>(args, e, count, regs)  runs the body and stores the outputs
// and this header provides the two work loops:
//   side_walk   chunk pairs (2j, 2j+1) are on opposite L2 sides; a CTA on side s takes the chunk of each
//               pair that is on s (one AND + POPC + XOR on the chunk's address), pairs handed out by two
//               per-side ticket counters, each side helping the other once its own tickets run out.
//   stride_walk side-agnostic persistent grid-stride loop (memory that is not side-aware).
// Correctness never depends on the side formula: every chunk belongs to exactly one counter.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace l2side_ew {

using u64 = unsigned long long;
using i64 = long long;

constexpr int kThreads = 256;          // threads per CTA; one 16-byte vector each per chunk
constexpr int kChunkBytes = 4096;      // the side never changes inside 4 KiB
constexpr int kVectorBytes = 16;

enum Mode : int { kNear = 0, kOff = 1, kFar = 2 };

// Fields shared by every kernel. Every field is 8 bytes: the host packs it with struct format '<...Q'.
struct Common {
  u64 n;               // logical elements of the iteration (numel of every 1:1 tensor)
  u64 cols;            // the last dimension (row length of the rows form; `cols` in bodies)
  u64 side_mask;       // hash_mask | 1 << 21 (side path only)
  u64 drive;           // address of the tensor whose 4 KiB chunks choose the side (side path only)
  u64 drive_row_pitch; // 0: the driving tensor is contiguous; else bytes between its rows (rows form only,
                       // a multiple of 8 KiB), each row 2^drive_row_shift chunks
  u64 drive_row_shift;
  u64 n_chunks;        // ceil(n / CHUNK_ELEMS)
  u64 n_pairs;         // ceil(n_chunks / 2)
  u64 big_tickets;     // tickets [0, big_tickets) hand out big_pairs pairs each, later ones small_pairs
  u64 big_pairs;
  u64 small_pairs;
  u64 n_tickets;       // per counter
  u64* counters;       // u64[4]: ticket counters of side 0 and 1, CTAs done; zero between launches
  u64 mode;            // Mode
  u64 sm_side_bits[4]; // bit i: L2 side of the SM whose %smid is i (ids >= 256: side 0)
};

// ---------------------------------------------------------------------------------------------------
// Storage types and the value types bodies compute with.
template <class T> struct Conv {                         // integers, float, double: unchanged
  using type = T;
  __device__ __forceinline__ static type load(T v) { return v; }
  template <class C> __device__ __forceinline__ static T store(C v) { return static_cast<T>(v); }
};
template <> struct Conv<__nv_bfloat16> {
  using type = float;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  template <class C> __device__ __forceinline__ static __nv_bfloat16 store(C v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <> struct Conv<__half> {
  using type = float;
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  template <class C> __device__ __forceinline__ static __half store(C v) { return __float2half_rn(static_cast<float>(v)); }
};
template <> struct Conv<__nv_fp8_e4m3> {
  using type = float;
  __device__ __forceinline__ static float load(__nv_fp8_e4m3 v) { return static_cast<float>(v); }
  template <class C> __device__ __forceinline__ static __nv_fp8_e4m3 store(C v) {
    __nv_fp8_e4m3 r;
    r.__x = __nv_cvt_float_to_fp8(static_cast<float>(v), __NV_SATFINITE, __NV_E4M3);  // RN, saturating
    return r;
  }
};
template <> struct Conv<__nv_fp8_e5m2> {
  using type = float;
  __device__ __forceinline__ static float load(__nv_fp8_e5m2 v) { return static_cast<float>(v); }
  template <class C> __device__ __forceinline__ static __nv_fp8_e5m2 store(C v) {
    __nv_fp8_e5m2 r;
    r.__x = __nv_cvt_float_to_fp8(static_cast<float>(v), __NV_SATFINITE, __NV_E5M2);
    return r;
  }
};
template <class T> struct Native {                       // compute="native": storage types as they are
  using type = T;
  __device__ __forceinline__ static T load(T v) { return v; }
  __device__ __forceinline__ static T store(T v) { return v; }
};

// ---------------------------------------------------------------------------------------------------
// Vectors: N elements of T held as raw bits (N * sizeof(T) in {1, 2, 4, 8, 16}).
template <int BYTES> struct Bits;
template <> struct alignas(16) Bits<16> { uint4 v; };
template <> struct alignas(8) Bits<8> { uint2 v; };
template <> struct alignas(4) Bits<4> { unsigned v; };
template <> struct alignas(2) Bits<2> { unsigned short v; };
template <> struct alignas(1) Bits<1> { unsigned char v; };

template <class T, int N> struct alignas(sizeof(T) * N) Vec {
  T e[N];
};

__device__ __forceinline__ u64 evict_first_policy() {
  u64 policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// Streaming load of an input: L1 not allocated, L2 evict-first (inputs are read once).
template <int BYTES>
__device__ __forceinline__ Bits<BYTES> load_stream(const void* p, u64 policy) {
  Bits<BYTES> b;
  if constexpr (BYTES == 16) {
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(b.v.x), "=r"(b.v.y), "=r"(b.v.z), "=r"(b.v.w) : "l"(p), "l"(policy));
  } else if constexpr (BYTES == 8) {
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
                 : "=r"(b.v.x), "=r"(b.v.y) : "l"(p), "l"(policy));
  } else if constexpr (BYTES == 4) {
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;" : "=r"(b.v) : "l"(p), "l"(policy));
  } else if constexpr (BYTES == 2) {
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.u16 %0, [%1], %2;" : "=h"(b.v) : "l"(p), "l"(policy));
  } else {
    unsigned short w;
    asm volatile("ld.global.L1::no_allocate.L2::cache_hint.u8 %0, [%1], %2;" : "=h"(w) : "l"(p), "l"(policy));
    b.v = static_cast<unsigned char>(w);
  }
  return b;
}

template <int BYTES>
__device__ __forceinline__ Bits<BYTES> load_plain(const void* p) {
  return *reinterpret_cast<const Bits<BYTES>*>(p);
}

template <int BYTES>
__device__ __forceinline__ void store_plain(void* p, const Bits<BYTES>& b) {
  *reinterpret_cast<Bits<BYTES>*>(p) = b;
}

template <class To, class From>
__device__ __forceinline__ To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

// ---------------------------------------------------------------------------------------------------
// a / d for a < 2^52, d >= 1 (element indices): a double multiply by 1/d (hoisted out of the loops, d is a
// kernel parameter) and one correction each way, ~10 instructions; a u64 division is a ~60-instruction
// routine, and it ran per vector in the rows-form and group kernels. It costs a few registers: the generator
// sets L2SIDE_EW_FAST_DIV 0 where that would spill (>= 3 CTAs per SM with unroll >= 4).
__device__ __forceinline__ u64 div_u64(u64 a, u64 d) {
#if defined(L2SIDE_EW_FAST_DIV) && !L2SIDE_EW_FAST_DIV
  return a / d;
#else
  const double inv = 1.0 / static_cast<double>(d);
  u64 q = static_cast<u64>(static_cast<double>(a) * inv);   // within 1 of a / d: |error of a * inv| < 1
  const i64 rem = static_cast<i64>(a) - static_cast<i64>(q * d);
  if (rem < 0) --q;
  else if (rem >= static_cast<i64>(d)) ++q;
  return q;
#endif
}

// Index arithmetic. Flat form: every tensor is contiguous and element e is at offset e. Rows form: the
// logical shape is [rows, cols]; tensor t's element (r, k) is at r * rs_t + k (last dim contiguous).
template <bool ROWS>
__device__ __forceinline__ i64 offset_of(const Common& c, u64 e, i64 row_stride) {
  if constexpr (ROWS) {
    const u64 row = div_u64(e, c.cols);
    return static_cast<i64>(row) * row_stride + static_cast<i64>(e - row * c.cols);
  } else {
    return static_cast<i64>(e);
  }
}

// A thread's VEC elements [e, e + VEC) of tensor `base`. FAST: one vector access when count == VEC (the
// host checked alignment, and in the rows form that cols % VEC == 0), nothing when count == 0. Otherwise
// element by element (unaligned memory, the partial last vector).
template <class T, int VEC, bool ROWS, bool FAST, bool STREAM>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* base, i64 rs, const Common& c, u64 e, int count,
                                                u64 policy) {
  Bits<sizeof(T) * VEC> zero{};
  Vec<T, VEC> v = bit_cast<Vec<T, VEC>>(zero);
  if constexpr (FAST) {
    if (count > 0) {
      const T* p = base + offset_of<ROWS>(c, e, rs);
      if constexpr (STREAM) v = bit_cast<Vec<T, VEC>>(load_stream<sizeof(T) * VEC>(p, policy));
      else v = bit_cast<Vec<T, VEC>>(load_plain<sizeof(T) * VEC>(p));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (i < count) v.e[i] = base[offset_of<ROWS>(c, e + i, rs)];
  }
  return v;
}

template <class T, int VEC, bool ROWS, bool FAST>
__device__ __forceinline__ void store_vec(T* base, i64 rs, const Common& c, u64 e, int count, const Vec<T, VEC>& v) {
  if constexpr (FAST) {
    store_plain<sizeof(T) * VEC>(base + offset_of<ROWS>(c, e, rs), bit_cast<Bits<sizeof(T) * VEC>>(v));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (i < count) base[offset_of<ROWS>(c, e + i, rs)] = v.e[i];
  }
}

// Group tensors (one value per GROUP elements along the last dim): logical shape [rows, cols / GROUP],
// element (r, k) at r * stride_row + k * stride_col.
__device__ __forceinline__ i64 group_offset(const Common& c, u64 group, u64 groups_per_row, i64 stride_row,
                                            i64 stride_col) {
  const u64 r = div_u64(group, groups_per_row);
  return static_cast<i64>(r) * stride_row + static_cast<i64>(group - r * groups_per_row) * stride_col;
}

// Reductions over the TPG consecutive lanes that hold one group (TPG a power of two <= 32).
template <int TPG, class T>
__device__ __forceinline__ T group_reduce_max(T v) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <int TPG, class T>
__device__ __forceinline__ T group_reduce_min(T v) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}
template <int TPG, class T>
__device__ __forceinline__ T group_reduce_sum(T v) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// (kernels/sm_side.cuh has the same for the library's kernels; this header stays self-contained: it
// compiles with only its own folder on the include path)
__device__ __forceinline__ unsigned smid() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__device__ __forceinline__ int my_side(const Common& c) {
  const unsigned id = smid();
  return id < 256 ? static_cast<int>((c.sm_side_bits[id >> 6] >> (id & 63)) & 1ull) : 0;
}

// Where chunk `chunk` of the driving tensor starts: contiguous, or (rows form) rows of a power-of-two number
// of chunks (a row-strided input such as either half of silu_and_mul's input). The flat kernels keep the
// one-multiply form: a run-time division here cost the fp8 quantisation kernel 10% (H100, 1 GiB).
template <bool ROWS>
__device__ __forceinline__ u64 drive_chunk_address(const Common& c, u64 chunk) {
  if constexpr (ROWS) {
    if (c.drive_row_pitch != 0) {
      const u64 row = chunk >> c.drive_row_shift;
      return c.drive + row * c.drive_row_pitch +
             (chunk - (row << c.drive_row_shift)) * static_cast<u64>(kChunkBytes);
    }
  }
  return c.drive + chunk * static_cast<u64>(kChunkBytes);
}

// Of pair j (chunks 2j, 2j+1 of the driving tensor), which one counter `ctr` owns: near/far: the one on
// side ctr (bit 12 is in the mask, so the two are on opposite sides); off: simply chunk 2j + ctr.
template <bool ROWS>
__device__ __forceinline__ u64 chunk_of_pair(const Common& c, u64 pair, int ctr, int mode) {
  const u64 even = 2 * pair;
  const int even_side = __popcll(drive_chunk_address<ROWS>(c, even) & c.side_mask) & 1;
  return even + static_cast<u64>(mode == kOff ? ctr : (even_side ^ ctr));
}

__device__ __forceinline__ void ticket_range(const Common& c, u64 t, u64& p0, u64& p1) {
  if (t < c.big_tickets) {
    p0 = t * c.big_pairs;
    p1 = p0 + c.big_pairs;
  } else {
    p0 = c.big_tickets * c.big_pairs + (t - c.big_tickets) * c.small_pairs;
    p1 = p0 + c.small_pairs;
  }
  if (p1 > c.n_pairs) p1 = c.n_pairs;
}

// The last, partial vector (n % VEC elements; element form only: group kernels have n % GROUP == 0), done
// element by element by one thread while the loops skip it.
template <class Op, bool ROWS>
__device__ __forceinline__ void tail(const typename Op::Args& a) {
  if constexpr (Op::GROUP == 0) {
    const u64 n = a._l2_c.n;
    const u64 e = n / Op::VEC * Op::VEC;
    if (e < n && blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) {
      typename Op::Regs r;
      Op::template load<ROWS, false>(a, e, static_cast<int>(n - e), r, 0ull);
      Op::template compute_store<ROWS, false>(a, e, static_cast<int>(n - e), r);
    }
  }
}

template <class Op, bool ROWS, int UNROLL>
__device__ __forceinline__ void side_walk(const typename Op::Args& a) {
  const Common& c = a._l2_c;
  const int mode = static_cast<int>(c.mode);
  const int side = my_side(c);
  const int first = mode == kFar ? side ^ 1 : side;
  const u64 policy = evict_first_policy();
  tail<Op, ROWS>(a);
  __shared__ u64 tickets[2];
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {   // own counter, then help the other side
    const int ctr = first ^ pass;
    u64* counter = c.counters + ctr;
    if (threadIdx.x == 0) tickets[0] = atomicAdd(counter, 1ull);
    __syncthreads();
    int buf = 0;
#pragma unroll 1
    while (true) {
      const u64 t = tickets[buf];
      if (t >= c.n_tickets) break;
      u64 next = 0;   // the next ticket: its atomic is in flight while this one's loads are
      if (threadIdx.x == 0) next = atomicAdd(counter, 1ull);
      u64 p0, p1;
      ticket_range(c, t, p0, p1);
#pragma unroll 1
      for (u64 p = p0; p < p1; p += UNROLL) {
        typename Op::Regs r[UNROLL];
        u64 e[UNROLL];
        int count[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const u64 pair = p + u;
          e[u] = chunk_of_pair<ROWS>(c, pair, ctr, mode) * Op::CHUNK_ELEMS + threadIdx.x * Op::VEC;
          count[u] = (pair < p1 && e[u] + Op::VEC <= c.n) ? Op::VEC : 0;   // the partial vector: tail()
          Op::template load<ROWS, true>(a, e[u], count[u], r[u], policy);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) Op::template compute_store<ROWS, true>(a, e[u], count[u], r[u]);
      }
      if (threadIdx.x == 0) tickets[buf ^ 1] = next;
      __syncthreads();
      buf ^= 1;
    }
    __syncthreads();
  }
  // The last CTA to finish zeroes the counters for the next launch on this stream.
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(c.counters + 2, 1ull) == gridDim.x - 1) {
      c.counters[0] = 0;
      c.counters[1] = 0;
      c.counters[2] = 0;
      __threadfence();
    }
  }
}

template <class Op, bool ROWS, bool ALIGNED, int UNROLL>
__device__ __forceinline__ void stride_walk(const typename Op::Args& a) {
  const Common& c = a._l2_c;
  const u64 policy = evict_first_policy();
  const u64 n_tiles = c.n_chunks;
  if constexpr (ALIGNED) tail<Op, ROWS>(a);
#pragma unroll 1
  for (u64 t0 = blockIdx.x; t0 < n_tiles; t0 += static_cast<u64>(UNROLL) * gridDim.x) {
    typename Op::Regs r[UNROLL];
    u64 e[UNROLL];
    int count[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const u64 tile = t0 + static_cast<u64>(u) * gridDim.x;
      e[u] = tile * Op::CHUNK_ELEMS + threadIdx.x * Op::VEC;
      if constexpr (ALIGNED) count[u] = (tile < n_tiles && e[u] + Op::VEC <= c.n) ? Op::VEC : 0;
      else count[u] = (tile < n_tiles && e[u] < c.n) ? static_cast<int>(min(c.n - e[u], static_cast<u64>(Op::VEC))) : 0;
      Op::template load<ROWS, ALIGNED>(a, e[u], count[u], r[u], policy);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) Op::template compute_store<ROWS, ALIGNED>(a, e[u], count[u], r[u]);
  }
}

}  // namespace l2side_ew

// Entry points of one generated kernel module (Op, L2SIDE_EW_UNROLL, L2SIDE_EW_MIN_CTAS defined before).
#define L2SIDE_EW_ENTRY_POINTS(Op)                                                                             \
  extern "C" __global__ void __launch_bounds__(l2side_ew::kThreads, L2SIDE_EW_MIN_CTAS)                        \
      l2ew_side_flat(const __grid_constant__ Op::Args a) {                                                     \
    l2side_ew::side_walk<Op, false, L2SIDE_EW_UNROLL>(a);                                                      \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(l2side_ew::kThreads, L2SIDE_EW_MIN_CTAS)                        \
      l2ew_side_rows(const __grid_constant__ Op::Args a) {                                                     \
    l2side_ew::side_walk<Op, true, L2SIDE_EW_UNROLL>(a);                                                       \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(l2side_ew::kThreads, L2SIDE_EW_MIN_CTAS)                        \
      l2ew_stride_flat(const __grid_constant__ Op::Args a) {                                                   \
    l2side_ew::stride_walk<Op, false, true, L2SIDE_EW_UNROLL>(a);                                              \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(l2side_ew::kThreads, L2SIDE_EW_MIN_CTAS)                        \
      l2ew_stride_rows(const __grid_constant__ Op::Args a) {                                                   \
    l2side_ew::stride_walk<Op, true, true, L2SIDE_EW_UNROLL>(a);                                               \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(l2side_ew::kThreads, L2SIDE_EW_MIN_CTAS > 4 ? 4 : L2SIDE_EW_MIN_CTAS) \
      l2ew_unaligned(const __grid_constant__ Op::Args a) {                                                     \
    l2side_ew::stride_walk<Op, true, false, 2>(a);                                              \
  }
