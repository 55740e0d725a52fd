#!/usr/bin/env bash
# Issue 9 on H200s as one device call: the whole bank pipeline (benchmarks/bank.py --full), one bank
# worker per GPU. Same set-up as h200_issue3.sh: expects the GGUF's first half at /tmp/smol.part00 and
# carries .gguf/smol.part01, .whl (gguf, optuna + deps) and .data (the two WikiText-2 files).
#   bash benchmarks/h200_bank.sh [extra args for benchmarks/bank.py]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false AQSEARCH_CACHE=/tmp/aqcache
OUT=${OUT:-/tmp/aq_out}; mkdir -p "$OUT"
cat /tmp/smol.part00 .gguf/smol.part01 > /tmp/smol.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv > "$OUT/smi.txt" 2>&1
# the bank stays in /tmp/bankwork while the machine is warm: a second call reuses every finished candidate
timeout 590 python3 benchmarks/bank.py --full --model /tmp/smol.gguf --data-dir .data --work /tmp/bankwork \
  --out "$OUT/bank.jsonl" "$@" 2> "$OUT/bank.log"
echo "rc=$?"; grep -E "^bench:|Error|error" "$OUT/bank.log" | tail -20
