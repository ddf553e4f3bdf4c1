"""Developer check of l2side.gemm on a GPU: correctness on a few shapes, then a quick timing against
cuBLAS's blockwise torch._scaled_mm (CUDA events, L2 flushed). The full benchmark is
benchmarks/bench_gemm.py; this one is for kernel work.

    python scripts/gemm_dev.py [--shapes M,N,K;M,N,K...] [--no-time] [--config BM,BN,STAGES]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch

DEEPSEEK = [(m, n, k) for m in (64, 128, 4096)
            for (n, k) in ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]
EDGE = [(1, 16, 16), (7, 2112, 7168), (129, 200, 272), (300, 1000, 4112), (65, 129, 144), (257, 2111, 1040)]


def reference(a, sa, b, sb):
    from l2side import gemm_reference
    return gemm_reference(a, sa, b, sb)


def diff(x, y):
    from l2side.quantize import gemm_diff
    return gemm_diff(x, y)


def make(m, n, k):
    """Random inputs quantised as l2side.gemm takes them (A's scales MN-major)."""
    from l2side import quantize_activation, quantize_weight
    a, sa = quantize_activation(torch.randn(m, k, device="cuda"))
    b, sb = quantize_weight(torch.randn(n, k, device="cuda"))
    return a, sa, b, sb


@functools.lru_cache(maxsize=1)
def _bench_gemm():
    """benchmarks/bench_gemm.py as a module (its cuBLAS call and checks)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cublas_fn(a, sa, b, sb):
    """cuBLAS's blockwise (1x128 A, 128x128 B) torch._scaled_mm, as benchmarks/bench_gemm.py picks and checks
    it, or None when refused."""
    try:
        return _bench_gemm().pick_cublas(torch, [(a, sa, b, sb)], reference(a, sa, b, sb))[1][0]
    except Exception as e:  # noqa: BLE001
        print(f"   cuBLAS blockwise refused: {str(e).splitlines()[0][:150]}", flush=True)
        return None


def time_fn(fn, flush, reps=30):
    """Median µs of one call, L2 flushed (`flush` zeroed) before each."""
    from l2side._timing import median_event_ms
    return median_event_ms(fn, reps, before=flush.zero_) * 1e3


def full_config(bm, bn, cluster=1, double_acc=0, group_m=8, stages=0, split_k=1, tail_split=1):
    from l2side import fp8_gemm
    return fp8_gemm.GemmConfig(bm, bn, stages or fp8_gemm.max_stages(bm, bn, True), cluster_n=cluster,
                               double_acc=bool(double_acc), group_m=group_m, split_k=split_k, tail_split=tail_split)


def fresh_inputs_us(m, n, k, config):
    """Kernel-only µs the way the DeepGEMM anchors were timed (new inputs before every call, no flush: B partly
    in L2), with benchmarks/bench_gemm.py's call and timer."""
    import l2side
    from l2side import fp8_gemm
    return _kernel_timer().kernel_us_fresh_inputs(
        lambda: _bench_gemm().fresh_inputs_call(torch, l2side, m, n, k, config), fp8_gemm.KERNEL_NAME)


@functools.lru_cache(maxsize=1)
def _kernel_timer():
    """One bench_gemm.Bench (20 calls, 3 warm-up) for every kernel-only timing here: it holds a 512 MiB flush buffer
    and probes the profiler when made."""
    return _bench_gemm().Bench(torch, 20, 3)


def changed_config(base, text):
    """base with the fields of 'field=value,field*=factor,...' replaced or multiplied; (config, changed fields)."""
    changes = {}
    for kv in filter(None, text.split(",")):
        f, v = kv.split("=")
        changes[f.rstrip("*")] = getattr(base, f[:-1]) * int(v) if f.endswith("*") else int(v)
    return dataclasses.replace(base, **changes), changes


def changed_blocks(base, text):
    """changed_config, with as many stages as fit the changed blocks unless the text sets them."""
    from l2side import fp8_gemm
    c, changes = changed_config(base, text)
    if "stages" not in changes:
        c = dataclasses.replace(c, stages=fp8_gemm.max_stages(c.block_m, c.block_n, c.tma_store, c.kblocks_per_stage))
    return c


def configs_for(m, n, k, spec):
    """The configs of a --sweep spec valid for the shape ('auto' is gemm_config's choice)."""
    from l2side import fp8_gemm
    out = []
    for item in spec.split(";"):
        if item.startswith("auto"):  # 'auto' or 'auto:field=value,field*=factor,...' (gemm_config's choice,
            # fields replaced or multiplied)
            c = changed_blocks(fp8_gemm.gemm_config(m, n, k), item[5:])
        else:
            c = full_config(*(int(v) for v in item.split(",")))
        try:
            fp8_gemm.gemm_source(n, k, c)
        except ValueError:
            continue
        if c not in out:
            out.append(c)
    return out


def _yield_note(n, k, c) -> str:
    """' fy=P (E FFMA edited)' for a config with ffma_yield (its kernel is loaded by then), else ''."""
    if not c.ffma_yield:
        return ""
    from l2side import fp8_gemm
    kernel = fp8_gemm._kernel(fp8_gemm._device(torch.cuda.current_device()), n, k, c)
    return f" fy={c.ffma_yield} ({getattr(kernel, 'ffma_yield_edits', '?')} FFMA edited)"


def clean_l2_us(fn):
    """Kernel-only µs with L2 flushed by a read before each call (clean L2: the call's own DRAM traffic), with
    benchmarks/bench_gemm.py's profiler timer."""
    return _kernel_timer().kernel_us(fn, clean=True)[0]


def sweep(shapes, spec, fresh=False, clean=False):
    import l2side
    from l2side import fp8_gemm
    from concurrent.futures import ThreadPoolExecutor

    per_shape = {s: configs_for(*s, spec) for s in shapes}
    jobs = {(n, k, c) for (m, n, k), cs in per_shape.items() for c in cs}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda j: fp8_gemm.build(*j), jobs))
    flush = torch.empty(256 << 20, dtype=torch.int32, device="cuda")
    auto = {s: fp8_gemm.gemm_config(*s) for s in shapes}
    for (m, n, k), configs in per_shape.items():
        a, sa, b, sb = make(m, n, k)
        ref = reference(a, sa, b, sb)
        out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        for c in configs:
            out.fill_(float("nan"))
            l2side.gemm(a, sa, b, sb, out=out, config=c)
            if c.cluster_n > 1:
                dev = fp8_gemm._device(0)
                kern = fp8_gemm._kernel(dev, n, k, c)
                print("   resident clusters:", fp8_gemm._native.max_active_clusters(0, kern.function, c.threads,
                                                                               c.smem_bytes, c.cluster_n))
            d = diff(out, ref)
            t = time_fn(lambda: l2side.gemm(a, sa, b, sb, out=out, config=c), flush)
            extra = ""
            if clean:
                tc = clean_l2_us(lambda: l2side.gemm(a, sa, b, sb, out=out, config=c))
                extra += f" clean {tc:7.1f} us {(m * k + n * k + 2 * m * n) / tc / 1e3:5.0f} GB/s"
            if fresh:
                tf = fresh_inputs_us(m, n, k, c)
                extra += f" fresh {tf:7.1f} us {2 * m * n * k / tf / 1e6:6.1f} TF"
            mark = "*" if c == auto[(m, n, k)] else " "
            print(f"{m:5d} {n:6d} {k:6d} {mark} bm={c.block_m} bn={c.block_n} st={c.stages} cl={c.cluster_n} "
                  f"dacc={int(c.double_acc)} kb={c.kblocks_per_stage} gm={c.group_m} sk={c.split_k} "
                  f"ts={c.tail_split}{_yield_note(n, k, c)} diff={d:.1e} ev {t:7.1f} us {2 * m * n * k / t / 1e6:6.1f} TF"
                  f"{extra}", flush=True)
    return 0


def timeline(shapes, spec="auto", runs=5):
    """Where a launch's time goes, per CTA: the kernel built with -DL2SIDE_TIMELINE records %globaltimer / clock64
    at CTA entry, at the producer's first load, as math thread 0 sees each stage arrive, and when math warpgroup 0
    is done (fp8_gemm.cuh). L2 flushed by a read before each launch (clean L2). Prints medians over `runs` of:
    span (first CTA entry -> last CTA done), how late CTAs enter, entry -> first load -> first stage, the time per
    stage in the steady part, last stage -> done, how early CTAs finish, and the share of the span SMs hold a CTA."""
    from l2side import fp8_gemm
    fp8_gemm.EXTRA_OPTIONS = tuple(fp8_gemm.EXTRA_OPTIONS) + ("-DL2SIDE_TIMELINE",)
    flush = torch.empty(256 << 20, dtype=torch.int32, device="cuda")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    real_split_args = fp8_gemm._split_k_args
    try:
        for (m, n, k), cfg in ((s, c) for s in shapes for c in configs_for(*s, spec)):
            _timeline_one(m, n, k, cfg, flush, num_sms, runs)
    finally:
        fp8_gemm._split_k_args = real_split_args
        fp8_gemm._launch_cache.clear()
    return 0


def _timeline_one(m, n, k, cfg, flush, num_sms, runs):
    """timeline() for one shape and config (fp8_gemm._split_k_args is replaced here, restored by the caller)."""
    import statistics
    import l2side
    from l2side import fp8_gemm
    med = statistics.median
    grid = fp8_gemm.grid_size(m, n, cfg, num_sms)
    buf = torch.zeros(grid * 64, dtype=torch.int64, device="cuda")
    fp8_gemm._split_k_args = lambda *args, **kw: fp8_gemm._SPLIT_K_ARGS.pack(buf.data_ptr(), 0, 0, 1)
    fp8_gemm._launch_cache.clear()
    a, sa, b, sb = make(m, n, k)
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    if cfg.cluster_n > 1:  # (the launch keeps only the clusters that fit at once: the buffer has room for all)
        grid = fp8_gemm._prepare(a, sa, b, sb, out, m, n, k, cfg, 0, fp8_gemm._raw_stream(0))[0][2]
        fp8_gemm._launch_cache.clear()
    stats = []
    for _ in range(runs + 1):
        flush.sum(dtype=torch.int64)
        buf.zero_()
        l2side.gemm(a, sa, b, sb, out=out, config=cfg)
        torch.cuda.synchronize()
        t = buf.view(-1, 64)[:grid].cpu().tolist()
        t0 = min(r[0] for r in t)
        span = max(r[5] for r in t) - t0
        ghz = med([(r[4] - r[1]) / max(1, r[5] - r[0]) for r in t])  # clock64 cycles per ns
        per_stage = med([med([r[8 + i + 1] - r[8 + i] for i in range(int(r[6]) - 1)]) for r in t if r[6] > 2])
        stats.append({
            "span": span, "enter_p50": med([r[0] - t0 for r in t]), "enter_max": max(r[0] - t0 for r in t),
            "first_load": med([(r[3] - r[1]) / ghz for r in t]), "first_stage": med([(r[8] - r[1]) / ghz for r in t]),
            "stage": per_stage / ghz, "stages": med([r[6] for r in t]),
            "tail": med([(r[4] - r[8 + int(r[6]) - 1]) / ghz for r in t]),
            "done_min": min(r[5] - t0 for r in t), "done_p50": med([r[5] - t0 for r in t]),
            "busy": sum(r[5] - r[0] for r in t) / (num_sms * span), "ghz": ghz})
    s = {key: med([x[key] for x in stats[1:]]) for key in stats[0]}
    print(f"{m:5d} {n:6d} {k:6d} bm={cfg.block_m} bn={cfg.block_n} cl={cfg.cluster_n} grid={grid} | "
          f"span {s['span'] / 1e3:.2f} us | CTAs enter +{s['enter_p50'] / 1e3:.2f} (last +{s['enter_max'] / 1e3:.2f}) us | entry -> first load "
          f"{s['first_load'] / 1e3:.2f} us -> first stage {s['first_stage'] / 1e3:.2f} us | "
          f"{s['stages']:.0f} stages at {s['stage']:.0f} ns | last stage -> done {s['tail'] / 1e3:.2f} us | "
          f"done from {s['done_min'] / 1e3:.2f} (median {s['done_p50'] / 1e3:.2f}) us | SMs hold a CTA "
          f"{100 * s['busy']:.0f}% of the span | {s['ghz']:.2f} GHz", flush=True)


def packed_block_n(m: int) -> int:
    """The packed tile width for `--packed auto`: 64 at small M (memory-bound: near beat ignore by 3-7% there),
    128 when compute-bound (docs/perf-notes.md, packed B session 3)."""
    from l2side import fp8_gemm
    return 64 if m < fp8_gemm.COMPUTE_BOUND_M else 128


def packed_ablation(shapes, block_n, timed=True, energy_seconds=0.0, overrides="", extra=""):
    """Per shape (block_n 0: packed_block_n(M)): the unpacked kernel with the packed kernel's blocks (and split-K),
    the unpacked kernel with its own (gemm_config: 'auto'), then the packed one in each side mode, then the same
    tiles packed contiguously ('plain': no side purity) (outputs compared bitwise with the first one's), then
    cuBLAS; times with CUDA events, L2 flushed.
    energy_seconds > 0: also mJ per GEMM from NVML (steady power over back-to-back calls, without flushes,
    x time per back-to-back call), variants alternating over two rounds.
    overrides ('field=value,field*=factor,...', e.g. 'double_acc=1,group_m=16'; changed_config): changes to the
    blocks of both the packed calls (packed_config's choice) and the unpacked one.
    extra ('name:field=value,...;name2:...'): more near columns, each the packed call's config with those fields
    changed (e.g. 'cl2da:cluster_n=2,double_acc=1'): variants A/B'd on the same inputs in one process; their bits
    are compared with the first column's (a '!=' mark where they differ, not counted as a mismatch)."""
    import l2side
    from l2side import fp8_gemm
    flush = torch.empty(256 << 20 if timed else 1, dtype=torch.int32, device="cuda")
    print(l2side.topology())
    clock = time_fn if timed else (lambda fn, flush: (fn(), float("nan"))[1])
    energy = None
    if timed and energy_seconds > 0:
        from l2side._energy import NvmlEnergy
        energy = NvmlEnergy(torch.cuda.current_device())
        energy = energy if energy.handle is not None else None
    bad = 0
    for (m, n, k) in shapes:
        bn = block_n or packed_block_n(m)
        a, sa, b, sb = make(m, n, k)
        packed = l2side.pack_b(b, sb, block_n=bn)
        base = fp8_gemm.gemm_config(m, n, k)
        packed_call = fp8_gemm.packed_call_config(m, packed)
        # (the packed call's split-K too: the unpacked kernel gives its bits only with the same K ranges)
        cfg = fp8_gemm.GemmConfig(base.block_m, bn, fp8_gemm.max_stages(base.block_m, bn, n % 8 == 0),
                                  tma_store=n % 8 == 0, split_k=packed_call.split_k)
        packed_cfg = None
        if overrides:
            cfg = changed_blocks(cfg, overrides)  # (stages refitted, e.g. to more K blocks per stage)
            cfg = dataclasses.replace(cfg, packed_tickets=False)  # (a packed-only field)
            packed_cfg = changed_config(fp8_gemm.packed_config(m, n, k, bn), overrides)[0]  # (its block_n stays bn)
            # (an explicit config has no automatic split: the same K ranges on both sides)
            packed_cfg = dataclasses.replace(packed_cfg, split_k=cfg.split_k)
        ref_out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        l2side.gemm(a, sa, b, sb, out=ref_out, config=cfg)
        d = diff(ref_out, reference(a, sa, b, sb))
        calls = {"unpacked": lambda: l2side.gemm(a, sa, b, sb, out=ref_out, config=cfg)}
        t_ref = clock(calls["unpacked"], flush)
        # da: double accumulators of the unpacked call / of the packed calls (packed_config's choice unless changed)
        da = f"{int(cfg.double_acc)}/{int((packed_cfg or fp8_gemm.packed_config(m, n, k, bn)).double_acc)}"
        line = (f"{m:5d} {n:6d} {k:6d} bm={cfg.block_m} bn={bn} da={da} sk={cfg.split_k} {packed.kind:5s} diff={d:.1e} "
                f"| unpacked {t_ref:7.1f} us")
        # the unpacked kernel with its own blocks (gemm_config): what a user without pack_b gets
        auto_out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        calls["auto"] = lambda: l2side.gemm(a, sa, b, sb, out=auto_out)
        line += f" | auto {clock(calls['auto'], flush):7.1f} us"
        # "plain": the same tiles packed contiguously (chunk i = i, both sides): the chunk pattern without side purity
        plain = l2side.pack_b(b, sb, block_n=bn, layout="plain")
        # parity: queue and rank by CTA index (blockIdx ranks instead of the SM's rank in its side)
        # (plain: the sides pack's config, whose split-K its own one-queue schedule would choose differently)
        columns = [(name, weight, mode, packed_cfg or (packed_call if weight is plain else None), True)
                   for name, weight, mode in (("near", packed, "near"), ("ignore", packed, "ignore"),
                                              ("far", packed, "far"), ("parity", packed, "parity"),
                                              ("plain", plain, "ignore"))]
        # more near columns: other configs of the packed call (bits that differ marked '!=', not counted)
        columns += [(name, packed, "near", changed_config(packed_cfg or packed_call, fields)[0], False)
                    for name, _, fields in (item.partition(":") for item in filter(None, extra.split(";")))]
        for name, weight, mode, use, counted in columns:
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            l2side.gemm(a, sa, weight, out=out, side_mode=mode, config=use)
            same = torch.equal(out, ref_out)
            bad += counted and not same
            calls[name] = lambda out=out, weight=weight, mode=mode, use=use: l2side.gemm(a, sa, weight, out=out,
                                                                                         side_mode=mode, config=use)
            t = clock(calls[name], flush)
            mark = "" if same else " MISMATCH" if counted else " !="
            line += f" | {name} {t:7.1f} us {2 * m * n * k / t / 1e6:6.0f} TF{mark}"
        f = cublas_fn(a, sa, b, sb) if timed else None
        if f is not None:
            calls["cuBLAS"] = f
            tc = clock(f, flush)
            line += f" | cuBLAS {tc:7.1f} us {2 * m * n * k / tc / 1e6:6.0f} TF"
        print(line, flush=True)
        if energy is not None:
            print("      mJ/GEMM (back-to-back, no flush): " + energy_per_call(calls, energy, energy_seconds),
                  flush=True)
    print(f"{bad} mismatches")
    return 1 if bad else 0


def energy_per_call(calls, energy, seconds, rounds=2):
    """'name mJ (W, MHz, us)' per call in `calls`: steady NVML power over back-to-back calls x events time per
    call, and the median SM clock NVML saw meanwhile (under the power cap, what the watts cost in clock)."""
    import statistics
    from l2side._energy import steady_power
    from l2side._timing import back_to_back_ms

    ms = {name: back_to_back_ms(fn, 20, warmup=1) for name, fn in calls.items()}
    watts = {name: [] for name in calls}
    clocks = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            watts[name].append(steady_power(energy, fn, ms[name], seconds, clocks[name]))
    parts = []
    for name in calls:
        w = statistics.median(watts[name])
        mhz = statistics.median(clocks[name]) if clocks[name] else float("nan")
        parts.append(f"{name} {w * ms[name]:.3f} ({w:.0f} W, {mhz:.0f} MHz, {ms[name] * 1e3:.1f} us)")
    return " | ".join(parts)


def host_parts():
    """µs per call of each part of l2side.gemm's host path at 128^3 (no sync; the GPU queue absorbs it)."""
    import l2side
    from l2side import fp8_gemm
    a, sa, b, sb = make(128, 128, 128)
    out = torch.empty((128, 128), dtype=torch.bfloat16, device="cuda")
    l2side.gemm(a, sa, b, sb, out=out)
    key = next(iter(fp8_gemm._launch_cache))
    hit = fp8_gemm._launch_cache[key]
    device, function, grid, block, smem, params, cluster, offsets = hit
    stream = fp8_gemm._raw_stream(device)
    parts = {
        "l2side.gemm (whole call)": lambda: l2side.gemm(a, sa, b, sb, out=out),
        "check_arguments": lambda: fp8_gemm.check_arguments(a, sa, b, sb, out),
        "torch.compiler.is_compiling": torch.compiler.is_compiling,
        "_launch (key + lookup + launch)": lambda: fp8_gemm._launch(a, sa, b, sb, out, 128, 128, 128, None),
        "raw stream": lambda: fp8_gemm._raw_stream(device),
        "_native.launch": lambda: fp8_gemm._native.launch(device, function, grid, block, smem, stream, params,
                                                          cluster, offsets),
    }
    for name, fn in parts.items():
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(500):
                fn()
            best = min(best, (time.perf_counter() - t0) / 500 * 1e6)
            torch.cuda.synchronize()
        print(f"   {name:45s} {best:6.2f} us", flush=True)
    return 0


def main():
    import l2side
    from l2side import fp8_gemm
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--config", default="")
    p.add_argument("--host", action="store_true", help="break the host overhead of a tiny call into its parts")
    p.add_argument("--packed", default="", metavar="BLOCK_N",
                   help="side-aware packed B (l2side.pack_b) ablation: near / ignore / far vs unpacked and cuBLAS; "
                        "BLOCK_N a multiple of 32, or 'auto' (64 at M < 512, else 128)")
    p.add_argument("--packed-set", default="", metavar="FIELD=V,...",
                   help="with --packed: config fields changed for the packed calls and the unpacked one (e.g. double_acc=1)")
    p.add_argument("--packed-extra", default="", metavar="NAME:FIELD=V,...;...",
                   help="with --packed: more near columns with the packed call's config changed so (same inputs, "
                        "same process), e.g. 'tkda:packed_tickets=1,double_acc=1;cl2da:cluster_n=2,double_acc=1'")
    p.add_argument("--energy", type=float, default=0.0, metavar="SECONDS",
                   help="with --packed: also NVML energy per GEMM, this many seconds of counter window per variant")
    p.add_argument("--sweep", default="", help="BM,BN[,CLUSTER[,DOUBLE_ACC[,GROUP_M[,STAGES[,SPLIT_K[,TAIL_SPLIT]]]]]];... : time each config on each "
                        "shape (STAGES 0: as many as fit; 'auto': gemm_config's choice; 'auto:cluster_n=2,...': that choice "
                        "with those fields replaced; 'auto:block_n*=2': multiplied)")
    p.add_argument("--fresh", action="store_true", help="with --sweep: also kernel-only time with fresh inputs "
                   "before each call and no flush (how the DeepGEMM anchors were timed)")
    p.add_argument("--clean", action="store_true", help="with --sweep: also kernel-only time with L2 flushed by a "
                   "read (clean L2)")
    p.add_argument("--timeline", action="store_true", help="per-CTA timeline of one launch per shape (kernel built "
                   "with -DL2SIDE_TIMELINE; unsplit configs, those of --sweep if given): CTA entry / first load / stage "
                   "arrivals / done")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes else EDGE + DEEPSEEK
    torch.manual_seed(0)
    if args.timeline:
        return timeline(shapes, args.sweep or "auto")
    if args.sweep:
        return sweep(shapes, args.sweep, fresh=args.fresh, clean=args.clean)
    if args.host:
        return host_parts()
    if args.packed:
        return packed_ablation(shapes, 0 if args.packed == "auto" else int(args.packed), timed=not args.no_time,
                               energy_seconds=args.energy, overrides=args.packed_set, extra=args.packed_extra)
    flush = torch.empty(256 << 20, dtype=torch.int32, device="cuda")
    # compile every kernel in parallel first (nvcc takes seconds per kernel)
    from concurrent.futures import ThreadPoolExecutor
    fixed = fp8_gemm.GemmConfig(*(int(v) for v in args.config.split(","))) if args.config else None
    jobs = {(n, k, fixed or fp8_gemm.gemm_config(m, n, k)) for (m, n, k) in shapes}
    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda j: fp8_gemm.build(*j), jobs))
    print(f"built {len(jobs)} kernels in {time.time() - t0:.1f} s", flush=True)
    bad = 0
    for (m, n, k) in shapes:
        a, sa, b, sb = make(m, n, k)
        cfg = None
        if args.config:
            bm, bn, st = (int(v) for v in args.config.split(","))
            cfg = fp8_gemm.GemmConfig(bm, bn, st)
        cfg = cfg or fp8_gemm.gemm_config(m, n, k)
        t0 = time.time()
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        l2side.gemm(a, sa, b, sb, out=out, **({"config": cfg} if args.config else {}))
        torch.cuda.synchronize()
        build_s = time.time() - t0
        ref = reference(a, sa, b, sb)
        d = diff(out, ref)
        nan = torch.isnan(out).any().item()
        ok = d < 1e-3 and not nan
        bad += not ok
        line = f"{m:5d} {n:6d} {k:6d} {str(cfg):60s} diff={d:.2e} nan={nan} {'OK' if ok else 'BAD'} (first call {build_s:.1f}s)"
        if not args.no_time and ok:
            t = time_fn(lambda: l2side.gemm(a, sa, b, sb, out=out), flush)
            tf = 2 * m * n * k / t / 1e6
            gbs = (m * k + n * k + 2 * m * n) / t / 1e3
            line += f" | l2side {t:8.1f} us {tf:7.1f} TFLOPS {gbs:6.0f} GB/s"
            f = cublas_fn(a, sa, b, sb)
            if f is not None:
                tc = time_fn(f, flush)
                line += f" | cuBLAS {tc:8.1f} us {2 * m * n * k / tc / 1e6:7.1f} TFLOPS | x{tc / t:.2f}"
        print(line, flush=True)
    print(f"{bad} bad shapes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
