#!/usr/bin/env python3
"""How tight is bench_gemm's read floor? Times several read-only readers of each memory-bound row's bytes, all
kernel-only with a clean L2 (benchmarks/bench_gemm.py's timer), next to l2side.gemm and cuBLAS on the same row:

    python3 scripts/floor_check.py [--shapes memory-bound|M,N,K;...] [--csv FILE]

Readers: kernels/read_stream.cu (ld.global.cg, 512 threads; bench_gemm's floor until session 19) with 4 or 8
loads in flight per thread and 2 or 4 CTAs per SM, and kernels/read_bulk.cu (TMA bulk copies into shared memory,
the GEMM's own load path; bench_gemm's floor since: 16 KiB x 8, the fastest on the H100) with 32 KiB x 6 /
16 KiB x 12 / 16 KiB x 8 / 8 KiB x 12 / 4 KiB x 16 in flight per CTA. If no reader beats bench_gemm's by more than
a few %, "1.25x cuBLAS needs more than 100% of the read floor" holds for any reader we know of.
"""
import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, source file, #defines / constants, CTAs per SM, threads, dynamic shared memory bytes)
READERS = [
    ("stream u4 x4", "read_stream.cu", {"kUnroll": 4}, 4, 512, 0),
    ("stream u8 x4", "read_stream.cu", {"kUnroll": 8}, 4, 512, 0),
    ("stream u8 x2", "read_stream.cu", {"kUnroll": 8}, 2, 512, 0),
    ("bulk 32K x6", "read_bulk.cu", {"L2SIDE_READ_BULK_CHUNK": 32768, "L2SIDE_READ_BULK_STAGES": 6}, 1, 32, 196608),
    ("bulk 16K x12", "read_bulk.cu", {"L2SIDE_READ_BULK_CHUNK": 16384, "L2SIDE_READ_BULK_STAGES": 12}, 1, 32, 196608),
    ("bulk 16K x8", "read_bulk.cu", {"L2SIDE_READ_BULK_CHUNK": 16384, "L2SIDE_READ_BULK_STAGES": 8}, 1, 32, 131072),
    ("bulk 8K x12", "read_bulk.cu", {"L2SIDE_READ_BULK_CHUNK": 8192, "L2SIDE_READ_BULK_STAGES": 12}, 2, 32, 98304),
    ("bulk 4K x16", "read_bulk.cu", {"L2SIDE_READ_BULK_CHUNK": 4096, "L2SIDE_READ_BULK_STAGES": 16}, 3, 32, 65536),
]


def reader_source(file: str, constants: dict) -> str:
    """The kernel's source with its constants set: read_stream's `constexpr int kUnroll = 4;` is rewritten,
    read_bulk's macros are defined ahead of its #ifndef defaults."""
    text = (ROOT / "kernels" / file).read_text()
    for name, value in constants.items():
        if name.startswith("L2SIDE_"):
            text = f"#define {name} {value}\n" + text
        else:
            old = f"constexpr int {name} = "
            start = text.index(old)
            end = text.index(";", start)
            text = text[:start] + f"{old}{value}" + text[end:]
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="memory-bound")
    p.add_argument("--csv", default="")
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("floor_check: no CUDA GPU here; run it on the GPU machine")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gemm
    import l2side
    from l2side import jit
    from l2side.quantize import gemm_reference

    shapes = (bench_gemm.SHAPE_SETS[args.shapes] if args.shapes in bench_gemm.SHAPE_SETS
              else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")])
    bench = bench_gemm.Bench(torch, args.calls, 3)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    kernels = []
    for label, file, constants, per_sm, threads, smem in READERS:
        name = "l2side_read_stream" if file == "read_stream.cu" else "l2side_read_bulk"
        kernels.append((label, jit.load_kernel(reader_source(file, constants), name, name=file[:-3]), per_sm * sms,
                        threads, smem, file))
    copy_gbs = bench_gemm.copy_bandwidth_gbs(torch, 20)
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, device copy {copy_gbs:.0f} GB/s (read + write)", flush=True)

    rows = []
    for m, n, k in shapes:
        nbytes = bench_gemm.traffic_bytes(m, n, k)
        words = max(1, nbytes // 16)
        src = torch.empty(words * 4, dtype=torch.int32, device="cuda").random_(0, 1 << 30)
        sink = torch.zeros(1, dtype=torch.int32, device="cuda")
        row = {"m": m, "n": n, "k": k, "mb": nbytes / 1e6}
        for label, kernel, grid, threads, smem, file in kernels:
            params = jit.Params().ptr(src).u64(words).ptr(sink) if file == "read_stream.cu" \
                else jit.Params().ptr(src).u64(16 * words)
            row[label] = bench.kernel_us(lambda: kernel.launch(grid, threads, params, smem=smem), clean=True)[0]
        del src
        a, sa, b, sb = bench_gemm.make_inputs(torch, m, n, k, 0)
        out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        row["l2side"] = bench.kernel_us(lambda: l2side.gemm(a, sa, b, sb, out=out), clean=True)[0]
        try:
            _, fns, _ = bench_gemm.pick_cublas(torch, [(a, sa, b, sb)], gemm_reference(a, sa, b, sb))
            row["cublas"] = bench.kernel_us(fns[0], clean=True)[0]
        except Exception as e:  # noqa: BLE001
            print(f"  cuBLAS unavailable at {m} x {n} x {k}: {e}")
        labels = [r[0] for r in READERS]
        best = min(labels, key=lambda lab: row[lab])
        row["best"], row["best_us"] = best, row[best]
        row["best_vs_stream"] = row[labels[0]] / row[best]
        row["best_pct_copy"] = 100 * nbytes / row[best] / 1e3 / copy_gbs
        if "cublas" in row:
            row["pct_of_best_for_125"] = 100 * bench_gemm.SMALL_M_X_CUBLAS * row[best] / row["cublas"]
        rows.append(row)
        print(f"{m:4d} {n:6d} {k:6d} {nbytes / 1e6:6.1f} MB | "
              + " | ".join(f"{lab} {row[lab]:6.2f}" for lab in labels)
              + f" | l2side {row['l2side']:6.2f} | cuBLAS {row.get('cublas', float('nan')):6.2f}"
              + f" | best {best} {row['best_vs_stream']:.3f}x stream, {row['best_pct_copy']:.0f}% copy"
              + (f", 1.25x cuBLAS = {row['pct_of_best_for_125']:.0f}% of it" if "cublas" in row else ""), flush=True)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            fields = list(dict.fromkeys(key for row in rows for key in row))
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        print("wrote", args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
