"""GPU scenarios of the side-aware allocator, one per process: `python tests/gpu_scenarios.py NAME`.

l2side.enable() swaps torch's allocator for the whole process (and only before CUDA starts), so every scenario
runs in a fresh interpreter; tests/test_allocator_gpu.py runs them and checks the exit code and the final
"SCENARIO OK <name>" line. Each scenario raises (exit code 1, traceback on stderr) when something is wrong and
prints what it measured.
"""
from __future__ import annotations

import gc
import os
import random
import sys
import threading
import time
import traceback

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _enable():
    import l2side
    l2side.enable()
    import torch
    return torch, l2side


def _stats(l2side, device=None):
    return l2side.memory_stats(device)


def _fmt(n):
    return f"{n / MiB:,.1f} MiB"


def _holds(t, value) -> bool:
    """Every element of t equals value, without a temporary as large as t (min/max reduce to scalars)."""
    return t.min().item() == value and t.max().item() == value


def _check_stats_sane(stats):
    bad = {k: v for k, v in stats.items()
           if isinstance(v, (int, float)) and not k.endswith("limit_bytes") and v < 0}
    assert not bad, f"negative counters in l2side.memory_stats(): {bad}"


# ------------------------------------------------------------------------------------------------ invariant
def invariant():
    """>= 1 GiB of torch allocations of mixed sizes (512 B .. 256 MiB); the side of >= 2000 sampled 4 KiB chunks,
    measured by latency, equals the address formula for >= 99.9% of them."""
    torch, l2side = _enable()
    from l2side import _native
    topo = l2side.topology()
    print(topo)
    rng = random.Random(7)
    live, total, n_small, n_allocs = [], 0, 0, 0
    while total < GiB + GiB // 8 or n_small < 1500:
        if total >= GiB + GiB // 8 or rng.random() < 0.75:
            n = int(2 ** rng.uniform(9, 20))  # 512 B .. 1 MiB: sub-allocated from shared pages
            n_small += 1
        else:
            n = int(2 ** rng.uniform(20, 28))  # 1 MiB .. 256 MiB: whole pages, 4 MiB-aligned
        t = torch.empty(n, dtype=torch.uint8, device="cuda")
        n_allocs += 1
        live.append(t)
        total += n
        if rng.random() < 0.1 and len(live) > 4:  # free some on the way: reused blocks must obey it too
            victim = live.pop(rng.randrange(len(live)))
            total -= victim.numel()
            del victim
    for t in live:
        t.random_(0, 255)
    sums_before = torch.stack([t.sum(dtype=torch.int64) for t in live]).cpu()
    torch.cuda.synchronize()
    print(f"{len(live)} live tensors ({n_allocs} allocated), {_fmt(total)} live")

    for t in live:
        assert l2side.owns(t) and l2side.is_side_aware(t), f"tensor at {t.data_ptr():#x} is not l2side memory"
        if t.numel() > MiB:
            assert t.data_ptr() % (4 * MiB) == 0, f"{t.numel()} B block at {t.data_ptr():#x} not 4 MiB-aligned"
    for t in live[:50]:  # side_of is the formula per chunk
        s = l2side.side_of(t)
        first = t.data_ptr() // 4096
        assert all(int(s[i]) == topo.side_of_address((first + i) * 4096) for i in range(0, len(s), max(1, len(s) // 16)))

    if not topo.split:
        print("no L2 split on this GPU: every address is side 0; nothing to measure")
        print("SCENARIO OK invariant")
        return

    # one 4-byte-aligned address in each of many distinct 4 KiB chunks: every small tensor, plus chunks of the
    # large ones drawn by size
    chunks = {}

    def add(t, off):
        addr = (t.data_ptr() + off) & ~3
        chunks.setdefault(addr // 4096, addr)

    smalls = [t for t in live if t.numel() <= MiB]
    larges = [t for t in live if t.numel() > MiB]
    for t in smalls:
        add(t, rng.randrange(t.numel()))
    weights = [t.numel() for t in larges]
    target = len(chunks) + 3000
    while len(chunks) < target:
        t = rng.choices(larges, weights)[0]
        add(t, rng.randrange(t.numel()))
    addresses = list(chunks.values())
    rng.shuffle(addresses)
    t0 = time.perf_counter()
    measured = []
    for i in range(0, len(addresses), 1024):
        measured += list(_native.measure_address_sides(0, addresses[i:i + 1024]))
    ms = (time.perf_counter() - t0) * 1e3
    predicted = [topo.side_of_address(a) for a in addresses]
    agree = sum(int(m == p) for m, p in zip(measured, predicted))
    undecided = sum(int(m not in (0, 1)) for m in measured)
    share = agree / len(addresses)
    by_side = [sum(1 for p in predicted if p == s) for s in (0, 1)]
    print(f"sampled {len(addresses)} distinct 4 KiB chunks ({len(smalls)} small tensors, predicted sides "
          f"{by_side[0]}/{by_side[1]}): formula == measured for {agree} ({share:.4%}), undecided {undecided}, "
          f"probe {ms:.0f} ms")
    wrong = [(hex(a), p, m) for a, p, m in zip(addresses, predicted, measured) if m != p][:20]
    assert share >= 0.999, f"formula right for only {share:.4%} of sampled chunks; first misses: {wrong}"
    assert min(by_side) > len(addresses) // 4, f"sampled chunks are not spread over both sides: {by_side}"
    sums_after = torch.stack([t.sum(dtype=torch.int64) for t in live]).cpu()
    assert torch.equal(sums_before, sums_after), "the side measurement changed data"
    print("SCENARIO OK invariant")


# ------------------------------------------------------------------------------------------------ stress
def stress():
    """>= 1e5 random-size (1 B .. 64 MiB, log-uniform) alloc/free from 4 Python threads on 4 streams, with
    writes and checks of the data; then stats consistent, and after empty_cache memory back to baseline."""
    torch, l2side = _enable()
    total_allocs = int(os.environ.get("L2SIDE_STRESS_ALLOCS", 100_000))
    n_threads, n_streams, max_live = 4, 4, 48
    torch.zeros(1, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(n_streams)]
    torch.cuda.synchronize()
    gc.collect()
    l2side.empty_cache()
    base = _stats(l2side)
    counters = torch.zeros(n_threads, n_streams, dtype=torch.int64, device="cuda")  # mismatches found
    torch.cuda.synchronize()
    errors = []
    per_thread = total_allocs // n_threads
    start = threading.Barrier(n_threads)

    def verify(t, value, tid, si, full):
        n = t.numel()
        if full:
            bad = t.ne(value).sum()
        else:
            step = max(1, n // 61)
            bad = t[::step].ne(value).sum() + t[-1:].ne(value).sum()
        counters[tid, si].add_(bad)

    def worker(tid):
        rng = random.Random(1000 + tid)
        live = []
        try:
            start.wait()
            for i in range(per_thread):
                if live and (len(live) >= max_live or rng.random() < 0.45):
                    t, value, si = live.pop(rng.randrange(len(live)))
                    with torch.cuda.stream(streams[si]):
                        verify(t, value, tid, si, rng.random() < 0.01)
                        del t
                si = rng.randrange(n_streams)
                n = max(1, int(2 ** rng.uniform(0, 26)))
                value = rng.randrange(256)
                with torch.cuda.stream(streams[si]):
                    t = torch.empty(n, dtype=torch.uint8, device="cuda")
                    t.fill_(value)
                live.append((t, value, si))
                del t
            while live:
                t, value, si = live.pop()
                with torch.cuda.stream(streams[si]):
                    verify(t, value, tid, si, True)
                    del t
        except BaseException:  # noqa: BLE001 -- reported by the main thread
            errors.append(f"thread {tid}:\n{traceback.format_exc()}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert not errors, "\n".join(errors)
    mismatches = counters.sum().item()
    mid = _stats(l2side)
    print(f"{n_threads * per_thread} allocations (+ the checks' temporaries) from {n_threads} threads on "
          f"{n_streams} streams in {seconds:.1f} s; peak reserved {_fmt(mid['reserved_bytes.all.peak'])}, "
          f"allocations counted {mid['allocation.all.allocated'] - base['allocation.all.allocated']}, "
          f"retries {mid['num_alloc_retries']}, ooms {mid['num_ooms']}")
    assert mismatches == 0, f"{mismatches} bytes did not hold the value written: a block was handed out twice"
    counters = None  # noqa: F841 -- frees it (the workers hold it through their closure)
    gc.collect()
    torch.cuda.synchronize()
    after = _stats(l2side)
    _check_stats_sane(after)
    assert after["allocation.all.allocated"] - base["allocation.all.allocated"] >= n_threads * per_thread
    assert after["allocation.all.allocated"] - after["allocation.all.freed"] == after["allocation.all.current"]
    for key in ("allocated_bytes.all.current", "allocation.all.current", "requested_bytes.all.current"):
        assert after[key] == base[key], f"{key}: {base[key]} before, {after[key]} after everything was freed"
    assert after["num_ooms"] == base["num_ooms"], "the stress run hit out-of-memory"
    l2side.empty_cache()
    final = _stats(l2side)
    _check_stats_sane(final)
    print(f"reserved: baseline {_fmt(base['reserved_bytes.all.current'])}, after the run "
          f"{_fmt(after['reserved_bytes.all.current'])}, after empty_cache {_fmt(final['reserved_bytes.all.current'])}")
    assert final["reserved_bytes.all.current"] == base["reserved_bytes.all.current"], \
        "reserved bytes not back to the baseline after empty_cache"
    assert final["l2side.cached_bytes"] <= base["l2side.cached_bytes"], (base["l2side.cached_bytes"],
                                                                          final["l2side.cached_bytes"])
    print("SCENARIO OK stress")


# ------------------------------------------------------------------------------------------------ out of memory
def oom():
    """set_memory_limit(2 GiB): 3 GiB raises torch.OutOfMemoryError and the process goes on; cached pages are
    given back to satisfy a later request; a request larger than the GPU raises too; and afterwards large
    allocations that need the cache released still succeed."""
    torch, l2side = _enable()
    torch.zeros(1, device="cuda")
    l2side.set_memory_limit(2 * GiB)
    try:
        torch.empty(3 * GiB, dtype=torch.uint8, device="cuda")
        raise AssertionError("3 GiB under a 2 GiB limit did not raise")
    except torch.OutOfMemoryError as e:
        msg = str(e)
    print(f"limit OOM message: {msg.splitlines()[0][:300]}")
    assert "out of memory" in msg.lower(), msg
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    a.fill_(7)
    assert _holds(a, 7)
    try:
        torch.empty(GiB + GiB // 2, dtype=torch.uint8, device="cuda")
        raise AssertionError("1 GiB live + 1.5 GiB under a 2 GiB limit did not raise")
    except torch.OutOfMemoryError:
        pass
    assert _holds(a, 7), "a live tensor changed after an OOM"
    del a  # cached, still reserved
    b = torch.empty(GiB + GiB // 2, dtype=torch.uint8, device="cuda")  # needs the cached 1 GiB given back
    b.fill_(3)
    assert _holds(b, 3)
    s = _stats(l2side)
    assert s["reserved_bytes.all.current"] <= 2 * GiB, s["reserved_bytes.all.current"]
    assert s["num_ooms"] >= 2, s["num_ooms"]
    del b

    l2side.set_memory_limit(None)
    total = torch.cuda.get_device_properties(0).total_memory
    for n in (total + 8 * GiB, 200 * GiB):
        try:
            torch.empty(n, dtype=torch.uint8, device="cuda")
            raise AssertionError(f"allocating {n / GiB:.0f} GiB on a {total / GiB:.0f} GiB GPU did not raise")
        except torch.OutOfMemoryError as e:
            msg = str(e)
    s = _stats(l2side)
    print(f"device OOM message: {msg.splitlines()[0][:300]}")
    print(f"after the device OOMs: reserved {_fmt(s['reserved_bytes.all.current'])}, cached "
          f"{_fmt(s['l2side.cached_bytes'])}, retries {s['num_alloc_retries']}, ooms {s['num_ooms']}")
    c = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    c.fill_(5)
    assert _holds(c, 5)
    del c

    # A cached block that must be given back: x (55% of free memory) freed, then y (60%) allocated.
    l2side.empty_cache()
    free, total = torch.cuda.mem_get_info()
    assert free > total // 2, f"only {_fmt(free)} of {_fmt(total)} free after empty_cache: pages leaked on OOM?"
    x = torch.empty(int(free * 0.55), dtype=torch.uint8, device="cuda")
    x.fill_(1)
    del x
    retries = _stats(l2side)["num_alloc_retries"]
    t0 = time.perf_counter()
    y = torch.empty(int(free * 0.60), dtype=torch.uint8, device="cuda")
    y.fill_(2)
    torch.cuda.synchronize()
    assert _holds(y, 2)
    s = _stats(l2side)
    print(f"{_fmt(free)} free: 55% cached then 60% allocated in {time.perf_counter() - t0:.2f} s "
          f"(retries {retries} -> {s['num_alloc_retries']}, reserved {_fmt(s['reserved_bytes.all.current'])})")
    del y
    l2side.empty_cache()
    _check_stats_sane(_stats(l2side))
    z = torch.ones(1 << 20, device="cuda")
    assert z.sum().item() == 1 << 20
    print("SCENARIO OK oom")


# ------------------------------------------------------------------------------------------------ CUDA graphs
def graphs():
    """Capture (torch.cuda.graph) and replay a training step and an inference step with the allocator active;
    results equal eager execution; after deleting the graphs, release_graph_memory gives the memory back."""
    import copy
    torch, l2side = _enable()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.LayerNorm(1024), nn.Linear(1024, 256)).cuda()
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(64, 256, device="cuda", generator=gen) for _ in range(8)]
    ys = [torch.randn(64, 256, device="cuda", generator=gen) for _ in range(8)]
    static_x, static_y = xs[0].clone(), ys[0].clone()

    def eager_step(m, o, x, y):
        o.zero_grad(set_to_none=True)
        loss = loss_fn(m(x), y)
        loss.backward()
        o.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs do before capture
        for i in range(3):
            eager_step(model, opt, xs[i], ys[i])
    torch.cuda.current_stream().wait_stream(side)
    for i in range(3):
        eager_step(eager, opt_e, xs[i], ys[i])
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    l2side.empty_cache()
    before = _stats(l2side)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    torch.cuda.synchronize()
    during = _stats(l2side)
    print(f"captured training step: l2side.graph_bytes {_fmt(during['l2side.graph_bytes'])}, reserved "
          f"{_fmt(before['reserved_bytes.all.current'])} -> {_fmt(during['reserved_bytes.all.current'])}")
    assert during["l2side.graph_bytes"] > 0, "memory allocated during capture is not accounted as graph memory"

    max_diff = 0.0
    for i in range(3, 8):
        static_x.copy_(xs[i])
        static_y.copy_(ys[i])
        g.replay()
        le = eager_step(eager, opt_e, xs[i], ys[i])
        torch.cuda.synchronize()
        max_diff = max(max_diff, abs(static_loss.item() - le.item()))
        assert torch.allclose(static_loss, le, rtol=1e-5, atol=1e-6), (i, static_loss.item(), le.item())
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max().item()
        max_diff = max(max_diff, (p - q).abs().max().item())
    print(f"5 replays of the training step == eager (max abs diff {max_diff:.3g})")

    # inference graph, replayed with new inputs
    gi = torch.cuda.CUDAGraph()
    with torch.no_grad():
        for _ in range(2):
            model(static_x)
        torch.cuda.synchronize()
        with torch.cuda.graph(gi):
            static_out = model(static_x)
        for i in range(8):
            static_x.copy_(xs[i])
            gi.replay()
            ref = model(xs[i])
            assert torch.allclose(static_out, ref, rtol=1e-5, atol=1e-6), (i, (static_out - ref).abs().max().item())
    print("8 replays of the inference step == eager")

    del g, gi, static_loss, static_out, ref, le
    opt.zero_grad(set_to_none=True)  # the gradients live in graph memory
    gc.collect()
    torch.cuda.synchronize()
    l2side.release_graph_memory()
    l2side.empty_cache()
    after = _stats(l2side)
    _check_stats_sane(after)
    print(f"after deleting the graphs + release_graph_memory + empty_cache: graph_bytes "
          f"{_fmt(after['l2side.graph_bytes'])}, reserved {_fmt(after['reserved_bytes.all.current'])} "
          f"(before capture {_fmt(before['reserved_bytes.all.current'])}), allocated "
          f"{_fmt(after['allocated_bytes.all.current'])} (before {_fmt(before['allocated_bytes.all.current'])})")
    # Freed graph memory is all given back. What torch allocated during the capture and still holds (its
    # cuBLAS workspace for the capture stream, say) stays allocated and is counted as graph memory in use.
    # Free graph blocks go back with their segments; a segment that still holds a graph block in use keeps
    # its free part (at most part of a 2 MiB page here).
    assert after["l2side.graph_cached_bytes"] < (2 << 20), after["l2side.graph_cached_bytes"]
    still_used = after["l2side.graph_allocated_bytes"]
    print(f"graph memory still in use after the graphs are gone (torch's own caches): {_fmt(still_used)}")
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"] + still_used
    # (+ the rest of the 2 MiB pages that small graph blocks still in use sit in)
    assert after["reserved_bytes.all.current"] <= before["reserved_bytes.all.current"] + still_used + (16 << 20)
    # and the allocator still works normally
    out = model(xs[0])
    assert torch.isfinite(out).all().item()
    print("SCENARIO OK graphs")


# ------------------------------------------------------------------------------------------------ streams
def streams():
    """A block freed on stream A while A's work is in flight is not handed to stream B; on A it is reused at
    once."""
    torch, l2side = _enable()
    torch.zeros(1, device="cuda")
    A, B = torch.cuda.Stream(), torch.cuda.Stream()
    sleep_cycles = int(os.environ.get("L2SIDE_SLEEP_CYCLES", 1_000_000_000))  # ~0.5 s at ~2 GHz
    conclusive = 0
    for n in (4 * KiB, 512 * KiB, MiB, 64 * MiB):
        with torch.cuda.stream(A):
            r = torch.empty(n, dtype=torch.uint8, device="cuda")
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            x.fill_(1)
            torch.cuda._sleep(sleep_cycles)
            r.copy_(x)  # reads x long after the free below
            x_ptr = x.data_ptr()
            del x
        with torch.cuda.stream(B):
            y = torch.empty(n, dtype=torch.uint8, device="cuda")
            y.fill_(2)
            y_ptr = y.data_ptr()
        a_busy = not A.query()
        torch.cuda.synchronize()
        assert _holds(r, 1), f"{n} B: stream A's data was overwritten by stream B (block reused too early)"
        if a_busy:
            conclusive += 1
            assert y_ptr != x_ptr, f"{n} B: the block freed on A was handed to B while A was busy"
        else:  # reuse is allowed once A is done; something (page creation?) waited for A
            print(f"{n:>10} B: NOTE stream A had finished when B's allocation returned: inconclusive "
                  f"(did the allocation on B synchronise with A? or raise L2SIDE_SLEEP_CYCLES)")
        assert _holds(y, 2)
        # same stream: reused at once (no new pages; for whole-page blocks, the very same block)
        device_allocs = _stats(l2side)["num_device_alloc"]
        with torch.cuda.stream(A):
            x2 = torch.empty(n, dtype=torch.uint8, device="cuda")
            p = x2.data_ptr()
            x2.fill_(3)
            del x2
            x3 = torch.empty(n, dtype=torch.uint8, device="cuda")
            same = x3.data_ptr() == p
            del x3
        # other stream, after A's work is done: allowed to reuse
        torch.cuda.synchronize()
        with torch.cuda.stream(B):
            z = torch.empty(n, dtype=torch.uint8, device="cuda")
            reused_b = z.data_ptr() == p
            del z
        torch.cuda.synchronize()
        new_pages = _stats(l2side)["num_device_alloc"] - device_allocs
        print(f"{n:>10} B: B got a different block while A was busy; same-stream reuse at once: {same}; "
              f"B reused A's block after A finished: {reused_b}; new device allocations: {new_pages}")
        assert new_pages == 0, f"{n} B: cached blocks were not reused ({new_pages} new device allocations)"
        if n > MiB:
            assert same, f"{n} B: a block freed on A was not reused at once by the next same-size request on A"
        del r, y
    assert conclusive >= 2, f"only {conclusive} of 4 sizes allocated on B while A was still busy"
    _check_stats_sane(_stats(l2side))
    print("SCENARIO OK streams")


def torch_hooks():
    """Tensor.record_stream, torch.cuda.empty_cache and set_per_process_memory_fraction reach l2side."""
    torch, l2side = _enable()
    import l2side.memory
    assert l2side.memory._hooks_installed, "the torch allocator hooks were not installed"
    A, B = torch.cuda.Stream(), torch.cuda.Stream()
    n = 64 * MiB
    with torch.cuda.stream(A):
        x = torch.empty(n, dtype=torch.uint8, device="cuda")
        x.fill_(1)
    B.wait_stream(A)
    with torch.cuda.stream(B):
        r = torch.empty(n, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(1_000_000_000)
        r.copy_(x)  # B reads x long after the free below
    x.record_stream(B)
    x_ptr = x.data_ptr()
    del x  # freed on A, but B still uses it: not reusable until B's work is done
    with torch.cuda.stream(A):
        y = torch.empty(n, dtype=torch.uint8, device="cuda")
        y.fill_(2)
    b_busy = not B.query()
    torch.cuda.synchronize()
    assert _holds(r, 1), "record_stream ignored: the block was reused while stream B still read it"
    print(f"record_stream: B busy when A reallocated: {b_busy}; A got the same block: {y.data_ptr() == x_ptr}")
    if b_busy:
        assert y.data_ptr() != x_ptr
    del y, r
    torch.cuda.synchronize()
    before = _stats(l2side)["reserved_bytes.all.current"]
    torch.cuda.empty_cache()
    after = _stats(l2side)["reserved_bytes.all.current"]
    print(f"torch.cuda.empty_cache: l2side reserved {_fmt(before)} -> {_fmt(after)}")
    assert after < before
    torch.cuda.set_per_process_memory_fraction(0.01)
    assert _stats(l2side)["l2side.limit_bytes"] > 0
    try:
        torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        raise AssertionError("set_per_process_memory_fraction(0.01) did not limit l2side")
    except torch.OutOfMemoryError as e:
        print(f"set_per_process_memory_fraction(0.01): {str(e)[:100]}...")
    torch.cuda.set_per_process_memory_fraction(1.0)
    print("SCENARIO OK torch_hooks")


# ------------------------------------------------------------------------------------------------ bad input
def bad_enable():
    """enable() after torch allocated CUDA memory: RuntimeError with a clear message; torch keeps working."""
    import torch
    import l2side
    x = torch.ones(16, device="cuda")
    try:
        l2side.enable()
        raise AssertionError("enable() after a CUDA allocation did not raise")
    except RuntimeError as e:
        msg = str(e)
    print(f"message: {msg}")
    assert "enable" in msg and "before" in msg, msg
    assert not l2side.is_enabled()
    assert (x * 2).sum().item() == 32
    print("SCENARIO OK bad_enable")


def bad_side_of():
    """side_of on memory that is not l2side's (native torch allocator): ValueError; owns() is False."""
    import torch
    import l2side
    t = torch.ones(1 << 20, device="cuda")
    for bad in (t, torch.ones(4), [1, 2]):
        try:
            l2side.side_of(bad)
            raise AssertionError(f"side_of({type(bad).__name__}) did not raise")
        except ValueError as e:
            print(f"side_of({type(bad).__name__}{'' if not hasattr(bad, 'device') else ' on ' + str(bad.device)}): {e}")
    assert not l2side.owns(t) and not l2side.is_side_aware(t)
    s = l2side.empty(1 << 20, dtype=torch.float32)  # side-aware memory without enable()
    assert l2side.owns(s) and len(l2side.side_of(s)) == (4 << 20) // 4096
    print("SCENARIO OK bad_side_of")


def bad_device():
    """Unknown device indices: ValueError from every per-device entry point."""
    torch, l2side = _enable()
    keep = torch.zeros(1, device="cuda")
    count = torch.cuda.device_count()
    calls = {
        "topology": lambda d: l2side.topology(d),
        "memory_stats": lambda d: l2side.memory_stats(d),
        "empty_cache": lambda d: l2side.empty_cache(d),
        "reset_peak_memory_stats": lambda d: l2side.reset_peak_memory_stats(d),
        "set_memory_limit": lambda d: l2side.set_memory_limit(GiB, d),
        "release_graph_memory": lambda d: l2side.release_graph_memory(d),
        "empty": lambda d: l2side.empty(16, dtype=torch.float32, device=d),
    }
    for bad in (count, 99, -1, f"cuda:{count}", torch.device("cuda", 99), "cpu"):
        for name, call in calls.items():
            try:
                call(bad)
                raise AssertionError(f"{name}({bad!r}) did not raise")
            except ValueError as e:
                msg = str(e)
        print(f"device {bad!r}: {msg}")
    assert l2side.memory_stats(0)["allocated_bytes.all.current"] > 0  # still healthy
    assert keep.add(1).item() == 1
    print("SCENARIO OK bad_device")


# ------------------------------------------------------------------------------------------------ multi-GPU
def multi_device():
    """One process, tensors on cuda:0 and cuda:1: separate pools and stats per device."""
    torch, l2side = _enable()
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
    a = torch.full((64 * MiB,), 1, dtype=torch.uint8, device="cuda:0")
    b = torch.full((64 * MiB,), 2, dtype=torch.uint8, device="cuda:1")
    sa = torch.full((1000,), 3.0, device="cuda:0")
    sb = torch.full((3000,), 4.0, device="cuda:1")
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    s0, s1 = l2side.memory_stats(0), l2side.memory_stats(1)
    for d, s in ((0, s0), (1, s1)):
        print(f"device {d}: {l2side.topology(d)}")
        print(f"device {d}: allocated {_fmt(s['allocated_bytes.all.current'])}, reserved "
              f"{_fmt(s['reserved_bytes.all.current'])}, pages {s['l2side.pages.side0.total']}/"
              f"{s['l2side.pages.side1.total']}")
        assert s["allocated_bytes.all.current"] >= 64 * MiB
    for t in (a, b, sa, sb):
        assert l2side.owns(t) and l2side.is_side_aware(t), t.device
    assert a.data_ptr() % (4 * MiB) == 0 and b.data_ptr() % (4 * MiB) == 0
    assert l2side.check_sides(a, samples=256) >= 0.999
    assert l2side.check_sides(b, samples=256) >= 0.999
    assert _holds(b, 2) and _holds(a, 1) and sb.sum().item() == 12000.0
    del a
    torch.cuda.synchronize(0)
    s0b, s1b = l2side.memory_stats(0), l2side.memory_stats(1)
    assert s0b["allocated_bytes.all.current"] == s0["allocated_bytes.all.current"] - 64 * MiB
    assert s1b["allocated_bytes.all.current"] == s1["allocated_bytes.all.current"]
    l2side.empty_cache(0)
    s0c, s1c = l2side.memory_stats(0), l2side.memory_stats(1)
    assert s0c["reserved_bytes.all.current"] <= s0b["reserved_bytes.all.current"] - 64 * MiB
    assert s1c["reserved_bytes.all.current"] == s1b["reserved_bytes.all.current"]
    with torch.cuda.device(1):  # a current device other than 0
        c = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")
        c.fill_(9)
        assert c.device.index == 1 and l2side.owns(c)
        assert l2side.memory_stats(1)["allocated_bytes.all.current"] >= s1c["allocated_bytes.all.current"] + 32 * MiB
    del b, c, sa, sb
    for d in (0, 1):
        torch.cuda.synchronize(d)
        l2side.empty_cache(d)
        _check_stats_sane(l2side.memory_stats(d))
    print("SCENARIO OK multi_device")


def multi_device_copy():
    """Copies between two GPUs' l2side memory (peer access to VMM memory needs cuMemSetAccess for the peer)."""
    torch, l2side = _enable()
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
    for n in (4096, 3 * MiB, 64 * MiB):
        a = torch.arange(n, device="cuda:0", dtype=torch.int32)
        b = a.to("cuda:1")
        c = torch.empty(n, device="cuda:0", dtype=torch.int32)
        c.copy_(b)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        assert torch.equal(b.cpu(), a.cpu()) and torch.equal(c, a), n
        d = torch.empty(n, device="cuda:1", dtype=torch.int32)
        d.copy_(a, non_blocking=True)
        torch.cuda.synchronize(1)
        assert torch.equal(d.cpu(), a.cpu()), n
    print("SCENARIO OK multi_device_copy")


SCENARIOS = {f.__name__: f for f in (invariant, stress, oom, graphs, streams, torch_hooks, bad_enable, bad_side_of,
                                     bad_device, multi_device, multi_device_copy)}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        print(f"usage: python {sys.argv[0]} {{{','.join(SCENARIOS)}}}")
        sys.exit(2)
    SCENARIOS[sys.argv[1]]()
