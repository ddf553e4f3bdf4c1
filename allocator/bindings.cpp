// The l2side._native extension: the CUDAPluggableAllocator entry points (l2side_malloc / l2side_free,
// found by torch with dlsym in this very library) and the Python bindings for topology, stats, control,
// side-aware tensors and the kernel runtime.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <algorithm>
#include <cstring>

#include "caching_allocator.h"
#include "driver_api.h"
#include "fake_driver.h"
#include "kernel_runtime.h"
#include "topology.h"

namespace py = pybind11;
using namespace l2side;

// ---- CUDAPluggableAllocator entry points (signatures fixed by torch) -------------------------------------
extern "C" {

__attribute__((visibility("default"))) void* l2side_malloc(ssize_t size, int device, CUstream stream) {
  try {
    return device_allocator(device).malloc(static_cast<size_t>(size), stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "l2side: allocation of %zd bytes on device %d failed: %s\n", size, device, e.what());
    return nullptr;
  }
}

__attribute__((visibility("default"))) void l2side_free(void* ptr, ssize_t, int device, CUstream) {
  try {
    device_allocator(device).free(ptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "l2side: free of %p on device %d failed: %s\n", ptr, device, e.what());
  }
}

// torch hooks (installed through the shim): Tensor.record_stream, torch.cuda.empty_cache,
// torch.cuda.set_per_process_memory_fraction.
__attribute__((visibility("default"))) void l2side_record_stream(void* ptr, CUstream stream) {
  for (int d = 0; d < 64; ++d)
    if (device_allocator_exists(d) && device_allocator(d).record_stream(reinterpret_cast<uintptr_t>(ptr), stream))
      return;
}

__attribute__((visibility("default"))) void l2side_empty_cache_all() {
  for (int d = 0; d < 64; ++d) {
    if (!device_allocator_exists(d)) continue;
    try {
      device_allocator(d).empty_cache();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "l2side: empty_cache on device %d failed: %s\n", d, e.what());
    }
  }
}

__attribute__((visibility("default"))) void l2side_set_memory_fraction(double fraction, int device) {
  try {
    CUdevice dev;
    size_t total = 0;
    check(driver().cuDeviceGet(&dev, device), "cuDeviceGet");
    check(driver().cuDeviceTotalMem(&total, dev), "cuDeviceTotalMem");
    device_allocator(device).set_limit(static_cast<size_t>(total * fraction));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "l2side: set_memory_fraction on device %d failed: %s\n", device, e.what());
  }
}

// Copies device's last out-of-memory explanation into buf (for the torch OOM shim); returns its length.
__attribute__((visibility("default"))) size_t l2side_last_oom_message(int device, char* buf, size_t n) {
  if (!buf || n == 0) return 0;
  std::string msg;
  try {
    msg = device_allocator(device).last_oom_message();
  } catch (const std::exception& e) {
    msg = e.what();
  }
  size_t len = std::min(msg.size(), n - 1);
  std::memcpy(buf, msg.data(), len);
  buf[len] = 0;
  return len;
}

}  // extern "C"

namespace {

// ---- DLPack (the stable C ABI, v0.8 layout) for handing side-aware memory to torch ----------------------
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data; DLDevice device; int32_t ndim; DLDataType dtype; int64_t* shape; int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor { DLTensor dl_tensor; void* manager_ctx; void (*deleter)(DLManagedTensor*); };
constexpr int32_t kDLCUDA = 2;

struct ManagedBytes {
  DLManagedTensor managed;
  int64_t shape[1];
  int device;
};

void delete_managed(DLManagedTensor* m) {
  auto* owner = static_cast<ManagedBytes*>(m->manager_ctx);
  l2side_free(m->dl_tensor.data, 0, owner->device, nullptr);
  delete owner;
}

// A 1-D uint8 CUDA tensor of `nbytes` from the side-aware allocator, as a DLPack capsule.
py::capsule side_aware_bytes(int device, int64_t nbytes, uintptr_t stream) {
  if (nbytes <= 0) throw std::invalid_argument("nbytes must be positive");
  void* p = device_allocator(device).malloc(static_cast<size_t>(nbytes), reinterpret_cast<CUstream>(stream));
  if (!p) throw std::runtime_error(device_allocator(device).last_oom_message());
  auto* owner = new ManagedBytes();
  owner->device = device;
  owner->shape[0] = nbytes;
  DLTensor& t = owner->managed.dl_tensor;
  t.data = p;
  t.device = {kDLCUDA, device};
  t.ndim = 1;
  t.dtype = {1 /* kDLUInt */, 8, 1};
  t.shape = owner->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  owner->managed.manager_ctx = owner;
  owner->managed.deleter = delete_managed;
  return py::capsule(&owner->managed, "dltensor", [](PyObject* capsule) {
    // Only an unconsumed capsule still owns the tensor (torch renames consumed ones "used_dltensor").
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
      if (m && m->deleter) m->deleter(m);
    }
  });
}

py::dict topology_dict(const Topology& t) {
  py::dict d;
  d["device"] = t.device;
  d["name"] = t.name;
  d["uuid"] = t.uuid;
  d["num_sms"] = t.num_sms;
  d["sm_side"] = t.sm_side;
  d["sms_per_side"] = py::make_tuple(t.sms_per_side[0], t.sms_per_side[1]);
  d["hash_mask"] = t.hash_mask;
  d["split"] = t.split;
  d["near_cycles"] = t.near_cycles;
  d["far_cycles"] = t.far_cycles;
  d["linearity"] = t.linearity;
  d["probe_ms"] = t.probe_ms;
  d["from_cache"] = t.from_cache;
  return d;
}

std::array<unsigned, 3> dim3_of(const py::object& o) {
  std::array<unsigned, 3> d = {1, 1, 1};
  if (py::isinstance<py::int_>(o)) {
    d[0] = o.cast<unsigned>();
    return d;
  }
  auto seq = o.cast<std::vector<unsigned>>();
  if (seq.empty() || seq.size() > 3) throw std::invalid_argument("a launch dimension takes 1 to 3 entries");
  for (size_t i = 0; i < seq.size(); ++i) d[i] = seq[i];
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "l2side native core: side-aware CUDA caching allocator, L2 topology probe, kernel runtime";
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def("driver_status", []() {
    std::string why;
    bool ok = driver_available(&why);
    return py::make_tuple(ok, why);
  }, "(available, reason): whether the CUDA driver could be loaded");
  m.def("device_count", &device_count);
  m.def("total_memory", [](int device) {
    CUdevice dev;
    size_t bytes = 0;
    check(driver().cuDeviceGet(&dev, device), "cuDeviceGet");
    check(driver().cuDeviceTotalMem(&bytes, dev), "cuDeviceTotalMem");
    return bytes;
  }, "total memory of a device, without initialising torch's CUDA state");
  m.def("set_probe_ptx", &set_probe_ptx);
  m.def("has_probe_ptx", &has_probe_ptx);
  m.def("set_cache_dir", &set_cache_dir);
  m.def("topology", [](int device, bool reprobe) {
    const Topology* t;
    {
      py::gil_scoped_release release;
      t = &topology(device, reprobe);
    }
    return topology_dict(*t);
  }, py::arg("device"), py::arg("reprobe") = false);

  // allocator control
  m.def("stats", [](int device) { return device_allocator(device).stats(); });
  m.def("has_allocator", &device_allocator_exists);
  m.def("reset_peaks", [](int device) { device_allocator(device).reset_peaks(); });
  m.def("empty_cache", [](int device) {
    py::gil_scoped_release release;
    device_allocator(device).empty_cache();
  });
  m.def("release_graph_memory", [](int device) {
    py::gil_scoped_release release;
    device_allocator(device).release_graph_memory();
  });
  m.def("set_limit", [](int device, int64_t bytes) {
    device_allocator(device).set_limit(bytes < 0 ? SIZE_MAX : static_cast<size_t>(bytes));
  });
  m.def("owns", [](int device, uintptr_t address) {
    return device_allocator_exists(device) && device_allocator(device).owns(address);
  });
  m.def("last_oom_message", [](int device) { return device_allocator(device).last_oom_message(); });
  m.def("side_aware_bytes", &side_aware_bytes, py::arg("device"), py::arg("nbytes"), py::arg("stream"));
  m.def("malloc_address", []() { return reinterpret_cast<uintptr_t>(&l2side_malloc); });
  m.def("free_address", []() { return reinterpret_cast<uintptr_t>(&l2side_free); });
  m.def("oom_message_address", []() { return reinterpret_cast<uintptr_t>(&l2side_last_oom_message); });
  m.def("hook_addresses", []() {
    return py::make_tuple(reinterpret_cast<uintptr_t>(&l2side_record_stream),
                          reinterpret_cast<uintptr_t>(&l2side_empty_cache_all),
                          reinterpret_cast<uintptr_t>(&l2side_set_memory_fraction));
  }, "(record_stream, empty_cache, set_memory_fraction) entry points for torch's allocator hooks");
  m.def("record_stream", [](int device, uintptr_t ptr, uintptr_t stream) {
    return device_allocator(device).record_stream(ptr, reinterpret_cast<CUstream>(stream));
  });

  // raw access (benchmarks, tests) and the CPU test double of the driver
  m.def("malloc", [](int device, int64_t nbytes, uintptr_t stream) {
    void* p = device_allocator(device).malloc(static_cast<size_t>(nbytes), reinterpret_cast<CUstream>(stream));
    if (!p && nbytes > 0) throw std::runtime_error(device_allocator(device).last_oom_message());
    return reinterpret_cast<uintptr_t>(p);
  }, py::arg("device"), py::arg("nbytes"), py::arg("stream") = 0);
  m.def("free", [](int device, uintptr_t ptr) { device_allocator(device).free(reinterpret_cast<void*>(ptr)); });
  m.def("use_fake_driver", [](int devices, size_t bytes_per_device, uint32_t hash_mask, int num_sms) {
    if (device_allocator_exists(0)) throw std::runtime_error("use_fake_driver must come before any allocation");
    FakeConfig c;
    c.devices = devices;
    c.bytes_per_device = bytes_per_device;
    c.hash_mask = hash_mask;
    c.num_sms = num_sms;
    install_fake_driver(c);
  }, py::arg("devices") = 1, py::arg("bytes_per_device") = size_t(1) << 30, py::arg("hash_mask") = 0xb3000,
     py::arg("num_sms") = 8);
  m.def("measure_address_sides", [](int device, const std::vector<uint64_t>& addresses) {
    py::gil_scoped_release release;
    return measure_address_sides(device, addresses);
  });
  m.def("sm_probe_offsets", &sm_probe_offsets);
  m.def("analyse_sm_latencies", [](const std::vector<std::vector<unsigned>>& latencies) {
    ProbeAnalysis a = analyse_sm_latencies(latencies);
    py::dict d;
    d["split"] = a.split;
    d["hash_mask"] = a.hash_mask;
    d["sm_side"] = a.sm_side;
    d["near_cycles"] = a.near_cycles;
    d["far_cycles"] = a.far_cycles;
    d["linearity"] = a.linearity;
    d["disagreeing_sms"] = a.disagreeing_sms;
    return d;
  });
  m.def("fake_side_of", [](uintptr_t address) { return fake_side_of(address); });

  // kernel runtime
  m.def("load_module", [](int device, py::bytes image) { return load_module(device, std::string(image)); });
  m.def("get_function", &get_function);
  m.def("set_max_dynamic_smem", &set_max_dynamic_smem);
  m.def("launch", [](int device, uintptr_t fn, py::object grid, py::object block, unsigned smem, uintptr_t stream,
                     py::bytes params, py::object cluster, std::vector<size_t> offsets) {
    std::string p(params);
    launch(device, fn, dim3_of(grid), dim3_of(block), smem, stream, p, dim3_of(cluster), offsets);
  }, py::arg("device"), py::arg("function"), py::arg("grid"), py::arg("block"), py::arg("smem"),
     py::arg("stream"), py::arg("params"), py::arg("cluster") = 1, py::arg("offsets") = std::vector<size_t>{});
  m.def("param_layout", &param_layout);
  m.def("max_active_clusters", [](int device, uintptr_t fn, py::object block, unsigned smem, py::object cluster) {
    return max_active_clusters(device, fn, dim3_of(block), smem, dim3_of(cluster));
  });
  m.def("encode_tensor_map", [](int dtype, uintptr_t address, std::vector<uint64_t> dims,
                                std::vector<uint64_t> strides, std::vector<uint32_t> box, int swizzle,
                                int l2_promotion, bool oob_nan) {
    return py::bytes(encode_tensor_map(dtype, address, dims, strides, box, swizzle, l2_promotion, oob_nan));
  });
}
