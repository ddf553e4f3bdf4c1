"""Issue 5 benchmark: l2side's side-aware elementwise built-ins against torch, with the side ablation.

    python benchmarks/bench_elementwise.py [--csv FILE] [--ops copy,add,...] [--no-compile] [--quick]

For every built-in, at two sizes:
  1gib    the main input is 1 GiB (data streamed from DRAM)
  32mib   every tensor of the call together is ~32 MiB (L2-resident: the H100's L2 is 50 MB)
variants: l2side near (side-aware, the default), l2side off (the same kernel, side choice ignored), l2side far
(every SM takes the chunk on the other side), torch eager, torch.compile (inductor; --no-compile skips it);
for copy at 1 GiB also torch's copy_ launched eagerly, outside a graph. "% copy roofline" is relative to the
fastest copy measured at that size (torch copy_ with or without a graph, l2side copy in any mode).
All variants use the same tensors, in l2side memory (l2side.enable() runs first, so torch's allocations are
side-aware too, as in ANCHORS.md's copy measurement).

Timing: each variant is captured in a CUDA graph of `reps` back-to-back calls (>= ~2 ms per replay, so launch
overhead is out of the picture), replayed after warm-up; time per call = median over replays of CUDA-event
time / reps. GB/s counts the bytes the op must move (reads + writes). Energy: NVML's total-energy counter
(nvmlDeviceGetTotalEnergyConsumption, mJ) read at two of its own updates inside a stretch of continuous replays
(--energy-seconds apart), giving the steady board power; mJ per GB moved = power / GB/s. Done in --rounds rounds
that alternate the variants (median mJ/GB, mean W; "energy vs off" is the median of the per-round paired
ratios, with their range: use --rounds 6 or more for a figure to hold a target against). torch.compile runs at 1 GiB only unless --compile-32mib
(the 32 MiB part is the side ablation). Prints a markdown table; --csv writes every row.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time

GiB = 1 << 30
MiB = 1 << 20
OPS = ("copy", "add", "mul", "axpby", "cast_f32_bf16", "cast_bf16_f32", "silu_and_mul", "fp8_quant")
VARIANTS = ("l2side near", "l2side off", "l2side far", "l2side near u4c2", "torch eager", "torch eager (no graph)",
            "torch.compile")
# "l2side near u4c2": silu_and_mul and fp8 quantisation built with unroll 4 and 2 CTAs per SM (their first
# version) instead of the default unroll 2 and 4 CTAs (the same loads in flight per SM, twice the warps).


class Loop:
    """Stands in for a CUDA graph: replay() launches `reps` calls eagerly (torch's copy_ of a large buffer is a
    cudaMemcpyAsync; captured in a graph it becomes a memcpy node, which can run differently)."""

    def __init__(self, fn, reps):
        self.fn, self.reps = fn, reps

    def replay(self):
        for _ in range(self.reps):
            self.fn()


def build_op(name, size_kind, torch, ew, l2side):
    """Returns (description, bytes moved per call, {variant: fn}) for one built-in at one size."""
    F = torch.nn.functional
    bf16, f32 = torch.bfloat16, torch.float32

    def rand(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device="cuda")
        t.copy_(torch.randn(shape, device="cuda", dtype=f32).to(dtype))
        return t

    def elems(main_bytes_per_elem, total_bytes_per_elem):
        if size_kind == "1gib":
            return GiB // main_bytes_per_elem
        return (32 * MiB) // total_bytes_per_elem

    fns = {}
    if name in ("copy", "add", "mul", "axpby"):
        n_in = 1 if name == "copy" else 2
        n = elems(2, 2 * (n_in + 1))
        x = rand((n,), bf16)
        y = rand((n,), bf16) if n_in == 2 else None
        out = torch.empty((n,), dtype=bf16, device="cuda")
        moved = 2 * n * (n_in + 1)
        if name == "copy":
            for m in ("near", "off", "far"):
                fns[f"l2side {m}"] = lambda m=m: ew.copy(x, out=out, mode=m)
            fns["torch eager"] = lambda: out.copy_(x)
            if size_kind == "1gib":                          # ~0.7 ms per call: launch gaps do not matter
                fns["torch eager (no graph)"] = ("nograph", lambda: out.copy_(x))
            fns["torch.compile"] = None                      # a copy is a copy: torch's copy_ is the roofline
        elif name in ("add", "mul"):
            f = getattr(ew, name)
            for m in ("near", "off", "far"):
                fns[f"l2side {m}"] = lambda m=m: f(x, y, out=out, mode=m)
            tf = getattr(torch, name)
            fns["torch eager"] = lambda: tf(x, y, out=out)
            fns["torch.compile"] = ("compile", lambda a, b: tf(a, b), (x, y))
        else:
            for m in ("near", "off", "far"):
                fns[f"l2side {m}"] = lambda m=m: ew.axpby(x, y, 0.75, -1.25, out=out, mode=m)
            fns["torch eager"] = lambda: torch.add(x.mul(0.75), y, alpha=-1.25, out=out)
            fns["torch.compile"] = ("compile", lambda a, b: 0.75 * a - 1.25 * b, (x, y))
        desc = f"bf16 [{n}]"
    elif name.startswith("cast"):
        src, dst = (f32, bf16) if name == "cast_f32_bf16" else (bf16, f32)
        sb, db = src.itemsize, dst.itemsize
        n = elems(sb, sb + db)
        x = rand((n,), src)
        out = torch.empty((n,), dtype=dst, device="cuda")
        moved = n * (sb + db)
        for m in ("near", "off", "far"):
            fns[f"l2side {m}"] = lambda m=m: ew.cast(x, dst, out=out, mode=m)
        fns["torch eager"] = lambda: out.copy_(x)
        fns["torch.compile"] = ("compile", lambda a: a.to(dst), (x,))
        desc = f"{src} -> {dst} [{n}]"
    elif name == "silu_and_mul":
        h = 8192
        rows = GiB // (2 * 2 * h) if size_kind == "1gib" else (32 * MiB) // (2 * 3 * h)
        x = rand((rows, 2 * h), bf16)
        out = torch.empty((rows, h), dtype=bf16, device="cuda")
        moved = rows * h * 2 * 3
        for m in ("near", "off", "far"):
            fns[f"l2side {m}"] = lambda m=m: ew.silu_and_mul(x, out=out, mode=m)
        from l2side.elementwise.builtins import silu_and_mul_kernel
        k42 = silu_and_mul_kernel("bf16", 4, 2)
        fns["l2side near u4c2"] = lambda: k42(x[:, :h], x[:, h:], out=out)
        fns["torch eager"] = lambda: torch.mul(F.silu(x[:, :h]), x[:, h:], out=out)
        fns["torch.compile"] = ("compile", lambda a: F.silu(a[:, :h]) * a[:, h:], (x,))
        desc = f"bf16 [{rows}, {2 * h}] -> [{rows}, {h}]"
    elif name == "fp8_quant":
        k = 7168
        rows = GiB // (2 * k) if size_kind == "1gib" else (32 * MiB) // (3 * k + 4 * k // 128)
        x = rand((rows, k), bf16)
        q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty((rows, k // 128), dtype=f32, device="cuda")
        moved = rows * k * 3 + rows * (k // 128) * 4
        for m in ("near", "off", "far"):
            fns[f"l2side {m}"] = lambda m=m: ew.per_token_cast_to_fp8(x, out=q, scales=s, mode=m)
        from l2side.elementwise.builtins import fp8_quant_kernel
        k42 = fp8_quant_kernel("bf16", 128, 4, 2)
        fns["l2side near u4c2"] = lambda: k42(x, q=q, scale=s)

        def ref(a):
            m_, n_ = a.shape
            av = a.view(m_, -1, 128)
            amax = av.abs().float().amax(dim=2).view(m_, -1).clamp(1e-4)
            return (av * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(m_, n_), (amax / 448.0).view(m_, -1)
        fns["torch eager"] = lambda: ref(x)
        fns["torch.compile"] = ("compile", ref, (x,))
        desc = f"bf16 [{rows}, {k}] -> e4m3 + fp32 1x128 scales"
    else:
        raise ValueError(name)
    return desc, moved, fns


def energy_vs(row, ref):
    """(% energy per GB of `row` against `ref`, the per-round range as "lo..hi" or ""). With the same number of
    energy rounds on both (they alternate inside each round, so a round's two windows see the same clocks and
    temperature), the median of the per-round paired ratios; otherwise the ratio of the medians."""
    if not ref or row["mj_per_gb"] == "" or ref["mj_per_gb"] in ("", 0):
        return "", ""
    mine, theirs = row.get("mj_rounds") or [], ref.get("mj_rounds") or []
    if len(mine) == len(theirs) and mine and all(theirs):
        pcts = [100 * (a / b - 1) for a, b in zip(mine, theirs)]
        spread = f"{min(pcts):+.1f}..{max(pcts):+.1f}" if len(pcts) > 1 else ""
        return round(statistics.median(pcts), 1), spread
    return round(100 * (row["mj_per_gb"] / ref["mj_per_gb"] - 1), 1), ""


def capture(torch, fn, reps, stream):
    """A CUDA graph of `reps` calls of fn (warmed up on `stream` first)."""
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    stream.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for _ in range(reps):
            fn()
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", help="write every row to this CSV file")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--sizes", default="1gib,32mib", help="comma-separated subset of 1gib,32mib")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--energy-seconds", type=float, default=0.3, help="energy window per variant and round")
    ap.add_argument("--compile-32mib", action="store_true", help="also torch.compile at 32 MiB (slower start)")
    ap.add_argument("--rounds", type=int, default=2, help="energy rounds (variants alternate inside a round)")
    ap.add_argument("--replays", type=int, default=15, help="timed graph replays per variant")
    ap.add_argument("--quick", action="store_true", help="fewer replays and shorter energy windows")
    ap.add_argument("--no-enable", action="store_true", help="do not make l2side torch's allocator "
                    "(tensors then come from torch; l2side kernels take their side-agnostic path)")
    args = ap.parse_args(argv)
    if args.quick:
        args.energy_seconds, args.rounds, args.replays = 0.15, 1, 7
    t_start = time.time()

    import torch
    if not torch.cuda.is_available():    # does not start torch's CUDA state: enable() still works after it
        print("bench_elementwise: no CUDA GPU; nothing to measure")
        return 0
    import l2side
    from l2side._energy import NvmlEnergy, steady_power
    from l2side._timing import back_to_back_ms, median_event_ms
    if not args.no_enable:
        l2side.enable()
    from l2side import elementwise as ew
    topo = l2side.topology()
    print(f"# {topo}")
    print(f"# torch {torch.__version__}, allocator: {'l2side' if l2side.is_enabled() else 'torch native'}")
    energy = NvmlEnergy(torch.cuda.current_device())
    stream = torch.cuda.Stream()
    ops = [o for o in args.ops.split(",") if o]
    sizes = [s for s in args.sizes.split(",") if s]
    rows = []

    for size_kind in sizes:
        for op in ops:
            desc, moved, fns = build_op(op, size_kind, torch, ew, l2side)
            graphs, reps_of, paths = {}, {}, {}
            for variant in VARIANTS:
                fn = fns.get(variant)
                if fn is None or (variant == "torch.compile" and (args.no_compile or
                                                                   (size_kind == "32mib" and not args.compile_32mib))):
                    continue
                nograph = isinstance(fn, tuple) and fn[0] == "nograph"
                if nograph:
                    fn = fn[1]
                elif isinstance(fn, tuple):          # torch.compile: compile now, outside the timed part
                    _, f, f_args = fn
                    try:
                        compiled = torch.compile(f, dynamic=False)
                        compiled(*f_args)
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"# {op} {size_kind}: torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    fn = (lambda c=compiled, a=f_args: c(*a))
                try:
                    # one untimed call to estimate the time per call, then reps for >= ~2 ms per replay
                    per = max(back_to_back_ms(fn, 3, warmup=1), 1e-3)
                    reps = max(1, min(200, math.ceil(2.0 / per)))
                    graphs[variant] = Loop(fn, reps) if nograph else capture(torch, fn, reps, stream)
                    reps_of[variant] = reps
                except Exception as e:
                    print(f"# {op} {size_kind} {variant}: skipped ({type(e).__name__}: {str(e)[:200]})")
            for variant in ("l2side near", "l2side off", "l2side far", "l2side near u4c2"):
                if variant in graphs:        # which path the l2side variants took (side / stride / unaligned)
                    fns[variant]()
                    plan = ew.last_plan()
                    paths[variant] = plan.path if plan else ""
            # timing and energy, on the stream the graphs were captured on
            times = {}
            mj_per_gb = {v: [] for v in graphs}
            watts = {v: [] for v in graphs}
            with torch.cuda.stream(stream):
                for variant, g in graphs.items():
                    times[variant] = median_event_ms(g.replay, args.replays, warmup=1) / reps_of[variant]
                # energy: rounds of windows, the variants alternating inside each round
                if energy.handle is not None:
                    for _ in range(args.rounds):
                        for variant, g in graphs.items():
                            w = steady_power(energy, g.replay, times[variant] * reps_of[variant],
                                             args.energy_seconds)
                            gbps = moved / (times[variant] * 1e-3) / 1e9
                            watts[variant].append(w)
                            mj_per_gb[variant].append(w * 1e3 / gbps)
            for variant in graphs:
                ms = times[variant]
                gbps = moved / (ms * 1e-3) / 1e9
                rows.append(dict(size=size_kind, op=op, shape=desc, variant=variant, bytes_moved=moved,
                                 time_us=round(ms * 1e3, 2), gbps=round(gbps, 1),
                                 mj_per_gb=round(statistics.median(mj_per_gb[variant]), 1) if mj_per_gb[variant] else "",
                                 mj_rounds=mj_per_gb[variant],
                                 watts=round(statistics.mean(watts[variant]), 0) if watts[variant] else "",
                                 reps=reps_of[variant], path=paths.get(variant, "")))
                r = rows[-1]       # progress (a run cut short still leaves every finished row in the log)
                print(f"# {size_kind} {op} {variant}: {r['time_us']} us, {r['gbps']} GB/s, {r['mj_per_gb']} mJ/GB, "
                      f"{r['watts']} W, path {r['path'] or '-'}", flush=True)
            del graphs, fns
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # derived columns: vs torch eager, vs the side-off twin, vs the copy roofline (the fastest copy measured at
    # that size: torch copy_ in a graph or not, l2side copy in any mode)
    by = {(r["size"], r["op"], r["variant"]): r for r in rows}
    roofs = {}
    for r in rows:
        if r["op"] == "copy":
            roofs[r["size"]] = max(roofs.get(r["size"], 0.0), r["gbps"])
    for r in rows:
        eager = by.get((r["size"], r["op"], "torch eager"))
        off = by.get((r["size"], r["op"], "l2side off"))
        roof = roofs.get(r["size"])
        r["x_eager"] = round(r["gbps"] / eager["gbps"], 3) if eager else ""
        r["pct_copy_roofline"] = round(100 * r["gbps"] / roof, 1) if roof else ""
        r["energy_vs_off_pct"], r["energy_vs_off_range"] = energy_vs(r, off)
        r["energy_vs_eager_pct"] = energy_vs(r, eager)[0]
    cols = ["size", "op", "variant", "time_us", "gbps", "x_eager", "pct_copy_roofline", "mj_per_gb",
            "energy_vs_off_pct", "energy_vs_off_range", "energy_vs_eager_pct", "watts", "path", "reps",
            "bytes_moved", "shape"]
    print()
    print("| size | op | variant | path | µs/call | GB/s | × eager | % copy roofline | mJ/GB | energy vs off | "
          "energy vs eager | W |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pct = lambda v: f"{v:+.1f}%" if v != "" else ""
        spread = f" ({r['energy_vs_off_range']})" if r["energy_vs_off_range"] else ""
        ev = f"{pct(r['energy_vs_off_pct'])}{spread} | {pct(r['energy_vs_eager_pct'])}"
        print(f"| {r['size']} | {r['op']} | {r['variant']} | {r['path']} | {r['time_us']} | {r['gbps']} | {r['x_eager']} | "
              f"{r['pct_copy_roofline']} | {r['mj_per_gb']} | {ev} | {r['watts']} |")
    print()
    for s in sizes:
        for o in ops:
            r = [x for x in rows if x["size"] == s and x["op"] == o]
            if r:
                print(f"# {s} {o}: {r[0]['shape']}, {r[0]['bytes_moved'] / 1e6:.1f} MB moved per call")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c, "") for c in cols})
        print(f"# wrote {args.csv}")
    print(f"# total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
