"""The JIT runtime on the CPU: parameter packing, nvcc compiles of the shipped kernels, the disk cache."""
import shutil
import struct
from pathlib import Path

import pytest

from conftest import requires_nvcc
from l2side import jit


def test_params_follow_the_c_abi_alignment():
    buf = jit.Params().i32(7).ptr(0x1000).f32(1.5).u64(3).buffer
    assert len(buf) == 32
    assert struct.unpack_from("<i", buf, 0)[0] == 7
    assert struct.unpack_from("<Q", buf, 8)[0] == 0x1000  # pointer aligned to 8
    assert struct.unpack_from("<f", buf, 16)[0] == 1.5
    assert struct.unpack_from("<Q", buf, 24)[0] == 3


def test_tensor_maps_are_64_byte_aligned_in_params():
    buf = jit.Params().i32(1).tensor_map(b"\x01" * 128).i32(2).buffer
    assert buf[64:192] == b"\x01" * 128 and struct.unpack_from("<i", buf, 192)[0] == 2


def test_tensor_map_argument_checks():
    with pytest.raises(ValueError, match="128 bytes"):
        jit.Params().tensor_map(b"x")
    with pytest.raises(ValueError, match="16-byte-aligned strides"):
        jit.tensor_map(0x1000, "bf16", (100, 100), (200,), (64, 64))
    with pytest.raises(ValueError, match="16-byte-aligned base"):
        jit.tensor_map(0x1001, "u8", (128, 128), (128,), (64, 64))
    with pytest.raises(ValueError, match="dtype"):
        jit.tensor_map(0x1000, "f64", (128, 128), (1024,), (64, 64))


def test_shipped_sources_are_found():
    assert (jit.KERNELS_DIR / "l2_probe.cu").exists()
    assert (jit.KERNELS_DIR / "side_read.cu").exists()


@requires_nvcc
def test_probe_kernels_compile_to_ptx():
    ptx = jit.compile((jit.KERNELS_DIR / "l2_probe.cu").read_text(), name="l2_probe", arch="sm_75", output="ptx")
    text = ptx.decode()
    assert ".entry l2side_sm_latency" in text and ".entry l2side_page_sides" in text
    assert "atom.global.add.u32" in text  # atomics reach the home slice; plain reads would not show the split


@requires_nvcc
@pytest.mark.parametrize("name", ["side_read", "read_stream", "read_bulk"])
def test_streaming_kernels_compile_for_sm90a(name):
    cubin = jit.compile((jit.KERNELS_DIR / f"{name}.cu").read_text(), name=name, arch="sm_90a")
    assert cubin[:4] == b"\x7fELF"


@requires_nvcc
def test_read_stream_keeps_its_loads_uncached_in_l1():
    ptx = jit.compile((jit.KERNELS_DIR / "read_stream.cu").read_text(), name="read_stream", arch="sm_90a",
                      output="ptx").decode()
    assert "ld.global.cg.v4.u32" in ptx   # every byte reaches L2 / DRAM, as a GEMM's TMA loads do


@requires_nvcc
def test_floor_check_readers_compile_with_their_constants():
    """scripts/floor_check.py rewrites each reader's constants; every variant must still compile."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / "floor_check.py"
    spec = importlib.util.spec_from_file_location("floor_check", path)
    floor_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor_check)
    sources = {floor_check.reader_source(file, constants) for _, file, constants, *_ in floor_check.READERS}
    assert len(sources) == 7   # the two 8-deep streams differ only in their grid
    assert any("constexpr int kUnroll = 8;" in s for s in sources)
    assert any(s.startswith("#define L2SIDE_READ_BULK_STAGES 16\n#define L2SIDE_READ_BULK_CHUNK 4096") for s in sources)
    for source in sources:
        ptx = jit.compile(source, name="floor_reader", arch="sm_90a", output="ptx").decode()
        assert "ld.global.cg.v4.u32" in ptx or "cp.async.bulk.shared::cluster.global" in ptx


@requires_nvcc
def test_compile_errors_carry_the_compiler_message(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SIDE_CACHE_DIR", str(tmp_path))
    with pytest.raises(jit.CompileError, match="undefined_thing"):
        jit.compile('extern "C" __global__ void k() { undefined_thing(); }', name="bad", arch="sm_90a")
    assert not list((tmp_path / "jit").glob("bad-*")), "nothing cached for a failed compile"


@requires_nvcc
def test_disk_cache_is_keyed_by_source_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SIDE_CACHE_DIR", str(tmp_path))
    src = 'extern "C" __global__ void k(int* p) { *p = 1; }'
    a = jit.compile(src, name="k", arch="sm_90a")
    assert len(list((tmp_path / "jit").glob("k-*.cubin"))) == 1
    assert jit.compile(src, name="k", arch="sm_90a") == a  # served from the cache
    jit.compile(src, name="k", arch="sm_90a", options=("-DX=1",))
    jit.compile(src.replace("1;", "2;"), name="k", arch="sm_90a")
    assert len(list((tmp_path / "jit").glob("k-*.cubin"))) == 3
    assert not list((tmp_path / "jit").glob("*.tmp")), "no staging files left behind"


def test_compile_rejects_unknown_outputs():
    with pytest.raises(ValueError, match="cubin"):
        jit.compile("", name="x", arch="sm_90a", output="fatbin")


# ----------------------------------------------------------------------------------------------------------
# the cache key follows the headers a source includes, and no others (no nvcc needed)

@pytest.fixture
def headers(tmp_path, monkeypatch):
    """An include folder: top.cuh includes "mid.cuh", which includes <leaf.cuh>; other.cuh stands alone."""
    monkeypatch.setattr(jit, "nvcc_version", lambda: "nvcc for the test")
    inc = tmp_path / "inc"
    (inc / "sub").mkdir(parents=True)
    (inc / "top.cuh").write_text('#pragma once\n#include "sub/mid.cuh"\n#include <cstdint>\n')
    (inc / "sub" / "mid.cuh").write_text('#pragma once\n  #  include <leaf.cuh>\n')
    (inc / "leaf.cuh").write_text("#define LEAF 1\n")
    (inc / "other.cuh").write_text("#define OTHER 1\n")
    return inc


def _key(inc, source='#include "top.cuh"\n__global__ void k() {}\n'):
    return jit.cache_key(source, ["-O3", f"-I{inc}"], "sm_90a", "cubin")


def test_included_headers_are_found_transitively(headers):
    found = jit.included_headers('#include "top.cuh"\n', jit.include_dirs([f"-I{headers}"]))
    assert sorted(p.name for p in found) == ["leaf.cuh", "mid.cuh", "top.cuh"]  # <cstdint>: not there, left out


def test_an_unrelated_header_leaves_the_key_alone(headers):
    before = _key(headers)
    (headers / "other.cuh").write_text("#define OTHER 2 /* edited */\n")
    (headers / "new.cuh").write_text("#define NEW 1\n")
    assert _key(headers) == before


@pytest.mark.parametrize("edited", ["top.cuh", "sub/mid.cuh", "leaf.cuh"])
def test_an_included_header_changes_the_key(headers, edited):
    before = _key(headers)
    path = headers / edited
    path.write_text(path.read_text() + "// edited\n")   # longer: the stat signature changes too
    assert _key(headers) != before


def test_the_key_follows_source_flags_and_target(headers):
    base = _key(headers)
    assert _key(headers) == base
    assert _key(headers, '#include "top.cuh"\n__global__ void k2() {}\n') != base
    assert jit.cache_key('#include "top.cuh"\n__global__ void k() {}\n', ["-O2", f"-I{headers}"],
                         "sm_90a", "cubin") != base
    assert jit.cache_key('#include "top.cuh"\n__global__ void k() {}\n', ["-O3", f"-I{headers}"],
                         "sm_80", "cubin") != base


def test_another_checkout_of_the_shipped_headers_gets_the_same_key(tmp_path, monkeypatch):
    monkeypatch.setattr(jit, "nvcc_version", lambda: "nvcc for the test")
    source = "#include <l2side_elementwise.cuh>\n"

    def key():
        flags = [f"-I{jit.KERNELS_DIR}", f"-I{jit.ELEMENTWISE_DIR}"]
        assert [p.name for p in jit.included_headers(source, jit.include_dirs(flags))] == ["l2side_elementwise.cuh"]
        return jit.cache_key(source, flags, "sm_90a", "cubin")

    here = key()
    copy = tmp_path / "elsewhere"
    shutil.copytree(jit.ELEMENTWISE_DIR, copy / "elementwise")
    shutil.copytree(jit.KERNELS_DIR, copy / "kernels")
    monkeypatch.setattr(jit, "ELEMENTWISE_DIR", copy / "elementwise")
    monkeypatch.setattr(jit, "KERNELS_DIR", copy / "kernels")
    assert key() == here                        # a cache made on one machine serves another
    header = copy / "elementwise" / "l2side_elementwise.cuh"
    header.write_text(header.read_text() + "// edited\n")
    assert key() != here
