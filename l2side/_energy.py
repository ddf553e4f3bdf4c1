"""Board power from NVML's total-energy counter, shared by the elementwise benchmark and the GEMM ablation.

nvmlDeviceGetTotalEnergyConsumption (mJ since driver load) ticks every few tens of ms, so short kernels are
measured as steady power during a stretch of back-to-back launches, read between two of the counter's own
updates; energy per call = power x time per call (from the benchmark's own timing)."""
from __future__ import annotations

import math
import sys
import time
from collections import deque


class NvmlEnergy:
    """The counter of one GPU; `handle` is None (and energy columns stay empty) without pynvml or support."""

    def __init__(self, index: int):
        self.handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read()
        except Exception as e:  # noqa: BLE001 - any failure means "no energy figures"
            print(f"# NVML energy counter unavailable: {e}", file=sys.stderr)
            self.handle = None

    def read(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))  # mJ

    def sm_clock_mhz(self) -> float:
        """The SM clock now (NaN where NVML does not say): under a power cap it shows what the watts cost."""
        try:
            return float(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))
        except Exception:  # noqa: BLE001
            return float("nan")


def steady_power(energy: NvmlEnergy, launch, launch_ms: float, seconds: float, clocks: list | None = None) -> float:
    """Watts while `launch()` (one call, or a graph replay, taking about `launch_ms` on the GPU) runs back to
    back: ~20 ms of launches stay queued, the counter is read at two of its updates `seconds` apart, both
    inside the stretch, so neither idle edges nor the counter's granularity enter. `clocks`: the SM clock (MHz)
    is sampled into it every ~5 ms of that window."""
    import torch
    depth = max(2, math.ceil(20.0 / max(launch_ms, 1e-3)))
    pending = deque()

    def enqueue():
        launch()
        ev = torch.cuda.Event()
        ev.record()
        pending.append(ev)
        while len(pending) > depth:
            pending.popleft().synchronize()

    def next_tick(previous):
        while True:
            enqueue()
            e = energy.read()
            if e != previous:
                return e, time.perf_counter()

    t = time.perf_counter()
    while time.perf_counter() - t < 0.05:     # reach steady state (clocks, queue) first
        enqueue()
    e0, t0 = next_tick(energy.read())
    sampled = t0
    while time.perf_counter() - t0 < seconds:
        enqueue()
        if clocks is not None and time.perf_counter() - sampled > 0.005:
            clocks.append(energy.sm_clock_mhz())
            sampled = time.perf_counter()
    e1, t1 = next_tick(energy.read())
    torch.cuda.synchronize()
    return (e1 - e0) / 1e3 / (t1 - t0)
