#!/usr/bin/env bash
# ncu profile of one l2side.gemm shape (kernel work): scripts/gemm_profile.sh M,N,K [extra gemm_dev args]
# NCU_COUNT=n profiles the first n GEMM launches (e.g. 2 with --packed: the unpacked kernel, then near).
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_check_out}; mkdir -p "$OUT"
SHAPE=${1:-4096,7168,16384}; shift
ncu --clock-control none -k regex:l2side_fp8_gemm -c ${NCU_COUNT:-1} -s 0 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy \
    python3 scripts/gemm_dev.py --no-time --shapes "$SHAPE" "$@" > "$OUT/ncu_${SHAPE//,/_}.txt" 2>&1
grep -E "Duration|Throughput|Pipe|Stall|Issue|Eligible|Active|Hit Rate|Bandwidth|Busy|Warp Cycles|No Eligible" \
    "$OUT/ncu_${SHAPE//,/_}.txt" | head -80
