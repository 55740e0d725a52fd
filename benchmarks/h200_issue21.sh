#!/usr/bin/env bash
# Issue 21 on one H200 or H100 (one process on the GPU at a time), 8 files to $OUT:
# run.log (machine, versions, GPU tests, the probe's table, each step's exit code), matmul.log + summary.txt +
# kernels.jsonl + tuned.py + decode.jsonl (benchmarks/matmul.py --all at MS (default 1,1024,4096; the decode's
# fused q/k/v and gate/up shapes at M = 1 too), then
# benchmarks/decode.py --llama8b with a kernel profile of one captured step), probe.jsonl (benchmarks/pk_profile.py:
# M = 1 eager / CUDA-graph / kernel-only times, ours and cuBLAS, kernel names), ncu.txt (Nsight Compute on
# exactly the probe's launches: cudaProfilerStart/Stop ranges, no kernel-name filter); with T_OVER > 0 first
# overhead.jsonl + overhead.txt (benchmarks/gemv_overhead.py: time against bytes, PDL modes); with T_CEIL > 0
# ceiling.jsonl + ceiling.txt (benchmarks/ceiling.py: the Triton reader and fp16 GEMM ceilings). A T_* of 0 skips its step.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/aq21}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 AQSEARCH_CACHE=/tmp/aqc TRITON_DEFAULT_FP_FUSION=1 TOKENIZERS_PARALLELISM=false
L="$OUT/run.log"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv; git log --oneline -1 2>/dev/null
  python -c "import torch,triton,transformers as t;print(torch.__version__,triton.__version__,t.__version__)"; } >"$L" 2>&1
[ "${T_TEST:-60}" -gt 0 ] && timeout ${T_TEST:-60} python -m pytest -q -x -p no:cacheprovider tests/kernels/test_gemv_pk.py tests/kernels/test_kernels.py \
  -k "(kn or gemv_pk or pdl) and not budget" >>"$L" 2>&1; echo "pytest rc=$?" >>"$L"
[ "${T_TEST:-60}" -gt 0 ] && timeout ${T_TEST:-60} python -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused.py >>"$L" 2>&1
echo "pytest fused rc=$?" >>"$L"
[ "${T_OVER:-0}" -gt 0 ] && timeout ${T_OVER} python benchmarks/gemv_overhead.py --out "$OUT/overhead.jsonl" \
  --run "issue21b $(date -u +%m%d-%H%M)" >"$OUT/overhead.txt" 2>&1; echo "overhead rc=$?" >>"$L"
AQSEARCH_DECODE_PROFILE=1 timeout $((${DEADLINE:-235} + 15)) python benchmarks/matmul.py --all --out "$OUT/r" \
  --ms ${MS:-1,1024,4096} --shapes 8192x8192,4096x14336,14336x4096,4096x4096 --m1-shapes 4096x6144,4096x28672 \
  --deadline-s ${DEADLINE:-235} --decode-s ${DECODE_S:-95} ${DECODE_SCHEMES:+--decode-schemes $DECODE_SCHEMES} \
  --run "issue21b $(date -u +%m%d-%H%M)" >"$OUT/summary.txt" 2>"$OUT/matmul.log"; echo "matmul rc=$?" >>"$L"
for f in kernels.jsonl decode.jsonl tuned.py; do [ -f "$OUT/r/$f" ] && mv "$OUT/r/$f" "$OUT/$f"; done
rm -rf "$OUT/r"
[ "${T_CEIL:-0}" -gt 0 ] && timeout ${T_CEIL} python benchmarks/ceiling.py --m1 --gemm --out "$OUT/ceiling.jsonl" \
  --run "ceiling $(date -u +%m%d-%H%M)" >"$OUT/ceiling.txt" 2>&1; echo "ceiling rc=$?" >>"$L"
[ "${T_PROBE:-60}" -gt 0 ] && timeout ${T_PROBE:-60} python benchmarks/pk_profile.py --shapes 8192x8192,4096x14336 --bits 2,3,4,8 --out "$OUT/probe.jsonl" \
  --run issue21b >/dev/null 2>>"$L"; echo "probe rc=$?" >>"$L"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ "${T_NCU:-75}" -gt 0 ]; then
  timeout ${T_NCU:-75} "$NCU" --profile-from-start off --clock-control none --cache-control all --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
    --section SchedulerStats python benchmarks/pk_profile.py --shapes 8192x8192 --bits 2,3,4,8 --ncu >"$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? ($NCU)" >>"$L"
else
  echo "no ncu on this machine" >>"$L"
fi
cat "$L"; cat "$OUT/overhead.txt" 2>/dev/null; grep -v "^warm\|^  skip" "$OUT/matmul.log" | tail -5; head -70 "$OUT/summary.txt"; grep -c "" "$OUT/ncu.txt"; ls -la "$OUT"
