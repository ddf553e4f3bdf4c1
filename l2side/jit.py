"""The JIT runtime every l2side kernel uses: compile CUDA C++ with nvcc for the GPU found, cache the binary
on disk, load it through the driver API, and launch it on torch's current stream.

Cache key (cache_key()): sha256 of the source, the options, the target, nvcc's version and the headers the
source includes, transitively (found through its -I folders; an edit of the GEMM's headers leaves the
elementwise kernels cached). Paths under the shipped folders enter the key relative to them, so a cache
made in one checkout serves another (scripts/gpu_check.sh carries it between GPU machines). Entries are
written to a temporary file and renamed into place, so concurrent processes never read half a binary.
Set L2SIDE_CACHE_DIR to move the cache.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

from . import _native

PACKAGE_DIR = Path(__file__).resolve().parent


def _find_dir(subpackage: str) -> Path:
    """The installed copy of a top-level source folder (mapped to l2side.<name> by setup.py)."""
    import importlib.util
    spec = importlib.util.find_spec(f"l2side.{subpackage}")
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    return PACKAGE_DIR.parent / subpackage


KERNELS_DIR = _find_dir("kernels")
ELEMENTWISE_DIR = _find_dir("elementwise")
DEFAULT_OPTIONS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")


class CompileError(RuntimeError):
    """nvcc rejected a source; the message holds the compiler's output."""


def cache_dir() -> Path:
    root = os.environ.get("L2SIDE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "l2side")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def nvcc_path() -> str:
    candidates = [os.environ.get("L2SIDE_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise CompileError("l2side needs nvcc (the CUDA compiler) to JIT-compile its kernels; none was found "
                       "(set CUDA_HOME or L2SIDE_NVCC)")


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str:
    out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


_INCLUDE_LINE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]', re.MULTILINE)
_scanned: dict = {}   # path -> (stat signature, content digest, includes): each header is read once per edit


def _includes_of(text: bytes) -> tuple:
    """(quoted?, name) of each #include line of a source text."""
    return tuple((m.group(1) == b'"', m.group(2).decode(errors="replace").strip())
                 for m in _INCLUDE_LINE.finditer(text))


def _scan(path: Path) -> tuple[str, tuple]:
    """(sha256 of the content, the (quote?, name) of each #include) of a file, cached by its stat."""
    st = path.stat()
    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _scanned.get(path)
    if hit is not None and hit[0] == signature:
        return hit[1], hit[2]
    data = path.read_bytes()
    includes = _includes_of(data)
    digest = hashlib.sha256(data).hexdigest()
    _scanned[path] = (signature, digest, includes)
    return digest, includes


def include_dirs(flags: Sequence[str]) -> list[Path]:
    """The folders nvcc searches for #include, in order, from -I / --include-path / -isystem flags."""
    dirs, take_next = [], False
    for flag in flags:
        if take_next:
            dirs.append(flag)
            take_next = False
        elif flag in ("-I", "--include-path", "-isystem"):
            take_next = True
        elif flag.startswith("--include-path="):
            dirs.append(flag.split("=", 1)[1])
        elif flag.startswith("-isystem"):
            dirs.append(flag[len("-isystem"):])
        elif flag.startswith("-I"):
            dirs.append(flag[2:])
    return [Path(d).resolve() for d in dirs if d]


def _portable(text: str) -> str:
    """Shipped folders by name rather than by where this checkout lies, so keys match between machines."""
    return text.replace(str(KERNELS_DIR), "$KERNELS").replace(str(ELEMENTWISE_DIR), "$ELEMENTWISE")


def included_headers(source: str, dirs: Sequence[Path]) -> list[Path]:
    """Every file `source` includes, transitively, that resolves in `dirs` ("..." also next to the including
    file, as nvcc does). Includes found nowhere there (system and CUDA headers) are left out; so are
    includes named by a macro. Lines inside #if / comments count too: a superset only costs a recompile."""
    found: list[Path] = []
    seen: set = set()
    pending = [(None, quoted, name) for quoted, name in _includes_of(source.encode())]
    while pending:
        parent, quoted, name = pending.pop()
        candidates = ([parent] if quoted and parent is not None else []) + list(dirs)
        for folder in candidates:
            path = folder / name
            if path.is_file():
                path = path.resolve()
                if path not in seen:
                    seen.add(path)
                    found.append(path)
                    pending += [(path.parent, q, n) for q, n in _scan(path)[1]]
                break
    return found


def cache_key(source: str, flags: Sequence[str], arch: str, output: str) -> str:
    """The disk-cache key of a compile: everything that changes what nvcc makes of `source`."""
    headers = hashlib.sha256()
    for label, path in sorted((_portable(str(p)), p) for p in included_headers(source, include_dirs(flags))):
        headers.update(f"{label}\0{_scan(path)[0]}\0".encode())
    parts = [source, *(_portable(f) for f in flags), arch, output, nvcc_version(), headers.hexdigest()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def arch_for(device=None) -> str:
    """The nvcc target for a device: sm_90a on Hopper (wgmma, setmaxnreg), else sm_XY."""
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major == 9 and minor == 0 else "")


def _target_flags(arch: str, output: str) -> list[str]:
    if output == "ptx":  # portable: the driver finishes the compile for whatever GPU loads it
        return [f"-arch=compute_{arch[3:].rstrip('a')}" if arch.startswith("sm_") else f"-arch={arch}"]
    number = arch[3:]
    return [f"-gencode=arch=compute_{number},code=sm_{number}"]


def compile(source: str, *, name: str, options: Sequence[str] = (), arch: str, output: str = "cubin") -> bytes:
    """Compiles `source` (cached on disk) and returns the cubin (or PTX text as bytes)."""
    if output not in ("cubin", "ptx"):
        raise ValueError(f"output must be 'cubin' or 'ptx', got {output!r}")
    flags = list(DEFAULT_OPTIONS) + [f"-I{KERNELS_DIR}", f"-I{ELEMENTWISE_DIR}"] + list(options)
    flags += _target_flags(arch, output)
    key = cache_key(source, flags, arch, output)
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
    target = cache_dir() / "jit" / f"{safe_name}-{key}.{output}"
    if target.exists():
        return target.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="l2side-jit-") as tmp:
        src = Path(tmp) / f"{safe_name}.cu"
        out = Path(tmp) / f"{safe_name}.{output}"
        src.write_text(source)
        cmd = [nvcc_path(), f"--{output}", *flags, str(src), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not out.exists():
            raise CompileError(f"nvcc failed to compile '{name}' (exit {result.returncode}):\n"
                               f"{result.stderr.strip() or result.stdout.strip()}\ncommand: {' '.join(cmd)}")
        data = out.read_bytes()
        staged = target.with_suffix(target.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
        staged.write_bytes(data)
        os.replace(staged, target)  # atomic: racing processes each write a whole file
    return data


class Kernel:
    """A loaded __global__ function of a JIT-compiled module on one device."""

    def __init__(self, device: int, module: int, function: int, name: str):
        self.device, self.module, self.function, self.name = device, module, function, name
        self._smem_limit = 0
        self.param_layout = None  # (offset, size) of each parameter as compiled, once check_params asked

    def check_params(self, params: "Params") -> None:
        """Raises when a parameter buffer does not hold the kernel's parameters (count and sizes; known only
        on a GPU). Offsets may differ: the compiler aligns parameters to their absolute place in the
        constant bank (a CUtensorMap after 28 bytes of other parameters sits at 112, not 64), which is why
        launches pass parameters one by one (`offsets`) rather than as one buffer. Only as many parameters
        as the buffer holds are asked for (asking past the last is an API error tools like
        compute-sanitizer report)."""
        if self.param_layout is None:
            try:
                self.param_layout = tuple(tuple(p) for p in _native.param_layout(self.function, len(params.sizes)))
            except Exception:  # noqa: BLE001 - an old driver or the CPU double: nothing to check against
                return
        if list(params.sizes) != [s for _, s in self.param_layout]:
            raise RuntimeError(f"kernel {self.name}: parameter sizes {list(params.sizes)} built on the host "
                               f"differ from the compiled ones {[s for _, s in self.param_layout]}")

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        if nbytes > self._smem_limit:
            _native.set_max_dynamic_smem(self.function, int(nbytes))
            self._smem_limit = nbytes

    def launch(self, grid, block, params, *, smem: int = 0, stream: int | None = None, cluster=1,
               offsets=None) -> None:
        """params: a Params (its offsets are used) or bytes (with `offsets`, else passed as one buffer,
        which is only right when no parameter is aligned to more than 16 bytes)."""
        if stream is None:
            import torch
            stream = torch.cuda.current_stream(self.device).cuda_stream
        if smem > 48 * 1024:
            self.set_max_dynamic_smem(smem)
        if isinstance(params, Params):
            params, offsets = params.buffer, params.offsets
        # parameter by parameter: the driver places each where the kernel reads it
        _native.launch(self.device, self.function, grid, block, smem, stream, bytes(params), cluster,
                       list(offsets) if offsets is not None else [])


_kernels: dict = {}
_kernels_lock = threading.Lock()
_scratch: dict = {}


def stream_scratch(name: str, index: int, stream: int, numel: int, dtype):
    """A zero-initialised device tensor per (name, device, stream), for kernels that keep counters between
    launches and re-zero them themselves (the last CTA of the launch): launches on one stream run in order,
    so they can share it; another stream gets its own."""
    key = (name, index, stream)
    buf = _scratch.get(key)
    if buf is None:
        import torch
        with _kernels_lock:
            buf = _scratch.get(key)
            if buf is None:
                buf = _scratch[key] = torch.zeros(numel, dtype=dtype, device=f"cuda:{index}")
    return buf


def _device_index(device) -> int:
    import torch
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def load_kernel(source: str, kernel_name: str, *, name: str, options: Sequence[str] = (), device=None,
                output: str = "cubin", transform=None) -> Kernel:
    """Compiles (cached), loads and looks up `kernel_name`; memoised per (source, options, device, transform).
    transform: None, or (label, function of the compiled image returning the image to load): a post-pass
    applied at every load (not cached on disk), e.g. l2side/sass_yield.py's."""
    index = _device_index(device)
    key = (hashlib.sha256(source.encode()).hexdigest(), tuple(options), kernel_name, index, output,
           transform[0] if transform else None)
    kernel = _kernels.get(key)
    if kernel is None:
        image = compile(source, name=name, options=options,
                        arch=arch_for(index), output=output)
        if transform is not None:
            image = transform[1](image)
        with _kernels_lock:
            kernel = _kernels.get(key)
            if kernel is None:
                module = _native.load_module(index, image)
                kernel = Kernel(index, module, _native.get_function(module, kernel_name), kernel_name)
                _kernels[key] = kernel
    return kernel


class Params:
    """Builds a kernel's parameter buffer with the C ABI's alignment, in parameter order."""

    def __init__(self):
        self._buf = bytearray()
        self.offsets: list[int] = []   # where each parameter starts in the buffer
        self.sizes: list[int] = []

    def _put(self, data: bytes, align: int) -> "Params":
        self._buf += b"\0" * (-len(self._buf) % align)
        self.offsets.append(len(self._buf))
        self.sizes.append(len(data))
        self._buf += data
        return self

    def ptr(self, value) -> "Params":
        address = value.data_ptr() if hasattr(value, "data_ptr") else int(value)
        return self._put(struct.pack("<Q", address), 8)

    def i32(self, v: int) -> "Params":
        return self._put(struct.pack("<i", v), 4)

    def u32(self, v: int) -> "Params":
        return self._put(struct.pack("<I", v), 4)

    def i64(self, v: int) -> "Params":
        return self._put(struct.pack("<q", v), 8)

    def u64(self, v: int) -> "Params":
        return self._put(struct.pack("<Q", v), 8)

    def f32(self, v: float) -> "Params":
        return self._put(struct.pack("<f", v), 4)

    def tensor_map(self, tmap: bytes) -> "Params":
        if len(tmap) != 128:
            raise ValueError("a CUtensorMap is 128 bytes")
        return self._put(tmap, 64)

    def raw(self, data: bytes, align: int) -> "Params":
        return self._put(bytes(data), align)

    @property
    def buffer(self) -> bytes:
        return bytes(self._buf)

    def __bytes__(self) -> bytes:
        return self.buffer


_TMAP_DTYPES = {"u8": 0, "e4m3": 0, "u16": 1, "u32": 2, "i32": 3, "f16": 6, "f32": 7, "bf16": 9}


def tensor_map(ptr: int, dtype: str, dims: Iterable[int], strides_bytes: Iterable[int], box: Iterable[int], *,
               swizzle: int = 128, oob_fill_zero: bool = True, l2_promotion: int = 256) -> bytes:
    """A TMA descriptor (cuTensorMapEncodeTiled). dims/box innermost first; strides of dims[1:] in bytes."""
    if dtype not in _TMAP_DTYPES:
        raise ValueError(f"tensor_map dtype must be one of {sorted(_TMAP_DTYPES)}, got {dtype!r}")
    dims, strides_bytes, box = list(dims), list(strides_bytes), list(box)
    if any(s % 16 for s in strides_bytes):
        raise ValueError(f"TMA needs 16-byte-aligned strides, got {strides_bytes}")
    if ptr % 16:
        raise ValueError(f"TMA needs a 16-byte-aligned base address, got {ptr:#x}")
    return _native.encode_tensor_map(_TMAP_DTYPES[dtype], int(ptr), dims, strides_bytes, box, swizzle,
                                     l2_promotion, not oob_fill_zero)
