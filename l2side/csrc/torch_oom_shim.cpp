// Turns l2side's "out of memory" (a null pointer from l2side_malloc) into torch.OutOfMemoryError.
// torch's CUDAPluggableAllocator hands a null pointer on as if it were memory, so the throw must happen in
// the entry point itself, with c10's exception type: this small library is built at run time against the
// installed torch's headers (see l2side/memory.py), which keeps the allocator itself free of libtorch.
#include <c10/util/Exception.h>

#include <cstddef>
#include <sys/types.h>

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

}  // extern "C"
