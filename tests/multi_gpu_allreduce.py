"""Two processes, each with l2side as torch's allocator, all-reduce / all-gather their buffers through NCCL.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --standalone --nproc_per_node=2 tests/multi_gpu_allreduce.py

Each rank prints its l2side stats and "ALLREDUCE OK rank R" when every result was exact.
"""
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the lent multi-GPU machines need NVLink multicast off
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import l2side  # noqa: E402

l2side.enable()  # before anything starts CUDA

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MiB = 1 << 20


def main() -> int:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    tri = world * (world + 1) // 2
    checked = 0
    for numel in (256, 256 * 1024, 16 * MiB, 64 * MiB):  # 1 KiB .. 256 MiB of float32
        pattern = torch.arange(numel, device=device, dtype=torch.float32).remainder_(1021).add_(1)
        x = pattern * (rank + 1)  # integers: the sums are exact in float32
        assert l2side.owns(x) and l2side.is_side_aware(x), "tensor not in l2side memory"
        dist.all_reduce(x)
        assert torch.equal(x, pattern * tri), f"rank {rank}: all_reduce of {numel} floats wrong"
        gathered = torch.empty(world * numel, device=device, dtype=torch.float32)
        dist.all_gather_into_tensor(gathered, pattern * (rank + 1))
        for r in range(world):
            assert torch.equal(gathered[r * numel:(r + 1) * numel], pattern * (r + 1)), \
                f"rank {rank}: all_gather part {r} of {numel} floats wrong"
        b = torch.full((numel,), float(rank + 7), device=device) if rank == 0 else torch.empty(numel, device=device)
        dist.broadcast(b, src=0)
        assert b.eq(7.0).all().item(), f"rank {rank}: broadcast of {numel} floats wrong"
        checked += 3
        del x, gathered, b, pattern
    torch.cuda.synchronize()
    dist.barrier()
    s = l2side.memory_stats(local)
    print(f"rank {rank} (cuda:{local}, {torch.cuda.get_device_name(local)}): {checked} collectives exact; "
          f"l2side allocated {s['allocated_bytes.all.current'] / MiB:.1f} MiB, reserved "
          f"{s['reserved_bytes.all.current'] / MiB:.1f} MiB (peak {s['reserved_bytes.all.peak'] / MiB:.1f}), "
          f"pages side0/side1 {s['l2side.pages.side0.total']}/{s['l2side.pages.side1.total']}, "
          f"allocations {s['allocation.all.allocated']}, ooms {s['num_ooms']}", flush=True)
    assert s["num_ooms"] == 0
    dist.destroy_process_group()
    print(f"ALLREDUCE OK rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
