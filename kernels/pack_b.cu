// Packs FP8 B [N, K] (row-major, 16-byte-aligned rows) into l2side's side-aware packed layout
// (l2side/packed_b.py, docs/packed-b.md). One CTA writes one 4 KiB chunk = 32 rows x 128 bytes of one tile,
// as the SWIZZLE_128B shared-memory image (row r at r * 128, its 16-byte unit u at unit position u ^ (r % 8)).
//
// CTA x < chunks0: the x-th chunk of side 0's sequence, else the (x - chunks0)-th of side 1's.
// Sequence index i -> N-block position j = i / (k_tiles * cpt), K-tile kb, part (32-row slice of the tile);
// the N-block is seq_blocks[j] (side 0) or seq_blocks[blocks0 + j] (side 1).
// Destination chunk (paired layout): 2i + (popc((out + 2i * 4096) & side_mask) & 1 ^ side) -- one AND, one
// POPC, one XOR; plain layout (paired == 0): chunk i.
#include <cstdint>

constexpr int kPackThreads = 256;   // 256 x 16 B = one 4 KiB chunk

extern "C" __global__ void __launch_bounds__(kPackThreads) l2side_pack_b(
    const uint4* __restrict__ b,          // B's first byte, 16-byte aligned
    long long ld16,                       // B's row stride in 16-byte units
    int n,                                // rows of B (N)
    int k16,                              // K / 16 (K % 16 == 0)
    uint4* __restrict__ out,              // the packed buffer, 8 KiB aligned
    unsigned long long side_mask,         // topology().side_mask (0 in the plain layout)
    int paired,                           // 1: side-aware pair layout, 0: plain (chunk i = i)
    const int* __restrict__ seq_blocks,   // stored[0] ++ stored[1] (N-block ids)
    int blocks0,                          // len(stored[0])
    int chunks0,                          // side 0's used chunks = blocks0 * k_tiles * cpt
    int k_tiles,                          // ceil(K / 128)
    int cpt,                              // chunks per tile = block_n / 32
    int block_n) {
  const int x = blockIdx.x;
  const int side = x >= chunks0;
  const int i = side ? x - chunks0 : x;
  const int per_block = k_tiles * cpt;
  const int j = i / per_block;
  const int rem = i - j * per_block;
  const int kb = rem / cpt;
  const int part = rem - kb * cpt;
  const int nb = seq_blocks[side ? blocks0 + j : j];

  unsigned long long chunk;
  if (paired) {
    const unsigned long long even = 2ull * (unsigned long long)i;
    const unsigned long long addr = reinterpret_cast<unsigned long long>(out) + even * 4096ull;
    chunk = even + (unsigned long long)((__popcll(addr & side_mask) & 1) ^ side);
  } else {
    chunk = (unsigned long long)i;
  }

  // thread t writes destination unit t: row rr = t / 8 of the chunk, unit position p = t % 8, which holds
  // source unit u = p ^ (rr % 8) (the chunk's first row is a multiple of 32, so rr % 8 == tile row % 8)
  const int t = threadIdx.x;
  const int rr = t >> 3;
  const int p = t & 7;
  const int u = p ^ (rr & 7);
  const long long row = (long long)nb * block_n + (long long)part * 32 + rr;
  const int col16 = kb * 8 + u;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row < n && col16 < k16) v = b[row * ld16 + col16];
  out[chunk * (unsigned long long)kPackThreads + t] = v;
}
