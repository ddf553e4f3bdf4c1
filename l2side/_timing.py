"""CUDA-event timing shared by `python -m l2side info`, the benchmarks and the dev scripts."""
from __future__ import annotations

import statistics


def median_event_ms(fn, reps: int, *, warmup: int = 3, before=None) -> float:
    """Median milliseconds of one call of `fn` between two CUDA events on the current stream, after `warmup`
    untimed calls. `before()` (an L2 flush, a counter reset) runs before every call, outside the timed span."""
    import torch
    times = []
    for r in range(warmup + reps):
        if before is not None:
            before()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if r >= warmup:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def back_to_back_ms(fn, calls: int, *, warmup: int = 0) -> float:
    """Milliseconds per call of `calls` calls of `fn` issued back to back between two CUDA events (the GPU time
    of a stream of calls, launch gaps included), after `warmup` untimed calls and a synchronize."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / calls
