"""The built-in kernels, each a few lines written with l2side.elementwise.kernel."""
from __future__ import annotations

import functools

from ._kernel import ElementwiseKernel, kernel

FLOAT_DTYPES = ("f32", "bf16", "f16")
_COPY_AS = {1: "i8", 2: "i16", 4: "i32", 8: "i64"}   # copy moves bits: any dtype as the int of its width
FP8_MAX = 448.0                                      # largest finite e4m3 value
AMAX_FLOOR = 1e-4                                    # DeepGEMM's per_token_cast_to_fp8 clamps amax to this


def _dtype_name(t, what: str, allowed=FLOAT_DTYPES) -> str:
    from ._codegen import _DTYPE_ALIASES
    import torch
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    d = _DTYPE_ALIASES.get(str(t.dtype))
    if d not in allowed:
        raise TypeError(f"{what} has dtype {t.dtype}; supported: {', '.join(allowed)}")
    return d


@functools.lru_cache(maxsize=None)
def copy_kernel(width: int) -> ElementwiseKernel:
    d = _COPY_AS[width]
    return kernel(f"copy_{d}", {"x": d}, {"out": d}, "out = x;", compute="native")


@functools.lru_cache(maxsize=None)
def binary_kernel(op: str, dtype: str) -> ElementwiseKernel:
    body = {"add": "out = x + y;", "mul": "out = x * y;"}[op]
    return kernel(f"{op}_{dtype}", {"x": dtype, "y": dtype}, {"out": dtype}, body)


@functools.lru_cache(maxsize=None)
def axpby_kernel(dtype: str) -> ElementwiseKernel:
    return kernel(f"axpby_{dtype}", {"x": dtype, "y": dtype}, {"out": dtype}, "out = alpha * x + beta * y;",
                  scalars={"alpha": "float", "beta": "float"})


@functools.lru_cache(maxsize=None)
def cast_kernel(src: str, dst: str) -> ElementwiseKernel:
    return kernel(f"cast_{src}_{dst}", {"x": src}, {"out": dst}, "out = x;")


@functools.lru_cache(maxsize=None)
def silu_and_mul_kernel(dtype: str, unroll: int = 1, min_ctas=8) -> ElementwiseKernel:
    # gate and up are the two halves of the last dim of one input: row-strided views (rows form).
    # unroll 1 x 8 CTAs per SM (H100, 1 GiB bf16, one process: 588.6-634.7 us vs 666 us for unroll 2 x 4 and
    # 833 us for unroll 4 x 2): the same or fewer loads in flight per thread, more warps to overlap the
    # arithmetic with memory (docs/perf-notes.md, elementwise session 4).
    suffix = "" if (unroll, min_ctas) == (1, 8) else f"_u{unroll}c{min_ctas}"
    return kernel(f"silu_and_mul_{dtype}{suffix}", {"gate": dtype, "up": dtype}, {"out": dtype},
                  "out = __fdividef(gate, 1.0f + __expf(-gate)) * up;",   # vLLM's fast-math form
                  unroll=unroll, min_ctas=min_ctas)


@functools.lru_cache(maxsize=None)
def fp8_quant_kernel(dtype: str, group: int = 128, unroll: int = 1, min_ctas=8) -> ElementwiseKernel:
    # unroll 1 x 8 CTAs per SM: 616-618 us vs 628-634 us for unroll 2 x 4 and ~660 us for unroll 4 x 2 (H100,
    # 1 GiB bf16, same run; bitwise the same output)
    body = f"""
float amax = 0.f;
#pragma unroll
for (int i = 0; i < VEC; ++i) amax = fmaxf(amax, fabsf(x[i]));
amax = fmaxf(group_max(amax), {AMAX_FLOOR!r}f);
// DeepGEMM's reference computes x * (448.0 / amax) and amax / 448.0; torch evaluates them as
// x * (reciprocal(amax) * 448) and amax * (1 / 448): the same roundings here give bit-identical results.
const float inv = (1.0f / amax) * {FP8_MAX!r}f;
#pragma unroll
for (int i = 0; i < VEC; ++i) q[i] = x[i] * inv;
scale = amax * (1.0f / {FP8_MAX!r}f);
"""
    suffix = "" if (unroll, min_ctas) == (1, 8) else f"_u{unroll}c{min_ctas}"
    return kernel(f"fp8_quant_{dtype}_g{group}{suffix}", {"x": dtype}, {"q": "e4m3"}, body, group=group,
                  group_outputs={"scale": "f32"}, unroll=unroll, min_ctas=min_ctas)


def builtin_kernels() -> dict:
    """Every built-in kernel definition, by name (for tests, compile checks and benchmarks)."""
    ks = [copy_kernel(w) for w in (1, 2, 4, 8)]
    for d in FLOAT_DTYPES:
        ks += [binary_kernel("add", d), binary_kernel("mul", d), axpby_kernel(d), silu_and_mul_kernel(d),
               fp8_quant_kernel(d)]
        ks += [cast_kernel(d, e) for e in FLOAT_DTYPES if e != d]
    return {k.name: k for k in ks}


# ------------------------------------------------------------------------------------------------------------
# Public built-ins

def copy(x, out=None, *, mode: str = "near"):
    """out = x (any dtype; bits are copied). `out` is allocated when not given."""
    import torch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"copy: input 'x' must be a torch.Tensor, got {type(x).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"copy: output 'out' must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != x.dtype:
            raise TypeError(f"copy: output 'out' has dtype {out.dtype}, input 'x' {x.dtype}")
    width = x.element_size()
    if width not in _COPY_AS or x.is_complex():
        raise TypeError(f"copy: unsupported dtype {x.dtype}")
    if out is None and x.device.type == "cuda":
        from ._kernel import _owns
        if _owns(x):
            from ..memory import empty as l2_empty
            out = l2_empty(tuple(x.shape), x.dtype, x.device)
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out is not None and out.shape != x.shape:
        raise ValueError(f"copy: output 'out' has shape {tuple(out.shape)}, input 'x' {tuple(x.shape)}")
    src = dst = None
    if x.device.type == "cuda" and x.is_contiguous() and out.is_contiguous() and x.numel() > 0:
        # bits are bits: copy contiguous data as the widest integer its size and both addresses allow
        nbytes = x.numel() * width
        for w in (8, 4, 2):
            if w > width and nbytes % w == 0 and x.data_ptr() % w == 0 and out.data_ptr() % w == 0:
                try:
                    src = x.reshape(-1).view(torch.uint8).view(_torch_int(w))
                    dst = out.reshape(-1).view(torch.uint8).view(_torch_int(w))
                    width = w
                except RuntimeError:     # torch refuses the view (storage offset): keep the element width
                    src = dst = None
                break
    if src is None:
        src = x.view(_torch_int(width))
        dst = out.view(_torch_int(width)) if out is not None else None
    copy_kernel(width)(src, out=dst, mode=mode)
    return out


def _torch_int(width: int):
    import torch
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]


def add(x, y, out=None, *, mode: str = "near"):
    """out = x + y (f32, bf16 or f16; computed in fp32)."""
    return binary_kernel("add", _dtype_name(x, "add: input 'x'"))(x, y, out=out, mode=mode)


def mul(x, y, out=None, *, mode: str = "near"):
    """out = x * y (f32, bf16 or f16; computed in fp32)."""
    return binary_kernel("mul", _dtype_name(x, "mul: input 'x'"))(x, y, out=out, mode=mode)


def axpby(x, y, alpha: float = 1.0, beta: float = 1.0, out=None, *, mode: str = "near"):
    """out = alpha * x + beta * y (f32, bf16 or f16; computed in fp32)."""
    return axpby_kernel(_dtype_name(x, "axpby: input 'x'"))(x, y, alpha=alpha, beta=beta, out=out, mode=mode)


def cast(x, dtype, out=None, *, mode: str = "near"):
    """x converted to `dtype` (fp32 / bf16 / fp16, round to nearest even)."""
    from ._codegen import DefinitionError, canonical_dtype
    src = _dtype_name(x, "cast: input 'x'")
    try:
        dst = canonical_dtype(dtype)
    except DefinitionError as e:
        raise TypeError(f"cast: 'dtype': {e}") from None
    if dst not in FLOAT_DTYPES:
        raise TypeError(f"cast: 'dtype' must be one of {', '.join(FLOAT_DTYPES)}, got {dtype}")
    if dst == src:
        return copy(x, out=out, mode=mode)
    return cast_kernel(src, dst)(x, out=out, mode=mode)


def silu_and_mul(x, out=None, *, mode: str = "near"):
    """vLLM's SiluAndMul: x [..., 2H] -> silu(x[..., :H]) * x[..., H:] [..., H] (computed in fp32)."""
    import torch
    d = _dtype_name(x, "silu_and_mul: input 'x'")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: input 'x' must have an even last dimension, got shape {tuple(x.shape)}")
    if x.device.type == "cuda" and x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError("silu_and_mul: input 'x' must have a contiguous last dimension; call .contiguous()")
    h = x.shape[-1] // 2
    if out is None and x.device.type == "cuda":
        shape = tuple(x.shape[:-1]) + (h,)
        from ._kernel import _owns
        if _owns(x):
            from ..memory import empty as l2_empty
            out = l2_empty(shape, x.dtype, x.device)
        else:
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
    return silu_and_mul_kernel(d)(x[..., :h], x[..., h:], out=out, mode=mode)


def per_token_cast_to_fp8(x, group: int = 128, *, scale_layout: str = "row", out=None, scales=None,
                          mode: str = "near"):
    """Per-token (1 x group) FP8 e4m3 quantisation, as DeepGEMM's per_token_cast_to_fp8:
    amax = max(|x|) over each group of `group` elements of a row, clamped to >= 1e-4;
    q = e4m3(x * (448 / amax)), scale = amax / 448 (fp32).

    x [..., K] (K % group == 0) -> (q [..., K] e4m3, scales [..., K // group] fp32).
    scale_layout: "row" -> scales contiguous [M, K/group]; "mn" -> the MN-major, TMA-aligned layout
    (column-major [M, K/group], M padded to a multiple of 4: strides (1, ceil4(M))), which DeepGEMM-style
    GEMMs read A's scales in. `scales` may also be any [..., K/group] fp32 tensor of your own layout."""
    import torch
    d = _dtype_name(x, "per_token_cast_to_fp8: input 'x'")
    if x.dim() == 0:
        raise ValueError("per_token_cast_to_fp8: input 'x' must have at least one dimension")
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"per_token_cast_to_fp8: the last dimension of 'x' ({k}) must be a multiple of group={group}")
    if scale_layout not in ("row", "mn"):
        raise ValueError(f"per_token_cast_to_fp8: scale_layout must be 'row' or 'mn', got {scale_layout!r}")
    kern = fp8_quant_kernel(d, group)
    if scales is None and x.device.type == "cuda":
        gshape = tuple(x.shape[:-1]) + (k // group,)
        if scale_layout == "mn":
            m = 1
            for s in x.shape[:-1]:
                m *= s
            m_pad = (m + 3) // 4 * 4
            flat = torch.empty((k // group, m_pad), dtype=torch.float32, device=x.device)
            scales = flat[:, :m].t().view(gshape)
        else:
            scales = torch.empty(gshape, dtype=torch.float32, device=x.device)
    q, s = kern(x, q=out, scale=scales, mode=mode)
    return q, s


quantize_fp8 = per_token_cast_to_fp8
