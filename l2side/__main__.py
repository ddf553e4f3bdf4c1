"""python -m l2side info   -- the GPU's L2 topology, the allocator's state and a side-aware read benchmark
python -m l2side bench  -- the repository's benchmarks (benchmarks/bench_*.py), when run from a checkout;
                           bench gemm -- --shapes small: only bench_gemm.py, with those arguments"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ._timing import median_event_ms


def _no_gpu_reason() -> str | None:
    import torch
    from . import _native
    ok, why = _native.driver_status()
    if not ok:
        return why
    if not torch.cuda.is_available():
        return "torch sees no CUDA device" + ("" if torch.version.cuda else " (this torch is a CPU-only build)")
    return None


def _read_benchmark(device: int, nbytes: int, repeats: int = 20) -> dict:
    import torch
    from . import jit
    from .memory import empty
    from .topology import topology
    topo = topology(device)
    kernel = jit.load_kernel((jit.KERNELS_DIR / "side_read.cu").read_text(), "l2side_side_read",
                             name="side_read", device=device)
    data = empty(nbytes // 4, dtype=torch.int32, device=device)
    data.random_(0, 1 << 30)
    table = torch.tensor([max(s, 0) for s in topo.sm_side], dtype=torch.int8, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    n_pairs = nbytes // 8192
    passes = max(1, (512 << 20) // nbytes)  # an L2-resident buffer is read many times per launch
    grid = torch.cuda.get_device_properties(device).multi_processor_count * 4
    results = {}
    for mode, label in ((0, "naive"), (1, "near"), (2, "far")):
        if mode and not topo.split:
            continue
        params = (jit.Params().ptr(data).u64(n_pairs).u64(passes).u64(topo.side_mask).ptr(table).i32(mode).ptr(counters)
                  .ptr(sink))
        ms = median_event_ms(lambda: kernel.launch(grid, 256, params), repeats, before=counters.zero_)
        results[label] = n_pairs * 8192 * passes / ms / 1e6  # every mode reads the whole buffer
    return results


def _events_us(fn, reps: int = 20) -> float:
    """Median µs of one call (CUDA events) after warm-up."""
    return median_event_ms(fn, reps) * 1e3


def _kernel_summary(torch, l2side) -> None:
    """One line per kernel family: l2side against torch on device 0 (full tables: python -m l2side bench)."""
    print("\n== kernels on device 0 (median of 20, CUDA events; full tables: python -m l2side bench)")
    try:
        x = torch.randn(1 << 28, device="cuda")  # 1 GiB
        y = torch.empty_like(x)
        t_l2 = _events_us(lambda: l2side.elementwise.copy(x, out=y))
        t_torch = _events_us(lambda: y.copy_(x))
        print(f"   copy 1 GiB (side-aware): l2side {2 * x.numel() * 4 / t_l2 / 1e3:.0f} GB/s, "
              f"torch copy_ {2 * x.numel() * 4 / t_torch / 1e3:.0f} GB/s")
        del x, y
    except Exception as e:  # noqa: BLE001 - a summary line, not a test
        print(f"   copy: not measured ({type(e).__name__}: {e})")
    if torch.cuda.get_device_capability(0) != (9, 0):
        print("   FP8 GEMM: needs a Hopper GPU (sm_90); skipped")
        return
    try:
        m, n, k = 4096, 7168, 2048
        a, sa = l2side.quantize_activation(torch.randn(m, k, device="cuda"))
        b, sb = l2side.quantize_weight(torch.randn(n, k, device="cuda"))
        out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        t_l2 = _events_us(lambda: l2side.gemm(a, sa, b, sb, out=out))
        line = f"   FP8 GEMM {m}x{n}x{k}: l2side {2 * m * n * k / t_l2 / 1e6:.0f} TFLOPS"
        try:  # cuBLAS blockwise scaling: scale_a outer-dim-major, scale_b [K/128, N/128]
            sa_c, sb_c = sa.t().contiguous().t(), sb.contiguous().t()
            t_cb = _events_us(lambda: torch._scaled_mm(a, b.t(), sa_c, sb_c, out_dtype=torch.bfloat16))
            line += f", cuBLAS blockwise {2 * m * n * k / t_cb / 1e6:.0f} TFLOPS"
        except Exception as e:  # noqa: BLE001
            line += f" (cuBLAS blockwise refused: {type(e).__name__})"
        print(line + " (L2 not flushed)")
    except Exception as e:  # noqa: BLE001
        print(f"   FP8 GEMM: not measured ({type(e).__name__}: {e})")


def info(args) -> int:
    reason = _no_gpu_reason()
    if reason:
        print(f"l2side: no CUDA GPU found ({reason}).")
        print("Nothing to probe or measure here; the tests still run on the CPU: pytest tests")
        return 0
    import l2side
    l2side.enable()  # before torch touches CUDA: this whole run uses the side-aware allocator
    import torch
    print(f"l2side {l2side.__version__}, torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s)")
    devices = range(torch.cuda.device_count()) if args.all_devices else [0]
    for d in devices:
        topo = l2side.topology(d)
        print(f"\n== device {d}: {topo}")
        if topo.split:
            print(f"   side mask {topo.side_mask:#x}; offsets predicted by the mask: {topo.linearity:.1%}")
    print("\n== read bandwidth of a side-aware buffer on device 0 (GB/s, median of 20): which L2 side each SM"
          " reads from")
    print("| buffer | naive (every SM reads both sides) | each SM reads its near side | each SM reads the far side |")
    print("|---|---:|---:|---:|")
    for nbytes in (32 << 20, 1 << 30):
        r = _read_benchmark(0, nbytes)
        cell = lambda k: f"{r[k]:.0f}" if k in r else "n/a"
        print(f"| {nbytes >> 20} MiB | {cell('naive')} | {cell('near')} | {cell('far')} |")
    _kernel_summary(torch, l2side)
    torch.cuda.synchronize()
    stats = l2side.memory_stats(0)
    print("\n== allocator state on device 0")
    for key in ("allocated_bytes.all.current", "reserved_bytes.all.current", "reserved_bytes.all.peak",
                "l2side.cached_bytes", "l2side.pages.side0.total", "l2side.pages.side1.total",
                "num_device_alloc", "allocation.all.allocated"):
        print(f"   {key:32s} {stats[key]}")
    return 0


def bench(args, extra=()) -> int:
    root = Path(args.root or os.getcwd())
    scripts = sorted((root / "benchmarks").glob("bench_*.py"))
    if args.names:   # e.g. "gemm" -> benchmarks/bench_gemm.py
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.names}
        scripts = [s for s in scripts if s.stem in wanted]
    if not scripts:
        which = ", ".join(f"bench_{n.removeprefix('bench_')}.py" for n in args.names) or "bench_*.py"
        print(f"l2side bench: no benchmarks/{which} under {root} (run it from a checkout of the repository)")
        return 2
    reason = _no_gpu_reason()
    if reason:
        print(f"l2side bench: no CUDA GPU found ({reason}); nothing to measure.")
        return 0
    status = 0
    for script in scripts:
        print(f"\n== {script.name}", flush=True)
        status |= subprocess.call([sys.executable, str(script), *extra], cwd=root)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2side", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="topology, allocator state, side-aware read benchmark")
    p_info.add_argument("--all-devices", action="store_true", help="probe every visible GPU")
    p_bench = sub.add_parser("bench", help="run benchmarks/bench_*.py")
    p_bench.add_argument("--root", help="repository root (default: the current folder)")
    p_bench.add_argument("names", nargs="*", help="only these benchmarks (gemm = benchmarks/bench_gemm.py); "
                         "arguments after -- go to each script, e.g. bench gemm -- --shapes small --quick")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "bench":
        return bench(args, extra)
    return info(args) if args.command == "info" else (parser.print_help() or 0)


if __name__ == "__main__":
    sys.exit(main())
