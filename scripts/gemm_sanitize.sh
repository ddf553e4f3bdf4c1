#!/usr/bin/env bash
# compute-sanitizer memcheck of l2side.gemm on small shapes (unpacked and packed B; the last two packed shapes run
# split-K in 2, the second with K not a multiple of 128)
export PYTHONUNBUFFERED=1
compute-sanitizer --tool memcheck --leak-check no python3 scripts/gemm_dev.py --no-time \
    --shapes "129,200,272;65,129,144;64,2112,1024" 2>&1 | grep -vE "^=========     (Host|Device) Frame" | tail -4
compute-sanitizer --tool memcheck --leak-check no python3 scripts/gemm_dev.py --no-time --packed 64 \
    --shapes "129,200,272;64,1024,512;64,1024,4096;100,1000,4112" 2>&1 | grep -vE "^=========     (Host|Device) Frame" | tail -4
