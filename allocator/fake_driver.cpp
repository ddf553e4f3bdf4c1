#include "fake_driver.h"

#include <atomic>
#include <map>
#include <mutex>
#include <set>

namespace l2side {
namespace {

std::atomic<bool> g_active{false};
FakeConfig g_config;
Driver g_fake;
std::mutex g_mutex;
std::map<CUmemGenericAllocationHandle, std::pair<int, size_t>> g_handles;  // handle -> (device, bytes)
std::map<CUdeviceptr, size_t> g_reservations;                              // base -> size
std::map<CUdeviceptr, CUmemGenericAllocationHandle> g_mappings;            // 2 MiB page VA -> handle
std::map<int, size_t> g_used;
CUdeviceptr g_next_va = 0x7f0000000000ull;
uint64_t g_next_handle = 1;
thread_local CUcontext t_current = nullptr;
constexpr size_t kPage = size_t(2) << 20;

int handle_side(CUmemGenericAllocationHandle h) {  // splitmix64: a fixed pseudo-random side per page
  uint64_t z = h + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<int>((z ^ (z >> 31)) & 1);
}

CUresult getErrorName(CUresult r, const char** s) {
  *s = r == CUDA_SUCCESS ? "CUDA_SUCCESS" : r == CUDA_ERROR_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY"
                                                                            : "CUDA_ERROR_INVALID_VALUE";
  return CUDA_SUCCESS;
}
CUresult getErrorString(CUresult, const char** s) {
  *s = "fake driver error";
  return CUDA_SUCCESS;
}
CUresult deviceGet(CUdevice* d, int ordinal) {
  if (ordinal < 0 || ordinal >= g_config.devices) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}
CUresult deviceGetCount(int* n) {
  *n = g_config.devices;
  return CUDA_SUCCESS;
}
CUresult deviceGetName(char* name, int len, CUdevice d) {
  std::snprintf(name, len, "l2side fake GPU %d", static_cast<int>(d));
  return CUDA_SUCCESS;
}
CUresult deviceGetUuid(CUuuid* u, CUdevice d) {
  for (int i = 0; i < 16; ++i) u->bytes[i] = static_cast<char>(0xf0 + d + i);
  return CUDA_SUCCESS;
}
CUresult deviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
  *v = a == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT ? g_config.num_sms : 0;
  return CUDA_SUCCESS;
}
CUresult primaryCtxRetain(CUcontext* c, CUdevice d) {
  *c = reinterpret_cast<CUcontext>(uintptr_t(0x1000 + d));
  return CUDA_SUCCESS;
}
CUresult ctxGetCurrent(CUcontext* c) {
  *c = t_current;
  return CUDA_SUCCESS;
}
CUresult ctxSetCurrent(CUcontext c) {
  t_current = c;
  return CUDA_SUCCESS;
}
CUresult ctxSynchronize() { return CUDA_SUCCESS; }
CUresult streamCreate(CUstream* s, unsigned) {
  *s = reinterpret_cast<CUstream>(uintptr_t(0x2000));
  return CUDA_SUCCESS;
}
CUresult streamGetCaptureInfo(CUstream, CUstreamCaptureStatus* status, cuuint64_t* id, CUgraph*,
                              const CUgraphNode**, const CUgraphEdgeData**, size_t*) {
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  if (id) *id = 0;
  return CUDA_SUCCESS;
}
CUresult eventCreate(CUevent* e, unsigned) {
  *e = reinterpret_cast<CUevent>(new int(0));
  return CUDA_SUCCESS;
}
CUresult eventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
CUresult eventQuery(CUevent) { return CUDA_SUCCESS; }  // the fake GPU finishes everything at once
CUresult eventDestroy(CUevent e) {
  delete reinterpret_cast<int*>(e);
  return CUDA_SUCCESS;
}
CUresult exchangeCaptureMode(CUstreamCaptureMode*) { return CUDA_SUCCESS; }

CUresult memCreate(CUmemGenericAllocationHandle* h, size_t size, const CUmemAllocationProp* prop,
                   unsigned long long) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int device = prop->location.id;
  if (device < 0 || device >= g_config.devices || size % kPage) return CUDA_ERROR_INVALID_VALUE;
  if (g_used[device] + size > g_config.bytes_per_device) return CUDA_ERROR_OUT_OF_MEMORY;
  g_used[device] += size;
  *h = g_next_handle++;
  g_handles[*h] = {device, size};
  return CUDA_SUCCESS;
}
CUresult memRelease(CUmemGenericAllocationHandle h) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_handles.find(h);
  if (it == g_handles.end()) return CUDA_ERROR_INVALID_VALUE;
  for (auto& m : g_mappings)
    if (m.second == h) return CUDA_ERROR_INVALID_VALUE;  // stricter than the driver: release after unmap
  g_used[it->second.first] -= it->second.second;
  g_handles.erase(it);
  return CUDA_SUCCESS;
}
CUresult memAddressReserve(CUdeviceptr* p, size_t size, size_t align, CUdeviceptr, unsigned long long) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (size == 0 || size % kPage) return CUDA_ERROR_INVALID_VALUE;
  align = align ? align : kPage;
  g_next_va = (g_next_va + align - 1) / align * align;
  *p = g_next_va;
  g_reservations[*p] = size;
  g_next_va += size + kPage;  // a gap, so that overruns do not land in a neighbour
  return CUDA_SUCCESS;
}
CUresult memAddressFree(CUdeviceptr p, size_t size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_reservations.find(p);
  if (it == g_reservations.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;
  auto m = g_mappings.lower_bound(p);
  if (m != g_mappings.end() && m->first < p + size) return CUDA_ERROR_INVALID_VALUE;  // still mapped
  g_reservations.erase(it);
  return CUDA_SUCCESS;
}
bool reserved(CUdeviceptr p, size_t size) {
  auto it = g_reservations.upper_bound(p);
  if (it == g_reservations.begin()) return false;
  --it;
  return p >= it->first && p + size <= it->first + it->second;
}
CUresult memMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (offset || size != kPage || p % kPage || !g_handles.count(h) || !reserved(p, size) || g_mappings.count(p))
    return CUDA_ERROR_INVALID_VALUE;
  g_mappings[p] = h;
  return CUDA_SUCCESS;
}
CUresult memUnmap(CUdeviceptr p, size_t size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (p % kPage || size % kPage) return CUDA_ERROR_INVALID_VALUE;
  for (CUdeviceptr q = p; q < p + size; q += kPage)
    if (!g_mappings.count(q)) return CUDA_ERROR_INVALID_VALUE;
  for (CUdeviceptr q = p; q < p + size; q += kPage) g_mappings.erase(q);
  return CUDA_SUCCESS;
}
CUresult memSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc*, size_t) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (CUdeviceptr q = p; q < p + size; q += kPage)
    if (!g_mappings.count(q)) return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

}  // namespace

void install_fake_driver(const FakeConfig& config) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_config = config;
  g_fake = Driver();
  g_fake.cuGetErrorName = getErrorName;
  g_fake.cuGetErrorString = getErrorString;
  g_fake.cuDeviceGet = deviceGet;
  g_fake.cuDeviceGetCount = deviceGetCount;
  g_fake.cuDeviceGetName = deviceGetName;
  g_fake.cuDeviceGetUuid = deviceGetUuid;
  g_fake.cuDeviceGetAttribute = deviceGetAttribute;
  g_fake.cuDevicePrimaryCtxRetain = primaryCtxRetain;
  g_fake.cuCtxGetCurrent = ctxGetCurrent;
  g_fake.cuCtxSetCurrent = ctxSetCurrent;
  g_fake.cuCtxSynchronize = ctxSynchronize;
  g_fake.cuStreamCreate = streamCreate;
  g_fake.cuStreamGetCaptureInfo = streamGetCaptureInfo;
  g_fake.cuEventCreate = eventCreate;
  g_fake.cuEventRecord = eventRecord;
  g_fake.cuEventQuery = eventQuery;
  g_fake.cuEventDestroy = eventDestroy;
  g_fake.cuThreadExchangeStreamCaptureMode = exchangeCaptureMode;
  g_fake.cuMemCreate = memCreate;
  g_fake.cuMemRelease = memRelease;
  g_fake.cuMemAddressReserve = memAddressReserve;
  g_fake.cuMemAddressFree = memAddressFree;
  g_fake.cuMemMap = memMap;
  g_fake.cuMemUnmap = memUnmap;
  g_fake.cuMemSetAccess = memSetAccess;
  g_active = true;
}

bool fake_driver_active() { return g_active; }
const Driver& fake_driver() { return g_fake; }
const FakeConfig& fake_config() { return g_config; }

int fake_side_of(CUdeviceptr address) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_mappings.find(address & ~CUdeviceptr(kPage - 1));
  if (it == g_mappings.end()) return -1;
  return handle_side(it->second) ^ (__builtin_popcount(uint32_t(address & (kPage - 1)) & g_config.hash_mask) & 1);
}

}  // namespace l2side
