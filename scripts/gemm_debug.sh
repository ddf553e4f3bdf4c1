#!/usr/bin/env bash
# Kernel-work diagnostics on the GPU machine: sanitizer on a tiny shape, the no-setmaxnreg variant, SASS.
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_check_out}; mkdir -p "$OUT"
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || tail -20 "$OUT/install.log"
SHAPES=${SHAPES:-"1,16,16;129,200,272;4096,7168,16384"}
echo "== param layout"; timeout 60 python3 -c "
import torch, l2side
from l2side import fp8_gemm as g
dev = g._device(0); c = g.gemm_config(1, 16, 16); k = g._kernel(dev, 16, 16, c); print(k.param_layout)"
echo "== plain"; timeout 60 python3 scripts/gemm_dev.py --no-time --shapes "$SHAPES" 2>&1 | tail -8
echo "== sanitizer"; timeout 120 compute-sanitizer --tool memcheck python3 scripts/gemm_dev.py --no-time --shapes "1,16,16" 2>&1 | grep -v "^=========     Host Frame" | head -40
echo "== no setmaxnreg"; L2SIDE_GEMM_NVCC_OPTIONS=-DL2SIDE_NO_SETMAXNREG timeout 60 python3 scripts/gemm_dev.py --no-time --shapes "$SHAPES" 2>&1 | tail -8
for f in ~/.cache/l2side/jit/fp8_gemm_n16_k16-*.cubin; do echo "== $f"; cuobjdump -sass "$f" > "$OUT/$(basename $f).sass"; grep -cE "HGMMA" "$OUT/$(basename $f).sass"; done
