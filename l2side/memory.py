"""The side-aware caching allocator, seen from Python: enabling it as torch's allocator, stats, control,
and side-aware tensors without enabling it."""
from __future__ import annotations

import math
import threading

import numpy as np

from . import _native, sides
from .topology import device_index, prepare_native, topology

_enabled = False
_enable_lock = threading.Lock()
_pluggable = None


def library_path() -> str:
    """The shared library that exports l2side_malloc / l2side_free (the CUDAPluggableAllocator entry points)."""
    return _native.__file__


_hooks_installed = False


def _cuda_include_dir():
    import os
    from pathlib import Path
    from .jit import nvcc_path
    for root in (os.environ.get("CUDA_HOME"), str(Path(os.path.realpath(nvcc_path())).parent.parent), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return str(Path(root) / "include")
    raise RuntimeError("the CUDA runtime headers (cuda_runtime_api.h) were not found; set CUDA_HOME")


def _build_shim(with_hooks: bool):
    """Builds (once per torch build, cached on disk) the torch-facing entry points; returns the loaded library.

    with_hooks also compiles the setters of torch's allocator hooks (needs libtorch_cuda and the CUDA headers).
    """
    import ctypes
    import hashlib
    import os
    import subprocess
    import sysconfig
    from pathlib import Path

    import torch
    from .jit import cache_dir
    source = Path(__file__).with_name("csrc") / "torch_oom_shim.cpp"
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-I{torch_dir / 'include'}"]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    if with_hooks:
        flags += ["-DL2SIDE_TORCH_HOOKS", f"-I{_cuda_include_dir()}"]
        libs += ["-ltorch_cuda", "-lc10_cuda"]
    key = hashlib.sha256(source.read_bytes() + f"{torch.__version__}|{torch_dir}|{flags}|{libs}".encode()).hexdigest()[:24]
    target = cache_dir() / f"torch_shim-{key}.so"
    if not target.exists():
        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        staged = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [*cxx.split(), *flags, str(source), *libs, "-o", str(staged)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"building l2side's torch shim failed:\n{result.stderr[-3000:]}")
        os.replace(staged, target)
    lib = ctypes.CDLL(str(target))
    lib.l2side_shim_bind(ctypes.c_void_p(_native.malloc_address()), ctypes.c_void_p(_native.free_address()),
                         ctypes.c_void_p(_native.oom_message_address()))
    return lib


def enable() -> None:
    """Makes l2side torch's CUDA allocator. Call it before anything initialises CUDA in torch."""
    global _enabled, _pluggable, _hooks_installed
    with _enable_lock:
        if _enabled:
            return
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("l2side.enable(): no CUDA GPU is available to this process")
        prepare_native()
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "l2side.enable() must run before torch initialises CUDA (before the first CUDA tensor, "
                "torch.cuda.current_device(), get_device_properties(), ...): torch can only swap its "
                "allocator before that. Call it at the top of the program.")
        import warnings
        shim = None
        errors = []
        for with_hooks in (True, False):
            try:
                # torch turns a null pointer into a tensor, not an error: these entry points raise its OOM
                shim = _build_shim(with_hooks)
                break
            except Exception as e:
                errors.append(str(e))
        if shim is None:  # no compiler or headers: still usable, but OOM would not raise cleanly
            warnings.warn(f"l2side: {errors[-1]}\nOut-of-memory will not raise torch.OutOfMemoryError.",
                          RuntimeWarning)
            path, alloc, free = library_path(), "l2side_malloc", "l2side_free"
        else:
            path, alloc, free = shim._name, "l2side_torch_malloc", "l2side_torch_free"
        _pluggable = torch.cuda.memory.CUDAPluggableAllocator(path, alloc, free)
        try:
            torch.cuda.memory.change_current_allocator(_pluggable)
        except RuntimeError as e:
            raise RuntimeError(f"l2side.enable(): torch refused to swap its allocator ({e}); call "
                               "l2side.enable() before any CUDA allocation") from e
        if shim is not None:
            import ctypes
            record, empty_all, fraction = _native.hook_addresses()
            _hooks_installed = bool(shim.l2side_shim_install_hooks(
                ctypes.c_void_p(record), ctypes.c_void_p(empty_all), ctypes.c_void_p(fraction)))
        if not _hooks_installed:
            warnings.warn("l2side: torch's allocator hooks could not be installed: Tensor.record_stream, "
                          "torch.cuda.empty_cache and set_per_process_memory_fraction do not reach l2side "
                          f"({'; '.join(errors) or 'this torch build has no CUDA allocator hooks'})",
                          RuntimeWarning)
        _enabled = True


def is_enabled() -> bool:
    return _enabled


def _index(device) -> int:
    return device_index(device)


def memory_stats(device=None) -> dict:
    """torch.cuda.memory_stats-like counters of l2side's allocator on `device` (plus l2side.* keys)."""
    return dict(_native.stats(_index(device)))


def reset_peak_memory_stats(device=None) -> None:
    _native.reset_peaks(_index(device))


def empty_cache(device=None) -> None:
    """Releases every cached, unused physical page of `device` (synchronises it)."""
    _native.empty_cache(_index(device))


def release_graph_memory(device=None) -> None:
    """Frees memory that CUDA-graph captures left reserved; call it once those graphs are deleted."""
    _native.release_graph_memory(_index(device))


def set_memory_limit(nbytes, device=None) -> None:
    """Caps the bytes l2side reserves on `device` (None = no cap); past it allocations raise OOM."""
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"nbytes must be a non-negative int or None, got {nbytes!r}")
    _native.set_limit(_index(device), -1 if nbytes is None else nbytes)


def set_memory_fraction(fraction: float, device=None) -> None:
    """Caps reserved bytes at `fraction` of the device's total memory."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    index = _index(device)
    set_memory_limit(int(_native.total_memory(index) * fraction), index)  # safe before enable()


def owns(value, device=None) -> bool:
    """True when the address (or a tensor's data pointer) lies in memory l2side handed out."""
    if hasattr(value, "data_ptr"):
        if not value.is_cuda:
            return False
        return _native.owns(value.device.index, value.data_ptr())
    return _native.owns(_index(device), int(value))


def empty(shape, dtype=None, device=None):
    """A torch tensor in side-aware memory (also when l2side is not torch's allocator).

    Sizes above 1 MiB start 4 MiB-aligned, so chunk i of every such tensor is on the same side.
    """
    import torch
    dtype = dtype or torch.get_default_dtype()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any((not isinstance(s, int)) or s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    index = _index(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=f"cuda:{index}")
    stream = torch.cuda.current_stream(index).cuda_stream
    raw = torch.utils.dlpack.from_dlpack(_native.side_aware_bytes(index, nbytes, stream))
    return raw.view(dtype).view(shape)


def is_side_aware(tensor) -> bool:
    return bool(getattr(tensor, "is_cuda", False)) and owns(tensor)


def side_of(tensor) -> np.ndarray:
    """Side (0/1) of every 4 KiB chunk the tensor's bytes touch, first chunk first (numpy uint8).

    Only meaningful for side-aware memory: anything else raises ValueError.
    """
    import torch
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"side_of expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cuda:
        raise ValueError(f"side_of expects a CUDA tensor, got one on {tensor.device}")
    if not owns(tensor):
        raise ValueError("side_of: the tensor's memory does not come from l2side (enable() l2side or create "
                         "it with l2side.empty); its sides are unknown")
    if not tensor.is_contiguous():
        raise ValueError("side_of expects a contiguous tensor")
    topo = topology(tensor.device.index)
    return sides.chunk_sides(tensor.data_ptr(), tensor.numel() * tensor.element_size(), topo.side_mask)


def check_sides(tensor, samples: int = 1024, seed: int = 0) -> float:
    """Measures the L2 side of up to `samples` random 4 KiB chunks of a side-aware tensor by latency and
    returns the share that the address formula predicted (1.0 when the invariant holds). Data is unchanged."""
    import random
    predicted = side_of(tensor)
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    topo = topology(tensor.device.index)
    if not topo.split:
        return 1.0
    rng = random.Random(seed)
    start = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    first_chunk = start // sides.CHUNK_BYTES
    n_chunks = len(predicted)
    # One address in each of up to `samples` distinct chunks: atomics of many probing blocks on one line
    # would queue behind each other and read as "far".
    chunks = rng.sample(range(n_chunks), min(samples, n_chunks))
    addresses = []
    for c in chunks:
        lo = max(start, (first_chunk + c) * sides.CHUNK_BYTES)
        hi = min(start + nbytes, (first_chunk + c + 1) * sides.CHUNK_BYTES)
        addresses.append((lo + rng.randrange(hi - lo)) & ~3)  # 4-byte aligned for the atomics
    measured = _native.measure_address_sides(tensor.device.index, addresses)
    agree = sum(int(m == predicted[c]) for c, m in zip(chunks, measured))
    return agree / len(chunks)


__all__ = ["check_sides", "enable", "is_enabled", "memory_stats", "reset_peak_memory_stats", "empty_cache",
           "release_graph_memory", "set_memory_limit", "set_memory_fraction", "owns", "empty",
           "is_side_aware", "side_of", "library_path", "prepare_native"]
