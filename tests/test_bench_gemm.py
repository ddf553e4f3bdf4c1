"""benchmarks/bench_gemm.py on the CPU: the cuBLAS blockwise scale layouts it builds (checked against torch's own
rules), the table/CSV output, and a clean exit without a GPU."""
import csv
import os

import pytest
import torch

from conftest import cuda_available, load_script, run_python
from l2side.quantize import quantize_activation, quantize_weight


bench = load_script("benchmarks", "bench_gemm.py")


def ceil_div(a, b):
    return -(-a // b)


# torch's rules (aten/src/ATen/native/cuda/ScaledBlas.cpp: check_size_stride, is_blockwise_1x128_scaling,
# is_blockwise_128x128_scaling; get_joint_scaling checks (a, scale_a) and (b.t(), scale_b.t()))
def _size_stride(s, dim, size, stride):
    return s.size(dim) == size and (size <= 1 or s.stride(dim) == stride)


def _is_1x128(t, s):
    return (s.dtype == torch.float32 and s.dim() == 2 and _size_stride(s, 0, t.size(0), 1)
            and _size_stride(s, 1, ceil_div(t.size(1), 128), t.size(0)))


def _is_128x128(t, s):
    return (s.dtype == torch.float32 and s.dim() == 2
            and _size_stride(s, 0, ceil_div(t.size(0), 128), ceil_div(t.size(1), 128))
            and _size_stride(s, 1, ceil_div(t.size(1), 128), 1))


class _Spy:
    """Stands in for torch in cublas_variants: records the tensors handed to torch._scaled_mm."""

    def __init__(self):
        self.calls = []
        self.bfloat16 = torch.bfloat16
        self.nn = torch.nn

    def _scaled_mm(self, *args, **kwargs):
        self.calls.append((args, kwargs))


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 24576, 1536), (4096, 32768, 512), (1, 256, 256),
                                   (7, 200, 272), (130, 7168, 2048)])
def test_cublas_scales_follow_torchs_blockwise_rules(m, n, k):
    a, sa = quantize_activation(torch.randn(m, k), scale_layout="mn")
    b, sb = quantize_weight(torch.randn(n, k))
    spy = _Spy()
    label, fn = bench.cublas_variants(spy, a, sa, b, sb)[0]
    assert label == "torch._scaled_mm"
    fn()
    (mat1, mat2, scale_a, scale_b), kwargs = spy.calls[0]
    assert kwargs == {"out_dtype": torch.bfloat16}
    assert mat1 is a and mat2.shape == (k, n) and mat2.stride() == (1, k)       # b.t(): column-major [K, N]
    assert _is_1x128(mat1, scale_a), (scale_a.shape, scale_a.stride())
    assert _is_128x128(mat2.t(), scale_b.t()), (scale_b.shape, scale_b.stride())
    # not mistaken for the (128x128, 1x128) pair torch tries first
    assert not (_is_128x128(mat1, scale_a) and _is_1x128(mat2.t(), scale_b.t())) or m == 1
    assert torch.equal(scale_a, sa) and torch.equal(scale_b.t(), sb)


def test_markdown_and_csv(tmp_path):
    rows = [{"M": 64, "N": 2112, "K": 7168, "l2side_kernel_us": 10.0, "l2side_kernel_tflops": 200.0,
             "cublas_error": "RuntimeError: refused | with a bar", "speedup_ev": 1.234, "l2side_diff": 1e-5},
            {"M": 128, "N": 4096, "K": 7168, "l2side_error": "skipped: past --deadline 225 s"}]
    table = bench.markdown(rows)
    lines = table.splitlines()
    assert lines[0].count("|") == len(bench.COLUMNS) + 1 and lines[2].count("|") == len(bench.COLUMNS) + 1
    assert "| 64 | 2112 | 7168 | 10.0 | 200 |" in lines[2] and "1.23" in lines[2] and "1.0e-05" in lines[2]
    assert "- 64x2112x7168 cublas: RuntimeError: refused | with a bar" in table
    assert "128x4096x7168 l2side: skipped" in table
    path = tmp_path / "out" / "t.csv"
    bench.write_csv(str(path), rows, ["M", "N", "K", "l2side_kernel_us", "cublas_error"])
    got = list(csv.DictReader(open(path)))
    assert got[0]["l2side_kernel_us"] == "10.0" and got[1]["l2side_kernel_us"] == ""


def test_targets_say_where_each_is_met_and_what_the_floor_allows():
    rows = [{"M": 64, "N": 2112, "K": 7168, "x_peer_kernel": 0.87, "x_deepgemm_fresh": 1.16, "x_peer_ev": 1.23,
             "speedup_kernel": 1.97, "speedup_clean": 2.54, "floor_pct_for_125": 49.0, "floor_pct_for_125_clean": 37.0,
             "l2side_pct_copy_bw": 49.0, "l2side_pct_copy_bw_clean": 63.0, "floor_pct_copy": 61.0,
             "floor_pct_copy_clean": 85.0},
            {"M": 128, "N": 32768, "K": 512, "x_peer_kernel": 0.96, "x_deepgemm_fresh": 1.31, "x_peer_ev": 0.99,
             "speedup_kernel": 1.04, "speedup_clean": 1.05, "floor_pct_for_125": 125.0,
             "floor_pct_for_125_clean": 115.0},
            {"M": 4096, "N": 7168, "K": 16384, "l2side_kernel_tflops": 1391.0, "x_peer_kernel": 1.04,
             "x_deepgemm_fresh": 1.05, "x_peer_ev": 1.01},
            {"M": 64, "N": 4096, "K": 7168, "l2side_error": "skipped: past --deadline 225 s"}]
    host = [{"what": "l2side.gemm", "cpu_us_per_call": 13.1}, {"what": "cuBLAS", "error": "refused"}]
    text = "\n".join(bench.targets(rows, host))
    assert "(x peer kernel; " in text and "met on 1 of 3; not on 64x2112x7168 (0.87), 128x32768x512 (0.96)" in text
    assert "as the DeepGEMM anchors were timed): met on 3 of 3" in text
    assert "events: met on 2 of 3; not on 128x32768x512 (0.99)" in text
    assert ("at M <= 128, kernel-only, clean L2: met on 1 of 2; not on 128x32768x512 (1.05, needs 115% of the read "
            "floor: beyond it)") in text
    assert "at 4096x7168x16384, kernel-only: 1391 (not met)" in text
    # the bandwidth target against the floor of the same flush: 85 / 85% = 100% of the clean floor, 85 / 61 of the other
    assert "clean L2: met on 0 of 1; not on 64x2112x7168 (63%, needs 100% of the read floor: beyond it)" in text
    assert "write: met on 0 of 1; not on 64x2112x7168 (49%, needs 139% of the read floor: beyond it)" in text
    assert "host overhead <= 15 µs per call: 13.1 (met)" in text
    assert text.count("64x4096x7168") == 1 and text.endswith("skipped): 64x4096x7168")   # counts for no target
    # a row without one figure says so instead of dropping out of that target's count
    assert "the same like for like" in text and "no figure for" not in text
    rows[0].pop("x_peer_ev")
    assert "events: met on 1 of 2; not on 128x32768x512 (0.99); no figure for 64x2112x7168" in "\n".join(
        bench.targets(rows, host))


def test_shape_sets_and_traffic():
    assert len(bench.SHAPE_SETS["all"]) == 18 and set(bench.SHAPE_SETS["small"]) <= set(bench.SHAPE_SETS["all"])
    assert set(bench.ANCHORS) == set(bench.SHAPE_SETS["all"])
    m, n, k = 64, 2112, 7168
    assert bench.traffic_bytes(m, n, k) == m * k + n * k + 2 * m * n + 4 * (m * 56 + 17 * 56)
    assert bench.diff(torch.ones(4), torch.ones(4)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU exit")
def test_exits_cleanly_without_a_gpu():
    r = run_python([os.path.join("benchmarks", "bench_gemm.py"), "--quick"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout
