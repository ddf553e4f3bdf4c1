"""l2side.elementwise: source generation, validation, chunk schedule and nvcc compiles on any machine; every
built-in against torch on a GPU (side-aware memory from l2side.empty and plain torch memory)."""
import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from conftest import cuda_available, load_script, requires_gpu, requires_nvcc

torch = pytest.importorskip("torch")
ew = pytest.importorskip("l2side.elementwise")
from l2side.elementwise import _codegen as cg  # noqa: E402
from l2side import sides  # noqa: E402

H100_MASK = 0xB3000 | 1 << 21
SM_SIDES = tuple([0, 1] * 66)


# ----------------------------------------------------------------------------------------------------------
# CPU: source generation

def test_every_builtin_generates_source():
    ks = ew.builtin_kernels()
    assert {"copy_i8", "add_bf16", "mul_f32", "axpby_f16", "cast_f32_bf16", "silu_and_mul_bf16",
            "fp8_quant_bf16_g128"} <= set(ks)
    for name, k in ks.items():
        src = k.source
        assert f"#include <{cg.HEADER}>" in src
        assert "L2SIDE_EW_ENTRY_POINTS(Op)" in src
        assert f'"{name}:body"' in src
        assert f"static constexpr int VEC = {k.spec.vec};" in src
        assert k.spec.vec * k.spec.widest == 16


def test_vec_and_drive_width_follow_the_widest_tensor():
    cast = ew.builtin_kernels()["cast_f32_bf16"]
    assert cast.spec.vec == 4 and cast.spec.chunk_elems == 1024      # 4 KiB of the fp32 input
    quant = ew.builtin_kernels()["fp8_quant_bf16_g128"]
    assert quant.spec.vec == 8 and quant.spec.tpg == 16 and quant.spec.group == 128


def test_body_line_numbers_point_at_the_body():
    k = ew.kernel("lines", {"x": "f32"}, {"out": "f32"}, "float t = x;\nout = t;")
    lines = k.source.splitlines()
    start = lines.index('#line 1 "lines:body"')
    assert lines[start + 1] == "float t = x;"
    # after the body, the numbering is that of the generated file again
    restore = lines[start + 3]
    assert re.match(r'#line (\d+) "lines.cu"', restore)
    assert int(restore.split()[1]) == start + 5


# ----------------------------------------------------------------------------------------------------------
# CPU: definition errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(inputs={"x": "bf17"}), "unsupported dtype"),
    (dict(inputs={"2x": "f32"}), "not a C identifier"),
    (dict(inputs={"index": "f32"}), "reserved"),
    (dict(inputs={"x": "f32"}, outputs={"x": "f32"}), "used twice"),
    (dict(outputs={}), "at least one output"),
    (dict(body="   "), "non-empty"),
    (dict(scalars={"alpha": "complex"}), "unsupported type"),
    (dict(group=100, group_outputs={"s": "f32"}), "group=100 is not supported"),
    (dict(group=1024, group_outputs={"s": "f32"}), "is not supported"),
    (dict(group_outputs={"s": "f32"}), "need group"),
    (dict(compute="fast"), "compute must be"),
    (dict(name="has space"), "kernel name"),
    (dict(inputs={"x": "f32", "x_rs": "f32"}), "clash"),
])
def test_definition_errors_name_the_problem(kwargs, match):
    args = dict(name="k", inputs={"x": "f32"}, outputs={"out": "f32"}, body="out = x;")
    args.update(kwargs)
    with pytest.raises(ew.DefinitionError, match=match):
        ew.kernel(args.pop("name"), args.pop("inputs"), args.pop("outputs"), args.pop("body"), **args)


def test_dtype_names_and_torch_dtypes_are_accepted():
    k = ew.kernel("names", {"a": torch.bfloat16, "b": "float32", "c2": "half"}, {"o": "float8_e4m3fn"}, "o = a;")
    assert [d for _, d in k.spec.inputs] == ["bf16", "f32", "f16"] and k.spec.outputs == (("o", "e4m3"),)


# ----------------------------------------------------------------------------------------------------------
# CPU: call validation that needs no GPU

def test_cpu_tensors_are_refused_naming_the_argument():
    x = torch.randn(16)
    with pytest.raises(ValueError, match=r"input 'x' is on cpu"):
        ew.add(x.bfloat16(), x.bfloat16())
    k = ew.builtin_kernels()["add_f32"]
    with pytest.raises(ValueError, match=r"input 'x' is on cpu"):
        k(x, x)


def test_call_argument_errors():
    k = ew.builtin_kernels()["axpby_f32"]
    x = torch.randn(4)
    with pytest.raises(TypeError, match="missing 'beta'"):
        k(x, x, alpha=1.0)
    with pytest.raises(TypeError, match="unexpected argument 'gamma'"):
        k(x, x, alpha=1.0, beta=1.0, gamma=2)
    with pytest.raises(TypeError, match="input 'y' must be a torch.Tensor"):
        k(x, 3.0, alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match="positional arguments"):
        k(x, x, 1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        k(x, x, alpha=1.0, beta=1.0, mode="sideways")
    with pytest.raises(TypeError, match="supported: f32, bf16, f16"):
        ew.add(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="'dtype'"):
        ew.cast(torch.zeros(3), "int4")
    with pytest.raises(ValueError, match="multiple of group=128"):
        ew.per_token_cast_to_fp8(torch.zeros(2, 100, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even last dimension"):
        ew.silu_and_mul(torch.zeros(2, 7, dtype=torch.bfloat16))


def test_torch_library_registration_with_fake_impl():
    k = ew.kernel("reg_axpby", {"x": "f32", "y": "f32"}, {"out": "f32"}, "out = a * x + y;", scalars={"a": "float"})
    op = k.register(namespace="l2side_ew_test")
    assert k.register(namespace="l2side_ew_test") is op
    x = torch.empty(3, 5, device="meta")
    out = op(x, x, 2.0)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.device.type == "meta"
    q = ew.kernel("reg_quant", {"x": "bf16"}, {"q": "e4m3"}, "for (int i = 0; i < VEC; ++i) q[i] = x[i]; s = 1.f;",
                  group=128, group_outputs={"s": "f32"})
    qop = q.register(namespace="l2side_ew_test")
    a, b = qop(torch.empty(4, 256, dtype=torch.bfloat16, device="meta"))
    assert a.shape == (4, 256) and a.dtype == torch.float8_e4m3fn and b.shape == (4, 2) and b.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# CPU: path choice and the chunk schedule

def _infos(n, elem=2, base=0x7F00_0000_0000 + (5 << 22), k=3, owned=True, step=1 << 30):
    return [cg.TensorInfo(base + i * step, elem, n, True, owned, i == k - 1) for i in range(k)]


def test_plan_chooses_the_path_and_says_why():
    spec = ew.builtin_kernels()["add_bf16"].spec
    n = 1 << 22
    plan = lambda infos, **kw: cg.plan(spec, infos, n, n, **{**dict(side_mask=H100_MASK, num_sms=132,
                                                                   sm_side=SM_SIDES), **kw})
    assert plan(_infos(n)).path == "side"
    assert plan(_infos(n)).entry == "l2ew_side_flat"
    assert plan(_infos(n), side_mask=0).path == "stride"                       # no split
    assert "not l2side memory" in plan(_infos(n, owned=False)).why
    assert plan(_infos(n, owned=False)).entry == "l2ew_stride_flat"
    off = _infos(n)
    off[1].address += 4096 * 2                                                  # a view 8 KiB in
    assert "modulo 4 MiB" in plan(off).why
    mis = _infos(n)
    mis[0].address += 2                                                         # one element in
    assert plan(mis).path == "unaligned" and plan(mis).entry == "l2ew_unaligned"
    assert "bit 12" in plan(_infos(n), side_mask=0xB2000 | 1 << 21).why
    rows = _infos(n)
    rows[0].contiguous, rows[0].row_stride = False, 2 * 1024
    assert plan(rows).entry == "l2ew_side_rows"
    rows[0].row_stride = 2 * 1024 + 1                                          # rows not vector-aligned
    assert plan(rows).path == "unaligned"
    with pytest.raises(ValueError, match="mode"):
        plan(_infos(n), mode="both")


def test_plan_drive_tensor_is_the_widest_output_first():
    spec = ew.builtin_kernels()["cast_f32_bf16"].spec
    n = 1 << 20
    infos = [cg.TensorInfo(0x7F00_0040_0000, 4, n, True, True, False),
             cg.TensorInfo(0x7F01_0000_0000, 2, n, True, True, True)]
    p = cg.plan(spec, infos, n, n, side_mask=H100_MASK, num_sms=132, sm_side=SM_SIDES)
    assert p.path == "side" and p.common["drive"] == infos[0].address and "input of 4-byte" in p.why


@pytest.mark.parametrize("mode", ["near", "far"])
def test_plan_row_strided_inputs_drive_silu_and_mul(mode):
    # x [rows, 2h] bf16: gate and up are its halves (row stride 2h), the output is contiguous [rows, h]
    spec = ew.builtin_kernels()["silu_and_mul_bf16"].spec
    rows, h = 37, 8192
    n, base = rows * h, 0x7F00_0000_0000 + (5 << 22)
    infos = [cg.TensorInfo(base, 2, 2 * h, False, True, False), cg.TensorInfo(base + 2 * h, 2, 2 * h, False, True, False),
             cg.TensorInfo(0x7F01_0000_0000, 2, n, True, True, True)]
    p = cg.plan(spec, infos, n, h, side_mask=H100_MASK, num_sms=132, sm_side=SM_SIDES, mode=mode)
    assert p.path == "side" and p.entry == "l2ew_side_rows" and "input of 2-byte" in p.why, p.why
    c = p.common
    assert c["drive"] == base and 1 << c["drive_row_shift"] == h * 2 // 4096 and c["drive_row_pitch"] == 4 * h
    ch = [cg.counter_chunks(c, 0), cg.counter_chunks(c, 1)]
    assert sorted(ch[0] + ch[1]) == list(range(c["n_chunks"]))
    per_row = h * 2 // 4096
    addr = np.array([base + (x // per_row) * 4 * h + (x % per_row) * 4096 for x in range(c["n_chunks"])], np.uint64)
    ref = _numpy_sides(addr, H100_MASK)
    for ctr in (0, 1):
        assert (ref[np.asarray(ch[ctr], dtype=np.int64)] == ctr).all()
    up = _numpy_sides(addr + np.uint64(2 * h), H100_MASK)        # the up half: the same side as gate here
    assert (up == ref).all()
    # rows that are not a power of two of chunk pairs (12 KiB, 24 KiB): the contiguous output drives, as before
    for cols in (6144, 12288):
        q = cg.plan(spec, infos, rows * cols, cols, side_mask=H100_MASK, num_sms=132, sm_side=SM_SIDES)
        assert q.common["drive"] == infos[2].address and q.common["drive_row_pitch"] == 0


def _numpy_sides(addresses, mask):
    a = np.asarray(addresses, dtype=np.uint64) & np.uint64(mask)
    bits = np.unpackbits(a.view(np.uint8).reshape(-1, 8), axis=1)
    return (bits.sum(axis=1) & 1).astype(np.uint8)


@pytest.mark.parametrize("n", [1, 7, 2048, 4095, 4096 * 3 + 5, 1 << 20, (64 << 20) // 2 + 3])
@pytest.mark.parametrize("mode", ["near", "off", "far"])
def test_chunk_selection_matches_a_numpy_reference(n, mode):
    spec = ew.builtin_kernels()["add_bf16"].spec
    infos = _infos(n)
    p = cg.plan(spec, infos, n, n, side_mask=H100_MASK, num_sms=132, sm_side=SM_SIDES, mode=mode)
    assert p.path == "side"
    c = p.common
    ch = [cg.counter_chunks(c, 0), cg.counter_chunks(c, 1)]
    # every chunk exactly once, whatever the mode
    assert sorted(ch[0] + ch[1]) == list(range(c["n_chunks"]))
    drive = infos[-1].address
    chunk_addr = drive + np.arange(c["n_chunks"], dtype=np.uint64) * np.uint64(4096)
    ref = _numpy_sides(chunk_addr, H100_MASK)
    assert np.array_equal(ref, sides.chunk_sides(drive, c["n_chunks"] * 4096, H100_MASK))
    for ctr in (0, 1):
        got = ref[np.asarray(ch[ctr], dtype=np.int64)] if ch[ctr] else np.zeros(0, np.uint8)
        if mode == "off":      # counter c takes chunk 2j + c, whatever its side
            assert all(x % 2 == ctr for x in ch[ctr])
        else:                  # counter c takes the chunk on side c; near: side c's SMs use it first
            assert (got == ctr).all()
    # pairs are on opposite sides (bit 12 is in the mask, drive is 8 KiB aligned)
    if c["n_chunks"] >= 2:
        m = c["n_chunks"] // 2 * 2
        assert (ref[0:m:2] != ref[1:m:2]).all()
    # the CTAs of each side start on their own counter: near -> own side, far -> the other side
    first = {"near": lambda s: s, "off": lambda s: s, "far": lambda s: s ^ 1}[mode]
    assert first(0) == (0 if mode != "far" else 1)


def test_tickets_cover_all_pairs_once():
    for n_pairs in (1, 2, 3, 17, 1000, 131072, 1 << 20):
        for cps in (1, 66, 264):
            bt, bp, sp, nt = cg._ticket_sizes(n_pairs, cps, 4)
            c = dict(big_tickets=bt, big_pairs=bp, small_pairs=sp, n_pairs=n_pairs)
            covered = []
            for t in range(nt):
                p0, p1 = cg.ticket_range(c, t)
                assert p0 < p1
                covered.append((p0, p1))
            assert covered[0][0] == 0 and covered[-1][1] == n_pairs
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


# ----------------------------------------------------------------------------------------------------------
# CPU: nvcc compiles every built-in for sm_90a (no spills)

def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@requires_nvcc
def test_every_builtin_compiles_for_sm90a_without_spills():
    ks = ew.builtin_kernels()
    include = os.path.dirname(ew.__file__)

    def build(item):
        name, k = item
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{name}.cu")
            with open(src, "w") as f:
                f.write(k.source)
            r = subprocess.run([_nvcc(), "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-O3", "-std=c++17",
                                "--expt-relaxed-constexpr", "-Xptxas", "-v", f"-I{include}", src,
                                "-o", os.path.join(tmp, f"{name}.cubin")], capture_output=True, text=True)
        return name, r

    with concurrent.futures.ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2))) as ex:
        results = list(ex.map(build, ks.items()))
    for name, r in results:
        assert r.returncode == 0, f"{name}:\n{r.stderr[-3000:]}"
        entries = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
        assert sorted(entries) == sorted(cg.ENTRY_POINTS), name
        spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
        assert spills and all(s == "0" for s in spills), f"{name} spills:\n{r.stderr}"


@requires_nvcc
def test_group_inputs_mixed_dtypes_scalars_and_preamble_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SIDE_CACHE_DIR", str(tmp_path))
    ks = [
        ew.kernel("t_dequant", {"q": "e4m3"}, {"y": "bf16"}, "for (int i = 0; i < VEC; ++i) y[i] = q[i] * s;",
                  group=128, group_inputs={"s": "f32"}),
        ew.kernel("t_mixed", {"a": "f64", "b": "i64", "c": "e5m2"}, {"o": "f32", "p": "u8"},
                  "o = a * b + c * d + k + u; p = (unsigned char)(b & 255);",
                  scalars={"k": "int64", "u": "uint64", "d": "double"}),
        ew.kernel("t_rms", {"x": "f16"}, {"y": "f16"},
                  "float ss = 0.f;\nfor (int i = 0; i < VEC; ++i) ss += x[i] * x[i];\n"
                  "const float r = rsqrtf(group_sum(ss) / GROUP + eps);\nfor (int i = 0; i < VEC; ++i) y[i] = x[i] * r;",
                  group=256, scalars={"eps": "float"}),
        ew.kernel("t_native", {"x": "bf16"}, {"y": "bf16"}, "y = square(x);", compute="native",
                  preamble="__device__ inline __nv_bfloat16 square(__nv_bfloat16 v) { return __hmul(v, v); }"),
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for cubin in ex.map(lambda k: k.build("sm_90a"), ks):
            assert cubin[:4] == b"\x7fELF"


@requires_nvcc
def test_user_kernel_from_a_string_compiles_and_a_bad_one_shows_nvcc(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SIDE_CACHE_DIR", str(tmp_path))
    from l2side import jit
    good = ew.kernel("user_scale_add", {"x": "bf16", "y": "bf16"}, {"out": "bf16"}, "out = alpha * x + y;",
                     scalars={"alpha": "float"})
    assert good.build("sm_90a")[:4] == b"\x7fELF"
    bad = ew.kernel("user_broken", {"x": "f32"}, {"out": "f32"}, "out = x +* 2;\nout = not_declared;")
    with pytest.raises(jit.CompileError) as err:
        bad.build("sm_90a")
    msg = str(err.value)
    assert "user_broken:body(1)" in msg and "user_broken:body(2)" in msg and "not_declared" in msg
    assert not [p for p in (tmp_path / "jit").glob("user_broken*")]     # nothing cached
    with pytest.raises(jit.CompileError):                                # and it fails again
        bad.build("sm_90a")


# ----------------------------------------------------------------------------------------------------------
# GPU: every built-in against torch, both paths

SIZES = [1, 7, 4095, 4096 * 3 + 5, 1 << 20, (64 << 20) // 2 + 3]
SHAPES = [(3, 5, 7), (17, 129), (1, 1), (257, 4096)]


def _topo():
    import l2side
    return l2side.topology()


def _alloc(kind, shape, dtype):
    import l2side
    if kind == "side":
        return l2side.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device="cuda")


def _rand(kind, shape, dtype, lo=-3.0, hi=3.0):
    t = _alloc(kind, shape, dtype)
    src = torch.rand(shape, device="cuda", dtype=torch.float32) * (hi - lo) + lo
    src = torch.where(src.abs() < 1e-3, torch.full_like(src, 0.5), src)     # fresh data, never zeros
    t.copy_(src.to(dtype))
    return t


def _poisoned(kind, shape, dtype):
    t = _alloc(kind, shape, dtype)
    t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan"))
    return t


def _expect_path(k_or_plan, kind, nbytes):
    if kind == "side" and _topo().split and nbytes > (2 << 20):
        assert k_or_plan.path == "side", k_or_plan.why
    if kind == "torch" and not __import__("l2side").is_enabled():
        assert k_or_plan.path != "side"


DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OTHER_UNROLL_CTAS = [(4, 2), (2, 4), (8, 1)]   # the defaults are 1 x 8 (builtins.py)


def _user_fma_kernel():
    return ew.kernel("test_user_fma", {"x": "bf16", "y": "f32"}, {"out": "f32", "o16": "f16"},
                     "out = alpha * x + y + (float)(index % 3);\no16 = out;", scalars={"alpha": "float"})


def _rope_kernel():
    return ew.kernel(
        "rope_neox", inputs={"x1": "bf16", "x2": "bf16"}, outputs={"o1": "bf16", "o2": "bf16"},
        scalars={"heads": "int", "theta": "float"},
        body="""
            const u64 row = index / cols, i = index % cols;       // row = token * heads + head
            const float pos = (float)(row / heads);
            const float freq = exp2f(-(float)i / (float)cols * log2f(theta));
            float s, c;
            sincosf(pos * freq, &s, &c);
            o1 = x1 * c - x2 * s;
            o2 = x2 * c + x1 * s;
        """)


def _kernels_the_gpu_tests_launch():
    from l2side.elementwise.builtins import fp8_quant_kernel, silu_and_mul_kernel
    ks = list(ew.builtin_kernels().values()) + [_user_fma_kernel(), _rope_kernel()]
    for unroll, min_ctas in OTHER_UNROLL_CTAS:
        ks += [silu_and_mul_kernel("bf16", unroll, min_ctas), fp8_quant_kernel("bf16", 128, unroll, min_ctas)]
    return ks


@pytest.fixture(scope="module")
def prebuilt():
    """Compiles every kernel the GPU tests launch, in parallel, before the first one runs: one nvcc after
    another took minutes on a fresh machine. Only GPU tests ask for it, and they are skipped before it would
    run on a machine without a GPU. The launches find the binaries in l2side.jit's disk cache."""
    from l2side import jit
    if not cuda_available():
        return
    try:
        jit.nvcc_path()
    except jit.CompileError:
        return
    arch = jit.arch_for(0)

    def build(k):
        try:
            k.build(arch)
        except jit.CompileError:
            pass  # the test that launches it reports nvcc's message

    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
        list(ex.map(build, _kernels_the_gpu_tests_launch()))


@requires_gpu
@pytest.mark.parametrize("kind", ["side", "torch"])
@pytest.mark.parametrize("shape", [(n,) for n in SIZES] + SHAPES)
def test_copy_add_mul_axpby_cast_match_torch(kind, shape, prebuilt):
    for dname, dt in DT.items():
        x, y = _rand(kind, shape, dt), _rand(kind, shape, dt)
        k = ew.builtin_kernels()[f"add_{dname}"]
        out = _poisoned(kind, shape, dt)
        _expect_path(k.plan(x, y, out=out), kind, out.numel() * out.element_size())
        for mode in ("near", "off", "far"):
            out = _poisoned(kind, shape, dt)
            assert ew.add(x, y, out=out, mode=mode) is out
            torch.testing.assert_close(out, x + y, rtol=0, atol=0)
        torch.testing.assert_close(ew.mul(x, y), x * y, rtol=0, atol=0)
        ref = (2.5 * x.float() - 0.75 * y.float()).to(dt)
        torch.testing.assert_close(ew.axpby(x, y, 2.5, -0.75), ref, rtol=TOL[dt], atol=TOL[dt])
        c = ew.copy(x)
        assert torch.equal(c.view(torch.uint8), x.contiguous().view(torch.uint8)) if c.numel() else True
        for ename, et in DT.items():
            if et != dt:
                o = _poisoned(kind, shape, et)
                ew.cast(x, et, out=o)
                torch.testing.assert_close(o, x.to(et), rtol=0, atol=0)


@requires_gpu
@pytest.mark.parametrize("kind", ["side", "torch"])
def test_copy_any_dtype_and_odd_byte_counts(kind, prebuilt):
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float64, torch.bool, torch.float8_e4m3fn):
        for n in (1, 3, 4097, (1 << 20) + 1, 3 << 20):
            if dt == torch.bool:
                x = torch.rand(n, device="cuda") > 0.5
            elif dt == torch.float8_e4m3fn:
                x = torch.randn(n, device="cuda").to(dt)
            else:
                x = torch.randint(1, 100, (n,), device="cuda").to(dt)
            src = _alloc(kind, (n,), dt)
            src.copy_(x)
            out = ew.copy(src)
            assert out.dtype == dt and torch.equal(out.view(torch.uint8), x.view(torch.uint8))


@requires_gpu
def test_unaligned_views_and_row_slices(prebuilt):
    import l2side
    base = l2side.empty((1 << 21) + 64,  torch.float32)
    base.copy_(torch.randn_like(base))
    for off in (1, 2, 3, 1024):                                            # offset views: not 16 B aligned
        x = base[off:off + (1 << 20) + 5]
        y = torch.randn_like(x)
        k = ew.builtin_kernels()["add_f32"]
        p = k.plan(x, y)
        assert p.path in ("unaligned", "stride"), p
        torch.testing.assert_close(ew.add(x, y), x + y, rtol=0, atol=0)
    m = torch.randn(64, 1000, device="cuda")                               # rows of a wider matrix
    a, b = m[:, :300], m[:, 500:800]
    torch.testing.assert_close(ew.add(a, b), a + b, rtol=0, atol=0)
    t = torch.randn(8, 8, device="cuda").t()                               # transposed: refused by name
    with pytest.raises(ValueError, match="input 'x' is not contiguous"):
        ew.add(t, t)
    with pytest.raises(ValueError, match=r"input 'y' has shape"):
        ew.add(torch.randn(4, device="cuda"), torch.randn(5, device="cuda"))
    with pytest.raises(TypeError, match=r"input 'y' must be f32"):
        ew.builtin_kernels()["add_f32"](torch.randn(4, device="cuda"), torch.randn(4, device="cuda").half())
    with pytest.raises(TypeError, match=r"output 'out' must be f32"):
        ew.add(torch.randn(4, device="cuda"), torch.randn(4, device="cuda"), out=torch.empty(4, device="cuda").half())


def _silu_mul_ref(x):
    h = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :h]) * xf[..., h:]).to(x.dtype)


@requires_gpu
@pytest.mark.parametrize("kind", ["side", "torch"])
@pytest.mark.parametrize("shape", [(1, 2), (7, 14), (3, 5, 2 * 4096), (257, 2 * 1376), (1000, 2 * 7), (4096, 2 * 4096)])
def test_silu_and_mul_matches_torch(kind, shape, prebuilt):
    for dname, dt in DT.items():
        x = _rand(kind, shape, dt, -6, 6)
        out = _poisoned(kind, shape[:-1] + (shape[-1] // 2,), dt)
        for mode in ("near", "far"):
            ew.silu_and_mul(x, out=out, mode=mode)
            torch.testing.assert_close(out, _silu_mul_ref(x), rtol=TOL[dt] * 2, atol=TOL[dt])
        torch.testing.assert_close(ew.silu_and_mul(x), _silu_mul_ref(x), rtol=TOL[dt] * 2, atol=TOL[dt])


def per_token_cast_to_fp8_ref(x):
    """DeepGEMM's per_token_cast_to_fp8 (the reference the GEMM's A-side recipe is defined by)."""
    m, n = x.shape
    xv = x.view(m, -1, 128)
    amax = xv.abs().float().amax(dim=2).view(m, -1).clamp(1e-4)
    return (xv * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(m, n), (amax / 448.0).view(m, -1)


@requires_gpu
@pytest.mark.parametrize("kind", ["side", "torch"])
@pytest.mark.parametrize("mk", [(1, 128), (7, 384), (129, 7168), (4096, 7168), (3, 128 * 1000)])
def test_fp8_quantisation_matches_deepgemm_reference(kind, mk, prebuilt):
    for dname, dt in DT.items():
        x = _rand(kind, mk, dt, -20, 20)
        x[0, :128] = x[0, :128] * 1e-7                                     # a group below the amax floor
        q_ref, s_ref = per_token_cast_to_fp8_ref(x)
        for layout in ("row", "mn"):
            q, s = ew.per_token_cast_to_fp8(x, scale_layout=layout)
            assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == s_ref.shape
            if layout == "mn" and mk[0] > 1:  # (a size-1 dimension's stride means nothing)
                assert s.stride(0) == 1 and s.stride(1) == (mk[0] + 3) // 4 * 4
            assert torch.equal(s, s_ref), (dname, layout)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (dname, layout)


@requires_gpu
@pytest.mark.parametrize("unroll, min_ctas", OTHER_UNROLL_CTAS)
def test_silu_and_fp8_other_unroll_and_ctas_match(unroll, min_ctas, prebuilt):
    from l2side.elementwise.builtins import fp8_quant_kernel, silu_and_mul_kernel
    for kind in ("side", "torch"):
        x = _rand(kind, (300, 2 * 4096), torch.bfloat16, -6, 6)
        out = _poisoned(kind, (300, 4096), torch.bfloat16)
        silu_and_mul_kernel("bf16", unroll, min_ctas)(x[:, :4096], x[:, 4096:], out=out)
        torch.testing.assert_close(out, _silu_mul_ref(x), rtol=2e-2, atol=1e-2)
        x = _rand(kind, (129, 7168), torch.bfloat16, -20, 20)
        q, s = fp8_quant_kernel("bf16", 128, unroll, min_ctas)(x)
        q_ref, s_ref = per_token_cast_to_fp8_ref(x)
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@requires_gpu
def test_user_kernel_from_a_string_runs(prebuilt):
    k = _user_fma_kernel()
    for kind in ("side", "torch"):
        n = (1 << 21) + 11
        x, y = _rand(kind, (n,), torch.bfloat16), _rand(kind, (n,), torch.float32)
        out, o16 = k(x, y, alpha=1.5)
        ref = 1.5 * x.float() + y + (torch.arange(n, device="cuda") % 3).float()
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(o16, ref.half(), rtol=1e-3, atol=1e-3)
    op = k.register(namespace="l2side_ew_gpu_test")
    a, b = op(x, y, 1.5)
    torch.testing.assert_close(a, out)


@requires_gpu
def test_rope_worked_example_from_the_docs(prebuilt):
    rope = _rope_kernel()
    T, H, D = 37, 8, 128
    x = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    rope(x[..., :D // 2], x[..., D // 2:], heads=H, theta=10000.0, o1=out[..., :D // 2], o2=out[..., D // 2:])
    pos = torch.arange(T, device="cuda", dtype=torch.float32)[:, None, None]
    freq = torch.exp2(-torch.arange(D // 2, device="cuda", dtype=torch.float32) / (D // 2) * torch.log2(torch.tensor(10000.0)))
    ang = pos * freq
    c, s = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :D // 2].float(), x[..., D // 2:].float()
    ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@requires_gpu
def test_side_path_counters_reset_between_launches_and_streams(prebuilt):
    import l2side
    n = 8 << 20
    x = l2side.empty((n,), torch.float32)
    x.copy_(torch.randn(n, device="cuda"))
    y = l2side.empty((n,), torch.float32)
    y.copy_(torch.randn(n, device="cuda"))
    ref = x + y
    for i in range(20):
        out = ew.add(x, y, mode=("near", "off", "far")[i % 3])
        assert torch.equal(out, ref), i
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(5):
            out2 = ew.add(x, y)
    s.synchronize()
    assert torch.equal(out2, ref)
    g = torch.cuda.CUDAGraph()                                            # graph replay reuses the counters
    out3 = l2side.empty((n,), torch.float32)
    ew.add(x, y, out=out3)
    with torch.cuda.graph(g):
        ew.add(x, y, out=out3)
    out3.zero_()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out3, ref)


@requires_gpu
def test_two_gib(prebuilt):
    if torch.cuda.get_device_properties(0).total_memory < (24 << 30):
        pytest.skip("needs 24 GiB")
    import l2side
    n = 1 << 30                                                           # 2 GiB of bf16 per tensor
    x = l2side.empty((n,), torch.bfloat16)
    x.copy_(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    y = l2side.empty((n,), torch.bfloat16)
    y.copy_(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    out = ew.add(x, y)
    assert torch.equal(out, x + y)
    c = ew.copy(x)
    assert torch.equal(c, x)
    del out, c
    q, s = ew.per_token_cast_to_fp8(x.view(-1, 8192))
    q_ref, s_ref = per_token_cast_to_fp8_ref(x.view(-1, 8192))
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU exit")
def test_variant_sweep_script_exits_cleanly_without_a_gpu():
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "elementwise_variants.py")
    r = subprocess.run([sys.executable, script, "--variants", "1x8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout, r.stderr


def test_bench_energy_vs_off_pairs_the_rounds():
    """The benchmark's "energy vs off": the median of per-round paired ratios (with their range) when both
    variants have the same rounds, else the ratio of the medians; blank without a reference."""
    energy_vs = load_script("benchmarks", "bench_elementwise.py").energy_vs
    near = {"mj_per_gb": 92.0, "mj_rounds": [90.0, 92.0, 95.0]}
    off = {"mj_per_gb": 100.0, "mj_rounds": [100.0, 100.0, 100.0]}
    assert energy_vs(near, off) == (-8.0, "-10.0..-5.0")
    assert energy_vs({"mj_per_gb": 92.0, "mj_rounds": [92.0]}, {"mj_per_gb": 100.0, "mj_rounds": [100.0]}) == (-8.0, "")
    assert energy_vs({"mj_per_gb": 90.0}, {"mj_per_gb": 100.0}) == (-10.0, "")   # no rounds: ratio of medians
    assert energy_vs(near, None) == ("", "") and energy_vs({"mj_per_gb": ""}, off) == ("", "")
