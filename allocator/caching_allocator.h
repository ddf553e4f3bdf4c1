// The side-aware caching allocator: physical 2 MiB pages probed once for their L2 side, pooled per side,
// and mapped so that bit 21 of every page's virtual address equals its side. Then for every byte handed out
//     side(addr) = popcount(addr & (hash_mask | 1 << 21)) & 1.
// Requests <= 1 MiB: rounded to 512 B, carved out of single-page segments (best fit, split, merge).
// Larger requests: rounded to whole pages, in segments that start 4 MiB-aligned with page k on side k&1;
// a cached block much larger than a request is split at a 4 MiB boundary (so every large block starts
// 4 MiB-aligned), and free neighbours merge again.
// Freed blocks are cached per stream (PyTorch semantics): reused on their stream at once, on another stream
// once an event recorded at free time has completed. Blocks allocated during a CUDA-graph capture are kept
// for that capture only (see release_graph_memory).
#pragma once
#include <cuda.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "topology.h"

namespace l2side {

constexpr size_t kSmallLimit = size_t(1) << 20;  // requests up to this size share pages
constexpr size_t kSmallRound = 512;

struct Page {
  CUmemGenericAllocationHandle handle;
  int side;
};

struct Event;  // a pooled CUevent, shared by the blocks whose last use it marks
struct Segment;

struct Block {
  CUdeviceptr ptr = 0;
  size_t size = 0;       // rounded size
  size_t requested = 0;  // what the caller asked for (while allocated)
  CUstream stream = nullptr;
  uint64_t capture_id = 0;  // != 0: belongs to a graph capture's memory
  bool allocated = false;
  bool pending = false;  // freed, waiting for the other streams it was used on (record_stream)
  Segment* segment = nullptr;
  Block* prev = nullptr;  // neighbours inside a small segment
  Block* next = nullptr;
  std::shared_ptr<Event> last_use;  // completes when the stream's work on this block is done
  std::vector<CUstream> stream_uses;  // other streams it was used on (Tensor.record_stream)
};

struct Segment {
  CUdeviceptr reserved = 0;  // the VA reservation
  size_t reserved_bytes = 0;
  CUdeviceptr base = 0;  // first mapped byte
  std::vector<Page> pages;
  bool small = false;
  size_t bytes() const { return pages.size() * kPageBytes; }
};

struct Stat {
  int64_t current = 0, peak = 0, allocated = 0, freed = 0;
  void add(int64_t n) {
    current += n;
    if (n > 0) allocated += n; else freed -= n;
    if (current > peak) peak = current;
  }
};

struct DeviceStats {
  Stat allocated_bytes, requested_bytes, reserved_bytes, active, segments;
  int64_t num_alloc_retries = 0, num_ooms = 0, num_device_alloc = 0, num_device_free = 0;
  int64_t pages_undecided = 0;
};

class DeviceAllocator {
 public:
  explicit DeviceAllocator(int device);
  ~DeviceAllocator() = default;

  // nullptr when out of memory (after releasing the cache and retrying).
  void* malloc(size_t size, CUstream stream);
  void free(void* ptr);
  // Tensor.record_stream: the block (starting at ptr) is also used on `stream`; false if ptr is not ours.
  bool record_stream(uintptr_t ptr, CUstream stream);
  void empty_cache();
  void release_graph_memory();
  void set_limit(size_t bytes) { std::lock_guard<std::mutex> l(mutex_); limit_ = bytes; }
  size_t limit() const { return limit_; }
  void reset_peaks();
  std::map<std::string, int64_t> stats();
  bool owns(uintptr_t address);
  std::string last_oom_message() { std::lock_guard<std::mutex> l(mutex_); return oom_message_; }
  const Topology& topology() const { return topo_; }

 private:
  struct BySize {  // (capture, stream, size, address): best fit for one stream and capture
    bool operator()(const Block* a, const Block* b) const;
  };
  using FreeSet = std::set<Block*, BySize>;

  struct Pending {
    Block* block;
    std::vector<std::shared_ptr<Event>> events;
  };
  void release_block(Block* b);  // a freed block becomes reusable: merge with free neighbours, cache it
  void process_pending(bool all_done);
  void settle();
  Block* alloc_small(size_t size, CUstream stream, uint64_t capture);
  Block* alloc_large(size_t pages, CUstream stream, uint64_t capture);
  Block* take_cross_stream(FreeSet& set, size_t lo, size_t hi, CUstream stream, uint64_t capture);
  Block* best_fit(FreeSet& set, size_t size, CUstream stream, uint64_t capture);
  void split(Block* b, size_t size);
  Block* new_segment_block(const std::vector<Page>& pages, bool small, CUstream stream, uint64_t capture);
  Segment* map_segment(const std::vector<Page>& pages, bool small);
  void unmap_segment(Segment* seg, std::vector<Page>* to_pool);
  bool ensure_pages(size_t side0, size_t side1, size_t any, bool capturing);
  bool create_pages(size_t count);
  size_t reclaim(bool synchronize, size_t wanted);  // cached segments -> page pools; returns pages
  void release_pool_pages();
  std::shared_ptr<Event> record(CUstream stream);
  bool completed(const std::shared_ptr<Event>& e);
  void enter_multi_stream();
  uint64_t capture_id(CUstream stream);
  void remove_free(Block* b);
  void insert_free(Block* b);

  const int device_;
  const Topology& topo_;
  const bool split_;
  std::mutex mutex_;
  CUstream probe_stream_ = nullptr;
  std::vector<CUmemAccessDesc> access_;  // this device + every peer that can reach it
  std::vector<Page> pool_[2];  // unmapped pages per side
  FreeSet small_free_, large_free_;
  std::unordered_map<CUdeviceptr, Block*> allocated_;
  std::vector<Pending> pending_;
  std::map<CUdeviceptr, Segment*> segments_;  // by reserved VA, for owns()
  std::vector<CUevent> spare_events_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  CUstream first_stream_ = nullptr;
  bool seen_stream_ = false, multi_stream_ = false;
  size_t limit_ = SIZE_MAX;
  size_t total_pages_ = 0;
  size_t pages_per_side_[2] = {0, 0};
  DeviceStats stats_;
  std::string oom_message_;
  std::string create_failure_;  // why create_pages last said no
  friend struct Event;
};

// One allocator per device, created on first use.
DeviceAllocator& device_allocator(int device);
bool device_allocator_exists(int device);
int device_count();

}  // namespace l2side
