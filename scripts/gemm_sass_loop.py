"""Instruction count of the FP8 GEMM's math K loop in SASS, for configs compiled here (nvcc, no GPU): the loop
that holds the first QGMMA, from its back-branch target to the branch. A cheap check before device time —
e.g. the split path compiled in (tail_split / split_k) grew the 128 x 128 loop from 115 to 163 instructions
(ptxas rebuilds the shared-memory base every K block), which measured ~10% slower on whole tiles.

    python scripts/gemm_sass_loop.py [--shape N,K] [--configs "128,128;128,128,ts5;128,128,sk2"]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def cuobjdump() -> str:
    from l2side.sass_yield import SassError, cuobjdump_path
    try:
        return cuobjdump_path()
    except SassError:
        return "cuobjdump"


def k_loop(sass: str) -> list[str]:
    """The math K loop: of the innermost back-branch ranges around a QGMMA (no other such range inside), the one
    with the most QGMMA (the double-accumulator kernel's loop of unrolled K-block pairs, not its one-block tail
    loop), the first in the code (packed B has a second copy of the math loop for claimed ranks, after it).
    Innermost: ptxas also places some blocks of a loop after the function's end, branching back from there."""
    lines = [(int(m.group(1), 16), m.group(2).strip()) for m in
             (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    mmas = [a for a, t in lines if "QGMMA" in t]
    loops = []
    for a, t in lines:
        m = re.search(r"BRA 0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a:
            lo = int(m.group(1), 16)
            count = sum(lo <= q <= a for q in mmas)
            if count:
                loops.append((lo, a, count))
    inner = [x for x in loops if not any(y != x and x[0] <= y[0] and y[1] <= x[1] for y in loops)]
    if not inner:
        raise RuntimeError("no loop around a QGMMA")
    lo, hi, _ = min(inner, key=lambda x: (-x[2], x[0]))
    return [t for b, t in lines if lo <= b <= hi]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="7168,16384", help="N,K")
    p.add_argument("--configs", default="128,128;128,128,ts5",
                   help="BM,BN[,tsS|skS|da|kbG];... (da: double accumulators, pk: packed B, kbG: G K blocks per stage, clC: clusters of C)")
    args = p.parse_args()
    from l2side import fp8_gemm
    n, k = (int(v) for v in args.shape.split(","))
    for item in args.configs.split(";"):
        bm, bn, *rest = item.split(",")
        extra = {}
        for r in rest:
            if r == "da":
                extra["double_acc"] = True
            elif r == "pk":
                extra["packed_b"] = True
            else:
                extra[{"ts": "tail_split", "sk": "split_k", "kb": "kblocks_per_stage", "cl": "cluster_n"}[r[:2]]] = \
                    int(r[2:])
        stages = fp8_gemm.max_stages(int(bm), int(bn), True, extra.get("kblocks_per_stage", 1))
        cfg = fp8_gemm.GemmConfig(int(bm), int(bn), stages, **extra)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(fp8_gemm.build(n, k, cfg))
            sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        loop = k_loop(sass)
        kblocks = max(1, sum('QGMMA' in t for t in loop) // 4)  # four wgmma k32 per 128-deep K block
        print(f"N={n} K={k} {item:18s} K loop: {len(loop):4d} instructions for {kblocks} K blocks "
              f"({len(loop) / kblocks:.0f} per block), {sum('S2UR' in t for t in loop)} S2UR, "
              f"{sum('QGMMA' in t for t in loop)} QGMMA, {sum('FFMA' in t for t in loop)} FFMA, "
              f"{sum('FSEL' in t for t in loop)} FSEL, {sum('R2UR' in t for t in loop)} R2UR, "
              f"{sum('DEPBAR.LE gsb0' in t for t in loop)} wgmma waits; whole kernel: {sass.count('R2UR')} R2UR, "
              f"{sass.count('BRA.U.ANY')} BRA.U.ANY")
    return 0


if __name__ == "__main__":
    sys.exit(main())
