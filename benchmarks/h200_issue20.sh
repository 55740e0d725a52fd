# Issue 20 on one GPU (a fresh machine, no network; torch, transformers, scikit-learn from the image). Three calls,
# back to back so that the machine stays warm (30 s) and keeps /tmp:
#   1. STAGE=part  carry .gguf (its first half only):      copies the GGUF's first half to /tmp/model
#   2. STAGE=hull  carry .gguf .whl .data:                 the second half, the wheels, the bank and the uniform hull
#   3. STAGE=front (no carry):                             the score study, racing, the stopped plans polished anyway
# .gguf holds SmolLM2's GGUF split in two (split -n 2), .whl optuna + alembic + sqlalchemy + colorlog + mako + gguf,
# .data the two WikiText-2 files. Under $OUT: front.jsonl (the record), front.png, the logs, env.txt.
set -u; OUT=${OUT:-/tmp/out20}; mkdir -p "$OUT" /tmp/model
export PYTHONPATH=/tmp/site:$PWD AQSEARCH_CACHE=/tmp/aqcache PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-50}; BUDGETS=${BUDGETS:-2.4,2.5625,2.8,3.0,3.296875,3.45,3.8,4.0,4.3125}
ARGS="--model /tmp/model/smollm2.gguf --data-dir .data --steps $STEPS --budgets $BUDGETS --promote 2 --workdir /tmp/fb ${EXTRA:-}"
case "${STAGE:?}" in
part) cp .gguf/smollm2.gguf.part00 /tmp/model/ && ls -la /tmp/model ;;
hull)
  cat /tmp/model/smollm2.gguf.part00 .gguf/smollm2.gguf.part01 > /tmp/model/smollm2.gguf || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g
    python3 -c "import torch,transformers,optuna;print(torch.__version__,transformers.__version__,optuna.__version__,torch.cuda.get_device_name(0))"
  } > "$OUT/env.txt" 2>&1
  timeout -k 10 540 python3 benchmarks/front.py $ARGS --stage hull --out "$OUT/front.jsonl" --plot "$OUT/front.png" \
    > "$OUT/hull.log" 2>&1; echo "hull exit $?" >> "$OUT/hull.log"; grep -a "bench:\|aqsearch:" "$OUT/hull.log" | tail -20 ;;
front)
  timeout -k 10 560 python3 benchmarks/front.py $ARGS --stage front --out "$OUT/front.jsonl" --plot "$OUT/front.png" \
    > "$OUT/front.log" 2>&1; echo "front exit $?" >> "$OUT/front.log"; grep -a "bench:\|aqsearch:" "$OUT/front.log" | tail -40 ;;
esac
