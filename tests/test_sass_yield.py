"""l2side/sass_yield.py on the CPU: the SASS parse, which FFMA it edits, and the edit of a real cubin (nvcc and
cuobjdump, no GPU): only the reuse flags and the stay bit of promotion FFMA change."""
import dataclasses
import struct

import pytest

from conftest import requires_nvcc
from l2side import fp8_gemm, sass_yield


def _have_cuobjdump():
    try:
        sass_yield.cuobjdump_path()
        return True
    except sass_yield.SassError:
        return False


requires_cuobjdump = pytest.mark.skipif(not _have_cuobjdump(), reason="needs cuobjdump (CUDA toolkit or triton)")

REUSE = 0x080FE200000000A5   # an FFMA control word with a reuse flag (and so the stay bit)
PLAIN = 0x000FC200000000A4   # one without


def _line(address, text, low, high):
    return f"        /*{address:04x}*/   {text} ;   /* {low:#018x} */\n                  /* {high:#018x} */\n"


def _sass(ffma_count, extra_block=True):
    out = "\n\tcode for sm_90a\n\t\tFunction : kern\n"
    address = 0
    out += _line(address, "WARPGROUP.DEPBAR.LE gsb0, 0x1", 0x79C5, 0x000FC60000010100)
    for i in range(ffma_count):
        address += 16
        out += _line(address, f"FFMA R{i}, R1, R2{'.reuse' if i % 2 else ''}, R{i}", 0x7223, REUSE if i % 2 else PLAIN)
        if i == 3:
            address += 16
            out += _line(address, "SHF.L.U32 R88, R201, 0x1f, RZ", 0x7819, 0x000FE200000006FF)
    address += 16
    out += _line(address, "WARPGROUP.ARRIVE", 0x79C5, 0x000FE20000000000)
    if extra_block:   # a short run after a wait: not a promotion
        address += 16
        out += _line(address, "WARPGROUP.DEPBAR.LE gsb0, 0x0", 0x79C5, 0x000FC60000010100)
        for i in range(4):
            address += 16
            out += _line(address, "FFMA R9, R1, R2.reuse, R9", 0x7223, REUSE)
    return out


def test_parse_and_promotion_blocks():
    functions = sass_yield.parse_sass(_sass(32))
    assert list(functions) == ["kern"]
    instructions = functions["kern"]
    assert len(instructions) == 1 + 32 + 1 + 1 + 1 + 4
    assert instructions[1].opcode == "FFMA" and instructions[1].high == PLAIN and instructions[1].address == 16
    blocks = sass_yield.promotion_blocks(instructions)
    assert [len(b) for b in blocks] == [32]   # the 4-FFMA run is too short, the SHF is not an FFMA


def test_yield_edits_take_the_reused_ffma_of_the_first_part():
    instructions = sass_yield.parse_sass(_sass(32))["kern"]
    assert sass_yield.yield_edits(instructions, 0) == {}
    half = sass_yield.yield_edits(instructions, 50)
    ffma = [i for i in instructions if i.opcode == "FFMA"][:32]
    assert set(half) == {i.address for i in ffma[:16] if i.high == REUSE}   # odd ones of the first 16: 8
    assert len(half) == 8 and len(sass_yield.yield_edits(instructions, 100)) == 16
    for high in half.values():
        assert high == REUSE & ~sass_yield.REUSE_BITS & ~sass_yield.STAY_BIT
        assert high & 0xFFFFFFFF == REUSE & 0xFFFFFFFF   # the operands and the other control bits stay
    with pytest.raises(ValueError, match="0..100"):
        sass_yield.yield_edits(instructions, 101)


def test_config_field_keeps_the_source_and_is_validated():
    cfg = fp8_gemm.gemm_config(4096, 7168, 16384)
    edited = dataclasses.replace(cfg, ffma_yield=50)
    assert fp8_gemm.gemm_source(7168, 16384, edited) == fp8_gemm.gemm_source(7168, 16384, cfg)   # same disk cache
    assert edited != cfg and "ffma_yield" not in repr(edited)
    with pytest.raises(ValueError, match="ffma_yield"):
        fp8_gemm.gemm_source(7168, 16384, dataclasses.replace(cfg, ffma_yield=120))


def test_text_section_rejects_what_is_not_a_cubin():
    with pytest.raises(sass_yield.SassError, match="ELF"):
        sass_yield.text_section(b"not an elf at all" * 8, "k")


@requires_nvcc
@requires_cuobjdump
@pytest.mark.parametrize("shape", [(4096, 7168, 16384), (128, 7168, 2048)])
def test_edit_of_a_compiled_gemm_changes_only_hints(shape):
    m, n, k = shape
    cubin = fp8_gemm.build(n, k, fp8_gemm.gemm_config(m, n, k))
    name = fp8_gemm.KERNEL_NAME
    same, count = sass_yield.add_yield_points(cubin, name, 0)
    assert same == cubin and count == 0
    edited, count = sass_yield.add_yield_points(cubin, name, 50)
    assert count > 0 and len(edited) == len(cubin)
    before = sass_yield.disassemble(cubin)[name]
    after = sass_yield.disassemble(edited)[name]
    assert [i.low for i in after] == [i.low for i in before]
    changed = [(b, a) for b, a in zip(before, after) if b.high != a.high]
    assert len(changed) == count
    for b, a in changed:
        assert b.opcode == "FFMA" and ".reuse" in b.text and ".reuse" not in a.text
        assert a.high == b.high & ~sass_yield.REUSE_BITS & ~sass_yield.STAY_BIT
    # nothing else in the file moved: the bytes differ exactly at the edited high words
    base = sass_yield.text_section(cubin, name)[0]
    diffs = {i for i in range(len(cubin)) if cubin[i] != edited[i]}
    allowed = {base + b.address + 8 + j for b, _ in changed for j in range(8)}
    assert diffs and diffs <= allowed
    assert struct.unpack_from("<Q", edited, base + changed[0][0].address + 8)[0] == changed[0][1].high


@requires_nvcc
@requires_cuobjdump
def test_thin_tiles_have_no_promotion_run_to_edit():
    """64 x 16 tiles promote 8 accumulators per thread: runs under MIN_FFMA_PER_BLOCK, nothing changes."""
    cubin = fp8_gemm.build(2112, 7168, fp8_gemm.gemm_config(64, 2112, 7168))
    assert sass_yield.add_yield_points(cubin, fp8_gemm.KERNEL_NAME, 100) == (cubin, 0)
