// Loading and launching JIT-compiled kernels through the driver API (l2side.jit sits on top of this).
#pragma once
#include <cuda.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace l2side {

uintptr_t load_module(int device, const std::string& image);  // cubin or PTX bytes
uintptr_t get_function(uintptr_t module, const std::string& name);
void set_max_dynamic_smem(uintptr_t function, int bytes);
// params: the kernel's parameter buffer laid out by the C ABI (see l2side.jit.Params).
// With `offsets` (each parameter's offset in the buffer, e.g. from param_layout) the parameters are handed
// over one by one (kernelParams), so the driver places each where the kernel expects it; without, the buffer
// is passed whole (CU_LAUNCH_PARAM_BUFFER_POINTER).
void launch(int device, uintptr_t function, std::array<unsigned, 3> grid, std::array<unsigned, 3> block,
            unsigned smem, uintptr_t stream, const std::string& params, std::array<unsigned, 3> cluster,
            const std::vector<size_t>& offsets = {});
// How many clusters of `cluster` CTAs (a shape larger than 1x1x1) (each `block` threads, `smem` dynamic bytes) can be resident at once.
int max_active_clusters(int device, uintptr_t function, std::array<unsigned, 3> block, unsigned smem,
                        std::array<unsigned, 3> cluster);
// (offset, size) of the first max_count kernel parameters (fewer if the kernel has fewer), as the compiler laid
// them out (cuFuncGetParamInfo).
std::vector<std::pair<size_t, size_t>> param_layout(uintptr_t function, size_t max_count);
// cuTensorMapEncodeTiled; returns the 128-byte CUtensorMap.
std::string encode_tensor_map(int dtype, uintptr_t address, const std::vector<uint64_t>& dims,
                              const std::vector<uint64_t>& strides_bytes, const std::vector<uint32_t>& box,
                              int swizzle_bytes, int l2_promotion_bytes, bool oob_fill_nan);

}  // namespace l2side
