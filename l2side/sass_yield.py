"""Yield points in the FP8 GEMM's promotion: a post-pass over the compiled cubin (opt-in, `GemmConfig.ffma_yield`).

After each wgmma wait, a math warp promotes its accumulators with a run of ~64 FFMA per K block. ptxas marks
about half of them with an operand-reuse flag, and an instruction that keeps a register in the reuse cache
must not let the scheduler switch warps, so those FFMA carry the "stay" control bit: through the whole run
the scheduler keeps this warp for pairs of FFMA while the other math warpgroup's warp on the same scheduler
waits to issue its wgmma. DeepGEMM found (README, "FFMA SASS interleaving") that clearing the reuse flags and
the stay bit on part of each run lets the warps interleave, and measured gains on its FP8 GEMM; this module is
our own pass for the A/B (docs/perf-notes.md): it only changes scheduling hints, never what an instruction
computes (a cleared reuse flag makes the next instruction read its operand from the register file).

Volta-and-later SASS is 128 bits per instruction; cuobjdump prints the low and the high 64 bits. In the high
word, bits 58-61 are the operand-reuse flags and bit 45 keeps the warp on the scheduler ("stay"; every FFMA
with a reuse flag has it). Needs cuobjdump (the CUDA toolkit or Triton's copy), not a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

REUSE_BITS = 0xF << 58
STAY_BIT = 1 << 45
MIN_FFMA_PER_BLOCK = 16  # shorter FFMA runs are not a promotion


class SassError(RuntimeError):
    """cuobjdump is missing or the cubin does not look as expected."""


@dataclass(frozen=True)
class Instruction:
    address: int  # byte offset in the function's .text section
    text: str     # the disassembly, without the trailing ';'
    low: int
    high: int

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words and words[0].startswith("@") else (words[0] if words else "")


def cuobjdump_path() -> str:
    """cuobjdump: $CUOBJDUMP, the one on PATH / beside nvcc, or Triton's copy."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if os.path.exists(os.path.join(cuda_home, "bin", "cuobjdump")):
        return os.path.join(cuda_home, "bin", "cuobjdump")
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise SassError("cuobjdump not found: set CUOBJDUMP, or install the CUDA toolkit or triton")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
_HIGH = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")


def disassemble(cubin: bytes) -> dict[str, list[Instruction]]:
    """{function name: its instructions} from `cuobjdump -sass`."""
    with tempfile.TemporaryDirectory(prefix="l2side-sass-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([cuobjdump_path(), "-sass", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SassError(f"cuobjdump -sass failed: {result.stderr.strip()}")
    return parse_sass(result.stdout)


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    current = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FUNCTION.match(lines[i])
        if m:
            if m.group(1) in functions:
                raise SassError(f"function {m.group(1)} appears twice in the disassembly (a multi-arch binary?)")
            current = functions[m.group(1)] = []
        else:
            m = _LINE.search(lines[i])
            high = _HIGH.match(lines[i + 1]) if m and i + 1 < len(lines) else None
            if m and high and current is not None:
                current.append(Instruction(int(m.group(1), 16), m.group(2), int(m.group(3), 16),
                                           int(high.group(1), 16)))
                i += 2
                continue
        i += 1
    return functions


def promotion_blocks(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The FFMA of each promotion: from a wgmma wait (WARPGROUP.DEPBAR) to the next wgmma issue or wait; blocks
    with fewer than MIN_FFMA_PER_BLOCK FFMA are left out."""
    blocks, current, inside = [], [], False
    for ins in instructions:
        op = ins.opcode
        if op.startswith("WARPGROUP.DEPBAR") or op.startswith("WARPGROUP.ARRIVE"):
            if inside and len(current) >= MIN_FFMA_PER_BLOCK:
                blocks.append(current)
            current, inside = [], op.startswith("WARPGROUP.DEPBAR")
        elif inside and (op == "FFMA" or op.startswith("FFMA.")):
            current.append(ins)
    if inside and len(current) >= MIN_FFMA_PER_BLOCK:
        blocks.append(current)
    return blocks


def yield_edits(instructions: list[Instruction], percent: int) -> dict[int, int]:
    """{address: new high word}: in the first `percent` % of each promotion block's FFMA, those that hold the warp
    (a reuse flag set) lose their reuse flags and the stay bit."""
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in 0..100, got {percent}")
    edits = {}
    for block in promotion_blocks(instructions):
        for ins in block[:len(block) * percent // 100]:
            if ins.high & REUSE_BITS:
                edits[ins.address] = ins.high & ~REUSE_BITS & ~STAY_BIT
    return edits


def text_section(cubin: bytes, function: str) -> tuple[int, int]:
    """(file offset, size) of the ELF section `.text.<function>` of a cubin (ELF64, little-endian)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise SassError("not a 64-bit little-endian ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, offset, size

    _, names_at, names_size = section(shstrndx)
    names = cubin[names_at:names_at + names_size]
    wanted = f".text.{function}".encode()
    for i in range(shnum):
        name, offset, size = section(i)
        end = names.index(b"\0", name)
        if names[name:end] == wanted:
            return offset, size
    raise SassError(f"no section .text.{function} in the cubin")


def add_yield_points(cubin: bytes, function: str, percent: int) -> tuple[bytes, int]:
    """(the cubin with the yield edits of `function` applied, how many instructions changed). Checks every
    instruction's bytes against the disassembly before changing it."""
    functions = disassemble(cubin)
    if function not in functions:
        raise SassError(f"function {function} not in the cubin (has: {', '.join(functions)})")
    instructions = {ins.address: ins for ins in functions[function]}
    base, size = text_section(cubin, function)
    if len(instructions) * 16 != size:   # every instruction parsed, or the blocks could be wrong
        raise SassError(f"parsed {len(instructions)} instructions of {function}, its section holds {size // 16}")
    edits = yield_edits(functions[function], percent)
    out = bytearray(cubin)
    for address, high in edits.items():
        ins = instructions[address]
        at = base + address
        if struct.unpack_from("<QQ", out, at) != (ins.low, ins.high):
            raise SassError(f"instruction bytes at {address:#x} differ from the disassembly")
        struct.pack_into("<Q", out, at + 8, high)
    return bytes(out), len(edits)
