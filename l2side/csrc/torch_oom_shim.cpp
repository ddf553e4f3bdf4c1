// The entry points torch's CUDAPluggableAllocator calls, between torch and the l2side allocator.
// 1. Out of memory: l2side_malloc returns a null pointer, which torch would hand on as memory, so the throw
//    must happen here, with c10's exception type (torch.OutOfMemoryError in Python).
// 2. (L2SIDE_TORCH_HOOKS) torch.cuda.empty_cache, torch.cuda.set_per_process_memory_fraction and
//    Tensor.record_stream reach a pluggable allocator only through setters that Python does not expose:
//    l2side_shim_install_hooks sets them on torch's current allocator.
// Built at run time against the installed torch (see l2side/memory.py), which keeps the allocator library
// itself free of libtorch.
#include <c10/util/Exception.h>

#include <cstddef>
#include <sys/types.h>

#ifdef L2SIDE_TORCH_HOOKS
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#endif

namespace {
using MallocFn = void* (*)(ssize_t, int, void*);
using FreeFn = void (*)(void*, ssize_t, int, void*);
using MessageFn = size_t (*)(int, char*, size_t);
MallocFn g_malloc = nullptr;
FreeFn g_free = nullptr;
MessageFn g_message = nullptr;
}  // namespace

extern "C" {

__attribute__((visibility("default"))) void l2side_shim_bind(void* malloc_fn, void* free_fn, void* message_fn) {
  g_malloc = reinterpret_cast<MallocFn>(malloc_fn);
  g_free = reinterpret_cast<FreeFn>(free_fn);
  g_message = reinterpret_cast<MessageFn>(message_fn);
}

__attribute__((visibility("default"))) void* l2side_torch_malloc(ssize_t size, int device, void* stream) {
  void* p = g_malloc(size, device, stream);
  if (!p && size > 0) {
    char message[2048] = "out of memory";
    g_message(device, message, sizeof(message));
    TORCH_CHECK_WITH(OutOfMemoryError, false, message);
  }
  return p;
}

__attribute__((visibility("default"))) void l2side_torch_free(void* p, ssize_t size, int device, void* stream) {
  g_free(p, size, device, stream);
}

// Returns 1 when the hooks were set on torch's current allocator, 0 when it is not a pluggable one.
__attribute__((visibility("default"))) int l2side_shim_install_hooks(void* record_fn, void* empty_fn,
                                                                     void* fraction_fn) {
#ifdef L2SIDE_TORCH_HOOKS
  using Pluggable = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;
  auto* current = dynamic_cast<Pluggable*>(c10::cuda::CUDACachingAllocator::get());
  if (!current) return 0;
  auto record = reinterpret_cast<void (*)(void*, cudaStream_t)>(record_fn);
  auto empty = reinterpret_cast<void (*)()>(empty_fn);
  auto fraction = reinterpret_cast<void (*)(double, int)>(fraction_fn);
  current->set_record_stream_fn([record](void* ptr, cudaStream_t stream) { record(ptr, stream); });
  current->set_reset_fn([empty]() { empty(); });
  current->set_memory_fraction_fn([fraction](double f, int device) { fraction(f, device); });
  return 1;
#else
  (void)record_fn, (void)empty_fn, (void)fraction_fn;
  return 0;
#endif
}

}  // extern "C"
