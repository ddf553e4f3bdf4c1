import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def hopper_available() -> bool:
    if not cuda_available():
        return False
    import torch
    return torch.cuda.get_device_capability(0) == (9, 0)


requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
requires_hopper = pytest.mark.skipif(not hopper_available(), reason="needs a Hopper (sm_90) GPU")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                                   reason="needs nvcc")


def load_script(*relpath: str):
    """A script of the repository (e.g. "benchmarks", "bench_gemm.py") imported as a module, to test its logic."""
    import importlib.util
    path = os.path.join(REPO, *relpath)
    spec = importlib.util.spec_from_file_location(os.path.splitext(relpath[-1])[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(code_or_args, timeout=600, env=None):
    """Runs Python in a fresh process (allocator state and torch's allocator choice are per process)."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=full_env)
