"""Scenarios for the caching allocator on the CPU test double of the CUDA driver (one per process:
the fake driver replaces the real one for the life of the process). Run: python fake_allocator_scenarios.py NAME"""
import random
import sys

from l2side import _native as native
from l2side.sides import side_mask, side_of_address

MiB = 1 << 20
MASK = 0xB3000
SIDE_MASK = side_mask(MASK)


def check_invariant(ptr, size, rng, samples=16):
    offsets = {0, size - 1} | {rng.randrange(size) for _ in range(samples)}
    for off in offsets:
        address = ptr + off
        truth = native.fake_side_of(address)
        assert truth in (0, 1), f"{address:#x} is not mapped"
        assert truth == side_of_address(address, SIDE_MASK), f"side formula wrong at {address:#x}"


def invariant():
    rng = random.Random(7)
    live = []
    for _ in range(400):
        size = int(2 ** rng.uniform(0, 25))  # 1 B .. 32 MiB
        ptr = native.malloc(0, size, 0)
        check_invariant(ptr, size, rng)
        if size > MiB:
            assert ptr % (4 * MiB) == 0, "large blocks start 4 MiB-aligned"
        live.append((ptr, size))
        while live and (rng.random() < 0.5 or sum(s for _, s in live) > 128 * MiB):
            native.free(0, live.pop(rng.randrange(len(live)))[0])
    for ptr, _ in live:
        native.free(0, ptr)


def caching():
    p = native.malloc(0, 8 * MiB, 0)
    created = native.stats(0)["num_device_alloc"]
    native.free(0, p)
    q = native.malloc(0, 8 * MiB, 0)
    assert q == p, "a freed block is reused on its stream"
    assert native.stats(0)["num_device_alloc"] == created, "reuse creates no pages"
    native.free(0, q)
    small = [native.malloc(0, 1000, 0) for _ in range(100)]
    assert len(set(small)) == 100
    for s in small:
        native.free(0, s)
    again = [native.malloc(0, 1000, 0) for _ in range(100)]
    assert sorted(again) == sorted(small), "merged small blocks are carved again in the same places"
    for s in again:
        native.free(0, s)


def split_and_merge():
    big = native.malloc(0, 64 * MiB, 0)
    native.free(0, big)
    created = native.stats(0)["num_device_alloc"]
    a = native.malloc(0, 10 * MiB, 0)  # carved out of the cached 64 MiB: 12 MiB kept (4 MiB granular)
    b = native.malloc(0, 20 * MiB, 0)
    assert a == big and b == big + 12 * MiB, (hex(a), hex(b), hex(big))
    assert b % (4 * MiB) == 0
    assert native.stats(0)["num_device_alloc"] == created, "splitting a cached block creates no pages"
    rng = random.Random(3)
    check_invariant(a, 10 * MiB, rng)
    check_invariant(b, 20 * MiB, rng)
    native.free(0, a)
    native.free(0, b)
    again = native.malloc(0, 64 * MiB, 0)  # the pieces merged back into one block
    assert again == big
    native.free(0, again)


def stats_consistency():
    rng = random.Random(11)
    streams = [0x10, 0x20, 0x30, 0x40]
    live = {}
    requested = 0
    for _ in range(20000):
        if live and (rng.random() < 0.5 or requested > 128 * MiB):
            ptr = rng.choice(list(live))
            requested -= live.pop(ptr)
            native.free(0, ptr)
        else:
            size = int(2 ** rng.uniform(0, 25))
            ptr = native.malloc(0, size, rng.choice(streams))
            assert ptr not in live, "an address handed out twice"
            live[ptr] = size
            requested += size
        if rng.random() < 0.01:
            s = native.stats(0)
            assert s["requested_bytes.all.current"] == requested
            assert s["allocation.all.current"] == len(live)
            assert s["reserved_bytes.all.current"] >= s["allocated_bytes.all.current"] >= requested
    for ptr in list(live):
        native.free(0, ptr)
    s = native.stats(0)
    assert s["allocated_bytes.all.current"] == 0 and s["allocation.all.current"] == 0
    assert s["reserved_bytes.all.current"] == (s["l2side.pages.side0.total"] + s["l2side.pages.side1.total"]) * 2 * MiB
    assert s["l2side.multi_stream"] == 1
    native.empty_cache(0)
    s = native.stats(0)
    assert s["reserved_bytes.all.current"] == 0 and s["segment.all.current"] == 0, s


def limit_and_oom():
    native.set_limit(0, 64 * MiB)
    try:
        native.malloc(0, 100 * MiB, 0)
        raise AssertionError("allocating past the limit must fail")
    except RuntimeError as e:
        assert "out of memory" in str(e) and "limit" in str(e), e
    assert native.stats(0)["num_ooms"] == 1
    p = native.malloc(0, 32 * MiB, 0)  # still healthy
    native.free(0, p)
    native.set_limit(0, -1)
    # the fake device has 256 MiB: a cached 200 MiB block must be given back to serve 220 MiB (a block needs
    # as many pages of one side as of the other, so not quite all of the device can form one block)
    p = native.malloc(0, 200 * MiB, 0)
    native.free(0, p)
    q = native.malloc(0, 220 * MiB, 0)
    native.free(0, q)
    try:
        native.malloc(0, 300 * MiB, 0)
        raise AssertionError("allocating past the device must fail")
    except RuntimeError as e:
        assert "no free memory" in str(e), e


def cross_stream():
    a, b = 0x10, 0x20
    p = native.malloc(0, 8 * MiB, a)
    native.malloc(0, 4096, b)  # a second stream: events are recorded from now on
    native.free(0, p)
    q = native.malloc(0, 8 * MiB, b)  # the fake GPU is idle, so A's event has completed
    assert q == p, "an idle block of another stream is reused"
    native.free(0, q)


def record_stream():
    a, b = 0x10, 0x20
    p = native.malloc(0, 8 * MiB, a)
    assert native.record_stream(0, p, b)  # also used on stream b
    assert not native.record_stream(0, 12345, b)
    native.free(0, p)  # waits for b's work before it is reusable
    s = native.stats(0)
    assert s["allocated_bytes.all.current"] == 0 and s["l2side.cached_bytes"] >= 0
    q = native.malloc(0, 8 * MiB, a)  # the fake GPU is idle: b's event has completed, the block is back
    assert q == p
    native.free(0, q)
    small = native.malloc(0, 1000, a)
    native.record_stream(0, small, b)
    neighbour = native.malloc(0, 1000, a)
    native.free(0, small)  # pending: must not merge with its free neighbour until b is done
    native.free(0, neighbour)
    again = native.malloc(0, 2000, a)
    assert again == small, "after b's work the two freed blocks merged"
    native.free(0, again)
    native.empty_cache(0)
    assert native.stats(0)["reserved_bytes.all.current"] == 0


def multi_device():
    p0 = native.malloc(0, 3 * MiB, 0)
    p1 = native.malloc(1, 5 * MiB, 0)
    assert native.stats(0)["allocated_bytes.all.current"] == 4 * MiB
    assert native.stats(1)["allocated_bytes.all.current"] == 6 * MiB
    assert native.owns(0, p0) and not native.owns(0, p1) and native.owns(1, p1)
    try:
        native.malloc(7, 100, 0)
        raise AssertionError("an unknown device must be refused")
    except ValueError as e:
        assert "no CUDA device 7" in str(e)
    native.free(0, p0)
    native.free(1, p1)


def owns_and_bad_free():
    p = native.malloc(0, 3 * MiB, 0)
    assert native.owns(0, p) and native.owns(0, p + 4 * MiB - 1)  # the whole rounded block
    assert not native.owns(0, p + 4 * MiB) and not native.owns(0, 12345)
    native.free(0, 0xDEAD000)  # not ours: reported, ignored
    native.free(0, p)
    assert native.stats(0)["allocated_bytes.all.current"] == 0


SCENARIOS = {f.__name__: f for f in (invariant, caching, split_and_merge, stats_consistency, limit_and_oom, cross_stream,
                                     record_stream, multi_device, owns_and_bad_free)}

if __name__ == "__main__":
    native.use_fake_driver(devices=2, bytes_per_device=256 * MiB, hash_mask=MASK)
    SCENARIOS[sys.argv[1]]()
    print("ok", sys.argv[1])
