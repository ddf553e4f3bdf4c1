"""The public API's argument checks and the no-GPU behaviour (these run everywhere)."""
import pytest

import l2side
from conftest import cuda_available, run_python

no_gpu = pytest.mark.skipif(cuda_available(), reason="checks the no-GPU behaviour")


def test_public_api_is_complete():
    for name in ("topology", "enable", "memory_stats", "empty_cache", "set_memory_limit", "set_memory_fraction",
                 "release_graph_memory", "library_path", "owns", "empty", "is_side_aware", "side_of", "jit"):
        assert hasattr(l2side, name), name
    assert set(l2side.__all__) <= set(dir(l2side))


def test_native_library_exports_the_pluggable_entry_points():
    import ctypes
    lib = ctypes.CDLL(l2side.library_path())
    assert lib.l2side_malloc and lib.l2side_free and lib.l2side_last_oom_message


def test_set_memory_limit_checks_its_argument():
    with pytest.raises(ValueError, match="nbytes"):
        l2side.set_memory_limit(-5)
    with pytest.raises(ValueError, match="nbytes"):
        l2side.set_memory_limit(1.5)


def test_set_memory_fraction_checks_its_argument():
    with pytest.raises(ValueError, match="fraction"):
        l2side.set_memory_fraction(0)
    with pytest.raises(ValueError, match="fraction"):
        l2side.set_memory_fraction(1.5)


def test_side_of_rejects_non_tensors_and_cpu_tensors():
    import torch
    with pytest.raises(ValueError, match="torch.Tensor"):
        l2side.side_of([1, 2, 3])
    with pytest.raises(ValueError, match="CUDA tensor"):
        l2side.side_of(torch.zeros(4))


def test_owns_is_false_for_cpu_tensors():
    import torch
    assert not l2side.owns(torch.zeros(4))
    assert not l2side.is_side_aware(torch.zeros(4))


def test_empty_checks_the_shape():
    import torch
    with pytest.raises(ValueError, match="shape"):
        l2side.empty((2, -1), dtype=torch.float32)


@no_gpu
def test_enable_without_a_gpu_says_so():
    r = run_python("import l2side; l2side.enable()")
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr


@no_gpu
def test_topology_without_a_gpu_says_so():
    r = run_python("import l2side; l2side.topology()")
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr


@no_gpu
def test_info_without_a_gpu_prints_a_clear_message():
    r = run_python(["-m", "l2side", "info"])
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU found" in r.stdout


def test_bench_outside_a_checkout_says_where_to_run_it(tmp_path):
    r = run_python(["-m", "l2side", "bench", "--root", str(tmp_path)])
    assert r.returncode == 2 and "no benchmarks" in r.stdout
