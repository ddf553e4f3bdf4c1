"""The side-aware allocator on a real GPU (issue 2, "what it must show"); skipped without a CUDA GPU.

l2side.enable() is process-wide and must come before CUDA starts, so each scenario runs in its own process
(tests/gpu_scenarios.py NAME); this pytest process itself never enables l2side. Run with -rA to see what each
scenario measured.
"""
import json
import os
import sys

import pytest

from conftest import REPO, cuda_available, requires_gpu, run_python

pytestmark = requires_gpu

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_scenarios.py")


def gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch
    return torch.cuda.device_count()


requires_2gpus = pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs")


def scenario(name: str, timeout: int = 300, env=None) -> str:
    r = run_python([SCENARIOS, name], timeout=timeout, env=env)
    out = r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr.strip() else "")
    print(out[-6000:])
    assert r.returncode == 0, f"scenario {name} failed (exit {r.returncode}):\n{out[-10000:]}"
    assert f"SCENARIO OK {name}" in r.stdout, out[-10000:]
    return r.stdout


def test_invariant_holds_for_mixed_torch_allocations():
    """>= 1 GiB of torch allocations (512 B .. 256 MiB) under enable(); >= 2000 sampled 4 KiB chunks: the
    latency-measured side equals popcount(addr & side_mask) & 1 for >= 99.9%."""
    scenario("invariant")


def test_stress_threads_and_streams():
    """1e5 random-size alloc/free, 4 threads x 4 streams, data written and checked; stats consistent; memory
    back to the baseline after empty_cache."""
    scenario("stress", timeout=600)


def test_out_of_memory_raises_and_the_process_goes_on():
    scenario("oom")


def test_cuda_graph_capture_and_replay():
    scenario("graphs")


def test_blocks_freed_on_a_busy_stream_are_not_handed_to_another():
    scenario("streams")


def test_torch_hooks_record_stream_empty_cache_memory_fraction():
    scenario("torch_hooks")


def test_enable_after_cuda_allocation_is_a_clear_error():
    scenario("bad_enable")


def test_side_of_rejects_memory_not_from_l2side():
    scenario("bad_side_of")


def test_unknown_device_is_a_value_error():
    scenario("bad_device")


@requires_2gpus
def test_one_process_two_gpus_has_per_device_pools():
    scenario("multi_device")


@requires_2gpus
def test_copies_between_two_gpus_l2side_memory():
    scenario("multi_device_copy")


@requires_2gpus
def test_torchrun_nccl_allreduce_two_processes():
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    r = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(REPO, "tests", "multi_gpu_allreduce.py")], timeout=400, env=env)
    out = r.stdout + "\n--- stderr ---\n" + r.stderr
    print(out[-6000:])
    assert r.returncode == 0, out[-10000:]
    for rank in (0, 1):
        assert f"ALLREDUCE OK rank {rank}" in r.stdout, out[-10000:]


def test_small_transformer_trains_identically_to_native(tmp_path):
    """>= 50 deterministic training steps of a small GPT-2 under l2side and under torch's allocator (separate
    processes): equal losses, and no leak after del + empty_cache. A reduced model of the benchmark's."""
    bench = os.path.join(REPO, "benchmarks", "bench_allocator.py")
    r = run_python([bench, "--parts", "train", "--steps", "50", "--warmup", "2", "--hidden", "256", "--layers", "2",
                    "--heads", "4", "--seq", "256", "--batch", "4", "--vocab", "4096", "--out", str(tmp_path)],
                   timeout=600)
    out = r.stdout + "\n--- stderr ---\n" + r.stderr
    print(out[-6000:])
    assert (tmp_path / "allocator.json").exists(), out[-10000:]
    data = json.loads((tmp_path / "allocator.json").read_text())
    assert not data["failed"], out[-10000:]
    native, l2 = data["raw"]["train/native"], data["raw"]["train/l2side"]
    assert len(native["losses"]) == len(l2["losses"]) >= 52
    assert native["losses"] == l2["losses"], \
        f"losses differ: max abs diff {max(abs(a - b) for a, b in zip(native['losses'], l2['losses']))}"
    assert l2["final_reserved"] == l2["baseline_reserved"], (l2["baseline_reserved"], l2["final_reserved"])
    assert l2["final_allocated"] == l2["baseline_allocated"], (l2["baseline_allocated"], l2["final_allocated"])
    assert r.returncode == 0, out[-10000:]


def test_scenario_script_lists_its_scenarios():
    r = run_python([SCENARIOS])
    assert r.returncode == 2 and "invariant" in r.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-rA", *sys.argv[1:]]))
