#!/usr/bin/env bash
# Issue 3 (and the uniform table) on the H200, as one device call: every job a process, side by side on
# the one GPU (SmolLM2 is far too small to fill it). Expects the GGUF's first half at /tmp/smol.part00
# (copied there by the call before) and carries: .gguf/smol.part01, .whl (gguf, optuna + deps), .data.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
cat /tmp/smol.part00 .gguf/smol.part01 > /tmp/smol.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed; using PYTHONPATH"
export AQSEARCH_CACHE=/tmp/aqcache
M=/tmp/smol.gguf; D=.data; R=/tmp/r; J=/tmp/j; mkdir -p $R $J
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "from aqsearch.models import load_model; load_model('$M')" || exit 1
LIMIT=${LIMIT:-520}
FULL="--model $M --data-dir $D --calib-windows 128 --calib-seqlen 2048 --steps 200 --eval-tokens all --seqlen 2048 --journal-dir $J --resume"
run() { name=$1; shift; timeout $LIMIT "$@" > $R/$name.log 2>&1; echo "$name exit $?" >> $R/status; }
run collect40 python3 benchmarks/curves.py collect --device cuda --model $M --data-dir $D --steps 40 --windows 32 --seqlen 256 --per-block 4 --seed 10 --out $R/curves40.jsonl &
run collect200 python3 benchmarks/curves.py collect --device cuda --model $M --data-dir $D --steps 200 --windows 64 --seqlen 512 --batch 8 --per-block 2 --seed 11 --out $R/curves200.jsonl &
run uniform python3 benchmarks/uniform.py --model $M --calib-data $D/wikitext-2-valid.tokens.txt --eval-data $D/wikitext-2-raw-test.txt --eval-tokens all --seqlen 2048 --device cuda --out $R/uniform.jsonl &
for s in w4g64 w3g64; do run trained.$s python3 benchmarks/progressive.py trained --scheme $s $FULL --out $R/prog.trained.$s.jsonl & done
for b in 4.5bpw 3.5bpw; do
  run plan.$b python3 benchmarks/progressive.py plan --budget $b $FULL --out $R/prog.plan.$b.jsonl &
  run planfull.$b python3 benchmarks/progressive.py plan --budget $b $FULL --no-early-stop --out $R/prog.planfull.$b.jsonl &
  run u.$b python3 benchmarks/progressive.py uniform --budget $b $FULL --top 8 --out $R/prog.uniform.$b.jsonl &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cat $R/status
cp -r $J $R/journals
cd /tmp && tar czf $OUT/results.tgz r && echo packed
