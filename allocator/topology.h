// The L2 topology of one GPU: the side of every SM and the in-page address bits that flip the side,
// measured by latency (see kernels/l2_probe.cu), plus the per-page side probe the allocator uses.
#pragma once
#include <cuda.h>

#include <cstdint>
#include <string>
#include <vector>

namespace l2side {

constexpr size_t kPageBytes = size_t(2) << 20;  // physical page = VMM granularity on Hopper

struct Topology {
  int device = -1;
  std::string name;
  std::string uuid;
  int num_sms = 0;                 // multiprocessor count
  std::vector<int8_t> sm_side;     // indexed by %smid; -1 = no SM with that id
  int sms_per_side[2] = {0, 0};
  uint32_t hash_mask = 0;          // in-page bits (4..20) whose parity flips the side
  bool split = false;              // false: no measurable split; everything is side 0
  double near_cycles = 0, far_cycles = 0;
  double linearity = 0;            // share of random in-page offsets whose side the mask predicts
  double probe_ms = 0;
  bool from_cache = false;

  // The one AND + POPC constant of the address invariant (0 when there is no split).
  uint64_t side_mask() const { return split ? (uint64_t(hash_mask) | (uint64_t(1) << 21)) : 0; }
  int side_of(uint64_t address) const { return __builtin_popcountll(address & side_mask()) & 1; }
  // The lowest mask bit: offset of a chunk whose side is opposite to the page's first chunk.
  uint32_t flip_offset() const { return hash_mask & (~hash_mask + 1); }
};

// The SM-latency probe's decision logic, exposed for tests: latencies[smid][k] in cycles for the offsets
// of sm_probe_offsets() (empty rows = no such SM).
struct ProbeAnalysis {
  bool split = false;
  uint32_t hash_mask = 0;
  std::vector<int8_t> sm_side;
  double near_cycles = 0, far_cycles = 0, linearity = 0;
  int disagreeing_sms = 0;
};
std::vector<uint32_t> sm_probe_offsets();
ProbeAnalysis analyse_sm_latencies(const std::vector<std::vector<unsigned>>& latencies);

// PTX of kernels/l2_probe.cu, handed over by the Python JIT runtime before the first probe.
void set_probe_ptx(std::string ptx);
bool has_probe_ptx();
// Folder for the on-disk topology cache (one small file per GPU UUID); empty = no disk cache.
void set_cache_dir(std::string dir);

// Probes (or returns the cached result for) a device. Thread-safe; throws std::runtime_error with the
// raw measurements when repeated probes disagree.
const Topology& topology(int device, bool reprobe = false);

// Sides (0/1, relative to SM 0's side) of the first chunk of n pages mapped at base + i * stride.
// -1 where the votes did not decide.
std::vector<int> probe_page_sides(int device, CUdeviceptr base, int n, size_t stride, CUstream stream);

// Measured side (relative to SM 0's) of arbitrary device addresses, e.g. inside live tensors (the atomics
// add 0, so data is unchanged); -1 where the votes did not decide. For tests and diagnostics.
std::vector<int> measure_address_sides(int device, const std::vector<uint64_t>& addresses);

}  // namespace l2side
