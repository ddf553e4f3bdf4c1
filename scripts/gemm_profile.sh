#!/usr/bin/env bash
# ncu profile of one l2side.gemm shape (kernel work): scripts/gemm_profile.sh M,N,K [extra gemm_dev args]
# NCU_COUNT=n profiles the first n GEMM launches (e.g. 3 with --packed: the unpacked kernel twice, then near).
# NCU_STALLS=1 adds the warp stall reasons (per issued instruction) and the top stalling SASS lines.
# NCU_SOURCE=1 also keeps the report and prints the SASS lines with the most warp-stall samples (PC sampling).
# NCU_METRICS=m1,m2,... collects just those metrics (no sections) and prints them per launch, e.g. the L2 traffic
#   per launch: lts__t_sectors.sum,lts__t_sectors.max,lts__t_requests.sum,dram__bytes_read.sum
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_check_out}; mkdir -p "$OUT"
SHAPE=${1:-4096,7168,16384}; shift
EXTRA=()
if [ "${NCU_STALLS:-0}" = 1 ]; then
  EXTRA=(--section SourceCounters --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio")
fi
LOG="$OUT/ncu_${SHAPE//,/_}${NCU_TAG:+_$NCU_TAG}.txt"
REP=()
if [ "${NCU_SOURCE:-0}" = 1 ]; then
  REP=(-f -o "/tmp/ncu_${SHAPE//,/_}${NCU_TAG:+_$NCU_TAG}" --section WarpStateStats --section SourceCounters
       --import-source no)
fi
if [ -n "${NCU_METRICS:-}" ]; then
  ncu --clock-control none -k regex:l2side_fp8_gemm -c "${NCU_COUNT:-1}" -s 0 --metrics "$NCU_METRICS" \
      python3 scripts/gemm_dev.py --no-time --shapes "$SHAPE" "$@" > "$LOG" 2>&1
  grep -E "l2side_fp8_gemm \(|${NCU_METRICS//,/|}|ERROR|rror" "$LOG" | head -${NCU_LINES:-80}
  exit 0
fi
ncu --clock-control none -k regex:l2side_fp8_gemm -c "${NCU_COUNT:-1}" -s 0 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy "${EXTRA[@]}" "${REP[@]}" \
    python3 scripts/gemm_dev.py --no-time --shapes "$SHAPE" "$@" > "$LOG" 2>&1
if [ "${NCU_SOURCE:-0}" = 1 ]; then
  ncu -i "/tmp/ncu_${SHAPE//,/_}${NCU_TAG:+_$NCU_TAG}.ncu-rep" --page details >> "$LOG" 2>&1
fi
grep -E "l2side_fp8_gemm \(|Duration|Throughput|Pipe|Stall|Issue|Eligible|Active|Hit Rate|Bandwidth|Busy|Warp Cycles|No Eligible|issue_stalled" \
    "$LOG" | head -${NCU_LINES:-80}
if [ "${NCU_SOURCE:-0}" = 1 ]; then
  ncu -i "/tmp/ncu_${SHAPE//,/_}${NCU_TAG:+_$NCU_TAG}.ncu-rep" --page source --csv --print-source sass \
      > "/tmp/ncu_source.csv" 2>&1
  python3 scripts/ncu_source_top.py /tmp/ncu_source.csv "${NCU_TOP:-40}" | tee -a "$LOG"
fi
