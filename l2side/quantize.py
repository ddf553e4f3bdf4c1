"""FP8 e4m3 quantisation in the layouts `l2side.gemm` takes, and the float32 reference GEMM (pure torch, any device).

The recipe is DeepGEMM's (per_token_cast_to_fp8 / per_block_cast_to_fp8):
  per group (1 x 128 of a row for activations, 128 x 128 for weights)
      amax  = max(|x|) over the group, clamped to >= 1e-4
      q     = e4m3(x * ((1 / amax) * 448))        # round to nearest even
      scale = amax * (1 / 448)                    # float32; dequantised value = q * scale
All arithmetic is float32, with the roundings torch's CUDA evaluation of DeepGEMM's reference uses (and
`l2side.elementwise.per_token_cast_to_fp8`), written so that CPU and CUDA give the same bits. A last partial
group (K or N not a multiple of 128) uses its own amax.

    quantize_activation(x)   x [M, K]  -> q [M, K] e4m3, scales [M, ceil(K/128)] float32
                             scale_layout="mn" (default, the GEMM's native layout): strides (1, ceil4(M));
                             "row": contiguous
    quantize_weight(w)       w [N, K]  -> q [N, K] e4m3, scales [ceil(N/128), ceil(K/128)] float32 contiguous
    dequantize_activation(q, scales), dequantize_weight(q, scales) -> float32
    gemm_reference(a, a_scales, b, b_scales) -> float32 [M, N] = dequant(a) @ dequant(b).T (float32 math,
                             TF32 off; float64=True: exact dequantisation, float64 matmul, float64 result)
"""
from __future__ import annotations

FP8_MAX = 448.0          # the largest finite e4m3 value
AMAX_FLOOR = 1e-4        # DeepGEMM clamps amax to this, so all-zero groups get a finite, non-zero scale
GROUP = 128

__all__ = ["quantize_activation", "quantize_weight", "dequantize_activation", "dequantize_weight",
           "gemm_reference", "FP8_MAX", "AMAX_FLOOR"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_float_2d(x, what: str):
    import torch
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.element_size() == 1:
        raise ValueError(f"{what} must be a float32/bfloat16/float16 tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must not be empty, got shape {tuple(x.shape)}")


def _check_positive_int(v, what: str):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")


def _amax_to_inv_and_scale(amax):
    """float32 amax (already clamped) -> (multiplier into fp8, dequantisation scale), DeepGEMM's roundings."""
    import torch
    inv = torch.reciprocal(amax) * FP8_MAX          # torch's CUDA evaluation of 448.0 / amax
    scale = amax * (1.0 / FP8_MAX)                  # ... and of amax / 448.0
    return inv, scale


def _mn_major(scales):
    """[M, G] float32 -> the same values with strides (1, ceil4(M)) (DeepGEMM's TMA-aligned column-major)."""
    import torch
    m, g = scales.shape
    flat = torch.empty((g, _ceil_div(m, 4) * 4), dtype=torch.float32, device=scales.device)
    if flat.shape[1] > m:
        flat[:, m:].zero_()                         # padding rows: deterministic, never read by the GEMM
    view = flat[:, :m].t()
    view.copy_(scales)
    return view


def quantize_activation(x, group: int = GROUP, scale_layout: str = "mn", *, use_kernel: bool = False):
    """Per-token (1 x `group`) e4m3 quantisation of x [M, K] (any K >= 1; float32/bf16/fp16, CPU or CUDA).

    Returns (q [M, K] float8_e4m3fn contiguous, scales [M, ceil(K/group)] float32) with
    dequant(q)[i, j] = q[i, j] * scales[i, j // group]. scale_layout "mn": scales has strides (1, ceil4(M))
    (what l2side.gemm reads natively, DeepGEMM's layout); "row": contiguous.
    use_kernel=True (CUDA, K % group == 0) runs l2side.elementwise.per_token_cast_to_fp8 instead of torch ops
    (bit-identical; faster for large inputs)."""
    import torch
    _check_float_2d(x, "x")
    _check_positive_int(group, "group")
    if scale_layout not in ("mn", "row"):
        raise ValueError(f"scale_layout must be 'mn' or 'row', got {scale_layout!r}")
    m, k = x.shape
    if use_kernel and x.device.type == "cuda" and k % group == 0 and x.dtype in (torch.float32, torch.bfloat16,
                                                                                   torch.float16):
        from .elementwise import per_token_cast_to_fp8
        xc = x if x.stride(-1) == 1 else x.contiguous()
        return per_token_cast_to_fp8(xc, group, scale_layout=scale_layout)
    g = _ceil_div(k, group)
    xf = x.to(torch.float32)
    if g * group != k:                              # zeros do not change a group's amax
        xf = torch.nn.functional.pad(xf, (0, g * group - k))
    xv = xf.reshape(m, g, group)
    amax = xv.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    inv, scale = _amax_to_inv_and_scale(amax)
    q = (xv * inv.unsqueeze(2)).to(torch.float8_e4m3fn).reshape(m, g * group)
    q = q[:, :k].contiguous()
    scale = scale.contiguous()
    return q, (_mn_major(scale) if scale_layout == "mn" else scale)


def quantize_weight(w, block: int = GROUP):
    """Per-block (`block` x `block`) e4m3 quantisation of w [N, K] (any N, K >= 1; CPU or CUDA).

    Returns (q [N, K] float8_e4m3fn contiguous, scales [ceil(N/block), ceil(K/block)] float32 contiguous) with
    dequant(q)[i, j] = q[i, j] * scales[i // block, j // block]."""
    import torch
    _check_float_2d(w, "w")
    _check_positive_int(block, "block")
    n, k = w.shape
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    wf = w.to(torch.float32)
    if nb * block != n or kb * block != k:
        wf = torch.nn.functional.pad(wf, (0, kb * block - k, 0, nb * block - n))
    wv = wf.reshape(nb, block, kb, block)
    amax = wv.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR)              # [nb, kb]
    inv, scale = _amax_to_inv_and_scale(amax)
    q = (wv * inv[:, None, :, None]).to(torch.float8_e4m3fn).reshape(nb * block, kb * block)
    return q[:n, :k].contiguous(), scale.contiguous()


def _check_q(q, what: str):
    import torch
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        desc = f"{tuple(q.shape)} {q.dtype}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{what} must be a 2-D float8_e4m3fn tensor, got {desc}")


def _check_scales(s, what: str, shape: tuple, device):
    import torch
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        desc = f"{s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{what} must be a float32 tensor, got {desc}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(s.shape)}")
    if s.device != device:
        raise ValueError(f"{what} is on {s.device}, its fp8 tensor on {device}")


def dequantize_activation(q, scales, group: int = GROUP, *, dtype=None):
    """q [M, K] e4m3, scales [M, ceil(K/group)] float32 (any strides) -> float32 [M, K] (or `dtype`:
    torch.float64 gives the exact products)."""
    import torch
    _check_q(q, "q")
    m, k = q.shape
    _check_scales(scales, "scales", (m, _ceil_div(k, group)), q.device)
    dtype = dtype or torch.float32
    s = scales.to(dtype).repeat_interleave(group, dim=1)[:, :k]
    return q.to(dtype) * s


def dequantize_weight(q, scales, block: int = GROUP, *, dtype=None):
    """q [N, K] e4m3, scales [ceil(N/block), ceil(K/block)] float32 (any strides) -> float32 [N, K] (or
    `dtype`: torch.float64 gives the exact products)."""
    import torch
    _check_q(q, "q")
    n, k = q.shape
    _check_scales(scales, "scales", (_ceil_div(n, block), _ceil_div(k, block)), q.device)
    dtype = dtype or torch.float32
    s = scales.to(dtype).repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]
    return q.to(dtype) * s


def gemm_diff(x, y) -> float:
    """DeepGEMM's calc_diff between a result and its reference: 1 - 2 sum(xy) / sum(x^2 + y^2), in float64
    (~1e-5 or less for a correct bf16 GEMM; 0 when both are all zeros)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return (1 - 2 * (x * y).sum() / denom).item() if denom > 0 else 0.0


def gemm_reference(a, a_scales, b, b_scales, *, float64: bool = False):
    """dequant(a) @ dequant(b).T: float32 [M, N] computed in float32 with TF32 off (float64=True: in float64,
    returned as float64). Same argument conventions as l2side.gemm, on any device."""
    import torch
    _check_q(a, "a")
    _check_q(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a [M, K] and b [N, K] must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device}, a on {a.device}")
    dtype = torch.float64 if float64 else torch.float32
    da = dequantize_activation(a, a_scales, dtype=dtype)
    db = dequantize_weight(b, b_scales, dtype=dtype)
    if float64:
        return da @ db.t()
    if da.device.type != "cuda":
        return da @ db.t()
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        return da @ db.t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
