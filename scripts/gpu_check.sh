#!/usr/bin/env bash
# The whole GPU check in one call, from the repository root on the GPU machine:
#
#   scripts/gpu_check.sh [all|tests|bench|install|info] [PYTEST_K_EXPRESSION]
#
#   all (default)  install, nvidia-smi, python -m l2side info, pytest, benchmarks
#   tests          install + info + pytest (optionally only the tests matching the -k expression)
#   bench          install + info + benchmarks
#   install|info   just that
#
# Output goes to $OUT (default ./gpu_check_out), as few files as possible:
#   check.log      install, nvidia-smi, l2side info, the summary
#   tests.log      pytest
#   bench.log      every benchmark's output
#   allocator.csv / allocator.json (bench_allocator.py), gemm.csv, elementwise.csv (when those benchmarks exist)
#   jit_cache.tar.gz the compiled kernels (see JIT cache below)
# Environment: PYTEST_OPTS (default "-x -q -rA"), BENCH_ALLOCATOR_ARGS / BENCH_GEMM_ARGS / BENCH_ELEMENTWISE_ARGS (extra args),
#   SKIP_INSTALL=1, SKIP_GEMM=1 (no bench_gemm.py), PACKED_SHAPES / PACKED_ENERGY_S / PACKED_SET (the packed ablation's
#   shapes, NVML seconds and gemm_dev --packed-set changes), BENCHES (default "allocator,gemm,packed,elementwise";
#   also "sanitize", "floor" (scripts/floor_check.py: other read-only readers of the small-M rows' bytes), "clock"
#   (scripts/clock_bound.py: the M = 4096 rows' TFLOPS against the tensor peak at the SM clock NVML reports), "sweep": gemm_dev.py --sweep "$SWEEP_SPEC" --clean --fresh on $SWEEP_SHAPES, and "clusters":
#   scripts/cluster_sides.py, the packed ablation on $CLUSTER_SHAPES with the --packed-extra columns $CLUSTER_EXTRA
#   (default: double accumulators, with ranks by ticket, clusters of 2, both), then once per --packed-set of
#   $CLUSTER_SETS (space-separated; default: clusters of 2 with double accumulators)), DEADLINE_S (every part is killed once this many seconds have passed since the start, so
#   the parts after it still report; default none), L2SIDE_CACHE_DIR (default .jit_cache), JIT_CACHE_EXPORT_MIB
#   (at most this many MiB of kernels are exported, the newest; default 48).
# Every part runs even when an earlier one failed; the exit code is non-zero when any part failed.
#
# JIT cache: kernels compile into $L2SIDE_CACHE_DIR (default .jit_cache/ in the repository root), and at the
# end (also after failures) its compiled kernels go to $OUT/jit_cache.tar.gz: one file, since only a few
# files come back from a device run. To start the next run with them instead of minutes of nvcc:
#   scripts/jit_cache_import.sh <that run's files folder, or the .tar.gz>   (fills .jit_cache/jit/)
# and pass carry: [".jit_cache"] to the device run. Only jit/ is exported: the topology probes cached
# beside it hold for the GPU they were measured on.
set -x
set -o pipefail
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# deterministic cuBLAS for the tests that compare training runs bit for bit (pytest only: it makes every
# torch._scaled_mm call ~100 us slower on the host, which would skew bench_gemm's events column)
TEST_CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

cd "$(dirname "$0")/.." || exit 2
export L2SIDE_CACHE_DIR=${L2SIDE_CACHE_DIR:-$PWD/.jit_cache}
WHAT=${1:-all}
KEXPR=${2:-}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
PYTEST_OPTS=${PYTEST_OPTS:--x -q -rA}
BENCHES=${BENCHES:-allocator,gemm,packed,elementwise}
T_START=$(date +%s)

case "$WHAT" in
  all|tests|bench|install|info) ;;
  *) echo "usage: $0 [all|tests|bench|install|info] [pytest -k expression]"; exit 2 ;;
esac

declare -a SUMMARY=()
FAILED=0
export_jit_cache() {  # the compiled kernels, newest first, as one .tar.gz (*.tmp: a compile still writing)
  local src=$L2SIDE_CACHE_DIR/jit dest=$OUT/jit_cache.tar.gz budget=$(( ${JIT_CACHE_EXPORT_MIB:-48} << 20 ))
  local -a found=() keep=()
  local f size total=0
  rm -f "$dest"
  [ -d "$src" ] && mapfile -t found < <(cd "$src" && ls -t -- *.cubin *.ptx 2>/dev/null)
  for f in "${found[@]}"; do
    size=$(stat -c %s "$src/$f") || continue
    if [ $(( total + size )) -gt "$budget" ]; then break; fi
    keep+=("$f")
    total=$(( total + size ))
  done
  if [ "${#keep[@]}" -eq 0 ]; then echo "jit cache: nothing to export from $src"; return 0; fi
  if ! tar czf "$dest" -C "$src" -- "${keep[@]}"; then echo "jit cache: export failed"; rm -f "$dest"; return 0; fi
  echo "jit cache: exported ${#keep[@]} of ${#found[@]} files, $total bytes ($(stat -c %s "$dest") compressed) -> $dest"
  if [ "$(stat -c %s "$dest")" -gt $(( 16 << 20 )) ]; then
    echo "jit cache: over 16 MiB, a device run may not bring it back (lower JIT_CACHE_EXPORT_MIB)"
  fi
}
record() {  # record NAME RC SECONDS
  SUMMARY+=("$(printf '%-28s rc=%-4s %5ss' "$1" "$2" "$3")")
  if [ "$2" -ne 0 ]; then FAILED=1; fi
}
run_part() {  # run_part NAME LOGFILE command...: output to the terminal and appended to LOGFILE
  local name=$1 log=$2 t0 rc
  shift 2
  t0=$(date +%s)
  local -a guard=()
  if [ -n "${DEADLINE_S:-}" ]; then
    local left=$(( T_START + DEADLINE_S - t0 ))
    if [ "$left" -lt 5 ]; then
      echo "===== $name: skipped, DEADLINE_S=$DEADLINE_S reached" | tee -a "$log"
      record "$name (no time)" 1 0
      return 0
    fi
    guard=(timeout --signal=TERM --kill-after=10 "$left")
  fi
  echo "===== $name: $* ($(date -u +%FT%TZ))" | tee -a "$log"
  "${guard[@]}" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "===== $name: exit code $rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
  record "$name" "$rc" "$(( $(date +%s) - t0 ))"
  return 0
}

CHECK_LOG=$OUT/check.log
: > "$CHECK_LOG"

# ---- install (no internet on the GPU machine: torch, pybind11, cuda-bindings are preinstalled)
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  run_part install "$CHECK_LOG" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
[ "$WHAT" = install ] && { printf '%s\n' "${SUMMARY[@]}" | tee -a "$CHECK_LOG"; exit $FAILED; }

# ---- the machine and the topology
run_part nvidia-smi "$CHECK_LOG" nvidia-smi
run_part versions "$CHECK_LOG" "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); import l2side; print('l2side', l2side.__version__, l2side.library_path())"
run_part l2side-info "$CHECK_LOG" "$PYTHON" -m l2side info --all-devices

# ---- tests
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  : > "$OUT/tests.log"
  if [ -n "$KEXPR" ]; then
    # shellcheck disable=SC2086
    run_part "pytest -k '$KEXPR'" "$OUT/tests.log" env CUBLAS_WORKSPACE_CONFIG="$TEST_CUBLAS_WORKSPACE_CONFIG" "$PYTHON" -m pytest $PYTEST_OPTS --durations=15 tests -k "$KEXPR"
  else
    # shellcheck disable=SC2086
    run_part pytest "$OUT/tests.log" env CUBLAS_WORKSPACE_CONFIG="$TEST_CUBLAS_WORKSPACE_CONFIG" "$PYTHON" -m pytest $PYTEST_OPTS --durations=15 tests
  fi
fi

# ---- benchmarks
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  : > "$OUT/bench.log"
  if [[ ",$BENCHES," == *,allocator,* ]]; then
    # shellcheck disable=SC2086
    run_part bench_allocator "$OUT/bench.log" "$PYTHON" benchmarks/bench_allocator.py --out "$OUT" ${BENCH_ALLOCATOR_ARGS:-}
  fi
  if [ "${SKIP_GEMM:-0}" = 1 ] || [[ ",$BENCHES," != *,gemm,* ]]; then
    echo "bench_gemm skipped (SKIP_GEMM / BENCHES)" | tee -a "$OUT/bench.log"
  elif [ -f benchmarks/bench_gemm.py ]; then
    # shellcheck disable=SC2086
    run_part bench_gemm "$OUT/bench.log" "$PYTHON" benchmarks/bench_gemm.py --csv "$OUT/gemm.csv" ${BENCH_GEMM_ARGS:-}
  else
    echo "benchmarks/bench_gemm.py not there yet: skipped" | tee -a "$OUT/bench.log"
  fi
  if [[ ",$BENCHES," == *,packed,* ]]; then  # side-aware packed B: near / ignore / far vs unpacked (issue 4)
    run_part gemm_packed_ablation "$OUT/bench.log" "$PYTHON" scripts/gemm_dev.py --packed auto \
      --energy "${PACKED_ENERGY_S:-0.3}" ${PACKED_SET:+--packed-set "$PACKED_SET"} \
      --shapes "${PACKED_SHAPES:-64,24576,1536;64,7168,16384;128,7168,16384;128,7168,2048;4096,2112,7168;4096,7168,16384;4096,24576,1536}"
  fi
  if [[ ",$BENCHES," == *,clusters,* ]]; then  # packed B in clusters of 2, ranks by ticket (issue 4, perf-notes s. 15)
    run_part cluster_sides "$OUT/bench.log" "$PYTHON" scripts/cluster_sides.py --rounds 3
    # the variants as extra near columns of one process (same inputs), then each set's own side-mode ablation
    run_part gemm_packed_variants "$OUT/bench.log" "$PYTHON" scripts/gemm_dev.py --packed 128 --energy 0.3 \
      --shapes "${CLUSTER_SHAPES:-4096,7168,16384}" \
      --packed-extra "${CLUSTER_EXTRA:-da:double_acc=1;tkda:packed_tickets=1,double_acc=1;cl2:cluster_n=2;cl2da:cluster_n=2,double_acc=1}"
    for set in ${CLUSTER_SETS:-cluster_n=2,double_acc=1}; do
      run_part "gemm_packed_ablation $set" "$OUT/bench.log" "$PYTHON" scripts/gemm_dev.py --packed 128 --energy 0.3 \
        --packed-set "$set" --shapes "${CLUSTER_SHAPES:-4096,7168,16384}"
    done
  fi
  if [[ ",$BENCHES," == *,sweep,* ]]; then  # GEMM block-config A/B (kernel work): SWEEP_SHAPES, SWEEP_SPEC
    run_part gemm_sweep "$OUT/bench.log" "$PYTHON" scripts/gemm_dev.py --sweep "${SWEEP_SPEC:-auto}" --clean --fresh \
      --shapes "${SWEEP_SHAPES:-64,2112,7168;64,4096,7168;128,2112,7168;128,4096,7168}"
  fi
  if [[ ",$BENCHES," == *,floor,* ]]; then  # how tight bench_gemm's read floor is: other readers of the same bytes
    run_part floor_check "$OUT/bench.log" "$PYTHON" scripts/floor_check.py --csv "$OUT/floor.csv"
  fi
  if [[ ",$BENCHES," == *,clock,* ]]; then  # are the compute-bound rows bounded by the power cap's clock?
    run_part clock_bound "$OUT/bench.log" "$PYTHON" scripts/clock_bound.py
  fi
  if [[ ",$BENCHES," == *,sanitize,* ]]; then  # compute-sanitizer memcheck of the GEMM (issue 3)
    run_part gemm_sanitize "$OUT/bench.log" scripts/gemm_sanitize.sh
  fi
  if [[ ",$BENCHES," != *,elementwise,* ]]; then
    echo "bench_elementwise skipped (BENCHES)" | tee -a "$OUT/bench.log"
  elif [ -f benchmarks/bench_elementwise.py ]; then
    # shellcheck disable=SC2086
    run_part bench_elementwise "$OUT/bench.log" "$PYTHON" benchmarks/bench_elementwise.py --csv "$OUT/elementwise.csv" ${BENCH_ELEMENTWISE_ARGS:-}
  else
    echo "benchmarks/bench_elementwise.py not there yet: skipped" | tee -a "$OUT/bench.log"
  fi
fi

set +x
{
  echo
  export_jit_cache
  echo "===== gpu_check summary ($WHAT${KEXPR:+, -k $KEXPR}) -> $OUT"
  printf '%s\n' "${SUMMARY[@]}"
  if [ -f "$OUT/tests.log" ]; then grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)' "$OUT/tests.log" | tail -25; fi
  if [ "$FAILED" -ne 0 ]; then echo "RESULT: some part failed"; else echo "RESULT: every part passed"; fi
} | tee -a "$CHECK_LOG"
exit $FAILED
