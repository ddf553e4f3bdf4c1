"""Where clusters of 2 land: for a persistent grid of one CTA per SM launched in clusters of 2 (as the packed-B
cluster experiment launches), the %smid of both CTAs of each cluster, whether they share an L2 side (the probe's
sm_side) and whether the cluster index's parity names that side. Kernel work (docs/perf-notes.md, packed B
session 15): a cluster can only be given its own side's queue if its two SMs are on one side.

    python scripts/cluster_sides.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import collections

SOURCE = r"""
extern "C" __global__ void where_am_i(unsigned* out) {
  extern __shared__ unsigned char smem[];  // (asked large: one CTA per SM)
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  const long long start = clock64();
  while (clock64() - start < 200000) {  // (~0.1 ms: every cluster of the grid is resident at once)
  }
  if (threadIdx.x == 0) { smem[0] = 1; out[blockIdx.x] = sm; }
}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import torch
    from l2side import jit, topology
    if not torch.cuda.is_available():
        print("cluster_sides: no CUDA GPU")
        return 0
    from l2side import _native
    topo = topology()
    kernel = jit.load_kernel(SOURCE, "where_am_i", name="cluster_sides")
    smem = 200 * 1024  # one CTA per SM, as the GEMM
    kernel.set_max_dynamic_smem(smem)
    fit = _native.max_active_clusters(kernel.device, kernel.function, 128, smem, 2)
    grid = min(topo.num_sms - topo.num_sms % 2, 2 * fit)  # (as the packed GEMM in clusters launches)
    print(f"{topo}\nclusters of 2 that fit at once: {fit}; grid {grid} CTAs")
    for r in range(args.rounds):
        out = torch.full((grid,), -1, dtype=torch.int32, device="cuda")
        kernel.launch(grid, 128, jit.Params().ptr(out.data_ptr()), smem=smem, cluster=2)
        torch.cuda.synchronize()
        sms = [v & 0xFFFFFFFF for v in out.tolist()]
        same = parity = 0
        pairs = collections.Counter()
        for c in range(grid // 2):
            s0, s1 = topo.sm_side[sms[2 * c]], topo.sm_side[sms[2 * c + 1]]
            same += s0 == s1
            parity += s0 == (c & 1)
            pairs[sms[2 * c + 1] - sms[2 * c]] += 1
        print(f"round {r}: {grid // 2} clusters, both CTAs on one side: {same}, side == cluster parity: {parity}, "
              f"distinct SMs {len(set(sms))}; SM id differences in a cluster {dict(pairs.most_common(4))}")
        if r == 0:
            print("  clusters (sm0, sm1, side0, side1):",
                  " ".join(f"({sms[2*c]},{sms[2*c+1]},{topo.sm_side[sms[2*c]]}{topo.sm_side[sms[2*c+1]]})"
                           for c in range(grid // 2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
