#include "topology.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <unistd.h>

#include "driver_api.h"
#include "fake_driver.h"

namespace l2side {
namespace {

std::mutex g_mutex;  // guards everything below
std::string g_ptx;
std::string g_cache_dir;
std::map<int, std::unique_ptr<Topology>> g_topologies;

constexpr int kMaxSmid = 1024;   // %smid bound used to size tables (H100: < 144)
constexpr int kFirstBit = 4, kLastBit = 20;
constexpr int kRandomOffsets = 24;
constexpr int kVotesPerPage = 5;

struct ProbeModule {
  CUmodule module = nullptr;
  CUfunction sm_latency = nullptr;
  CUfunction page_sides = nullptr;
  CUfunction address_sides = nullptr;
  CUstream stream = nullptr;  // for the diagnostic address probe
  CUdeviceptr sm_side_table = 0;  // int8[kMaxSmid], filled once the topology is known
  CUdeviceptr votes = 0;          // scratch for page votes
  size_t votes_capacity = 0;
};
std::map<int, ProbeModule> g_modules;

ProbeModule& probe_module(int device) {  // g_mutex held, context current
  ProbeModule& m = g_modules[device];
  if (m.module) return m;
  if (g_ptx.empty()) throw std::runtime_error("l2side: the L2 probe kernels were not loaded (internal error)");
  const Driver& d = driver();
  check(d.cuModuleLoadData(&m.module, g_ptx.c_str()), "cuModuleLoadData(l2_probe)");
  check(d.cuModuleGetFunction(&m.sm_latency, m.module, "l2side_sm_latency"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&m.page_sides, m.module, "l2side_page_sides"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&m.address_sides, m.module, "l2side_address_sides"), "cuModuleGetFunction");
  check(d.cuStreamCreate(&m.stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  check(d.cuMemAlloc(&m.sm_side_table, kMaxSmid), "cuMemAlloc");
  return m;
}

// One physical page mapped for probing: the SM probe needs memory that no allocator owns yet.
struct ScratchPage {
  CUdeviceptr va = 0;
  CUmemGenericAllocationHandle handle = 0;
  explicit ScratchPage(int device) {
    const Driver& d = driver();
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    check(d.cuMemCreate(&handle, kPageBytes, &prop, 0), "cuMemCreate");
    check(d.cuMemAddressReserve(&va, kPageBytes, kPageBytes, 0, 0), "cuMemAddressReserve");
    check(d.cuMemMap(va, kPageBytes, 0, handle, 0), "cuMemMap");
    CUmemAccessDesc access = {};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    check(d.cuMemSetAccess(va, kPageBytes, &access, 1), "cuMemSetAccess");
    check(d.cuMemsetD8(va, 0, kPageBytes), "cuMemsetD8");
  }
  ~ScratchPage() {
    const Driver& d = driver();
    d.cuMemUnmap(va, kPageBytes);
    d.cuMemAddressFree(va, kPageBytes);
    d.cuMemRelease(handle);
  }
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<uint32_t> probe_offsets() {
  std::vector<uint32_t> offsets = {0};
  for (int b = kFirstBit; b <= kLastBit; ++b) offsets.push_back(1u << b);
  uint32_t x = 0x9e3779b9u;  // fixed LCG: the same random offsets every run
  for (int i = 0; i < kRandomOffsets; ++i) {
    x = x * 1664525u + 1013904223u;
    offsets.push_back((x >> 8) & (kPageBytes - 1) & ~0xfffu);
  }
  return offsets;
}

// latency[smid][k] for every SM, one launch. Empty rows for absent SM ids.
std::vector<std::vector<unsigned>> measure_sm_latencies(int device, ProbeModule& m, CUdeviceptr base,
                                                        const std::vector<uint32_t>& offsets, int* nsmid) {
  const Driver& d = driver();
  const int n = static_cast<int>(offsets.size());
  CUdevice dev;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  int num_sms = 0, smem_optin = 0;
  check(d.cuDeviceGetAttribute(&num_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&smem_optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev),
        "cuDeviceGetAttribute");
  // A block that takes most of an SM's shared memory runs alone there: one measuring thread per SM.
  unsigned smem = static_cast<unsigned>(std::max(0, smem_optin - 1024));
  check(d.cuFuncSetAttribute(m.sm_latency, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
        "cuFuncSetAttribute");

  CUdeviceptr dev_offsets, claim, out, nsmid_dev;
  const size_t out_bytes = size_t(kMaxSmid) * n * sizeof(unsigned);
  check(d.cuMemAlloc(&dev_offsets, n * sizeof(uint32_t)), "cuMemAlloc");
  check(d.cuMemAlloc(&claim, kMaxSmid * sizeof(unsigned)), "cuMemAlloc");
  check(d.cuMemAlloc(&out, out_bytes), "cuMemAlloc");
  check(d.cuMemAlloc(&nsmid_dev, sizeof(unsigned)), "cuMemAlloc");
  std::vector<unsigned> host(size_t(kMaxSmid) * n, 0), claimed(kMaxSmid, 0);
  unsigned nsmid_host = 0;
  int reps = 16, trials = 3;
  void* args[] = {&base, &dev_offsets, const_cast<int*>(&n), &reps, &trials, &claim, &out, &nsmid_dev};
  const char* step = "";
  CUresult first = CUDA_SUCCESS;
  auto attempt = [&](CUresult r, const char* what) {
    if (first == CUDA_SUCCESS && r != CUDA_SUCCESS) {
      first = r;
      step = what;
    }
  };
  attempt(d.cuMemcpyHtoD(dev_offsets, offsets.data(), n * sizeof(uint32_t)), "cuMemcpyHtoD(offsets)");
  if (first == CUDA_SUCCESS) attempt(d.cuMemsetD8(claim, 0, kMaxSmid * sizeof(unsigned)), "cuMemsetD8(claim)");
  if (first == CUDA_SUCCESS) attempt(d.cuMemsetD8(out, 0, out_bytes), "cuMemsetD8(out)");
  if (first == CUDA_SUCCESS)
    attempt(d.cuLaunchKernel(m.sm_latency, 2 * num_sms, 1, 1, 32, 1, 1, smem, nullptr, args, nullptr),
            "cuLaunchKernel(l2side_sm_latency)");
  if (first == CUDA_SUCCESS) attempt(d.cuCtxSynchronize(), "cuCtxSynchronize after l2side_sm_latency");
  if (first == CUDA_SUCCESS) attempt(d.cuMemcpyDtoH(host.data(), out, out_bytes), "cuMemcpyDtoH(latencies)");
  if (first == CUDA_SUCCESS)
    attempt(d.cuMemcpyDtoH(claimed.data(), claim, kMaxSmid * sizeof(unsigned)), "cuMemcpyDtoH(claims)");
  if (first == CUDA_SUCCESS) attempt(d.cuMemcpyDtoH(&nsmid_host, nsmid_dev, sizeof(unsigned)), "cuMemcpyDtoH(nsmid)");
  d.cuMemFree(dev_offsets);
  d.cuMemFree(claim);
  d.cuMemFree(out);
  d.cuMemFree(nsmid_dev);
  check(first, (std::string("L2 SM-latency probe: ") + step).c_str());
  *nsmid = static_cast<int>(std::min<unsigned>(nsmid_host ? nsmid_host : kMaxSmid, kMaxSmid));
  std::vector<std::vector<unsigned>> lat(kMaxSmid);
  for (int s = 0; s < kMaxSmid; ++s)
    if (claimed[s]) lat[s].assign(host.begin() + size_t(s) * n, host.begin() + size_t(s + 1) * n);
  return lat;
}

struct Analysis {
  bool split = false;
  uint32_t mask = 0;
  std::vector<int8_t> side;  // per smid
  double near = 0, far = 0, gap = 0, linearity = 0;
  int disagreeing_sms = 0;
};

Analysis analyse(const std::vector<std::vector<unsigned>>& lat, const std::vector<uint32_t>& offsets) {
  Analysis a;
  const int n_bits = kLastBit - kFirstBit + 1;
  std::vector<int> sms;
  for (int s = 0; s < static_cast<int>(lat.size()); ++s)
    if (!lat[s].empty()) sms.push_back(s);
  a.side.assign(lat.size(), -1);
  if (sms.empty()) throw std::runtime_error("l2side probe: no SM reported a measurement");
  auto delta = [&](int sm, int k) { return double(lat[sm][k]) - double(lat[sm][0]); };
  std::vector<double> bit_gap(n_bits);
  for (int b = 0; b < n_bits; ++b) {
    std::vector<double> v;
    for (int sm : sms) v.push_back(std::fabs(delta(sm, 1 + b)));
    bit_gap[b] = median(v);
  }
  a.gap = *std::max_element(bit_gap.begin(), bit_gap.end());
  {
    std::vector<double> base;
    for (int sm : sms) base.push_back(lat[sm][0]);
    a.near = a.far = median(base);
  }
  for (int sm : sms) a.side[sm] = 0;
  if (a.gap < 40) return a;  // no split worth the name: a flat L2
  a.split = true;
  for (int b = 0; b < n_bits; ++b)
    if (bit_gap[b] > a.gap / 2) a.mask |= 1u << (kFirstBit + b);
  const int ref = sms.front();  // the lowest SM id is side 0 by definition
  std::vector<double> nears, fars;
  for (int sm : sms) {
    int same = 0, other = 0;
    for (int b = 0; b < n_bits; ++b) {
      if (!(a.mask >> (kFirstBit + b) & 1)) continue;
      double dm = delta(sm, 1 + b), dr = delta(ref, 1 + b);
      if (std::fabs(dm) < a.gap / 4 || std::fabs(dr) < a.gap / 4) continue;
      ((dm > 0) == (dr > 0) ? same : other)++;
      nears.push_back(std::min(lat[sm][0], lat[sm][1 + b]));
      fars.push_back(std::max(lat[sm][0], lat[sm][1 + b]));
    }
    a.side[sm] = other > same ? 1 : 0;
    if (std::min(same, other) * 5 > same + other || same + other == 0) a.disagreeing_sms++;
  }
  a.near = median(nears);
  a.far = median(fars);
  // Does the parity of (offset & mask) predict the random offsets? (the invariant's linearity)
  int agree = 0, total = 0;
  for (int sm : sms)
    for (size_t k = 1 + n_bits; k < offsets.size(); ++k) {
      bool flipped = std::fabs(delta(sm, static_cast<int>(k))) > a.gap / 2;
      bool predicted = __builtin_popcount(offsets[k] & a.mask) & 1;
      agree += flipped == predicted;
      total++;
    }
  a.linearity = total ? double(agree) / total : 1.0;
  return a;
}

std::string describe(const std::vector<std::vector<unsigned>>& lat, const std::vector<uint32_t>& offsets) {
  // stdio, not iostreams: iostreams in this extension crashed inside the host's libstdc++ on the GPU image.
  std::string s = "raw latencies (cycles) per SM id, offsets:";
  char buf[32];
  for (auto o : offsets) {
    std::snprintf(buf, sizeof(buf), " %#x", o);
    s += buf;
  }
  s += "\n";
  for (size_t sm = 0; sm < lat.size(); ++sm) {
    if (lat[sm].empty()) continue;
    std::snprintf(buf, sizeof(buf), "  sm %zu:", sm);
    s += buf;
    for (auto v : lat[sm]) {
      std::snprintf(buf, sizeof(buf), " %u", v);
      s += buf;
    }
    s += "\n";
  }
  return s;
}

std::string cache_path(const std::string& uuid) {
  if (g_cache_dir.empty() || uuid.empty()) return {};
  return g_cache_dir + "/topology-" + uuid + ".txt";
}

// Latencies measured under an instrumenting tool (compute-sanitizer, a debugger) are several times the real
// ones (an L2 atomic round trip is ~300-550 cycles on Hopper). Such a probe still finds the mask and the SM
// sides, but its cycle counts would mislead every later process that uses them as thresholds (the address
// probe): it is used in-process and never cached, and a cache holding one is ignored.
constexpr double kMaxPlausibleCycles = 1500;

bool plausible(const Topology& t) { return t.far_cycles > 0 && t.far_cycles < kMaxPlausibleCycles; }

bool load_cached(Topology& t) {
  std::string path = cache_path(t.uuid);
  if (path.empty()) return false;
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return false;
  int version = 0, split = 0, n_side = 0;
  bool ok = std::fscanf(f, "l2side-topology %d", &version) == 1 && version == 1 &&
            std::fscanf(f, "%d %u %d %lf %lf %lf %lf %d", &t.num_sms, &t.hash_mask, &split, &t.near_cycles,
                        &t.far_cycles, &t.linearity, &t.probe_ms, &n_side) == 8 &&
            n_side > 0 && n_side <= kMaxSmid;
  if (ok) {
    t.sm_side.resize(n_side);
    for (auto& s : t.sm_side) {
      int v = 0;
      ok = ok && std::fscanf(f, "%d", &v) == 1 && v >= -1 && v <= 1;
      s = static_cast<int8_t>(v);
    }
  }
  std::fclose(f);
  if (!ok || !plausible(t)) return false;
  t.split = split != 0;
  t.sms_per_side[0] = t.sms_per_side[1] = 0;
  for (auto s : t.sm_side)
    if (s >= 0) t.sms_per_side[s]++;
  t.from_cache = true;
  return true;
}

void store_cached(const Topology& t) {
  std::string path = cache_path(t.uuid);
  if (path.empty() || !plausible(t)) return;
  std::string tmp = path + ".tmp" + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) return;  // an unwritable cache only costs a re-probe
  std::fprintf(f, "l2side-topology 1\n%d %u %d %.1f %.1f %.4f %.3f %zu\n", t.num_sms, t.hash_mask, int(t.split),
               t.near_cycles, t.far_cycles, t.linearity, t.probe_ms, t.sm_side.size());
  for (auto s : t.sm_side) std::fprintf(f, "%d ", int(s));
  std::fprintf(f, "\n");
  bool ok = std::fclose(f) == 0;
  if (ok) std::rename(tmp.c_str(), path.c_str());  // atomic: readers see the old file or the new one
  else std::remove(tmp.c_str());
}

void fill_identity(Topology& t) {
  const Driver& d = driver();
  CUdevice dev;
  check(d.cuDeviceGet(&dev, t.device), "cuDeviceGet");
  char name[256] = {};
  check(d.cuDeviceGetName(name, sizeof(name), dev), "cuDeviceGetName");
  t.name = name;
  CUuuid uuid;
  check(d.cuDeviceGetUuid(&uuid, dev), "cuDeviceGetUuid");
  char hex[40];
  std::string s;
  for (int i = 0; i < 16; ++i) {
    std::snprintf(hex, sizeof(hex), "%02x", static_cast<unsigned char>(uuid.bytes[i]));
    s += hex;
  }
  t.uuid = s;
  check(d.cuDeviceGetAttribute(&t.num_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
}

void upload_sm_sides(int device, const Topology& t) {  // g_mutex held, context current
  ProbeModule& m = probe_module(device);
  std::vector<int8_t> table(kMaxSmid, -1);
  std::copy(t.sm_side.begin(), t.sm_side.begin() + std::min<size_t>(t.sm_side.size(), kMaxSmid), table.begin());
  check(driver().cuMemcpyHtoD(m.sm_side_table, table.data(), kMaxSmid), "cuMemcpyHtoD");
}

std::unique_ptr<Topology> probe(int device) {  // g_mutex held
  auto t = std::make_unique<Topology>();
  t->device = device;
  fill_identity(*t);
  ScopedContext ctx(device);
  ProbeModule& m = probe_module(device);
  ScratchPage page(device);
  const auto offsets = probe_offsets();
  auto start = std::chrono::steady_clock::now();
  // Repeat and vote: three probes must agree on the mask and on every SM's side.
  std::vector<Analysis> runs;
  std::vector<std::vector<std::vector<unsigned>>> raw;
  int nsmid = 0;
  for (int attempt = 0; attempt < 5 && runs.size() < 3; ++attempt) {
    raw.push_back(measure_sm_latencies(device, m, page.va, offsets, &nsmid));
    Analysis a = analyse(raw.back(), offsets);
    if (a.disagreeing_sms == 0) runs.push_back(a);
  }
  t->probe_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  bool consistent = runs.size() == 3;
  for (size_t i = 1; consistent && i < runs.size(); ++i)
    consistent = runs[i].split == runs[0].split && runs[i].mask == runs[0].mask && runs[i].side == runs[0].side;
  if (!consistent) {
    char head[512];
    std::snprintf(head, sizeof(head),
                  "l2side: the L2 topology probe of device %d (%s) gave inconsistent results over %zu runs (%zu "
                  "self-consistent); set L2SIDE_DISABLE_SIDES=1 to run without side awareness.\n",
                  device, t->name.c_str(), raw.size(), runs.size());
    std::string msg = head;
    for (auto& r : runs) {
      std::snprintf(head, sizeof(head), "  run: split=%d mask=%#x\n", int(r.split), r.mask);
      msg += head;
    }
    throw std::runtime_error(msg + describe(raw.back(), offsets));
  }
  const Analysis& a = runs[0];
  t->split = a.split;
  t->hash_mask = a.mask;
  t->sm_side.assign(a.side.begin(), a.side.begin() + std::max(1, std::min(nsmid, kMaxSmid)));
  for (auto s : t->sm_side)
    if (s >= 0) t->sms_per_side[s]++;
  t->near_cycles = a.near;
  t->far_cycles = a.far;
  t->linearity = a.linearity;
  return t;
}

// votes[v * n + i] is vote v on item i (0, 1, or 255 = none): the majority side, or -1 on a tie.
std::vector<int> tally_votes(const std::vector<unsigned char>& votes, int n) {
  std::vector<int> sides(n, -1);
  for (int i = 0; i < n; ++i) {
    int count[2] = {0, 0};
    for (int v = 0; v < kVotesPerPage; ++v) {
      unsigned char vote = votes[size_t(v) * n + i];
      if (vote < 2) count[vote]++;
    }
    sides[i] = count[0] > count[1] ? 0 : count[1] > count[0] ? 1 : -1;
  }
  return sides;
}

}  // namespace

std::vector<uint32_t> sm_probe_offsets() { return probe_offsets(); }

ProbeAnalysis analyse_sm_latencies(const std::vector<std::vector<unsigned>>& latencies) {
  const auto offsets = probe_offsets();
  for (const auto& row : latencies)
    if (!row.empty() && row.size() != offsets.size())
      throw std::invalid_argument("each SM's row needs one latency per probe offset");
  Analysis a = analyse(latencies, offsets);
  ProbeAnalysis out;
  out.split = a.split;
  out.hash_mask = a.mask;
  out.sm_side = a.side;
  out.near_cycles = a.near;
  out.far_cycles = a.far;
  out.linearity = a.linearity;
  out.disagreeing_sms = a.disagreeing_sms;
  return out;
}

void set_probe_ptx(std::string ptx) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_ptx = std::move(ptx);
}

bool has_probe_ptx() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return !g_ptx.empty();
}

void set_cache_dir(std::string dir) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache_dir = std::move(dir);
}

const Topology& topology(int device, bool reprobe) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_topologies.find(device);
  if (it != g_topologies.end() && !reprobe) return *it->second;
  std::unique_ptr<Topology> t;
  const char* disable = std::getenv("L2SIDE_DISABLE_SIDES");
  if (fake_driver_active()) {  // the CPU test double: a split GPU with the configured mask
    t = std::make_unique<Topology>();
    t->device = device;
    fill_identity(*t);
    t->split = true;
    t->hash_mask = fake_config().hash_mask;
    for (int i = 0; i < t->num_sms; ++i) {
      t->sm_side.push_back(static_cast<int8_t>((i / 2) & 1));  // pairs of SMs per side, as on the H100
      t->sms_per_side[(i / 2) & 1]++;
    }
    t->near_cycles = 300;
    t->far_cycles = 500;
    t->linearity = 1;
  } else if (disable && *disable && std::string(disable) != "0") {
    t = std::make_unique<Topology>();
    t->device = device;
    fill_identity(*t);
    t->sm_side.assign(1, 0);
    t->sms_per_side[0] = t->num_sms;
  } else {
    t = std::make_unique<Topology>();
    t->device = device;
    fill_identity(*t);
    if (reprobe || !load_cached(*t)) {
      t = probe(device);
      store_cached(*t);
    }
  }
  if (t->split && !fake_driver_active()) {
    ScopedContext ctx(device);
    upload_sm_sides(device, *t);
  }
  auto& slot = g_topologies[device];
  if (slot) *slot = *t;  // keep references handed out earlier valid
  else slot = std::move(t);
  return *slot;
}

std::vector<int> probe_page_sides(int device, CUdeviceptr base, int n, size_t stride, CUstream stream) {
  const Topology& t = topology(device);
  std::vector<int> sides(n, 0);
  if (!t.split || n == 0) return sides;
  if (fake_driver_active()) {
    for (int p = 0; p < n; ++p) sides[p] = fake_side_of(base + p * stride);
    return sides;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  ScopedContext ctx(device);
  const Driver& d = driver();
  ProbeModule& m = probe_module(device);
  const size_t n_votes = size_t(n) * kVotesPerPage;
  if (m.votes_capacity < n_votes) {
    if (m.votes) d.cuMemFree(m.votes);
    m.votes = 0;
    check(d.cuMemAlloc(&m.votes, n_votes), "cuMemAlloc");
    m.votes_capacity = n_votes;
  }
  std::vector<unsigned char> votes(n_votes);
  unsigned long long stride_arg = stride;
  unsigned flip = t.flip_offset();
  int reps = 8, trials = 2;
  int min_gap = static_cast<int>(std::max(20.0, (t.far_cycles - t.near_cycles) / 3));
  void* args[] = {&base, &n, &stride_arg, &flip, &reps, &trials, &min_gap, &m.sm_side_table, &m.votes};
  // The pages are all different, so the blocks run concurrently without disturbing each other.
  check(d.cuLaunchKernel(m.page_sides, static_cast<unsigned>(n_votes), 1, 1, 32, 1, 1, 0, stream, args, nullptr),
        "cuLaunchKernel(l2side_page_sides)");
  // Async copy on the allocator's non-blocking stream: a plain cuMemcpyDtoH would wait for the legacy
  // default stream (all of torch's default-stream work) and is refused during graph capture.
  check(d.cuMemcpyDtoHAsync(votes.data(), m.votes, n_votes, stream), "cuMemcpyDtoHAsync");
  check(d.cuStreamSynchronize(stream), "L2 page-side probe");
  return tally_votes(votes, n);
}

std::vector<int> measure_address_sides(int device, const std::vector<uint64_t>& addresses) {
  const Topology& t = topology(device);
  std::vector<int> sides(addresses.size(), 0);
  if (!t.split || addresses.empty()) return sides;
  if (fake_driver_active()) {
    for (size_t i = 0; i < addresses.size(); ++i) sides[i] = fake_side_of(addresses[i]);
    return sides;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  ScopedContext ctx(device);
  const Driver& d = driver();
  ProbeModule& m = probe_module(device);
  const int n = static_cast<int>(addresses.size());
  const size_t n_votes = size_t(n) * kVotesPerPage;
  CUdeviceptr dev_addresses = 0, votes = 0;
  check(d.cuMemAlloc(&dev_addresses, n * sizeof(uint64_t)), "cuMemAlloc");
  CUresult r = d.cuMemAlloc(&votes, n_votes);
  std::vector<unsigned char> host(n_votes, 255);
  int reps = 8, trials = 2;
  int threshold = static_cast<int>((t.near_cycles + t.far_cycles) / 2);
  void* args[] = {&dev_addresses, const_cast<int*>(&n), &reps, &trials, &threshold, &m.sm_side_table, &votes};
  if (r == CUDA_SUCCESS) r = d.cuMemcpyHtoD(dev_addresses, addresses.data(), n * sizeof(uint64_t));
  if (r == CUDA_SUCCESS)
    r = d.cuLaunchKernel(m.address_sides, static_cast<unsigned>(n_votes), 1, 1, 32, 1, 1, 0, m.stream, args, nullptr);
  if (r == CUDA_SUCCESS) r = d.cuMemcpyDtoHAsync(host.data(), votes, n_votes, m.stream);
  if (r == CUDA_SUCCESS) r = d.cuStreamSynchronize(m.stream);
  d.cuMemFree(dev_addresses);
  if (votes) d.cuMemFree(votes);
  check(r, "L2 address-side probe");
  return tally_votes(host, n);
}

}  // namespace l2side
