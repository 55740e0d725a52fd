#!/usr/bin/env bash
# Issue 21 on one H200 (one process on the GPU at a time; timeouts sum to 495 s), 8 files to $OUT:
# env.txt, pytest.log (pk GEMV + fused kernels on the GPU: the asm path against the reference),
# matmul.log + kernels.jsonl + decode.jsonl + summary.txt + tuned.py (benchmarks/matmul.py --all, then
# benchmarks/decode.py --llama8b, fused decode step), ncu.txt (Nsight Compute on the w4 M=1 GEMV, if ncu runs).
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/aq21}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AQSEARCH_CACHE=/tmp/aqc TRITON_DEFAULT_FP_FUSION=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv; git log --oneline -1
  python -c "import torch,triton,transformers as t;print(torch.__version__,triton.__version__,t.__version__)"; } >"$OUT/env.txt" 2>&1
timeout 50 python -m pytest -q -x -p no:cacheprovider tests/kernels/test_gemv_pk.py tests/kernels/test_fused.py \
  -k "not budget and not launch_count" >"$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >>"$OUT/pytest.log"
timeout 400 python benchmarks/matmul.py --all --out "$OUT/r" --ms 1,8,1024,4096 --deadline-s 380 --decode-s 180 \
  --run "issue21 $(git rev-parse --short HEAD)" >"$OUT/summary.txt" 2>"$OUT/matmul.log"; echo "matmul rc=$?" >>"$OUT/matmul.log"
for f in kernels.jsonl decode.jsonl tuned.py; do [ -f "$OUT/r/$f" ] && mv "$OUT/r/$f" "$OUT/$f"; done
rm -rf "$OUT/r"
if command -v ncu >/dev/null; then
  timeout 40 ncu --kernel-name regex:gemv_pk --launch-skip 3 --launch-count 1 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section LaunchStats python benchmarks/pk_profile.py \
    --bits 4 --k 8192 --n 8192 >"$OUT/ncu.txt" 2>&1
else
  timeout 40 python benchmarks/pk_profile.py --bits 4 --k 8192 --n 8192 >"$OUT/ncu.txt" 2>&1; echo "(no ncu)" >>"$OUT/ncu.txt"
fi
tail -3 "$OUT/pytest.log"; grep -v "^warm\|^  skip" "$OUT/matmul.log" | tail -4; head -60 "$OUT/summary.txt"; ls "$OUT"
