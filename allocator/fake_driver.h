// An in-process stand-in for the CUDA driver's VMM, stream and event calls, so that the caching allocator's
// real logic (page pools, the bit-21 invariant, caching, splitting, stats, limits, OOM) is tested on
// machines without a GPU. Pages get a pseudo-random side; the L2 probe is answered from the fake mappings.
#pragma once
#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include "driver_api.h"

namespace l2side {

struct FakeConfig {
  int devices = 1;
  size_t bytes_per_device = size_t(1) << 30;
  uint32_t hash_mask = 0xb3000;
  int num_sms = 8;
};

void install_fake_driver(const FakeConfig& config);
bool fake_driver_active();
const Driver& fake_driver();
const FakeConfig& fake_config();
// The true side of an address as the fake hardware defines it (-1 when nothing is mapped there).
int fake_side_of(CUdeviceptr address);

}  // namespace l2side
