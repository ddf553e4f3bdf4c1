"""l2side: CUDA memory and kernels that know which L2 side ("partition") every byte lives on.

Public API (this module is the only place it is defined):
  topology(device=None)            the measured L2 layout of a GPU
  enable()                         make the side-aware caching allocator torch's allocator
  memory_stats / reset_peak_memory_stats / empty_cache / set_memory_limit / set_memory_fraction /
  release_graph_memory / library_path / owns / empty / is_side_aware / side_of / check_sides
  gemm(a, a_scales, b, b_scales)   FP8 e4m3 GEMM with 1x128 / 128x128 scales, bf16 out (Hopper)
  pack_b / PackedB / PackedWeight  side-aware packed FP8 weights (PackedWeight: as an nn.Module)
  elementwise                      side-aware 1:1 kernels: kernel() to write your own, and built-ins
  jit                              the JIT runtime kernels are built with
"""
from . import elementwise, jit
from .fp8_gemm import gemm
from .memory import (check_sides, empty, empty_cache, enable, is_enabled, is_side_aware, library_path,
                     memory_stats, owns, release_graph_memory, reset_peak_memory_stats, set_memory_fraction,
                     set_memory_limit, side_of)
from .topology import Topology, topology
from .packed_b import PackedB, pack_b
from .packed_weight import PackedWeight
from .quantize import gemm_reference, quantize_activation, quantize_weight

__version__ = "0.1.0"

__all__ = ["Topology", "topology", "enable", "is_enabled", "memory_stats", "reset_peak_memory_stats",
           "empty_cache", "release_graph_memory", "set_memory_limit", "set_memory_fraction", "library_path",
           "owns", "empty", "is_side_aware", "side_of", "check_sides", "gemm", "elementwise", "jit", "__version__",
           "quantize_activation", "quantize_weight", "gemm_reference", "pack_b", "PackedB", "PackedWeight"]
