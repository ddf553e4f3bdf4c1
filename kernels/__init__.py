"""CUDA C++ sources JIT-compiled by l2side (the L2 probes, the FP8 GEMM headers). Data only."""
