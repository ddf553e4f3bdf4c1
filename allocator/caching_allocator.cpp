#include "caching_allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <tuple>

#include "driver_api.h"
#include "fake_driver.h"

namespace l2side {

struct Event {
  CUevent handle;
  DeviceAllocator* owner;
  ~Event() { owner->spare_events_.push_back(handle); }  // destroyed under the owner's mutex
};

namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

std::string format_bytes(size_t n) {
  char buf[32];
  if (n >= (size_t(1) << 30)) std::snprintf(buf, sizeof(buf), "%.2f GiB", double(n) / (1 << 30));
  else if (n >= (size_t(1) << 20)) std::snprintf(buf, sizeof(buf), "%.2f MiB", double(n) / (1 << 20));
  else std::snprintf(buf, sizeof(buf), "%zu bytes", n);
  return buf;
}

CUmemAccessDesc access_for(int device) {
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return access;
}

// Peer access to VMM memory is granted per mapping (cudaDeviceEnablePeerAccess does not cover it): every
// GPU that can reach this one gets read/write access, so cross-GPU copies and kernels work as with cudaMalloc.
std::vector<CUmemAccessDesc> access_list(int device) {
  std::vector<CUmemAccessDesc> list = {access_for(device)};
  const Driver& d = driver();
  if (!d.cuDeviceCanAccessPeer) return list;
  int count = device_count();
  for (int peer = 0; peer < count; ++peer) {
    int can = 0;
    if (peer != device && d.cuDeviceCanAccessPeer(&can, peer, device) == CUDA_SUCCESS && can)
      list.push_back(access_for(peer));
  }
  return list;
}

}  // namespace

bool DeviceAllocator::BySize::operator()(const Block* a, const Block* b) const {
  return std::tie(a->capture_id, a->stream, a->size, a->ptr) < std::tie(b->capture_id, b->stream, b->size, b->ptr);
}

DeviceAllocator::DeviceAllocator(int device)
    : device_(device), topo_(l2side::topology(device)), split_(topo_.split), access_(access_list(device)) {
  ScopedContext ctx(device_);
  check(driver().cuStreamCreate(&probe_stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

uint64_t DeviceAllocator::capture_id(CUstream stream) {
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  cuuint64_t id = 0;
  if (driver().cuStreamGetCaptureInfo(stream, &status, &id, nullptr, nullptr, nullptr, nullptr) != CUDA_SUCCESS)
    return 0;
  return status == CU_STREAM_CAPTURE_STATUS_ACTIVE ? id : 0;
}

std::shared_ptr<Event> DeviceAllocator::record(CUstream stream) {
  const Driver& d = driver();
  CUevent e;
  if (!spare_events_.empty()) {
    e = spare_events_.back();
    spare_events_.pop_back();
  } else {
    ScopedContext ctx(device_);
    check(d.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  }
  if (d.cuEventRecord(e, stream) != CUDA_SUCCESS) {
    spare_events_.push_back(e);
    return nullptr;
  }
  return std::shared_ptr<Event>(new Event{e, this});
}

bool DeviceAllocator::completed(const std::shared_ptr<Event>& e) {
  return e && driver().cuEventQuery(e->handle) == CUDA_SUCCESS;
}

void DeviceAllocator::enter_multi_stream() {
  // From now on every free records an event. Blocks freed before carry none: mark each stream's
  // current position so they too become reusable elsewhere once their stream gets there.
  multi_stream_ = true;
  std::map<CUstream, std::shared_ptr<Event>> marks;
  for (FreeSet* set : {&small_free_, &large_free_})
    for (Block* b : *set)
      if (!b->last_use && !b->capture_id) {
        auto& m = marks[b->stream];
        if (!m) m = record(b->stream);
        b->last_use = m;
      }
}

void DeviceAllocator::remove_free(Block* b) { (b->segment->small ? small_free_ : large_free_).erase(b); }
void DeviceAllocator::insert_free(Block* b) { (b->segment->small ? small_free_ : large_free_).insert(b); }

void* DeviceAllocator::malloc(size_t size, CUstream stream) {
  // The fast path (a cached block) makes no call that needs a current context; the slow paths that do
  // (page creation, mapping, events) set the device's primary context themselves.
  if (size == 0) return nullptr;
  std::lock_guard<std::mutex> lock(mutex_);
  if (!seen_stream_) {
    seen_stream_ = true;
    first_stream_ = stream;
  } else if (!multi_stream_ && stream != first_stream_) {
    enter_multi_stream();
  }
  if (!pending_.empty()) process_pending(false);
  const uint64_t capture = capture_id(stream);
  Block* b = nullptr;
  oom_message_.clear();
  try {
    b = size <= kSmallLimit ? alloc_small(round_up(size, kSmallRound), stream, capture)
                            : alloc_large(round_up(size, kPageBytes) / kPageBytes, stream, capture);
  } catch (const std::exception& e) {
    oom_message_ = std::string("Error: ") + e.what();
    b = nullptr;
  }
  if (!b) {
    stats_.num_ooms++;
    char msg[512];
    std::snprintf(msg, sizeof(msg),
                  "CUDA out of memory (l2side). Tried to allocate %s on device %d; l2side now holds %s reserved "
                  "(%s allocated, %s cached; limit %s). ",
                  format_bytes(size).c_str(), device_, format_bytes(total_pages_ * kPageBytes).c_str(),
                  format_bytes(stats_.allocated_bytes.current).c_str(),
                  format_bytes(total_pages_ * kPageBytes - stats_.allocated_bytes.current).c_str(),
                  limit_ == SIZE_MAX ? "none" : format_bytes(limit_).c_str());
    oom_message_ = msg + oom_message_;
    return nullptr;
  }
  b->allocated = true;
  b->requested = size;
  b->last_use.reset();
  allocated_[b->ptr] = b;
  stats_.allocated_bytes.add(b->size);
  stats_.requested_bytes.add(size);
  stats_.active.add(1);
  return reinterpret_cast<void*>(b->ptr);
}

Block* DeviceAllocator::take_cross_stream(FreeSet& set, size_t lo, size_t hi, CUstream stream, uint64_t capture) {
  // Only whole segments change stream: every block of a segment then keeps sharing one stream, which is
  // what makes merging neighbours safe.
  if (capture || !multi_stream_) return nullptr;  // graph memory never crosses streams
  Block* best = nullptr;
  for (Block* b : set) {
    if (b->capture_id != capture || b->prev || b->next) continue;
    if (b->size < lo || b->size > hi || (best && b->size >= best->size)) continue;
    if (completed(b->last_use)) best = b;
  }
  if (best) {
    set.erase(best);
    best->stream = stream;
  }
  return best;
}

Block* DeviceAllocator::best_fit(FreeSet& set, size_t size, CUstream stream, uint64_t capture) {
  Block key;
  key.capture_id = capture;
  key.stream = stream;
  key.size = size;
  auto it = set.lower_bound(&key);
  if (it == set.end() || (*it)->capture_id != capture || (*it)->stream != stream) return nullptr;
  Block* b = *it;
  set.erase(it);
  return b;
}

void DeviceAllocator::split(Block* b, size_t size) {
  // b (taken off its free set) keeps the first `size` bytes; the tail stays free on the same stream.
  Block* rest = new Block;
  rest->ptr = b->ptr + size;
  rest->size = b->size - size;
  rest->stream = b->stream;
  rest->capture_id = b->capture_id;
  rest->segment = b->segment;
  rest->last_use = b->last_use;
  rest->prev = b;
  rest->next = b->next;
  if (b->next) b->next->prev = rest;
  b->next = rest;
  b->size = size;
  insert_free(rest);
}

Block* DeviceAllocator::new_segment_block(const std::vector<Page>& pages, bool small, CUstream stream,
                                          uint64_t capture) {
  Segment* seg = map_segment(pages, small);
  Block* b = new Block;
  b->ptr = seg->base;
  b->size = seg->bytes();
  b->segment = seg;
  b->stream = stream;
  b->capture_id = capture;
  return b;
}

Block* DeviceAllocator::alloc_small(size_t size, CUstream stream, uint64_t capture) {
  Block* b = best_fit(small_free_, size, stream, capture);
  if (!b) b = take_cross_stream(small_free_, kPageBytes, kPageBytes, stream, capture);  // an idle page
  if (!b) {
    if (!ensure_pages(0, 0, 1, capture != 0)) return nullptr;
    int side = pool_[0].empty() ? 1 : 0;
    Page page = pool_[side].back();
    pool_[side].pop_back();
    b = new_segment_block({page}, true, stream, capture);
  }
  if (b->size - size >= kSmallRound) split(b, size);
  return b;
}

Block* DeviceAllocator::alloc_large(size_t pages, CUstream stream, uint64_t capture) {
  const size_t bytes = pages * kPageBytes;
  const size_t slack = bytes + std::max<size_t>(1, pages / 8) * kPageBytes;  // accept <= 12.5% waste
  Block* b = best_fit(large_free_, bytes, stream, capture);
  if (b) {
    // Too big: keep what the request needs, rounded to 4 MiB so that the tail block starts 4 MiB-aligned
    // too (its page k then still sits on side k & 1).
    const size_t keep = round_up(bytes, 2 * kPageBytes);
    if (b->size > slack && b->size > keep) split(b, keep);
    return b;
  }
  if ((b = take_cross_stream(large_free_, bytes, slack, stream, capture))) return b;
  // A new segment: even pages on side 0, odd pages on side 1 (any side when there is no split).
  const size_t need1 = split_ ? pages / 2 : 0;
  const size_t need0 = split_ ? pages - need1 : 0;
  if (!ensure_pages(need0, need1, split_ ? 0 : pages, capture != 0)) return nullptr;
  std::vector<Page> chosen(pages);
  for (size_t k = 0; k < pages; ++k) {
    int side = split_ ? static_cast<int>(k & 1) : (pool_[0].empty() ? 1 : 0);
    chosen[k] = pool_[side].back();
    pool_[side].pop_back();
  }
  return new_segment_block(chosen, false, stream, capture);
}

Segment* DeviceAllocator::map_segment(const std::vector<Page>& pages, bool small) {
  const Driver& d = driver();
  ScopedContext ctx(device_);
  RelaxedCaptureMode relaxed;
  auto seg = std::make_unique<Segment>();
  seg->small = small;
  seg->pages = pages;
  // 4 MiB alignment makes bit 21 of page k's address equal k & 1 (large) or lets a lone page sit at
  // offset side * 2 MiB of its reservation (small).
  seg->reserved_bytes = small ? 2 * kPageBytes : round_up(pages.size() * kPageBytes, 2 * kPageBytes);
  check(d.cuMemAddressReserve(&seg->reserved, seg->reserved_bytes, 2 * kPageBytes, 0, 0), "cuMemAddressReserve");
  seg->base = seg->reserved + (small && split_ ? pages[0].side * kPageBytes : 0);
  size_t mapped = 0;
  CUresult r = CUDA_SUCCESS;
  for (; mapped < pages.size() && r == CUDA_SUCCESS; ++mapped)
    r = d.cuMemMap(seg->base + mapped * kPageBytes, kPageBytes, 0, pages[mapped].handle, 0);
  if (r == CUDA_SUCCESS) r = d.cuMemSetAccess(seg->base, seg->bytes(), access_.data(), access_.size());
  if (r != CUDA_SUCCESS) {
    for (size_t k = 0; k + 1 < mapped; ++k) d.cuMemUnmap(seg->base + k * kPageBytes, kPageBytes);
    d.cuMemAddressFree(seg->reserved, seg->reserved_bytes);
    for (const Page& p : pages) pool_[p.side].push_back(p);
    throw CudaError("mapping a segment", r);
  }
  stats_.segments.add(1);
  Segment* raw = seg.release();
  segments_[raw->reserved] = raw;
  return raw;
}

void DeviceAllocator::unmap_segment(Segment* seg, std::vector<Page>* to_pool) {
  const Driver& d = driver();
  d.cuMemUnmap(seg->base, seg->bytes());
  d.cuMemAddressFree(seg->reserved, seg->reserved_bytes);
  for (const Page& p : seg->pages) to_pool[p.side].push_back(p);
  segments_.erase(seg->reserved);
  stats_.segments.add(-1);
  delete seg;
}

void DeviceAllocator::settle() {
  // After this every cached block is idle and every pending one is free.
  check(driver().cuCtxSynchronize(), "cuCtxSynchronize");
  process_pending(true);
}

size_t DeviceAllocator::reclaim(bool synchronize, size_t wanted) {
  // Free, cached segments go back to the page pools (until `wanted` pages came back). Unmapping memory
  // that kernels still use would fault, so only segments whose last use has completed, or any of them
  // after settle() (synchronize = true).
  if (synchronize) settle();
  size_t pages = 0;
  std::vector<Block*> victims;
  auto idle = [&](Block* b) {
    if (b->capture_id) return false;
    if (synchronize) return true;
    if (!b->last_use && !capture_id(b->stream)) b->last_use = record(b->stream);  // marks all work so far
    return completed(b->last_use);
  };
  for (FreeSet* set : {&large_free_, &small_free_})
    for (Block* b : *set)  // a segment is unused when one free block spans it
      if (!b->prev && !b->next && idle(b)) victims.push_back(b);
  for (Block* b : victims) {
    if (pages >= wanted) break;
    remove_free(b);
    pages += b->segment->pages.size();
    unmap_segment(b->segment, pool_);
    delete b;
  }
  return pages;
}

bool DeviceAllocator::create_pages(size_t count) {
  // Creates `count` pages, probes each page's side in one launch, and pools them.
  const Driver& d = driver();
  if (total_pages_ + count > limit_ / kPageBytes) {
    create_failure_ = "The l2side memory limit (set_memory_limit, set_per_process_memory_fraction) was reached.";
    return false;
  }
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device_;
  std::vector<CUmemGenericAllocationHandle> handles;
  CUresult r = CUDA_SUCCESS;
  while (handles.size() < count) {
    CUmemGenericAllocationHandle h;
    r = d.cuMemCreate(&h, kPageBytes, &prop, 0);
    if (r != CUDA_SUCCESS) break;
    handles.push_back(h);
  }
  if (r != CUDA_SUCCESS) {
    for (auto h : handles) d.cuMemRelease(h);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
      create_failure_ = "The device has no free memory left for new 2 MiB pages.";
      return false;
    }
    throw CudaError("cuMemCreate", r);
  }
  std::vector<int> sides(count, 0);
  if (split_) {
    // Map the new pages side by side in a scratch range, probe, unmap: their final addresses depend on sides.
    CUdeviceptr scratch = 0;
    const size_t bytes = count * kPageBytes;
    check(d.cuMemAddressReserve(&scratch, bytes, kPageBytes, 0, 0), "cuMemAddressReserve");
    for (size_t i = 0; i < count && r == CUDA_SUCCESS; ++i)
      r = d.cuMemMap(scratch + i * kPageBytes, kPageBytes, 0, handles[i], 0);
    CUmemAccessDesc access = access_for(device_);
    if (r == CUDA_SUCCESS) r = d.cuMemSetAccess(scratch, bytes, &access, 1);
    std::vector<int> probed;
    std::string error;
    if (r == CUDA_SUCCESS) {
      try {
        probed = probe_page_sides(device_, scratch, static_cast<int>(count), kPageBytes, probe_stream_);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    d.cuMemUnmap(scratch, bytes);
    d.cuMemAddressFree(scratch, bytes);
    if (r != CUDA_SUCCESS || !error.empty()) {
      for (auto h : handles) d.cuMemRelease(h);
      if (!error.empty()) throw std::runtime_error(error);
      throw CudaError("mapping new pages for the side probe", r);
    }
    sides = probed;
  }
  for (size_t i = 0; i < count; ++i) {
    if (sides[i] < 0) {  // the votes did not decide: never guess a side
      d.cuMemRelease(handles[i]);
      stats_.pages_undecided++;
      continue;
    }
    pool_[sides[i]].push_back({handles[i], sides[i]});
    pages_per_side_[sides[i]]++;
    total_pages_++;
    stats_.num_device_alloc++;
    stats_.reserved_bytes.add(kPageBytes);
  }
  return true;
}

bool DeviceAllocator::ensure_pages(size_t side0, size_t side1, size_t any, bool capturing) {
  ScopedContext ctx(device_);
  RelaxedCaptureMode relaxed;  // the slow path may probe pages while a graph is being captured
  auto short_of = [&]() -> size_t {
    size_t d0 = side0 > pool_[0].size() ? side0 - pool_[0].size() : 0;
    size_t d1 = side1 > pool_[1].size() ? side1 - pool_[1].size() : 0;
    size_t have_any = pool_[0].size() + pool_[1].size() - std::min(side0, pool_[0].size()) -
                      std::min(side1, pool_[1].size());
    size_t da = any > have_any ? any - have_any : 0;
    // Sides come out of the probe at random: to get d pages of one side, make about 2d.
    return da + 2 * std::max(d0, d1);
  };
  if (!short_of()) return true;
  // New pages first: taking cached segments apart here would make the next allocation of their size map
  // pages again (a training step churned through map/unmap that way). The cache goes back on OOM only.
  bool retried = false;
  for (int round = 0; round < 64; ++round) {
    size_t missing = short_of();
    if (!missing) return true;
    size_t batch = missing;
    if (any && !side0 && !side1) batch = std::max<size_t>(batch, 1);
    if (create_pages(batch)) continue;
    // Out of memory (or over the limit): give back everything cached, then try once more.
    if (retried || capturing) break;
    retried = true;
    stats_.num_alloc_retries++;
    reclaim(true, SIZE_MAX);
    release_pool_pages();
    if (!short_of()) return true;
  }
  if (!short_of()) return true;
  oom_message_ = create_failure_;
  return false;
}

void DeviceAllocator::release_pool_pages() {
  const Driver& d = driver();
  for (int s = 0; s < 2; ++s) {
    for (const Page& p : pool_[s]) {
      d.cuMemRelease(p.handle);
      stats_.num_device_free++;
      stats_.reserved_bytes.add(-static_cast<int64_t>(kPageBytes));
      pages_per_side_[s]--;
      total_pages_--;
    }
    pool_[s].clear();
  }
}

void DeviceAllocator::free(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(reinterpret_cast<CUdeviceptr>(ptr));
  if (it == allocated_.end()) {
    std::fprintf(stderr, "l2side: free of %p, which this allocator did not hand out (ignored)\n", ptr);
    return;
  }
  Block* b = it->second;
  allocated_.erase(it);
  b->allocated = false;
  stats_.allocated_bytes.add(-static_cast<int64_t>(b->size));
  stats_.requested_bytes.add(-static_cast<int64_t>(b->requested));
  stats_.active.add(-1);
  b->requested = 0;
  if (!b->stream_uses.empty() && !b->capture_id) {
    // Used on other streams too (Tensor.record_stream): reusable once their work so far is done.
    Pending p{b, {}};
    for (CUstream s : b->stream_uses)
      if (!capture_id(s))
        if (auto e = record(s)) p.events.push_back(std::move(e));
    b->stream_uses.clear();
    b->pending = true;
    pending_.push_back(std::move(p));
    return;
  }
  b->stream_uses.clear();
  release_block(b);
}

void DeviceAllocator::release_block(Block* b) {
  // An event marks when the stream is done with the block, so another stream may take it. Recorded only
  // once several streams are in use (reclaim() records late ones itself), never inside a capture.
  if (multi_stream_ && !b->capture_id && !capture_id(b->stream)) b->last_use = record(b->stream);
  for (Block* n : {b->prev, b->next}) {  // merge with free neighbours (same segment: same stream, capture)
    if (!n || n->allocated || n->pending) continue;
    remove_free(n);
    if (n == b->prev) {
      n->size += b->size;
      n->next = b->next;
      if (b->next) b->next->prev = n;
      n->last_use = b->last_use;  // the newest event covers older ones on the same stream
      delete b;
      b = n;
    } else {
      b->size += n->size;
      b->next = n->next;
      if (n->next) n->next->prev = b;
      delete n;
    }
  }
  insert_free(b);
}

void DeviceAllocator::process_pending(bool all_done) {
  auto done = [&](const Pending& p) {
    if (all_done) return true;
    for (const auto& e : p.events)
      if (!completed(e)) return false;
    return true;
  };
  for (size_t i = 0; i < pending_.size();) {
    if (done(pending_[i])) {
      Block* b = pending_[i].block;
      b->pending = false;
      pending_[i] = std::move(pending_.back());
      pending_.pop_back();
      release_block(b);
    } else {
      ++i;
    }
  }
}

bool DeviceAllocator::record_stream(uintptr_t ptr, CUstream stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = allocated_.find(ptr);
  if (it == allocated_.end()) return false;
  Block* b = it->second;
  if (stream != b->stream && std::find(b->stream_uses.begin(), b->stream_uses.end(), stream) == b->stream_uses.end())
    b->stream_uses.push_back(stream);
  return true;
}

void DeviceAllocator::empty_cache() {
  ScopedContext ctx(device_);
  std::lock_guard<std::mutex> lock(mutex_);
  reclaim(true, SIZE_MAX);
  release_pool_pages();
}

void DeviceAllocator::release_graph_memory() {
  ScopedContext ctx(device_);
  std::lock_guard<std::mutex> lock(mutex_);
  check(driver().cuCtxSynchronize(), "cuCtxSynchronize");
  std::vector<Block*> victims;
  for (FreeSet* set : {&small_free_, &large_free_})
    for (Block* b : *set)
      if (b->capture_id && !b->prev && !b->next) victims.push_back(b);
  for (Block* b : victims) {
    remove_free(b);
    unmap_segment(b->segment, pool_);
    delete b;
  }
}

void DeviceAllocator::reset_peaks() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Stat* s : {&stats_.allocated_bytes, &stats_.requested_bytes, &stats_.reserved_bytes, &stats_.active,
                  &stats_.segments})
    s->peak = s->current;
}

std::map<std::string, int64_t> DeviceAllocator::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<std::string, int64_t> out;
  auto put = [&](const std::string& name, const Stat& s) {
    out[name + ".all.current"] = s.current;
    out[name + ".all.peak"] = s.peak;
    out[name + ".all.allocated"] = s.allocated;
    out[name + ".all.freed"] = s.freed;
  };
  put("allocated_bytes", stats_.allocated_bytes);
  put("requested_bytes", stats_.requested_bytes);
  put("reserved_bytes", stats_.reserved_bytes);
  put("active_bytes", stats_.allocated_bytes);
  put("allocation", stats_.active);
  put("active", stats_.active);
  put("segment", stats_.segments);
  out["num_alloc_retries"] = stats_.num_alloc_retries;
  out["num_ooms"] = stats_.num_ooms;
  out["num_device_alloc"] = stats_.num_device_alloc;
  out["num_device_free"] = stats_.num_device_free;
  int64_t cached = 0, graph_cached = 0, graph_allocated = 0;
  for (const FreeSet* set : {&small_free_, &large_free_})
    for (const Block* b : *set) (b->capture_id ? graph_cached : cached) += b->size;
  for (const auto& kv : allocated_)
    if (kv.second->capture_id) graph_allocated += kv.second->size;
  out["l2side.cached_bytes"] = cached + int64_t(pool_[0].size() + pool_[1].size()) * kPageBytes;
  out["l2side.graph_bytes"] = graph_cached + graph_allocated;
  out["l2side.graph_cached_bytes"] = graph_cached;        // freed inside captures, kept for their graphs
  out["l2side.graph_allocated_bytes"] = graph_allocated;  // allocated during a capture, still in use
  out["l2side.pages.side0.total"] = pages_per_side_[0];
  out["l2side.pages.side1.total"] = pages_per_side_[1];
  out["l2side.pages.side0.free"] = pool_[0].size();
  out["l2side.pages.side1.free"] = pool_[1].size();
  out["l2side.pages.undecided"] = stats_.pages_undecided;
  out["l2side.limit_bytes"] = limit_ == SIZE_MAX ? -1 : static_cast<int64_t>(limit_);
  out["l2side.multi_stream"] = multi_stream_;
  return out;
}

bool DeviceAllocator::owns(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = segments_.upper_bound(address);
  if (it == segments_.begin()) return false;
  --it;
  const Segment* s = it->second;
  return address >= s->base && address < s->base + s->bytes();
}

namespace {
constexpr int kMaxDevices = 64;
std::mutex g_devices_mutex;
std::atomic<DeviceAllocator*> g_devices[kMaxDevices];  // never destroyed: the driver may be gone at exit
}  // namespace

int device_count() {
  static const int count = [] {
    int n = 0;
    check(driver().cuDeviceGetCount(&n), "cuDeviceGetCount");
    return n;
  }();
  return fake_driver_active() ? fake_config().devices : count;
}

DeviceAllocator& device_allocator(int device) {
  // Lock-free on the hot path: every malloc and free comes through here.
  if (device >= 0 && device < kMaxDevices)
    if (DeviceAllocator* a = g_devices[device].load(std::memory_order_acquire)) return *a;
  std::lock_guard<std::mutex> lock(g_devices_mutex);
  const int count = device_count();
  if (device < 0 || device >= count || device >= kMaxDevices)
    throw std::invalid_argument("l2side: no CUDA device " + std::to_string(device) + " (found " +
                                std::to_string(count) + ")");
  if (!g_devices[device].load()) g_devices[device].store(new DeviceAllocator(device), std::memory_order_release);
  return *g_devices[device].load();
}

bool device_allocator_exists(int device) {
  return device >= 0 && device < kMaxDevices && g_devices[device].load(std::memory_order_acquire);
}

}  // namespace l2side
