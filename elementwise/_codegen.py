"""Kernel definitions -> CUDA source, argument packing, path choice and the chunk schedule, in pure Python
(no torch, no GPU), so all of it is testable on a machine without either.

The generated source defines `struct Op` (the tensors, the body, loads/stores) and instantiates the loops of
`l2side_elementwise.cuh` for it.
"""
from __future__ import annotations

import dataclasses
import keyword
import re
import struct
from typing import Mapping, Optional, Sequence

from ..sides import sm_side_bits

HEADER = "l2side_elementwise.cuh"
THREADS = 256
CHUNK_BYTES = 4096
VECTOR_BYTES = 16
MODES = {"near": 0, "off": 1, "far": 2}

# name -> (C++ storage type, bytes, kind); kind "float" values compute as float (double for f64)
DTYPES = {
    "f32": ("float", 4, "float"),
    "f64": ("double", 8, "float"),
    "bf16": ("__nv_bfloat16", 2, "float"),
    "f16": ("__half", 2, "float"),
    "e4m3": ("__nv_fp8_e4m3", 1, "float"),
    "e5m2": ("__nv_fp8_e5m2", 1, "float"),
    "i8": ("signed char", 1, "int"),
    "u8": ("unsigned char", 1, "int"),
    "i16": ("short", 2, "int"),
    "i32": ("int", 4, "int"),
    "i64": ("long long", 8, "int"),
}
_DTYPE_ALIASES = {
    "float32": "f32", "float": "f32", "fp32": "f32", "torch.float32": "f32",
    "float64": "f64", "double": "f64", "fp64": "f64", "torch.float64": "f64",
    "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "float16": "f16", "half": "f16", "fp16": "f16", "torch.float16": "f16",
    "float8_e4m3fn": "e4m3", "fp8_e4m3": "e4m3", "fp8": "e4m3", "torch.float8_e4m3fn": "e4m3",
    "float8_e5m2": "e5m2", "fp8_e5m2": "e5m2", "torch.float8_e5m2": "e5m2",
    "int8": "i8", "torch.int8": "i8", "uint8": "u8", "torch.uint8": "u8",
    "int16": "i16", "torch.int16": "i16", "int32": "i32", "int": "i32", "torch.int32": "i32",
    "int64": "i64", "long": "i64", "torch.int64": "i64",
}
# scalar kind -> (C++ type, struct format incl. padding to 8 bytes)
SCALARS = {
    "float": ("float", "f4x"), "f32": ("float", "f4x"),
    "double": ("double", "d"), "f64": ("double", "d"),
    "int": ("int", "i4x"), "i32": ("int", "i4x"),
    "int64": ("long long", "q"), "i64": ("long long", "q"),
    "uint64": ("unsigned long long", "Q"), "u64": ("unsigned long long", "Q"),
}
_SCALAR_CANON = {"f32": "float", "f64": "double", "i32": "int", "i64": "int64", "u64": "uint64"}
RESERVED = {"args", "index", "cols", "VEC", "GROUP", "TPG", "Op", "Args", "Regs", "u64", "i64", "body",
            "load", "compute_store", "group_max", "group_min", "group_sum", "l2side_ew", "policy",
            "true", "false", "int", "float", "double", "char", "short", "long", "bool", "void", "auto",
            "const", "unsigned", "signed", "return", "if", "else", "for", "while", "do", "struct", "class",
            "template", "typename", "static", "inline", "asm", "new", "delete", "this", "switch", "case",
            "default", "break", "continue", "goto", "sizeof", "volatile", "register", "namespace", "using",
            "operator", "union", "enum", "extern", "friend", "private", "public", "protected", "virtual",
            "mutable", "explicit", "typedef", "throw", "try", "catch", "nullptr", "constexpr", "decltype",
            "static_assert", "alignas", "alignof", "noexcept", "thread_local", "half", "min", "max"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DefinitionError(ValueError):
    """A kernel definition that cannot work (bad name, dtype, group size, ...)."""


def canonical_dtype(dtype) -> str:
    """'bf16' from 'bf16', 'bfloat16', torch.bfloat16, ...; ValueError listing the supported ones."""
    key = str(dtype)
    if key in DTYPES:
        return key
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise DefinitionError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)} "
                          f"(or torch dtypes / names such as 'bfloat16', 'float32', 'float8_e4m3fn')")


def dtype_bytes(dtype: str) -> int:
    return DTYPES[canonical_dtype(dtype)][1]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated kernel definition (see l2side.elementwise.kernel)."""
    name: str
    inputs: tuple            # ((name, dtype), ...)
    outputs: tuple
    body: str
    scalars: tuple = ()      # ((name, kind), ...)
    group: int = 0           # elements per group along the last dim; 0 = element form
    group_inputs: tuple = ()
    group_outputs: tuple = ()
    compute: str = "float"   # "float": floating values as float (f64 as double); "native": storage types
    preamble: str = ""
    unroll: int = 4
    min_ctas: int = 4        # __launch_bounds__ minimum CTAs per SM (caps registers at 64 for 4)
    stream_inputs: bool = True  # L2 evict-first hint on input loads

    @property
    def tensors(self):        # the 1:1 tensors, inputs first
        return self.inputs + self.outputs

    @property
    def widest(self) -> int:
        return max(dtype_bytes(d) for _, d in self.tensors)

    @property
    def vec(self) -> int:     # elements per thread per chunk: 16 bytes of the widest tensor
        return VECTOR_BYTES // self.widest

    @property
    def chunk_elems(self) -> int:
        return THREADS * self.vec

    @property
    def tpg(self) -> int:     # threads per group
        return self.group // self.vec if self.group else 1

    def ctype(self, dtype: str) -> str:
        return DTYPES[dtype][0]

    def conv(self, dtype: str) -> str:
        return f"l2side_ew::{'Native' if self.compute == 'native' else 'Conv'}<{self.ctype(dtype)}>"

    def value_type(self, dtype: str) -> str:
        return f"typename {self.conv(dtype)}::type"


def _check_name(what: str, name, seen: set) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DefinitionError(f"{what} name {name!r} is not a C identifier")
    if name in RESERVED or keyword.iskeyword(name) or name.startswith("_l2") or name.startswith("__"):
        raise DefinitionError(f"{what} name {name!r} is reserved; pick another")
    if name in seen:
        raise DefinitionError(f"name {name!r} is used twice")
    seen.add(name)
    return name


def _tensor_dict(what: str, d, seen: set) -> tuple:
    if d is None:
        return ()
    if not isinstance(d, Mapping):
        raise DefinitionError(f"{what} must be a dict of name -> dtype, got {type(d).__name__}")
    out = []
    for name, dtype in d.items():
        _check_name(what[:-1], name, seen)
        try:
            out.append((name, canonical_dtype(dtype)))
        except DefinitionError as e:
            raise DefinitionError(f"{what[:-1]} {name!r}: {e}") from None
    return tuple(out)


def make_spec(name, inputs, outputs, body, scalars=None, group=None, group_inputs=None, group_outputs=None,
              compute="float", preamble="", unroll=4, min_ctas=4, stream_inputs=True) -> Spec:
    """Validates a kernel definition; DefinitionError names what is wrong."""
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.\-]+$", name or ""):
        raise DefinitionError(f"kernel name must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
    if not isinstance(body, str) or not body.strip():
        raise DefinitionError(f"kernel '{name}': body must be a non-empty string of CUDA C++")
    seen: set = set()
    ins = _tensor_dict("inputs", inputs, seen)
    outs = _tensor_dict("outputs", outputs, seen)
    if not outs:
        raise DefinitionError(f"kernel '{name}': needs at least one output")
    g_ins = _tensor_dict("group_inputs", group_inputs, seen)
    g_outs = _tensor_dict("group_outputs", group_outputs, seen)
    sc = []
    for sname, kind in (scalars or {}).items():
        _check_name("scalar", sname, seen)
        if kind not in SCALARS:
            raise DefinitionError(f"scalar {sname!r}: unsupported type {kind!r}; supported: "
                                  "float, double, int, int64, uint64")
        sc.append((sname, _SCALAR_CANON.get(kind, kind)))
    derived = {f"{n}{suffix}" for n, _ in ins + outs for suffix in ("_rs",)}
    derived |= {f"{n}{suffix}" for n, _ in g_ins + g_outs for suffix in ("_sr", "_sc")}
    if derived & seen:
        raise DefinitionError(f"kernel '{name}': name(s) {sorted(derived & seen)} clash with generated fields "
                              "(<tensor>_rs / _sr / _sc); pick others")
    if compute not in ("float", "native"):
        raise DefinitionError(f"compute must be 'float' or 'native', got {compute!r}")
    if not isinstance(unroll, int) or not 1 <= unroll <= 16:
        raise DefinitionError(f"unroll must be an int in [1, 16], got {unroll!r}")
    if not isinstance(min_ctas, int) or not 1 <= min_ctas <= 8:
        raise DefinitionError(f"min_ctas must be an int in [1, 8], got {min_ctas!r}")
    spec = Spec(name=name, inputs=ins, outputs=outs, body=body, scalars=tuple(sc), group=0,
                group_inputs=g_ins, group_outputs=g_outs, compute=compute, preamble=preamble or "",
                unroll=unroll, min_ctas=min_ctas, stream_inputs=bool(stream_inputs))
    if group is None or group == 0:
        if g_ins or g_outs:
            raise DefinitionError(f"kernel '{name}': group_inputs/group_outputs need group=<elements per group>")
        return spec
    if not isinstance(group, int) or group < 0:
        raise DefinitionError(f"group must be a positive int, got {group!r}")
    vec = spec.vec
    tpg = group // vec
    if group % vec or tpg & (tpg - 1) or tpg > 32:
        raise DefinitionError(
            f"kernel '{name}': group={group} is not supported with these dtypes: a group must be VEC * 2^k "
            f"elements with 2^k <= 32, VEC = {vec} (16 bytes of the widest tensor): "
            f"one of {[vec << k for k in range(6)]}")
    return dataclasses.replace(spec, group=group)


# ---------------------------------------------------------------------------------------------------------
# Source generation

def _fields(spec: Spec) -> list:
    """(C++ declaration, struct format) of Args after `Common c`, in order."""
    f = []
    for n, d in spec.inputs:
        f += [(f"const {spec.ctype(d)}* {n};", "Q"), (f"i64 {n}_rs;", "q")]
    for n, d in spec.outputs:
        f += [(f"{spec.ctype(d)}* {n};", "Q"), (f"i64 {n}_rs;", "q")]
    for n, d in spec.group_inputs:
        f += [(f"const {spec.ctype(d)}* {n};", "Q"), (f"i64 {n}_sr;", "q"), (f"i64 {n}_sc;", "q")]
    for n, d in spec.group_outputs:
        f += [(f"{spec.ctype(d)}* {n};", "Q"), (f"i64 {n}_sr;", "q"), (f"i64 {n}_sc;", "q")]
    if spec.group:
        f.append(("u64 _l2_groups_per_row;", "Q"))
    for n, kind in spec.scalars:
        ctype, fmt = SCALARS[kind]
        decl = f"{ctype} {n};" + (f" {'float' if fmt[0] == 'f' else 'int'} _l2_pad_{n};" if fmt.endswith("4x") else "")
        f.append((decl, fmt))
    return f


COMMON_FORMAT = "<" + "Q" * 18   # l2side_ew::Common


def args_format(spec: Spec) -> str:
    return COMMON_FORMAT + "".join(fmt for _, fmt in _fields(spec))


def generate(spec: Spec) -> str:
    """The CUDA source of a kernel module (entry points l2ew_side_flat/_rows, l2ew_stride_flat/_rows,
    l2ew_unaligned)."""
    g = spec.group
    L = []
    w = L.append
    w(f"// l2side elementwise kernel '{spec.name}' (generated by l2side.elementwise)")
    w(f"#define L2SIDE_EW_UNROLL {spec.unroll}")
    w(f"#define L2SIDE_EW_MIN_CTAS {spec.min_ctas}")
    w(f"#define L2SIDE_EW_FAST_DIV {0 if spec.min_ctas >= 3 and spec.unroll >= 4 else 1}")
    w(f"#include <{HEADER}>")
    if spec.preamble.strip():
        w(f'#line 1 "{spec.name}:preamble"')
        w(spec.preamble.rstrip())
        w("#line LINE_PLACEHOLDER")
    w("struct Op {")
    w("  using u64 = l2side_ew::u64;")
    w("  using i64 = l2side_ew::i64;")
    w(f"  static constexpr int VEC = {spec.vec};")
    w("  static constexpr int CHUNK_ELEMS = l2side_ew::kThreads * VEC;")
    w(f"  static constexpr int GROUP = {g};")
    w(f"  static constexpr int TPG = {spec.tpg};")
    w("  struct Args {")
    w("    l2side_ew::Common _l2_c;")
    for decl, _ in _fields(spec):
        w(f"    {decl}")
    w("  };")
    w("  struct Regs {")
    for n, d in spec.inputs:
        w(f"    l2side_ew::Vec<{spec.ctype(d)}, VEC> {n};")
    for n, d in spec.group_inputs:
        w(f"    {spec.ctype(d)} {n};")
    if not spec.inputs and not spec.group_inputs:
        w("    int _l2_unused;")
    w("  };")
    if g:
        for op in ("max", "min", "sum"):
            w(f"  template <class T> __device__ __forceinline__ static T group_{op}(T v) "
              f"{{ return l2side_ew::group_reduce_{op}<TPG>(v); }}")
    # loads
    w("  template <bool ROWS, bool FAST>")
    w("  __device__ __forceinline__ static void load(const Args& a, u64 e, int count, Regs& r, u64 policy) {")
    w("    (void)policy; (void)a; (void)r;")
    stream = "true" if spec.stream_inputs else "false"
    for n, d in spec.inputs:
        w(f"    r.{n} = l2side_ew::load_vec<{spec.ctype(d)}, VEC, ROWS, FAST, {stream}>(a.{n}, a.{n}_rs, a._l2_c, e, "
          "count, policy);")
    for n, d in spec.group_inputs:
        w(f"    r.{n} = count > 0 ? a.{n}[l2side_ew::group_offset(a._l2_c, e / GROUP, a._l2_groups_per_row, a.{n}_sr, "
          f"a.{n}_sc)] : {spec.ctype(d)}{{}};")
    w("  }")
    # body
    params = ["const Args& args", "const u64 index"]
    if g:
        params += [f"const {spec.value_type(d)} (&{n})[VEC]" for n, d in spec.inputs]
        params += [f"{spec.value_type(d)} (&{n})[VEC]" for n, d in spec.outputs]
        params += [f"const {spec.value_type(d)} {n}" for n, d in spec.group_inputs]
        params += [f"{spec.value_type(d)}& {n}" for n, d in spec.group_outputs]
    else:
        params += [f"const {spec.value_type(d)} {n}" for n, d in spec.inputs]
        params += [f"{spec.value_type(d)}& {n}" for n, d in spec.outputs]
    w(f"  __device__ __forceinline__ static void body({', '.join(params)}) {{")
    w("    const u64 cols = args._l2_c.cols;")
    w("    (void)cols; (void)index;")
    for n, kind in spec.scalars:
        w(f"    const {SCALARS[kind][0]} {n} = args.{n}; (void){n};")
    w(f'#line 1 "{spec.name}:body"')
    w(spec.body.rstrip())
    w("#line LINE_PLACEHOLDER")
    w("  }")
    # compute + store
    w("  template <bool ROWS, bool FAST>")
    w("  __device__ __forceinline__ static void compute_store(const Args& a, u64 e, int count, const Regs& r) {")
    w("    (void)r;")
    for n, d in spec.outputs:
        w(f"    l2side_ew::Vec<{spec.ctype(d)}, VEC> _l2_v_{n};")
    if g:
        for n, d in spec.inputs:
            w(f"    {spec.value_type(d)} _l2_{n}[VEC];")
            w("#pragma unroll")
            w(f"    for (int i = 0; i < VEC; ++i) _l2_{n}[i] = {spec.conv(d)}::load(r.{n}.e[i]);")
        for n, d in spec.outputs:
            w(f"    {spec.value_type(d)} _l2_{n}[VEC] = {{}};")
        for n, d in spec.group_outputs:
            w(f"    {spec.value_type(d)} _l2_{n}{{}};")
        args = ["a", "e"] + [f"_l2_{n}" for n, _ in spec.inputs] + [f"_l2_{n}" for n, _ in spec.outputs]
        args += [f"{spec.conv(d)}::load(r.{n})" for n, d in spec.group_inputs]
        args += [f"_l2_{n}" for n, _ in spec.group_outputs]
        w(f"    body({', '.join(args)});")
        for n, d in spec.outputs:
            w("#pragma unroll")
            w(f"    for (int i = 0; i < VEC; ++i) _l2_v_{n}.e[i] = {spec.conv(d)}::store(_l2_{n}[i]);")
    else:
        w("#pragma unroll")
        w("    for (int i = 0; i < VEC; ++i) {")
        for n, d in spec.outputs:
            w(f"      {spec.value_type(d)} _l2_{n}{{}};")
        args = ["a", "e + i"] + [f"{spec.conv(d)}::load(r.{n}.e[i])" for n, d in spec.inputs]
        args += [f"_l2_{n}" for n, _ in spec.outputs]
        w(f"      body({', '.join(args)});")
        for n, d in spec.outputs:
            w(f"      _l2_v_{n}.e[i] = {spec.conv(d)}::store(_l2_{n});")
        w("    }")
    w("    if (count <= 0) return;")
    for n, d in spec.outputs:
        w(f"    l2side_ew::store_vec<{spec.ctype(d)}, VEC, ROWS, FAST>(a.{n}, a.{n}_rs, a._l2_c, e, count, _l2_v_{n});")
    if spec.group_outputs:
        w("    if ((threadIdx.x & (TPG - 1)) == 0) {")
        w("      const u64 _l2_g = e / GROUP;")
        for n, d in spec.group_outputs:
            w(f"      a.{n}[l2side_ew::group_offset(a._l2_c, _l2_g, a._l2_groups_per_row, a.{n}_sr, a.{n}_sc)] = "
              f"{spec.conv(d)}::store(_l2_{n});")
        w("    }")
    w("  }")
    w("};")
    w("L2SIDE_EW_ENTRY_POINTS(Op)")
    # restore line numbers after user text: '#line N' names the next line's number in this file
    out = []
    for i, line in enumerate(_expand(L)):
        out.append(f'#line {i + 2} "{spec.name}.cu"' if line == "#line LINE_PLACEHOLDER" else line)
    return "\n".join(out) + "\n"


def _expand(lines):
    for line in lines:
        yield from line.split("\n")


ENTRY_POINTS = ("l2ew_side_flat", "l2ew_side_rows", "l2ew_stride_flat", "l2ew_stride_rows", "l2ew_unaligned")


# ---------------------------------------------------------------------------------------------------------
# Launch planning (pure: addresses and sizes in, path + Common fields out)

@dataclasses.dataclass
class TensorInfo:
    """What the planner needs to know about one 1:1 tensor."""
    address: int
    elem_bytes: int
    row_stride: int          # elements between rows (== cols for a contiguous tensor)
    contiguous: bool
    owned: bool              # memory from l2side's allocator
    is_output: bool = False


@dataclasses.dataclass
class Plan:
    entry: str               # one of ENTRY_POINTS
    path: str                # "side" | "stride" | "unaligned"
    grid: int
    common: dict             # the Common fields
    why: str                 # why this path (for messages and tests)


def _ticket_sizes(n_pairs: int, ctas_per_side: int, unroll: int):
    """Big tickets (up to 4 x unroll pairs) for the first ~7/8 of the pairs, then tickets of `unroll` pairs
    (one batch of loads per thread) so the CTAs, and the two sides, finish together."""
    small = unroll
    big = max(small, min(4 * unroll, n_pairs // max(1, ctas_per_side * 6)))
    big_tickets = (n_pairs * 7 // 8) // big if big > small else 0
    rest = n_pairs - big_tickets * big
    n_tickets = big_tickets + -(-rest // small)
    return big_tickets, big, small, n_tickets


def plan(spec: Spec, tensors: Sequence[TensorInfo], n: int, cols: int, *, side_mask: int, num_sms: int,
         sm_side: Sequence[int], mode: str = "near", ctas_per_sm: Optional[int] = None,
         counters: int = 0) -> Plan:
    """Chooses the kernel variant and fills Common. Side path: the GPU has a split whose mask contains bit
    12, every 1:1 tensor is l2side memory, the driving tensor (widest; outputs first) is contiguous and
    8 KiB-aligned, tensors as wide as it start at the same offset modulo 4 MiB, and every access can be a
    full vector. Otherwise the side-agnostic stride path (vectorised when aligned) runs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    vec = spec.vec
    chunk_elems = spec.chunk_elems
    ctas = ctas_per_sm or spec.min_ctas
    rows_form = any(not t.contiguous for t in tensors)
    aligned = all(t.address % (vec * t.elem_bytes) == 0 for t in tensors)
    if rows_form:
        aligned = aligned and cols % vec == 0 and all(t.row_stride % vec == 0 for t in tensors)
    n_chunks = -(-n // chunk_elems)
    n_pairs = -(-n_chunks // 2)
    bits = sm_side_bits(sm_side)
    common = dict(n=n, cols=cols, side_mask=0, drive=0, drive_row_pitch=0, drive_row_shift=0, n_chunks=n_chunks,
                  n_pairs=n_pairs, big_tickets=0, big_pairs=1, small_pairs=1, n_tickets=0, counters=counters,
                  mode=MODES[mode], sm_side_bits=bits)
    max_grid = max(1, ctas * num_sms)
    widest = max(t.elem_bytes for t in tensors)
    candidates = [t for t in tensors if t.elem_bytes == widest and t.contiguous]
    drive = (sorted(candidates, key=lambda t: not t.is_output) or [None])[0]
    # Row-strided inputs that outweigh the outputs drive instead when their rows are a power of two of chunk
    # pairs (silu_and_mul: the two halves of the input are 2/3 of the bytes and on the same side as each
    # other, the output's chunks agree with them only half the time; H100, 1 GiB: -8 to -9% energy vs
    # side-off instead of -2.6%).
    row_inputs = [t for t in tensors if t.elem_bytes == widest and not t.contiguous and not t.is_output]
    n_outputs = sum(t.elem_bytes == widest and t.is_output for t in tensors)
    row_chunks = cols * widest // CHUNK_BYTES
    if (len(row_inputs) > n_outputs and (cols * widest) % (2 * CHUNK_BYTES) == 0 and row_chunks & (row_chunks - 1) == 0
            and (row_inputs[0].row_stride * widest) % (2 * CHUNK_BYTES) == 0):
        drive = row_inputs[0]
    why = None
    if not aligned:
        why = "unaligned pointers or row strides: element-wise accesses"
    elif side_mask == 0:
        why = "this GPU has no L2 split (or side logic not available)"
    elif not side_mask & 0x1000:
        why = f"side mask {side_mask:#x} lacks bit 12: 4 KiB chunk pairs are not on opposite sides"
    elif not all(t.owned for t in tensors):
        why = "a tensor is not l2side memory"
    elif drive is None:
        why = "no contiguous tensor of the widest element size to drive the side choice"
    elif drive.address % (2 * CHUNK_BYTES):
        why = "the driving tensor is not 8 KiB-aligned"
    elif drive.contiguous and any(t.elem_bytes == widest and t.contiguous and (t.address - drive.address) % (4 << 20)
                                  for t in tensors):
        why = "tensors of the driving width do not start at the same offset modulo 4 MiB"
    if why is None:
        grid = max(1, min(max_grid, n_chunks))
        ctas_per_side = max(1, grid // 2)
        bt, bp, sp, nt = _ticket_sizes(n_pairs, ctas_per_side, spec.unroll)
        if not drive.contiguous:
            common.update(drive_row_pitch=drive.row_stride * widest, drive_row_shift=row_chunks.bit_length() - 1)
        common.update(side_mask=side_mask, drive=drive.address, big_tickets=bt, big_pairs=bp, small_pairs=sp,
                      n_tickets=nt)
        entry = "l2ew_side_rows" if rows_form else "l2ew_side_flat"
        return Plan(entry, "side", grid, common, f"side-aware ({mode}); drive: "
                    f"{'output' if drive.is_output else 'input'} of {widest}-byte elements"
                    f"{'' if drive.contiguous else ', rows of whole chunk pairs'}")
    grid = max(1, min(max_grid, n_chunks))
    if not aligned:
        return Plan("l2ew_unaligned", "unaligned", grid, common, why)
    return Plan("l2ew_stride_rows" if rows_form else "l2ew_stride_flat", "stride", grid, common, why)


def pack_common(common: dict) -> bytes:
    c = common
    return struct.pack(COMMON_FORMAT, c["n"], c["cols"], c["side_mask"], c["drive"], c["drive_row_pitch"],
                       c["drive_row_shift"], c["n_chunks"], c["n_pairs"],
                       c["big_tickets"], c["big_pairs"], c["small_pairs"], c["n_tickets"], c["counters"], c["mode"],
                       *c["sm_side_bits"])


# ---------------------------------------------------------------------------------------------------------
# A pure-Python mirror of side_walk's chunk selection (for tests and docs)

def side_of_address(address: int, side_mask: int) -> int:
    return bin(address & side_mask).count("1") & 1


def drive_chunk_address(common: dict, chunk: int) -> int:
    if common["drive_row_pitch"] == 0:
        return common["drive"] + chunk * CHUNK_BYTES
    per_row = 1 << common["drive_row_shift"]
    return common["drive"] + chunk // per_row * common["drive_row_pitch"] + chunk % per_row * CHUNK_BYTES


def chunk_of_pair(common: dict, pair: int, ctr: int) -> int:
    even = 2 * pair
    if common["mode"] == MODES["off"]:
        return even + ctr
    return even + (side_of_address(drive_chunk_address(common, even), common["side_mask"]) ^ ctr)


def ticket_range(common: dict, t: int):
    bt, bp, sp = common["big_tickets"], common["big_pairs"], common["small_pairs"]
    if t < bt:
        p0, p1 = t * bp, t * bp + bp
    else:
        p0 = bt * bp + (t - bt) * sp
        p1 = p0 + sp
    return p0, min(p1, common["n_pairs"])


def counter_chunks(common: dict, ctr: int) -> list:
    """Every chunk that counter `ctr`'s tickets hand out, in ticket order."""
    chunks = []
    for t in range(common["n_tickets"]):
        p0, p1 = ticket_range(common, t)
        for p in range(p0, p1):
            ch = chunk_of_pair(common, p, ctr)
            if ch < common["n_chunks"]:
                chunks.append(ch)
    return chunks
