#include "kernel_runtime.h"

#include <stdexcept>

#include "driver_api.h"

namespace l2side {

uintptr_t load_module(int device, const std::string& image) {
  ScopedContext ctx(device);
  CUmodule module;
  check(driver().cuModuleLoadData(&module, image.c_str()), "cuModuleLoadData");
  return reinterpret_cast<uintptr_t>(module);
}

uintptr_t get_function(uintptr_t module, const std::string& name) {
  CUfunction fn;
  CUresult r = driver().cuModuleGetFunction(&fn, reinterpret_cast<CUmodule>(module), name.c_str());
  if (r == CUDA_ERROR_NOT_FOUND)
    throw std::invalid_argument("l2side: no kernel named '" + name + "' in the module (declare it extern \"C\")");
  check(r, "cuModuleGetFunction");
  return reinterpret_cast<uintptr_t>(fn);
}

void set_max_dynamic_smem(uintptr_t function, int bytes) {
  check(driver().cuFuncSetAttribute(reinterpret_cast<CUfunction>(function),
                                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes),
        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
}

namespace {
// The launch configuration (no stream); a cluster shape other than 1x1x1 is attached through `attribute`,
// which must outlive the configuration's use.
CUlaunchConfig launch_config(std::array<unsigned, 3> grid, std::array<unsigned, 3> block, unsigned smem,
                             std::array<unsigned, 3> cluster, CUlaunchAttribute* attribute) {
  CUlaunchConfig config = {};
  config.gridDimX = grid[0];
  config.gridDimY = grid[1];
  config.gridDimZ = grid[2];
  config.blockDimX = block[0];
  config.blockDimY = block[1];
  config.blockDimZ = block[2];
  config.sharedMemBytes = smem;
  if (cluster[0] * cluster[1] * cluster[2] > 1) {
    attribute->id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attribute->value.clusterDim.x = cluster[0];
    attribute->value.clusterDim.y = cluster[1];
    attribute->value.clusterDim.z = cluster[2];
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return config;
}
}  // namespace

void launch(int device, uintptr_t function, std::array<unsigned, 3> grid, std::array<unsigned, 3> block,
            unsigned smem, uintptr_t stream, const std::string& params, std::array<unsigned, 3> cluster,
            const std::vector<size_t>& offsets) {
  ScopedContext ctx(device);
  std::vector<void*> args;
  for (size_t offset : offsets) {
    if (offset >= params.size()) throw std::invalid_argument("launch: a parameter offset lies past the buffer");
    args.push_back(const_cast<char*>(params.data()) + offset);
  }
  size_t size = params.size();
  void* buffer = const_cast<char*>(params.data());
  void* extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, buffer, CU_LAUNCH_PARAM_BUFFER_SIZE, &size,
                   CU_LAUNCH_PARAM_END};
  CUlaunchAttribute attribute = {};
  CUlaunchConfig config = launch_config(grid, block, smem, cluster, &attribute);
  config.hStream = reinterpret_cast<CUstream>(stream);
  check(driver().cuLaunchKernelEx(&config, reinterpret_cast<CUfunction>(function),
                                  offsets.empty() ? nullptr : args.data(), offsets.empty() ? extra : nullptr),
        "cuLaunchKernelEx");
}

int max_active_clusters(int device, uintptr_t function, std::array<unsigned, 3> block, unsigned smem,
                        std::array<unsigned, 3> cluster) {
  ScopedContext ctx(device);
  CUlaunchAttribute attribute = {};
  const std::array<unsigned, 3> grid = {cluster[0] * 1024, cluster[1], cluster[2]};  // any multiple of the cluster
  CUlaunchConfig config = launch_config(grid, block, smem, cluster, &attribute);
  int n = 0;
  check(driver().cuOccupancyMaxActiveClusters(&n, reinterpret_cast<CUfunction>(function), &config),
        "cuOccupancyMaxActiveClusters");
  return n;
}

std::vector<std::pair<size_t, size_t>> param_layout(uintptr_t function, size_t max_count) {
  std::vector<std::pair<size_t, size_t>> layout;
  for (size_t i = 0; i < max_count; ++i) {
    size_t offset = 0, size = 0;
    if (driver().cuFuncGetParamInfo(reinterpret_cast<CUfunction>(function), i, &offset, &size) != CUDA_SUCCESS)
      break;
    layout.emplace_back(offset, size);
  }
  return layout;
}

std::string encode_tensor_map(int dtype, uintptr_t address, const std::vector<uint64_t>& dims,
                              const std::vector<uint64_t>& strides_bytes, const std::vector<uint32_t>& box,
                              int swizzle_bytes, int l2_promotion_bytes, bool oob_fill_nan) {
  const size_t rank = dims.size();
  if (rank < 1 || rank > 5 || box.size() != rank || strides_bytes.size() != rank - 1)
    throw std::invalid_argument("tensor_map: dims and box need 1..5 entries and strides one fewer");
  CUtensorMapSwizzle swizzle;
  switch (swizzle_bytes) {
    case 0: swizzle = CU_TENSOR_MAP_SWIZZLE_NONE; break;
    case 32: swizzle = CU_TENSOR_MAP_SWIZZLE_32B; break;
    case 64: swizzle = CU_TENSOR_MAP_SWIZZLE_64B; break;
    case 128: swizzle = CU_TENSOR_MAP_SWIZZLE_128B; break;
    default: throw std::invalid_argument("tensor_map: swizzle must be 0, 32, 64 or 128 bytes");
  }
  CUtensorMapL2promotion promotion;
  switch (l2_promotion_bytes) {
    case 0: promotion = CU_TENSOR_MAP_L2_PROMOTION_NONE; break;
    case 64: promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_64B; break;
    case 128: promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_128B; break;
    case 256: promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B; break;
    default: throw std::invalid_argument("tensor_map: l2_promotion must be 0, 64, 128 or 256 bytes");
  }
  std::vector<uint32_t> element_strides(rank, 1);
  CUtensorMap map;
  CUresult r = driver().cuTensorMapEncodeTiled(
      &map, static_cast<CUtensorMapDataType>(dtype), static_cast<cuuint32_t>(rank), reinterpret_cast<void*>(address),
      dims.data(), strides_bytes.data(), box.data(), element_strides.data(), CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
      promotion, oob_fill_nan ? CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA : CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(r, "cuTensorMapEncodeTiled");
  return std::string(reinterpret_cast<const char*>(&map), sizeof(map));
}

}  // namespace l2side
