#!/bin/bash
# One device call on the H200: install, compile the benchmark's kernels (12 processes) while the GPU
# kernel tests run, then the kernel benchmark. Logs and JSON lines go to $OUT (they come back); a table
# is printed last. The full grid needs about 6 minutes on a started machine (2-3 compiling, 2-3
# measuring): 240 s was too little in the last run, which stopped after three of the four shapes.
#   bash benchmarks/h200_call.sh [quick|full|bench] [extra args for benchmarks/matmul.py]
cd "$(dirname "$0")/.."
MODE=${1:-full}; shift || true
OUT=${OUT:-/tmp/aq_out}; mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 AQSEARCH_CACHE=/tmp/aqcache
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >"$OUT/pip.log" 2>&1 \
  || { python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/site . >>"$OUT/pip.log" 2>&1 \
       && export PYTHONPATH=/tmp/site; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
ARGS="--out $OUT/kernels.jsonl --write-tuned $OUT/_tuned.py"
[ "$MODE" = "quick" ] && ARGS="$ARGS --quick"
if [ "$MODE" != "bench" ]; then
  timeout 240 python3 -m pytest tests/kernels/test_kernels.py tests/kernels/test_kernels_gpu.py -q -n 4 -x \
    -p no:cacheprovider -k "not every_candidate and not symmetric_large" >"$OUT/pytest.log" 2>&1 &
  PYT=$!
fi
timeout 300 python3 benchmarks/matmul.py $ARGS --workers 12 --precompile-only "$@" 2>"$OUT/precompile.log"
if [ -n "$PYT" ]; then wait $PYT; echo "pytest rc=$?"; tail -3 "$OUT/pytest.log"; fi
timeout 300 python3 benchmarks/matmul.py $ARGS "$@" 2>"$OUT/bench.log" >"$OUT/summary.txt"
echo "bench rc=$?"; grep -v "^warm" "$OUT/bench.log" | tail -2; head -70 "$OUT/summary.txt"
