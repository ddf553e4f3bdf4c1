// The CUDA driver API, loaded at run time (dlopen libcuda.so.1 + cuGetProcAddress) so that the
// extension builds and imports on machines without a GPU driver, and never links -lcuda.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <stdexcept>
#include <string>

namespace l2side {

// Each function with the ABI version we call it by (cudaTypedefs.h's PFN_<name>_v<version>): asking
// cuGetProcAddress for CUDA_VERSION instead would hand out newer ABIs of the same name, e.g. CUDA 13's
// cuCtxSynchronize(CUcontext), whose callers here pass no context.
#define L2SIDE_DRIVER_FUNCTIONS(X) \
  X(cuInit, 2000) X(cuDriverGetVersion, 2020) X(cuDeviceGet, 2000) X(cuDeviceGetCount, 2000) \
  X(cuDeviceGetAttribute, 2000) X(cuDeviceGetName, 2000) X(cuDeviceGetUuid, 11040) \
  X(cuDeviceTotalMem, 3020) X(cuDevicePrimaryCtxRetain, 7000) X(cuCtxGetCurrent, 4000) \
  X(cuCtxSetCurrent, 4000) X(cuCtxSynchronize, 2000) X(cuCtxGetDevice, 2000) X(cuGetErrorName, 6000) \
  X(cuGetErrorString, 6000) X(cuMemCreate, 10020) X(cuMemRelease, 10020) X(cuMemMap, 10020) \
  X(cuMemUnmap, 10020) X(cuMemSetAccess, 10020) X(cuMemAddressReserve, 10020) X(cuMemAddressFree, 10020) \
  X(cuMemGetAllocationGranularity, 10020) X(cuMemGetInfo, 3020) X(cuMemAlloc, 3020) X(cuMemFree, 3020) \
  X(cuMemcpyHtoD, 3020) X(cuMemcpyDtoH, 3020) X(cuMemcpyDtoHAsync, 3020) X(cuMemsetD8, 3020) \
  X(cuStreamCreate, 2000) X(cuStreamSynchronize, 2000) X(cuStreamGetCaptureInfo, 12030) \
  X(cuEventCreate, 2000) X(cuEventRecord, 2000) X(cuEventQuery, 2000) X(cuEventDestroy, 4000) \
  X(cuModuleLoadData, 2000) X(cuModuleUnload, 2000) X(cuModuleGetFunction, 2000) \
  X(cuFuncSetAttribute, 9000) X(cuLaunchKernel, 4000) X(cuLaunchKernelEx, 11060) \
  X(cuTensorMapEncodeTiled, 12000) X(cuThreadExchangeStreamCaptureMode, 10010) \
  X(cuDeviceCanAccessPeer, 4000) X(cuFuncGetParamInfo, 12040) \
  X(cuOccupancyMaxActiveClusters, 11070)

struct Driver {
#define L2SIDE_DECLARE(name, version) PFN_##name##_v##version name = nullptr;
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

// Relaxed stream-capture mode on this thread for a scope: lets the allocator create, probe and map pages
// while another stream of the process is being captured into a CUDA graph (as torch does for cudaMalloc).
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() : mode_(CU_STREAM_CAPTURE_MODE_RELAXED) {
    ok_ = driver().cuThreadExchangeStreamCaptureMode(&mode_) == CUDA_SUCCESS;
  }
  ~RelaxedCaptureMode() {
    if (ok_) driver().cuThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;
 private:
  CUstreamCaptureMode mode_;
  bool ok_ = false;
};

}  // namespace l2side
