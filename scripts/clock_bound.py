#!/usr/bin/env python3
"""How close do the compute-bound GEMMs run to the tensor cores' peak at the clock the power cap leaves them?

    python3 scripts/clock_bound.py [--shapes compute-bound|M,N,K;...] [--seconds 1.0]

For l2side.gemm (its own config), l2side.gemm on side-aware packed B (l2side.pack_b, 128-wide, near schedule)
and cuBLAS's blockwise torch._scaled_mm on each shape, two ways of running:
  flushed       the benchmark's way: a 512 MiB write flush before every call (the GPU cools during the flushes)
  back to back  calls queued without gaps (steady power, the clock the cap settles at)
and for each: µs per call (CUDA events), TFLOPS, the median SM clock and board power NVML reports meanwhile
(sampled every ~2 ms by a thread), and "% of peak at that clock": TFLOPS over SMs x 8192 FP8 FLOP per SM per
clock (sm_90 dense FP8 wgmma: 1979 TFLOPS = 132 SMs x 8192 x 1830 MHz) x the median clock. A kernel at ~100%
of it is bounded by the power cap, not by its own schedule: only fewer joules per FLOP would make it faster.
"""
import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FP8_FLOP_PER_SM_CLOCK = 8192  # dense FP8 wgmma on sm_90 (H100 / H200)
SHAPE_SETS = {"compute-bound": [(4096, 7168, 16384), (4096, 4096, 7168), (4096, 24576, 1536), (4096, 2112, 7168),
                                (4096, 7168, 2048), (4096, 32768, 512)]}


class Sampler:
    """SM clock (MHz) and board power (W) from NVML every `period` seconds while active."""

    def __init__(self, index: int, period: float = 0.002):
        import pynvml
        pynvml.nvmlInit()
        self.nvml, self.period = pynvml, period
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1e3
        self.clocks, self.watts = [], []
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.clocks.append(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))
            self.watts.append(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)
            time.sleep(self.period)

    def __enter__(self):
        self.clocks, self.watts = [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def medians(self):
        return (statistics.median(self.clocks) if self.clocks else float("nan"),
                statistics.median(self.watts) if self.watts else float("nan"))


def timed_stretch(torch, fn, seconds: float, before=None) -> float:
    """Median µs of `fn` between CUDA events over `seconds` of calls queued without host syncs (each after
    `before()` when given), so the GPU never idles on the host."""
    for _ in range(3):
        if before is not None:
            before()
        fn()
    torch.cuda.synchronize()
    pairs, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if before is not None:
            before()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        pairs.append((start, stop))
        if len(pairs) % 16 == 0:
            pairs[-16][1].synchronize()  # keep the queue a few calls deep, the GPU busy
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in pairs[len(pairs) // 10:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="compute-bound")
    p.add_argument("--seconds", type=float, default=1.0, help="per variant and way of running")
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("clock_bound: no CUDA GPU here; run it on the GPU machine")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gemm
    import l2side
    from l2side.quantize import gemm_reference

    shapes = (SHAPE_SETS[args.shapes] if args.shapes in SHAPE_SETS
              else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")])
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    try:
        sampler = Sampler(dev)
    except Exception as e:  # noqa: BLE001
        print(f"clock_bound: NVML unavailable ({e}); nothing to measure")
        return 0
    bench = bench_gemm.Bench(torch, 30, 3)
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, power limit {sampler.limit_w:.0f} W; peak = {sms} x "
          f"{FP8_FLOP_PER_SM_CLOCK} FP8 FLOP x SM clock")
    print("| M x N x K | GEMM | way | µs | TFLOPS | SM MHz (median) | W (median) | peak at that clock, TFLOPS | "
          "% of it |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for m, n, k in shapes:
        a, sa, b, sb = bench_gemm.make_inputs(torch, m, n, k, seed=m + n + k)
        ref = gemm_reference(a, sa, b, sb)
        out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        packed = l2side.pack_b(b, sb, block_n=128)
        gemms = [("l2side", lambda: l2side.gemm(a, sa, b, sb, out=out)),
                 ("l2side, packed B (near)", lambda: l2side.gemm(a, sa, packed, out=out))]
        try:
            label, fns, _ = bench_gemm.pick_cublas(torch, [(a, sa, b, sb)], ref)
            gemms.append((f"cuBLAS ({label})", fns[0]))
        except Exception as e:  # noqa: BLE001
            print(f"# {m}x{n}x{k}: no cuBLAS blockwise GEMM: {e}")
        flop = 2.0 * m * n * k
        for name, fn in gemms:
            for way, before in (("flushed", bench.flush), ("back to back", None)):
                with sampler:
                    us = timed_stretch(torch, fn, args.seconds, before)
                mhz, watts = sampler.medians()
                tflops = flop / us / 1e6
                peak = sms * FP8_FLOP_PER_SM_CLOCK * mhz * 1e6 / 1e12
                print(f"| {m} x {n} x {k} | {name} | {way} | {us:.1f} | {tflops:.0f} | {mhz:.0f} | {watts:.0f} | "
                      f"{peak:.0f} | {100 * tflops / peak:.1f} |", flush=True)
        del a, sa, b, sb, ref, out, packed
    return 0


if __name__ == "__main__":
    sys.exit(main())
