"""Streaming rate of each shared-memory load path the FP8 GEMM uses or could use, one producer thread per SM
(scripts/load_paths.cu has the modes): TMA tensor tiles vs 4 KiB / 16 KiB bulk copies vs side-aware 4 KiB
chunks (near / far / side ignored), from an L2-resident buffer and from DRAM. Kernel work for issue 4 (the
packed-B GEMM is ~1.45x slower than the TMA one at M = 4096: is it the bulk copies, or the chunk pattern?).

    python scripts/load_paths.py [--sizes-mib 32,1024] [--reps 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODES = ["TMA tile 128x128", "4 x 4 KiB bulk", "1 x 16 KiB bulk", "4 x 4 KiB near side", "4 x 4 KiB far side",
         "4 x 4 KiB side ignored", "4 x 4 KiB 2 near + 2 far", "TMA tile, same tiles on every SM"]
MAX_STAGES, STAGE_BYTES = 13, 16384
ROW_BYTES = 16384                      # the matrix the TMA mode reads: [rows, 16384] bytes (like K = 16384)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", default="32,1024", help="buffer sizes (the side modes use half of each)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--stages-per-cta", type=int, default=2048, help="16 KiB stages each CTA loads per launch")
    p.add_argument("--in-flight", default="8", help="stages in flight per SM, a list (Little's law: does the rate "
                   f"grow with the bytes in flight?), each <= {MAX_STAGES}")
    p.add_argument("--modes", default="", help="indices into the mode list (default all)")
    p.add_argument("--box-rows", default="128", help="TMA modes: rows per box, a list (each tile is 128 / this "
                   "many boxes; 8..128, powers of two): is there a cost per TMA instruction?")
    p.add_argument("--ctas", default="", help="CTAs per launch, a list (default one per SM): does the rate per SM "
                   "stay when fewer SMs stream (a per-SM limit) or grow (a shared one: L2, the crossbar)?")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("load_paths: no CUDA GPU; nothing to measure")
        return 0
    import l2side
    from l2side import jit
    from l2side._timing import median_event_ms
    from l2side.sides import sm_side_bits
    topo = l2side.topology(0)
    print(topo)
    source = (Path(__file__).with_name("load_paths.cu")).read_text()
    kernel = jit.load_kernel(source, "l2side_load_paths", name="load_paths", device=0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bits = sm_side_bits(topo.sm_side)
    smem = MAX_STAGES * STAGE_BYTES + MAX_STAGES * 8 + 1024
    in_flight = [int(v) for v in args.in_flight.split(",")]
    assert all(1 <= v <= MAX_STAGES for v in in_flight), f"--in-flight values must be 1..{MAX_STAGES}"
    modes = [int(v) for v in args.modes.split(",")] if args.modes else list(range(len(MODES)))
    cta_counts = [int(v) for v in args.ctas.split(",")] if args.ctas else [sms]
    box_rows = [int(v) for v in args.box_rows.split(",")]
    assert all(v in (8, 16, 32, 64, 128) for v in box_rows), "--box-rows values must be 8, 16, 32, 64 or 128"
    assert all(1 <= c <= sms for c in cta_counts), f"--ctas values must be 1..{sms} (one CTA per SM)"
    for mib in (int(v) for v in args.sizes_mib.split(",")):
        nbytes = mib << 20
        buf = l2side.empty(nbytes, dtype=torch.uint8, device="cuda")
        buf.random_(0, 256)
        base = buf.data_ptr()
        assert base % 8192 == 0, "side modes need 8 KiB-aligned chunk pairs"
        rows = nbytes // ROW_BYTES
        tmaps = {r: jit.tensor_map(base, "u8", [ROW_BYTES, rows], [ROW_BYTES], [128, r]) for r in box_rows}
        print(f"\n{mib} MiB buffer ({'L2-resident' if nbytes <= (40 << 20) else 'DRAM'}), {sms} CTAs x "
              f"{args.stages_per_cta} stages of 16 KiB")
        for mode, stages, ctas, box in ((m, s, c, b) for m in modes for s in in_flight for c in cta_counts
                                        for b in (box_rows if m in (0, 7) else box_rows[:1])):
            label = (f"{MODES[mode]}, {stages:2d} in flight" + (f", {ctas} CTAs" if ctas != sms else "")
                     + (f", {box}-row boxes" if mode in (0, 7) and box != 128 else ""))
            if 3 <= mode <= 6 and not topo.split:
                continue
            units = nbytes // STAGE_BYTES // (2 if 3 <= mode <= 6 else 1)   # side modes read one chunk of each pair
            params = (jit.Params().tensor_map(tmaps[box]).ptr(base).u64(topo.side_mask).u64(bits[0]).u64(bits[1])
                      .u64(bits[2]).u64(bits[3]).u32(mode).u32(args.stages_per_cta).u32(units)
                      .u32(ROW_BYTES // 128).u32(stages).u32(box))
            ms = median_event_ms(lambda: kernel.launch(ctas, 128, params, smem=smem), args.reps)
            gbs = ctas * args.stages_per_cta * STAGE_BYTES / ms / 1e6
            print(f"   {label:48s} {ms * 1e3:9.1f} us  {gbs:8.0f} GB/s  {gbs / ctas:6.1f} GB/s per SM", flush=True)
        del buf
    return 0


if __name__ == "__main__":
    sys.exit(main())
