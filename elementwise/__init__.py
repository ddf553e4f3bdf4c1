"""l2side.elementwise: side-aware 1:1 elementwise kernels for torch tensors (see docs/elementwise.md).

    from l2side import elementwise as ew
    scale_add = ew.kernel("scale_add", inputs={"x": "bf16", "y": "bf16"}, outputs={"out": "bf16"},
                          scalars={"alpha": "float"}, body="out = alpha * x + y;")
    out = scale_add(x, y, alpha=0.5)          # JIT-compiled on first use, cached on disk

On side-aware memory (l2side.enable() or l2side.empty) every SM only touches the 4 KiB chunks on its own
L2 side; on any other memory the same kernel runs a side-agnostic vectorised loop. `mode="off"` / `"far"`
turn the side choice off / invert it (for measurements).
"""
from ._codegen import DTYPES, MODES, DefinitionError, Plan
from ._kernel import ElementwiseKernel, kernel, last_plan
from .builtins import (add, axpby, builtin_kernels, cast, copy, mul, per_token_cast_to_fp8, quantize_fp8,
                       silu_and_mul)

__all__ = ["kernel", "ElementwiseKernel", "DefinitionError", "Plan", "DTYPES", "MODES", "copy", "add", "mul",
           "axpby", "cast", "silu_and_mul", "per_token_cast_to_fp8", "quantize_fp8", "builtin_kernels",
           "last_plan"]
