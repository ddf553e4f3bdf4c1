"""l2side: a side-aware CUDA caching allocator for PyTorch and the kernels that use it.

Builds one extension, l2side._native, from allocator/*.cpp. It uses the CUDA driver API loaded at run
time (dlopen), so it needs only the CUDA headers to build, links neither libcuda nor libtorch, and imports
on machines without a GPU. Kernels (kernels/, elementwise/) are shipped as sources and JIT-compiled.
"""
import glob
import os
import shutil

from setuptools import Extension, setup


def cuda_include_dir():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(real)), "include"))
        with open(real, "rb") as f:  # a wrapper script such as 'exec /usr/local/cuda-13.0/bin/nvcc'
            head = f.read(512).decode("latin-1")
        for word in head.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(os.path.join(os.path.dirname(os.path.dirname(word)), "include"))
    candidates += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for c in candidates:
        if os.path.exists(os.path.join(c, "cuda.h")):
            return c
    raise RuntimeError("l2side needs the CUDA toolkit headers (cuda.h) to build; set CUDA_HOME. Looked in: "
                       + ", ".join(candidates))


def pybind11_include():
    import pybind11
    return pybind11.get_include()


native = Extension(
    "l2side._native",
    sources=sorted(glob.glob("allocator/*.cpp")),
    include_dirs=[cuda_include_dir(), pybind11_include(), "allocator"],
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall"],
    libraries=["dl"],
    language="c++",
)

setup(
    name="l2side",
    version="0.1.0",
    description="L2-side-aware CUDA caching allocator, FP8 GEMM and elementwise kernels for Hopper",
    python_requires=">=3.10",
    packages=["l2side", "l2side.kernels", "l2side.elementwise"],
    package_dir={"l2side": "l2side", "l2side.kernels": "kernels", "l2side.elementwise": "elementwise"},
    package_data={"l2side": ["csrc/*.cpp"],
                  "l2side.kernels": ["*.cu", "*.cuh", "**/*.cuh", "**/*.cu"],
                  "l2side.elementwise": ["*.cu", "*.cuh", "**/*.cuh"]},
    ext_modules=[native],
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest"], "nvrtc": ["cuda-bindings>=12.8"]},
    entry_points={"console_scripts": ["l2side=l2side.__main__:main"]},
)
