// The CUDA driver API, loaded at run time (dlopen libcuda.so.1 + cuGetProcAddress) so that the
// extension builds and imports on machines without a GPU driver, and never links -lcuda.
#pragma once
#include <cuda.h>
#include <stdexcept>
#include <string>

namespace l2side {

#define L2SIDE_DRIVER_FUNCTIONS(X)                                                               \
  X(cuInit) X(cuDriverGetVersion) X(cuDeviceGet) X(cuDeviceGetCount) X(cuDeviceGetAttribute)     \
  X(cuDeviceGetName) X(cuDeviceGetUuid) X(cuDeviceTotalMem) X(cuDevicePrimaryCtxRetain)          \
  X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuCtxPushCurrent) X(cuCtxPopCurrent)                   \
  X(cuCtxSynchronize) X(cuCtxGetDevice) X(cuGetErrorName) X(cuGetErrorString)                    \
  X(cuMemCreate) X(cuMemRelease) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess)                     \
  X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemGetAllocationGranularity) X(cuMemGetInfo)    \
  X(cuMemAlloc) X(cuMemFree) X(cuMemcpyHtoD) X(cuMemcpyDtoH) X(cuMemcpyDtoHAsync) X(cuMemsetD8)                       \
  X(cuStreamCreate) X(cuStreamSynchronize) X(cuStreamGetCaptureInfo)                             \
  X(cuEventCreate) X(cuEventRecord) X(cuEventQuery) X(cuEventDestroy)                            \
  X(cuModuleLoadData) X(cuModuleUnload) X(cuModuleGetFunction) X(cuFuncSetAttribute)             \
  X(cuLaunchKernel) X(cuLaunchKernelEx) X(cuTensorMapEncodeTiled)

struct Driver {
#define L2SIDE_DECLARE(name) decltype(&::name) name = nullptr;
  L2SIDE_DRIVER_FUNCTIONS(L2SIDE_DECLARE)
#undef L2SIDE_DECLARE
};

// Loads the driver once; throws std::runtime_error (with the reason) when there is none.
const Driver& driver();
// True when libcuda could be loaded and cuInit succeeded; never throws.
bool driver_available(std::string* why = nullptr);

// "cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory)"
std::string error_text(const char* what, CUresult r);

class CudaError : public std::runtime_error {
 public:
  CudaError(const char* what, CUresult r) : std::runtime_error(error_text(what, r)), code(r) {}
  CUresult code;
};

inline void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) throw CudaError(what, r);
}

// Makes the device's primary context (the one PyTorch uses) current on this thread for a scope.
class ScopedContext {
 public:
  explicit ScopedContext(int device);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
 private:
  CUcontext previous_ = nullptr;
  bool switched_ = false;
};

CUcontext primary_context(int device);

}  // namespace l2side
