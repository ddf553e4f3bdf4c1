"""Unroll x CTAs-per-SM variants of the silu_and_mul and fp8-quantisation built-ins at 1 GiB (side-aware l2side
memory, CUDA events, median of 20), next to a side-aware copy of the same bytes: how the defaults in
elementwise/builtins.py were chosen (docs/perf-notes.md, elementwise session 4).

    python scripts/elementwise_variants.py [--variants 2x4,1x8,1x6] [--modes near,off]
"""
from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="2x4,1x8,1x6,2x6", help="UNROLLxCTAS,...")
    p.add_argument("--modes", default="near,off")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("elementwise_variants: no CUDA GPU; nothing to measure")
        return 0
    import l2side
    from l2side import elementwise as ew
    from l2side._timing import median_event_ms
    from l2side.elementwise.builtins import fp8_quant_kernel, silu_and_mul_kernel
    variants = [tuple(int(v) for v in item.split("x")) for item in args.variants.split(",")]
    modes = args.modes.split(",")
    h = 8192
    rows = (1 << 30) // (2 * 2 * h)
    x = l2side.empty((rows, 2 * h), dtype=torch.bfloat16, device="cuda").normal_()
    out = l2side.empty((rows, h), dtype=torch.bfloat16, device="cuda")
    k7 = 7168
    r7 = (1 << 30) // (2 * k7)
    xq = l2side.empty((r7, k7), dtype=torch.bfloat16, device="cuda").normal_()
    q = l2side.empty((r7, k7), dtype=torch.float8_e4m3fn, device="cuda")
    s = l2side.empty((r7, k7 // 128), dtype=torch.float32, device="cuda")
    src = l2side.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = l2side.empty(src.shape, dtype=src.dtype, device="cuda")
    first = None
    for _ in range(args.rounds):
        ms = median_event_ms(lambda: ew.copy(src, out=dst), 20)
        copy_gbs = 2 * src.numel() * 2 / ms / 1e6
        print(f"copy near          {ms * 1e3:8.1f} us {copy_gbs:7.0f} GB/s", flush=True)
        for unroll, ctas in variants:
            silu = silu_and_mul_kernel("bf16", unroll, ctas)
            quant = fp8_quant_kernel("bf16", 128, unroll, ctas)
            for mode in modes:
                ms = median_event_ms(lambda: silu(x[:, :h], x[:, h:], out=out, mode=mode), 20)
                gbs = rows * h * 2 * 3 / ms / 1e6
                print(f"silu u{unroll}c{ctas} {mode:4s}   {ms * 1e3:8.1f} us {gbs:7.0f} GB/s "
                      f"{100 * gbs / copy_gbs:5.1f}% of copy", flush=True)
                quant(xq, q=q, scale=s, mode=mode)
                torch.cuda.synchronize()
                if first is None:
                    first = (q.view(torch.uint8).clone(), s.clone())
                same = torch.equal(q.view(torch.uint8), first[0]) and torch.equal(s, first[1])
                ms = median_event_ms(lambda: quant(xq, q=q, scale=s, mode=mode), 20)
                gbs = (r7 * k7 * 3 + r7 * (k7 // 128) * 4) / ms / 1e6
                print(f"fp8  u{unroll}c{ctas} {mode:4s}   {ms * 1e3:8.1f} us {gbs:7.0f} GB/s "
                      f"{100 * gbs / copy_gbs:5.1f}% of copy, same bits as the first: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
