"""FP8 quantisation helpers and the reference GEMM (l2side.quantize) against an independent numpy model."""
import numpy as np
import pytest
import torch

import l2side
from conftest import requires_gpu
from l2side.quantize import (AMAX_FLOOR, FP8_MAX, dequantize_activation, dequantize_weight, gemm_reference,
                             quantize_activation, quantize_weight)


def ceil_div(a, b):
    return -(-a // b)


# ------------------------------------------------------------------------------------------- numpy model
def e4m3_round(v: np.ndarray) -> np.ndarray:
    """float32 -> the nearest e4m3fn value (ties to even), as float64; an independent model of torch's cast."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    assert np.all(a <= FP8_MAX * (1 + 1e-6)), "the quantiser must never produce |x| > 448"
    _, ex = np.frexp(np.where(a > 0, a, 1.0))            # a = f * 2**ex, f in [0.5, 1)
    e = np.maximum(ex - 1, -6)                           # 2**-6 is the smallest normal; below: subnormal step
    quantum = np.ldexp(1.0, e - 3)                       # 3 mantissa bits
    r = np.round(a / quantum) * quantum                  # np.round: half to even; a / quantum is exact
    return np.sign(v) * np.minimum(r, FP8_MAX)


def np_quantize_activation(x: np.ndarray, group=128):
    x = x.astype(np.float32)
    m, k = x.shape
    g = ceil_div(k, group)
    xp = np.zeros((m, g * group), np.float32)
    xp[:, :k] = x
    xv = xp.reshape(m, g, group)
    amax = np.maximum(np.abs(xv).max(axis=2), np.float32(AMAX_FLOOR)).astype(np.float32)
    inv = (np.float32(1.0) / amax).astype(np.float32) * np.float32(FP8_MAX)
    q = e4m3_round((xv * inv[:, :, None]).astype(np.float32)).reshape(m, g * group)[:, :k]
    scale = (amax * np.float32(1.0 / FP8_MAX)).astype(np.float32)
    return q, scale


def np_quantize_weight(w: np.ndarray, block=128):
    w = w.astype(np.float32)
    n, k = w.shape
    nb, kb = ceil_div(n, block), ceil_div(k, block)
    wp = np.zeros((nb * block, kb * block), np.float32)
    wp[:n, :k] = w
    wv = wp.reshape(nb, block, kb, block)
    amax = np.maximum(np.abs(wv).max(axis=(1, 3)), np.float32(AMAX_FLOOR)).astype(np.float32)
    inv = (np.float32(1.0) / amax).astype(np.float32) * np.float32(FP8_MAX)
    q = e4m3_round((wv * inv[:, None, :, None]).astype(np.float32)).reshape(nb * block, kb * block)[:n, :k]
    scale = (amax * np.float32(1.0 / FP8_MAX)).astype(np.float32)
    return q, scale


def randn(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------------------------- the model
def test_numpy_e4m3_model_matches_torch_cast_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[torch.isfinite(codes)].numpy()
    assert np.array_equal(e4m3_round(finite), finite)           # every representable value maps to itself
    mids = np.sort(np.unique(finite))
    mids = ((mids[1:] + mids[:-1]) / 2).astype(np.float32)      # exact ties: to even, like torch
    ties = torch.from_numpy(mids).to(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(e4m3_round(mids), ties)
    v = randn((100000,), seed=1, scale=100.0).clamp(-448, 448)
    assert np.array_equal(e4m3_round(v.numpy()), v.to(torch.float8_e4m3fn).float().numpy())


# ------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("m,k", [(1, 16), (7, 128), (5, 300), (64, 7168), (129, 272), (3, 4112)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_activation_matches_numpy(m, k, dtype):
    x = randn((m, k), dtype, seed=m * 7919 + k)
    q, s = quantize_activation(x, scale_layout="row")
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (m, ceil_div(k, 128)) and s.is_contiguous()
    q_ref, s_ref = np_quantize_activation(x.float().numpy())
    assert np.array_equal(s.numpy(), s_ref)
    assert np.array_equal(q.float().numpy(), q_ref)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 64, 130])
def test_activation_scale_layouts(m):
    k = 520                                              # 5 groups, the last one partial
    x = randn((m, k), seed=m)
    q_mn, s_mn = quantize_activation(x)                  # "mn" is the default
    q_row, s_row = quantize_activation(x, scale_layout="row")
    m4 = ceil_div(m, 4) * 4
    assert s_mn.shape == (m, 5) and s_mn.stride() == (1, m4)
    assert s_mn.untyped_storage().nbytes() >= 5 * m4 * 4
    assert s_row.shape == (m, 5) and s_row.stride() == (5, 1)
    assert torch.equal(q_mn.view(torch.uint8), q_row.view(torch.uint8))
    assert torch.equal(s_mn, s_row)
    # the MN-major view is DeepGEMM's get_col_major_tma_aligned_tensor: column j starts at j * ceil4(M)
    flat = torch.empty(0).set_(s_mn.untyped_storage()).view(-1)
    for j in range(5):
        assert torch.equal(flat[j * m4: j * m4 + m], s_row[:, j])


def test_partial_last_group_uses_its_own_amax():
    x = torch.full((2, 128 + 48), 100.0)
    x[:, 128:] = torch.linspace(-0.5, 0.25, 48)
    q, s = quantize_activation(x, scale_layout="row")
    assert s[0, 0].item() == pytest.approx(100.0 / FP8_MAX, rel=1e-6)
    assert s[0, 1].item() == pytest.approx(0.5 / FP8_MAX, rel=1e-6)
    assert q[:, 128:].float().abs().max().item() == FP8_MAX  # the partial group uses the full range
    w = torch.full((130, 200), 1.0)
    w[128:, 128:] = 1e-3
    qw, sw = quantize_weight(w)
    assert sw.shape == (2, 2) and sw[1, 1].item() == pytest.approx(1e-3 / FP8_MAX, rel=1e-6)


@pytest.mark.parametrize("m,k", [(9, 300), (64, 2048)])
def test_activation_round_trip_error_bound(m, k):
    x = randn((m, k), seed=3) * torch.logspace(-3, 3, k)  # a wide range inside each group
    q, s = quantize_activation(x)
    err = (dequantize_activation(q, s) - x).abs()
    scale = s.repeat_interleave(128, dim=1)[:, :k]
    # half an e4m3 ulp: |x| / 16 for normals, scale * 2**-10 in the subnormal range; plus fp32 rounding
    bound = x.abs() / 16 + scale * 2.0 ** -10 + x.abs() * 1e-6
    assert torch.all(err <= bound)
    rel = (err.norm() / x.norm()).item()
    assert rel < 0.04


def test_zeros_and_extremes():
    x = torch.zeros(3, 256)
    x[1, :128] = 1e30
    x[2, 5] = -1e-30
    q, s = quantize_activation(x, scale_layout="row")
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert s[0, 0].item() == pytest.approx(AMAX_FLOOR / FP8_MAX) and q[0].float().abs().max() == 0
    assert q[1, :128].float().abs().max().item() == FP8_MAX
    assert dequantize_activation(q, s)[1, 0].item() == pytest.approx(1e30, rel=1e-6)


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("n,k", [(1, 16), (200, 300), (256, 256), (129, 4112), (2112, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_matches_numpy(n, k, dtype):
    w = randn((n, k), dtype, seed=n * 31 + k)
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (ceil_div(n, 128), ceil_div(k, 128)) and s.is_contiguous()
    q_ref, s_ref = np_quantize_weight(w.float().numpy())
    assert np.array_equal(s.numpy(), s_ref)
    assert np.array_equal(q.float().numpy(), q_ref)


def test_weight_round_trip_error_bound():
    w = randn((300, 400), seed=5)
    q, s = quantize_weight(w)
    err = (dequantize_weight(q, s) - w).abs()
    scale = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :400]
    assert torch.all(err <= w.abs() / 16 + scale * 2.0 ** -10 + w.abs() * 1e-6)


def test_dequantize_accepts_any_scale_strides():
    w = randn((300, 400), seed=6)
    q, s = quantize_weight(w)
    s_t = s.t().contiguous().t()                         # column-major copy
    assert torch.equal(dequantize_weight(q, s), dequantize_weight(q, s_t))
    x = randn((10, 400), seed=7)
    qa, sa = quantize_activation(x)
    assert torch.equal(dequantize_activation(qa, sa), dequantize_activation(qa, sa.contiguous()))


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (7, 200, 272), (64, 256, 1024), (129, 130, 4112)])
def test_gemm_reference_matches_float64_numpy(m, n, k):
    a, sa = quantize_activation(randn((m, k), seed=m))
    b, sb = quantize_weight(randn((n, k), seed=n))
    out = gemm_reference(a, sa, b, sb)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    qa, s_a = np_quantize_activation(randn((m, k), seed=m).numpy())
    qb, s_b = np_quantize_weight(randn((n, k), seed=n).numpy())
    da = qa * np.repeat(s_a, 128, axis=1)[:, :k]
    db = qb * np.repeat(np.repeat(s_b, 128, axis=0)[:n], 128, axis=1)[:, :k]
    ref = da @ db.T
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    out64 = gemm_reference(a, sa, b, sb, float64=True)
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    # and it approximates the unquantised product (e4m3: ~3% error per element, averaging out)
    x, w = randn((m, k), seed=m), randn((n, k), seed=n)
    exact = x.double() @ w.double().t()
    assert ((out64 - exact).norm() / exact.norm()).item() < 0.05


def test_argument_errors_name_the_argument():
    x = randn((4, 256))
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_activation(x[0])
    with pytest.raises(ValueError, match="x must be a float"):
        quantize_activation(x.to(torch.int32))
    with pytest.raises(ValueError, match="scale_layout"):
        quantize_activation(x, scale_layout="col")
    with pytest.raises(ValueError, match="group"):
        quantize_activation(x, group=0)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_weight(x[None])
    q, s = quantize_activation(x)
    with pytest.raises(ValueError, match="scales must have shape"):
        dequantize_activation(q, s[:, :1])
    with pytest.raises(ValueError, match="q must be a 2-D float8_e4m3fn"):
        dequantize_activation(x, s)
    qw, sw = quantize_weight(randn((8, 128)))
    with pytest.raises(ValueError, match="share K"):
        gemm_reference(q, s, qw, sw)


def test_exported_from_the_package():
    for name in ("quantize_activation", "quantize_weight", "gemm_reference"):
        assert name in l2side.__all__ and getattr(l2side, name) is globals()[name]


def test_use_kernel_falls_back_to_torch_off_cuda():
    x = randn((3, 256))
    a = quantize_activation(x, use_kernel=True)
    b = quantize_activation(x)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------- GPU
@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 16), (5, 300), (64, 7168), (4096, 512)])
def test_cuda_results_are_bit_identical_to_cpu(m, k):
    x = randn((m, k), torch.bfloat16, seed=11)
    q_cpu, s_cpu = quantize_activation(x)
    q_gpu, s_gpu = quantize_activation(x.cuda())
    assert s_gpu.stride() == s_cpu.stride()
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8))
    assert torch.equal(s_gpu.cpu(), s_cpu)
    w = randn((m + 100, k), seed=12)
    qw_cpu, sw_cpu = quantize_weight(w)
    qw_gpu, sw_gpu = quantize_weight(w.cuda())
    assert torch.equal(qw_gpu.cpu().view(torch.uint8), qw_cpu.view(torch.uint8))
    assert torch.equal(sw_gpu.cpu(), sw_cpu)
    if k % 128 == 0:                                     # the elementwise kernel path: the same bits
        q_k, s_k = quantize_activation(x.cuda(), use_kernel=True)
        assert s_k.shape == s_cpu.shape and s_k.stride() == s_cpu.stride()
        assert torch.equal(q_k.cpu().view(torch.uint8), q_cpu.view(torch.uint8))
        assert torch.equal(s_k.cpu(), s_cpu)
