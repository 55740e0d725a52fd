# Issue 22 on one H200 (fresh machine, no network; torch, transformers from the image; random weights, no files).
# From the repo root: bash benchmarks/h200_issue22.sh  (8.5 min at most). Under $OUT: scale.jsonl (the records),
# scale.log, table.md (the README's scale table made from them), env.txt. (SCALE_ARGS=--small: a CPU smoke
# run of this file.) Back here:
#   cat <files_at>/scale.jsonl >> benchmarks/results/scale.jsonl && python benchmarks/report.py
set -u; OUT=${OUT:-/tmp/out22}; mkdir -p "$OUT"
export PYTHONPATH=$PWD AQSEARCH_CACHE=/tmp/aqcache PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc; df -h /tmp
  python -c "import torch,transformers;print(torch.__version__,transformers.__version__,torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
timeout -k 10 505 python benchmarks/scale.py --shapes 8b,smollm2,1b --out "$OUT/scale.jsonl" --budget-s 465 \
  --reserve-s 45 --run "issue22-$(date -u +%Y%m%dT%H%M)" ${SCALE_ARGS:-} > "$OUT/scale.log" 2>&1
echo "scale.py exit $?" >> "$OUT/scale.log"
python - "$OUT" > "$OUT/table.md" 2>&1 <<'PY'
import sys; sys.path.insert(0, "benchmarks")
import report; from aqsearch.bench import read_results
print(report.scale_rows(read_results(sys.argv[1] + "/scale.jsonl")))
PY
grep -v "it/s\|s/it" "$OUT/scale.log" | cut -c1-400 | tail -30; cat "$OUT/table.md"
