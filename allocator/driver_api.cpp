#include "driver_api.h"

#include "fake_driver.h"

#include <dlfcn.h>
#include <mutex>
#include <vector>

namespace l2side {
namespace {

struct Loaded {
  Driver api;
  std::string error;  // empty when loaded
};

Loaded load() {
  Loaded out;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    const char* e = dlerror();
    out.error = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (e ? e : "not found");
    return out;
  }
  using GetProc = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
  auto get_proc = reinterpret_cast<GetProc>(dlsym(lib, "cuGetProcAddress_v2"));
  if (!get_proc) {
    out.error = "the CUDA driver is too old: cuGetProcAddress_v2 is missing (need a CUDA 12+ driver)";
    return out;
  }
  std::vector<std::string> missing;
#define L2SIDE_RESOLVE(name, version)                                                        \
  {                                                                                          \
    void* fn = nullptr;                                                                      \
    CUdriverProcAddressQueryResult status;                                                   \
    if (get_proc(#name, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &status) !=               \
            CUDA_SUCCESS || !fn)                                                             \
      missing.push_back(#name);                                                              \
    out.api.name = reinterpret_cast<decltype(out.api.name)>(fn);                             \
  }
  L2SIDE_DRIVER_FUNCTIONS(L2SIDE_RESOLVE)
#undef L2SIDE_RESOLVE
  if (!missing.empty()) {
    out.error = "the CUDA driver lacks:";
    for (auto& m : missing) out.error += " " + m;
    return out;
  }
  CUresult r = out.api.cuInit(0);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    out.api.cuGetErrorName(r, &name);
    out.error = std::string("cuInit failed: ") + (name ? name : "unknown error");
  }
  return out;
}

const Loaded& loaded() {
  static const Loaded instance = load();
  return instance;
}

}  // namespace

const Driver& driver() {
  if (fake_driver_active()) return fake_driver();
  const Loaded& l = loaded();
  if (!l.error.empty()) throw std::runtime_error(l.error);
  return l.api;
}

bool driver_available(std::string* why) {
  const Loaded& l = loaded();
  if (why) *why = l.error;
  return l.error.empty();
}

std::string error_text(const char* what, CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (fake_driver_active() || loaded().error.empty()) {
    driver().cuGetErrorName(r, &name);
    driver().cuGetErrorString(r, &text);
  }
  return std::string(what) + " failed: " + (name ? name : ("CUresult " + std::to_string(r)).c_str()) +
         (text ? std::string(" (") + text + ")" : std::string());
}

CUcontext primary_context(int device) {
  // Retained once per device for the life of the process, as the runtime (and PyTorch) do.
  static std::mutex mutex;
  static std::vector<CUcontext> contexts;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0) throw std::invalid_argument("negative device index");
  if (static_cast<size_t>(device) >= contexts.size()) contexts.resize(device + 1, nullptr);
  if (!contexts[device]) {
    const Driver& d = driver();
    CUdevice dev;
    check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
    check(d.cuDevicePrimaryCtxRetain(&contexts[device], dev), "cuDevicePrimaryCtxRetain");
  }
  return contexts[device];
}

ScopedContext::ScopedContext(int device) {
  const Driver& d = driver();
  CUcontext wanted = primary_context(device);
  check(d.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ != wanted) {
    check(d.cuCtxSetCurrent(wanted), "cuCtxSetCurrent");
    switched_ = true;
  }
}

ScopedContext::~ScopedContext() {
  if (switched_) driver().cuCtxSetCurrent(previous_);
}

}  // namespace l2side
