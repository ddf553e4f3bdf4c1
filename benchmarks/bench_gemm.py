"""FP8 GEMM benchmark (issue 3): l2side.gemm vs cuBLAS's blockwise torch._scaled_mm on the DeepSeek-V3 shapes.

    python benchmarks/bench_gemm.py [--shapes small|memory-bound|all] [--quick] [--csv FILE] [--allocator torch|l2side]

Per shape, both implementations, the same process and inputs (torch.randn, quantised with l2side.quantize:
A 1x128 scales, B 128x128 scales, bf16 out):
  - correctness first: DeepGEMM's diff = 1 - 2*sum(x*y)/sum(x*x+y*y) against l2side.gemm_reference (fp32)
  - kernel-only time: torch.profiler (CUPTI), sum of the call's kernel durations, median of >= 30 calls, each
    after a 512 MiB write that flushes L2
  - end-to-end time: CUDA events around one call, 512 MiB written before each, median of >= 30 after warm-up
  - TFLOPS = 2MNK / t; GB/s = (M*K + N*K fp8 + 2*M*N bf16 + 4 * #scales) / t; l2side/cuBLAS = speed ratio
    (> 1: l2side faster); for M = 64, l2side's kernel GB/s as % of the device-copy bandwidth measured here
    (1 GiB copy_, read + write), also with L2 flushed by a 512 MiB read instead ("clean L2": the write flush
    leaves ~50 MB of dirty lines that the timed kernel must write back, which a copy running back to back
    does not pay for); "x peer" columns: l2side over the best peer figure of the row (kernel-only:
    DeepGEMM from ../shared/ANCHORS.md (H100) or cuBLAS measured now; events: the same with the anchors' and
    this run's cuBLAS event figures).
  - the floor, for M <= 128 ("read floor" columns): a read-only stream of the row's bytes (kernels/read_bulk.cu:
    TMA bulk copies of 16 KiB, 8 in flight per SM, each byte read once, nothing written; the fastest of the
    readers scripts/floor_check.py compares, 2-11% faster than an ld.global.cg stream on the H100), timed
    kernel-only the same two ways (write flush / clean L2): what a
    memory-bound kernel that must read its operands reaches, its fixed costs (first DRAM latency, drain)
    included. Its % of the 1 GiB copy (clean) says what the "% copy BW" target can reach; "l2side vs read floor"
    = the floor's time / l2side's, clean L2 (1.0: as fast as reading its bytes); cuBLAS is timed with a clean L2
    too, and "1.25x cuBLAS as % of read floor" = the floor's speed that a kernel 1.25x faster than cuBLAS needs
    (over 100: no kernel can, by that method).
  - "fresh inputs": l2side kernel-only time measured the way the DeepGEMM anchors were (DeepGEMM's
    tests/test_core.py: new inputs made before every call, no flush, so the freshly written B is mostly still
    in L2), and its ratio to the DeepGEMM anchor: the like-for-like comparison with that column.
Inputs alternate between two random sets. Then the host overhead per call at M=N=K=128 (CPU time of
back-to-back calls without sync) and the replay of a CUDA graph of one call.
Kernels are JIT-compiled; all of them are pre-built in parallel first (l2side.fp8_gemm.build). One failing
shape or implementation is reported in its row and the run goes on; --deadline bounds the whole run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                     # run from a checkout without installing
    sys.path.insert(0, str(REPO))

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
SHAPE_SETS = {
    "small": [(64, n, k) for n, k in DEEPSEEK_NK],
    "memory-bound": [(m, n, k) for m in (64, 128) for n, k in DEEPSEEK_NK],   # the rows of the 1.25x-cuBLAS target
    "all": [(m, n, k) for m in (64, 128, 4096) for n, k in DEEPSEEK_NK],
}
# ../shared/ANCHORS.md, H100 80GB HBM3, TFLOPS: (DeepGEMM kernel-only, DeepGEMM events, cuBLAS events)
ANCHORS = {
    (64, 2112, 7168): (198, 113, 77), (64, 24576, 1536): (273, 190, 194), (64, 32768, 512): (234, 130, 142),
    (64, 7168, 16384): (315, 254, 248), (64, 4096, 7168): (268, 164, 133), (64, 7168, 2048): (282, 129, 142),
    (128, 2112, 7168): (341, 212, 156), (128, 24576, 1536): (518, 346, 379), (128, 32768, 512): (370, 235, 284),
    (128, 7168, 16384): (604, 498, 496), (128, 4096, 7168): (499, 311, 263), (128, 7168, 2048): (496, 250, 280),
    (4096, 2112, 7168): (1062, 1002, 1076), (4096, 24576, 1536): (990, 967, 1177),
    (4096, 32768, 512): (593, 579, 830), (4096, 7168, 16384): (1339, 1324, 1293),
    (4096, 4096, 7168): (1315, 1094, 1133), (4096, 7168, 2048): (1016, 856, 1103),
}
FLUSH_BYTES = 512 << 20
TINY = (128, 128, 128)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def diff(x, y) -> float:
    from l2side.quantize import gemm_diff   # (l2side is imported lazily: the script runs without a GPU too)
    return gemm_diff(x, y)


def traffic_bytes(m: int, n: int, k: int) -> int:
    kb = ceil_div(k, 128)
    return m * k + n * k + 2 * m * n + 4 * (m * kb + ceil_div(n, 128) * kb)


# -------------------------------------------------------------------------------------------- timing
class Bench:
    def __init__(self, torch, calls: int, warmup: int):
        self.torch = torch
        self.calls, self.warmup = calls, warmup
        self.flush_buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self.flush_names = set()
        self.profiler_error = None
        try:
            self.flush_names = {e["name"] for e in self._kernel_events(self.flush, 3)}
            self.flush_names |= {e["name"] for e in self._kernel_events(self.clean_flush, 3)}
        except Exception as e:  # noqa: BLE001  (no CUPTI: kernel-only columns say why)
            self.profiler_error = short(e)

    def flush(self):
        """The anchors' flush: a 512 MiB write. It leaves L2 full of dirty lines, which the timed call then
        writes back to DRAM as it evicts them."""
        self.flush_buf.fill_(1)

    def clean_flush(self):
        """A 512 MiB read: L2 holds only clean lines of the flush buffer, so the timed call's DRAM traffic is its
        own (what 'HBM bandwidth achieved' means for the M = 64 target)."""
        self.flush_buf.sum(dtype=self.torch.int64)

    def _kernel_events(self, body, repeats):
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                body()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory(prefix="bench_gemm-") as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
        return sorted(kernels, key=lambda e: float(e["ts"]))

    def kernel_us(self, fn, clean: bool = False) -> tuple[float, int]:
        """Median over calls of the summed duration of one call's kernels (L2 flushed before each call: by a
        write, or with `clean` by a read)."""
        if self.profiler_error:
            raise RuntimeError(f"profiler unavailable: {self.profiler_error}")
        for _ in range(self.warmup):
            fn()
        flush = self.clean_flush if clean else self.flush

        def body():
            flush()
            fn()

        events = [e for e in self._kernel_events(lambda: body(), self.calls) if e["name"] not in self.flush_names]
        if not events or len(events) % self.calls:
            raise RuntimeError(f"profiler saw {len(events)} kernels for {self.calls} calls")
        per = len(events) // self.calls
        sums = [sum(float(e["dur"]) for e in events[i * per:(i + 1) * per]) for i in range(self.calls)]
        return median(sums), per

    def kernel_us_fresh_inputs(self, call, kernel_name: str) -> float:
        """DeepGEMM's own method, the one behind ANCHORS.md's "DeepGEMM kernel" column (its tests/test_core.py at
        50cf26c): `call` makes new inputs and then runs the GEMM, with no flush, so the freshly written B mostly
        sits in L2; median duration of the kernels named `kernel_name`."""
        if self.profiler_error:
            raise RuntimeError(f"profiler unavailable: {self.profiler_error}")
        for _ in range(self.warmup):
            call()
        events = [e for e in self._kernel_events(call, self.calls) if kernel_name in e["name"]]
        if len(events) != self.calls:
            raise RuntimeError(f"profiler saw {len(events)} {kernel_name} kernels for {self.calls} calls")
        return median([float(e["dur"]) for e in events])

    def event_us(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.calls)]
        for s, e in zip(starts, ends):
            self.flush()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return median([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])


# kernels/read_bulk.cu's defaults: 8 copies of 16 KiB in flight, one thread issuing them
READ_BULK_THREADS, READ_BULK_SMEM = 32, 8 * 16384


def read_floor(torch, bench, nbytes: int, copy_gbs: float) -> dict:
    """The floor of a memory-bound row: kernel-only µs of a read-only stream of `nbytes` (kernels/read_bulk.cu:
    every byte read once from DRAM by TMA bulk copies, nothing written), with L2 flushed by a write and by a
    read, and the clean one's GB/s as % of the 1 GiB copy's. A GEMM at small M must at least read its operands
    once; its output (2MN bytes, counted in `nbytes` as if read) stays in L2 within the timed call."""
    from l2side import jit
    kernel = jit.load_kernel((jit.KERNELS_DIR / "read_bulk.cu").read_text(), "l2side_read_bulk", name="read_bulk")
    words = max(1, nbytes // 16)
    src = torch.empty(words * 4, dtype=torch.int32, device="cuda").random_(0, 1 << 30)
    grid = torch.cuda.get_device_properties(src.device).multi_processor_count   # one CTA (128 KiB in flight) per SM
    params = jit.Params().ptr(src).u64(16 * words)

    def read():
        kernel.launch(grid, READ_BULK_THREADS, params, smem=READ_BULK_SMEM)

    row = {}
    try:
        row["floor_kernel_us"] = bench.kernel_us(read)[0]
        row["floor_clean_us"] = bench.kernel_us(read, clean=True)[0]
        if copy_gbs:
            for flush, suffix in (("kernel", ""), ("clean", "_clean")):
                row[f"floor_pct_copy{suffix}"] = 100 * 16 * words / row[f"floor_{flush}_us"] / 1e3 / copy_gbs
    except Exception as e:  # noqa: BLE001
        row["floor_error"] = short(e)
    return row


def copy_bandwidth_gbs(torch, reps: int) -> float:
    src = torch.empty(1 << 28, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    from l2side._timing import median_event_ms
    seconds = median_event_ms(lambda: dst.copy_(src), reps) * 1e-3
    del src, dst
    return 2 * (1 << 30) / seconds / 1e9


# -------------------------------------------------------------------------------------- implementations
def make_inputs(torch, m, n, k, seed):
    from l2side.quantize import quantize_activation, quantize_weight
    g = torch.Generator(device="cuda").manual_seed(seed)
    a, sa = quantize_activation(torch.randn(m, k, device="cuda", generator=g), scale_layout="mn")
    b, sb = quantize_weight(torch.randn(n, k, device="cuda", generator=g))
    return a, sa, b, sb


def fresh_inputs_call(torch, l2side, m, n, k, config=None):
    """One call the way DeepGEMM's test_core.py times one (construct() before every call): bf16 randn inputs,
    the bf16 reference matmul, per-token / per-block quantisation, then the GEMM (with `config`, that block
    configuration)."""
    from l2side.quantize import quantize_activation, quantize_weight
    x = torch.randn((m, k), device="cuda", dtype=torch.bfloat16)
    y = torch.randn((n, k), device="cuda", dtype=torch.bfloat16)
    out = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)
    x @ y.t()
    a, sa = quantize_activation(x, scale_layout="mn")
    b, sb = quantize_weight(y)
    l2side.gemm(a, sa, b, sb, out=out, **({"config": config} if config is not None else {}))


def cublas_variants(torch, a, sa, b, sb):
    """The ways to ask torch for cuBLAS's blockwise (1x128 A, 128x128 B) FP8 GEMM, most direct first.

    torch._scaled_mm(a [M,K] row-major, b.t() [K,N] column-major, scale_a, scale_b) picks the scaling from
    the scales' shapes/strides (aten/src/ATen/native/cuda/ScaledBlas.cpp, get_joint_scaling /
    is_blockwise_1x128_scaling / is_blockwise_128x128_scaling; torch >= 2.9 with CUDA >= 12.9, sm_90 only):
      scale_a: [M, ceil(K/128)] float32, "outer-dim-major": strides (1, M)
      scale_b: [ceil(K/128), ceil(N/128)] float32 whose transpose is row-major, i.e. b_scales.contiguous().t()
    The scales multiply (dequantise), as l2side's do. torch.nn.functional.scaled_mm (the v2 API, torch >= 2.10)
    takes the recipe explicitly (ScalingType.BlockWise1x128 / BlockWise128x128) and wants scale_b as
    [L4, ceil(N/128)] with strides (1, L4), L4 = ceil(K/128) rounded up to 4 (test/test_scaled_matmul_cuda.py)."""
    import torch.nn.functional as F
    kb = sa.shape[1]
    sa_outer = sa.t().contiguous().t()
    bt = b.t()
    sb_t = sb.contiguous().t()
    variants = [("torch._scaled_mm", lambda: torch._scaled_mm(a, bt, sa_outer, sb_t, out_dtype=torch.bfloat16))]
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        l4 = ceil_div(kb, 4) * 4
        sb_l4 = torch.nn.functional.pad(sb.contiguous(), (0, l4 - kb)).t() if l4 != kb else sb_t
        variants.append(("F.scaled_mm", lambda: F.scaled_mm(a, bt, sa_outer, F.ScalingType.BlockWise1x128, sb_l4,
                                                            F.ScalingType.BlockWise128x128,
                                                            output_dtype=torch.bfloat16)))
    return variants


def pick_cublas(torch, sets, ref):
    """(label, [one call per input set]) of the first variant that runs and is right, or raises with why."""
    errors = []
    for i, (label, _) in enumerate(cublas_variants(torch, *sets[0])):
        try:
            fns = [cublas_variants(torch, *s)[i][1] for s in sets]
            out = fns[0]()
            torch.cuda.synchronize()
            d = diff(out.float(), ref)
            if not (d < 1e-3) or torch.isnan(out).any().item():
                errors.append(f"{label}: wrong result (diff {d:.2e})")
                continue
            return label, fns, d
        except Exception as e:  # noqa: BLE001
            errors.append(f"{label}: {short(e, 200)}")
    raise RuntimeError(" ; ".join(errors) or "no cuBLAS blockwise API in this torch")


def cycling(fns):
    it = itertools.cycle(fns)
    return lambda: next(it)()


# --------------------------------------------------------------------------------------------------- run
def prebuild(shapes, num_sms, workers):
    """Compile every (N, K, config) in parallel; returns {(n, k, config): error text}."""
    try:
        from l2side import fp8_gemm
    except Exception as e:  # noqa: BLE001
        return {}, f"l2side.fp8_gemm unavailable: {short(e)}"
    if not hasattr(fp8_gemm, "build") or not hasattr(fp8_gemm, "gemm_config"):
        return {}, "l2side.fp8_gemm has no build()/gemm_config(): kernels compile on first use"
    jobs = {}
    for m, n, k in shapes:
        try:
            jobs[(n, k, fp8_gemm.gemm_config(m, n, k, num_sms))] = None
        except Exception as e:  # noqa: BLE001
            jobs[(n, k, ("config", m))] = short(e)
    todo = [j for j, err in jobs.items() if err is None]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as ex:
        futures = {ex.submit(fp8_gemm.build, n, k, c): (n, k, c) for n, k, c in todo}
        for f in concurrent.futures.as_completed(futures):
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                jobs[futures[f]] = short(e, 300)
    return {j: e for j, e in jobs.items() if e}, None


def run_shape(torch, bench, m, n, k, copy_gbs):
    import l2side
    from l2side.quantize import gemm_reference
    row = {"M": m, "N": n, "K": k}
    flops, nbytes = 2 * m * n * k, traffic_bytes(m, n, k)
    sets = [make_inputs(torch, m, n, k, seed=1000 + i) for i in range(2)]
    ref = gemm_reference(*sets[0])
    outs = [torch.empty((m, n), dtype=torch.bfloat16, device="cuda") for _ in sets]

    impls = {}
    # l2side
    try:
        out = outs[0].fill_(float("nan"))
        l2side.gemm(*sets[0], out=out)
        torch.cuda.synchronize()
        row["l2side_diff"] = diff(out.float(), ref)
        row["l2side_nan"] = bool(torch.isnan(out).any().item())
        if row["l2side_nan"] or not row["l2side_diff"] < 1e-3:
            row["l2side_error"] = f"WRONG: diff {row['l2side_diff']:.2e}, NaN {row['l2side_nan']}"
        impls["l2side"] = cycling([lambda s=s, o=o: l2side.gemm(*s, out=o) for s, o in zip(sets, outs)])
    except Exception as e:  # noqa: BLE001
        row["l2side_error"] = short(e)
    # cuBLAS
    try:
        label, fns, d = pick_cublas(torch, sets, ref)
        row["cublas_api"], row["cublas_diff"] = label, d
        impls["cublas"] = cycling(fns)
    except Exception as e:  # noqa: BLE001
        row["cublas_error"] = short(e, 300)
    del ref

    for name, fn in impls.items():
        try:
            t, per = bench.kernel_us(fn)
            row[f"{name}_kernel_us"], row[f"{name}_kernels_per_call"] = t, per
            row[f"{name}_kernel_tflops"] = flops / t / 1e6
            row[f"{name}_kernel_gbs"] = nbytes / t / 1e3
        except Exception as e:  # noqa: BLE001
            row.setdefault(f"{name}_error", f"kernel timing: {short(e)}")
        try:
            t = bench.event_us(fn)
            row[f"{name}_ev_us"], row[f"{name}_ev_tflops"] = t, flops / t / 1e6
            row[f"{name}_ev_gbs"] = nbytes / t / 1e3
        except Exception as e:  # noqa: BLE001
            row.setdefault(f"{name}_error", f"event timing: {short(e)}")
    if "l2side" in impls:   # l2side timed the way the DeepGEMM anchors were (fresh inputs, no flush)
        try:
            from l2side.fp8_gemm import KERNEL_NAME
            t = bench.kernel_us_fresh_inputs(lambda: fresh_inputs_call(torch, l2side, m, n, k), KERNEL_NAME)
            row["l2side_fresh_us"], row["l2side_fresh_tflops"] = t, flops / t / 1e6
        except Exception as e:  # noqa: BLE001
            row.setdefault("l2side_error", f"fresh-input timing: {short(e)}")
    for kind in ("kernel", "ev"):
        if f"l2side_{kind}_us" in row and f"cublas_{kind}_us" in row:
            row[f"speedup_{kind}"] = row[f"cublas_{kind}_us"] / row[f"l2side_{kind}_us"]
    if m == 64 and "l2side_kernel_gbs" in row and copy_gbs:
        row["l2side_pct_copy_bw"] = 100 * row["l2side_kernel_gbs"] / copy_gbs
    if m <= 128 and "l2side" in impls:  # the same with a clean L2 (a read flush): the GEMM's own DRAM traffic only
        try:
            t, _ = bench.kernel_us(impls["l2side"], clean=True)
            row["l2side_clean_us"] = t
            if copy_gbs:
                row["l2side_pct_copy_bw_clean"] = 100 * nbytes / t / 1e3 / copy_gbs
        except Exception as e:  # noqa: BLE001
            row.setdefault("l2side_error", f"clean-L2 timing: {short(e)}")
    if m <= 128 and "cublas" in impls:  # cuBLAS with a clean L2 too: the 1.25x target read without the flush
        try:
            row["cublas_clean_us"] = bench.kernel_us(impls["cublas"], clean=True)[0]
            if row.get("l2side_clean_us"):
                row["speedup_clean"] = row["cublas_clean_us"] / row["l2side_clean_us"]
        except Exception as e:  # noqa: BLE001
            row.setdefault("cublas_error", f"clean-L2 timing: {short(e)}")
    if m <= 128:
        row.update(read_floor(torch, bench, nbytes, copy_gbs))
        if row.get("floor_clean_us") and row.get("l2side_clean_us"):
            row["l2side_vs_floor_clean"] = row["floor_clean_us"] / row["l2side_clean_us"]
        for flush, suffix in (("kernel", ""), ("clean", "_clean")):   # > 100: 1.25x cuBLAS beats the floor
            floor, peer = row.get(f"floor_{flush}_us"), row.get(f"cublas_{flush}_us")
            if floor and peer:
                row[f"floor_pct_for_125{suffix}"] = 100 * SMALL_M_X_CUBLAS * floor / peer
    anchor = ANCHORS.get((m, n, k))
    if anchor:
        peers_k = [anchor[0]] + ([row["cublas_kernel_tflops"]] if "cublas_kernel_tflops" in row else [])
        peers_e = [anchor[1], anchor[2]] + ([row["cublas_ev_tflops"]] if "cublas_ev_tflops" in row else [])
        if "l2side_kernel_tflops" in row:
            row["x_peer_kernel"] = row["l2side_kernel_tflops"] / max(peers_k)
        if "l2side_ev_tflops" in row:
            row["x_peer_ev"] = row["l2side_ev_tflops"] / max(peers_e)
        if "l2side_fresh_tflops" in row:
            row["x_deepgemm_fresh"] = row["l2side_fresh_tflops"] / anchor[0]
    del sets, outs, impls
    return row


def host_overhead(torch, quick: bool):
    """CPU µs per call of back-to-back calls (no sync) at M=N=K=128, and a CUDA graph of one call."""
    import l2side
    from l2side.quantize import gemm_reference
    m, n, k = TINY
    a, sa, b, sb = make_inputs(torch, m, n, k, seed=7)
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    batches, per = (5, 50) if quick else (20, 100)
    results = []

    def cpu_us(fn):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(per):
                fn()
            times.append((time.perf_counter() - t0) / per * 1e6)
            torch.cuda.synchronize()
        return median(times)

    def gpu_us_back_to_back(fn):
        from l2side._timing import back_to_back_ms
        return back_to_back_ms(fn, per) * 1e3

    fns = {"l2side.gemm": lambda: l2side.gemm(a, sa, b, sb, out=out)}
    try:
        label, cfns, _ = pick_cublas(torch, [(a, sa, b, sb)], gemm_reference(a, sa, b, sb))
        fns[f"cuBLAS ({label})"] = cfns[0]
    except Exception as e:  # noqa: BLE001
        results.append({"what": "cuBLAS", "error": short(e)})
    for name, fn in fns.items():
        r = {"what": name}
        try:
            r["cpu_us_per_call"] = cpu_us(fn)
            r["gpu_us_per_call_back_to_back"] = gpu_us_back_to_back(fn)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                fn()
            r["graph_cpu_us_per_replay"] = cpu_us(g.replay)
            r["graph_gpu_us_per_replay"] = gpu_us_back_to_back(g.replay)
            del g
        except Exception as e:  # noqa: BLE001
            r["error"] = short(e)
        results.append(r)
    return results


def fmt(v, spec=".0f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


COLUMNS = [  # (header, key, format)
    ("M", "M", "d"), ("N", "N", "d"), ("K", "K", "d"),
    ("l2side kernel µs", "l2side_kernel_us", ".1f"), ("TFLOPS", "l2side_kernel_tflops", ".0f"),
    ("GB/s", "l2side_kernel_gbs", ".0f"),
    ("cuBLAS kernel µs", "cublas_kernel_us", ".1f"), ("TFLOPS", "cublas_kernel_tflops", ".0f"),
    ("GB/s", "cublas_kernel_gbs", ".0f"), ("l2side/cuBLAS kernel", "speedup_kernel", ".2f"),
    ("l2side ev µs", "l2side_ev_us", ".1f"), ("TFLOPS", "l2side_ev_tflops", ".0f"),
    ("cuBLAS ev µs", "cublas_ev_us", ".1f"), ("TFLOPS", "cublas_ev_tflops", ".0f"),
    ("l2side/cuBLAS ev", "speedup_ev", ".2f"),
    ("% copy BW", "l2side_pct_copy_bw", ".0f"), ("l2side kernel µs, clean L2", "l2side_clean_us", ".1f"),
    ("% copy BW, clean L2", "l2side_pct_copy_bw_clean", ".0f"), ("x peer kernel", "x_peer_kernel", ".2f"),
    ("x peer ev", "x_peer_ev", ".2f"),
    ("l2side kernel µs, fresh inputs", "l2side_fresh_us", ".1f"), ("TFLOPS", "l2side_fresh_tflops", ".0f"),
    ("x DeepGEMM, fresh inputs", "x_deepgemm_fresh", ".2f"),
    ("read floor µs", "floor_kernel_us", ".1f"), ("read floor µs, clean L2", "floor_clean_us", ".1f"),
    ("read floor % of copy, clean L2", "floor_pct_copy_clean", ".0f"),
    ("l2side vs read floor, clean L2", "l2side_vs_floor_clean", ".2f"),
    ("cuBLAS kernel µs, clean L2", "cublas_clean_us", ".1f"), ("l2side/cuBLAS, clean L2", "speedup_clean", ".2f"),
    ("1.25x cuBLAS as % of read floor", "floor_pct_for_125", ".0f"),
    ("the same, clean L2", "floor_pct_for_125_clean", ".0f"),
    ("diff l2side", "l2side_diff", ".1e"), ("diff cuBLAS", "cublas_diff", ".1e"),
]


def markdown(rows):
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    notes = []
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(key), spec) for _, key, spec in COLUMNS) + " |")
        for who in ("l2side", "cublas", "floor"):
            if r.get(f"{who}_error"):
                notes.append(f"- {r['M']}x{r['N']}x{r['K']} {who}: {r[f'{who}_error']}")
    return "\n".join(lines + ([""] + notes if notes else []))


# Issue 3's targets (the table's columns, read per row): what a closing note has to say, row by row
BIG_SHAPE, BIG_SHAPE_TFLOPS = (4096, 7168, 16384), 1400
SMALL_M, SMALL_M_X_CUBLAS = 128, 1.25
BANDWIDTH_M, BANDWIDTH_PCT = 64, 85
HOST_US = 15


def _shape(r) -> str:
    return f"{r['M']}x{r['N']}x{r['K']}"


def _tally(rows, key, ok, why_not=None) -> str:
    """'met on a of b' and the rows that miss, each with `why_not(row)` when given, and those without a figure."""
    have = [r for r in rows if r.get(key) is not None]
    missed = [r for r in have if not ok(r[key])]
    text = f"met on {len(have) - len(missed)} of {len(have)}"
    if missed:
        text += "; not on " + ", ".join(_shape(r) + (f" ({why_not(r)})" if why_not else "") for r in missed)
    if len(have) < len(rows):
        text += "; no figure for " + ", ".join(_shape(r) for r in rows if r.get(key) is None)
    return text


def _floor_note(pct) -> str:
    if pct is None:
        return "no floor"
    return f"needs {pct:.0f}% of the read floor" + (": beyond it" if pct >= 100 else "")


def targets(rows, host=()):
    """Markdown lines: each of issue 3's speed targets, where it is met and, where not, how fast it would have
    to read its bytes (as % of the row's read floor, clean L2: >= 100 no kernel that reads its operands once can)."""
    ok_rows = [r for r in rows if not r.get("l2side_error")]
    lines_skipped = [_shape(r) for r in rows if r.get("l2side_error")]
    small = [r for r in ok_rows if r["M"] <= SMALL_M]
    lines = ["- >= 1.0x the best peer, kernel-only (x peer kernel; at small M the anchors' DeepGEMM figure had a warm "
             "L2, so the next line is the like-for-like one): " + _tally(
                 ok_rows, "x_peer_kernel", lambda v: v >= 1.0, lambda r: f"{r['x_peer_kernel']:.2f}"),
             "- the same like for like (l2side with fresh inputs, as the DeepGEMM anchors were timed): " + _tally(
                 ok_rows, "x_deepgemm_fresh", lambda v: v >= 1.0, lambda r: f"{r['x_deepgemm_fresh']:.2f}"),
             "- >= 1.0x the best peer, events: " + _tally(
                 ok_rows, "x_peer_ev", lambda v: v >= 1.0, lambda r: f"{r['x_peer_ev']:.2f}")]
    for key, flush, pct_key in (("speedup_kernel", "L2 flushed by a write", "floor_pct_for_125"),
                                ("speedup_clean", "clean L2", "floor_pct_for_125_clean")):
        lines.append(f"- >= {SMALL_M_X_CUBLAS}x cuBLAS at M <= {SMALL_M}, kernel-only, {flush}: " + _tally(
            small, key, lambda v: v >= SMALL_M_X_CUBLAS,
            lambda r, k=key, p=pct_key: f"{r[k]:.2f}, {_floor_note(r.get(p))}"))
    big = [r for r in ok_rows if (r["M"], r["N"], r["K"]) == BIG_SHAPE and r.get("l2side_kernel_tflops")]
    for r in big:
        verdict = "met" if r["l2side_kernel_tflops"] >= BIG_SHAPE_TFLOPS else "not met"
        lines.append(f"- >= {BIG_SHAPE_TFLOPS} TFLOPS at {_shape(r)}, kernel-only: {r['l2side_kernel_tflops']:.0f} "
                     f"({verdict})")
    narrow = [r for r in ok_rows if r["M"] == BANDWIDTH_M]

    def bandwidth_note(r, key, floor_key):
        floor = r.get(floor_key)
        need = f", {_floor_note(100 * BANDWIDTH_PCT / floor)}" if floor else ""
        return f"{r[key]:.0f}%{need}"

    for key, flush, floor_key in (("l2side_pct_copy_bw", "L2 flushed by a write", "floor_pct_copy"),
                                  ("l2side_pct_copy_bw_clean", "clean L2", "floor_pct_copy_clean")):
        lines.append(f"- M = {BANDWIDTH_M} at >= {BANDWIDTH_PCT}% of copy bandwidth, {flush}: " + _tally(
            narrow, key, lambda v: v >= BANDWIDTH_PCT, lambda r, k=key, f=floor_key: bandwidth_note(r, k, f)))
    for h in host:
        if h.get("what") == "l2side.gemm" and h.get("cpu_us_per_call") is not None:
            verdict = "met" if h["cpu_us_per_call"] <= HOST_US else "not met"
            lines.append(f"- host overhead <= {HOST_US} µs per call: {h['cpu_us_per_call']:.1f} ({verdict})")
    if lines_skipped:
        lines.append("- not measured (l2side failed or was skipped): " + ", ".join(lines_skipped))
    return lines


def write_csv(path, rows, keys):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="all",
                   help="small: the 6 M=64 shapes; all: the 18 DeepSeek-V3 shapes (default)")
    p.add_argument("--quick", action="store_true", help="10 timed calls instead of 30 (a smoke run)")
    p.add_argument("--csv", default="scratch/bench_gemm.csv",
                   help="write the table here (default %(default)s; '' for none); host overhead goes to *_host.csv")
    p.add_argument("--allocator", choices=("torch", "l2side"), default="torch",
                   help="whose CUDA allocator the run uses (default: torch's)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per measurement (default 30, quick 10)")
    p.add_argument("--deadline", type=float, default=225.0, help="seconds; shapes not started by then are skipped")
    args = p.parse_args(argv)
    t_start = time.time()

    import torch
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    if args.allocator == "l2side":
        import l2side
        l2side.enable()
    import l2side
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    calls = args.calls or (10 if args.quick else 30)
    shapes = SHAPE_SETS[args.shapes]
    print(f"bench_gemm: {props.name} (sm_{props.major}{props.minor}, {num_sms} SMs), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, allocator {args.allocator}, {calls} timed calls per figure", flush=True)
    if "H100" not in props.name:
        print("   note: the anchor (x peer) columns are H100 figures", flush=True)

    t0 = time.time()
    build_errors, why = prebuild(shapes + [TINY], num_sms, min(16, os.cpu_count() or 4))
    print(f"   pre-built the kernels in {time.time() - t0:.1f} s" if why is None else f"   {why}", flush=True)
    for job, err in build_errors.items():
        print(f"   build failed for N={job[0]} K={job[1]} {job[2]}: {err}", flush=True)

    bench = Bench(torch, calls, warmup=2 if args.quick else 5)
    if bench.profiler_error:
        print(f"   torch.profiler unavailable, no kernel-only figures: {bench.profiler_error}", flush=True)
    copy_gbs = copy_bandwidth_gbs(torch, 5 if args.quick else 20)
    print(f"   device copy (1 GiB copy_, read + write): {copy_gbs:.0f} GB/s", flush=True)

    rows = []
    for m, n, k in shapes:
        if time.time() - t_start > args.deadline:
            rows.append({"M": m, "N": n, "K": k, "l2side_error": f"skipped: past --deadline {args.deadline:.0f} s"})
            continue
        ts = time.time()
        try:
            row = run_shape(torch, bench, m, n, k, copy_gbs)
        except Exception as e:  # noqa: BLE001
            row = {"M": m, "N": n, "K": k, "l2side_error": f"shape failed: {short(e)}"}
        rows.append(row)
        torch.cuda.empty_cache()
        print(f"   {m:5d} {n:6d} {k:6d}  l2side {fmt(row.get('l2side_kernel_tflops'))} / "
              f"{fmt(row.get('l2side_ev_tflops'))} TFLOPS (kernel / events), cuBLAS "
              f"{fmt(row.get('cublas_kernel_tflops'))} / {fmt(row.get('cublas_ev_tflops'))}, diff "
              f"{fmt(row.get('l2side_diff'), '.1e')} / {fmt(row.get('cublas_diff'), '.1e')}  ({time.time() - ts:.1f} s)"
              + "".join(f"  [{w}: {row[w + '_error']}]" for w in ("l2side", "cublas") if row.get(w + "_error")),
              flush=True)

    host = []
    if time.time() - t_start < args.deadline + 10:
        try:
            host = host_overhead(torch, args.quick)
        except Exception as e:  # noqa: BLE001
            host = [{"what": "host overhead", "error": short(e)}]

    print(f"\n## FP8 GEMM, {props.name}: kernel-only (torch.profiler) and end-to-end (CUDA events), L2 flushed, "
          f"median of {calls}; device copy {copy_gbs:.0f} GB/s\n")
    print(markdown(rows))
    if host:
        print(f"\n## Host overhead per call, M=N=K={TINY[0]} (median; GPU µs = events around back-to-back calls)\n")
        print("| call | CPU µs/call (no sync) | GPU µs/call | CUDA graph: CPU µs/replay | GPU µs/replay |")
        print("|---|---:|---:|---:|---:|")
        for r in host:
            if r.get("error"):
                print(f"| {r['what']} | error: {r['error']} | | | |")
            else:
                print(f"| {r['what']} | {fmt(r.get('cpu_us_per_call'), '.1f')} | "
                      f"{fmt(r.get('gpu_us_per_call_back_to_back'), '.1f')} | "
                      f"{fmt(r.get('graph_cpu_us_per_replay'), '.1f')} | {fmt(r.get('graph_gpu_us_per_replay'), '.1f')} |")
    print("\n## Issue 3's targets in this run\n")
    print("\n".join(targets(rows, host)))
    if args.csv:
        keys = ["M", "N", "K", "l2side_kernel_us", "l2side_kernel_tflops", "l2side_kernel_gbs",
                "l2side_kernels_per_call", "l2side_ev_us", "l2side_ev_tflops", "l2side_ev_gbs", "cublas_api",
                "cublas_kernel_us", "cublas_kernel_tflops", "cublas_kernel_gbs", "cublas_kernels_per_call",
                "cublas_ev_us", "cublas_ev_tflops", "cublas_ev_gbs", "speedup_kernel", "speedup_ev",
                "l2side_pct_copy_bw", "l2side_clean_us", "l2side_pct_copy_bw_clean", "x_peer_kernel", "x_peer_ev", "l2side_fresh_us", "l2side_fresh_tflops",
                "x_deepgemm_fresh", "floor_kernel_us", "floor_clean_us", "floor_pct_copy", "floor_pct_copy_clean",
                "l2side_vs_floor_clean", "cublas_clean_us", "speedup_clean",
                "floor_pct_for_125", "floor_pct_for_125_clean", "l2side_diff", "cublas_diff", "l2side_error",
                "cublas_error"]
        for r in rows:
            r["copy_gbs"] = copy_gbs
            r["device"] = props.name
        write_csv(args.csv, rows, keys + ["copy_gbs", "device"])
        host_path = str(Path(args.csv).with_name(Path(args.csv).stem + "_host.csv"))
        write_csv(host_path, host, ["what", "cpu_us_per_call", "gpu_us_per_call_back_to_back",
                                    "graph_cpu_us_per_replay", "graph_gpu_us_per_replay", "error"])
        print(f"\nwrote {args.csv} and {host_path}")
    print(f"bench_gemm: {time.time() - t_start:.0f} s")
    failed = [r for r in rows if r.get("l2side_error", "").startswith(("WRONG", "shape failed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
