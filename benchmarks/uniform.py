"""Every uniform round-to-nearest scheme on SmolLM2: bytes, bpw, held-out KL, top-1, perplexity ratio.

Calibrates on WikiText-2 validation (recorded; round-to-nearest does not use it) and evaluates on the
raw test set. CPU: a few thousand tokens; GPU: the whole test set in 2048-token windows.

    python benchmarks/uniform.py --eval-tokens 4096 --seqlen 512            # CPU
    python benchmarks/uniform.py --eval-tokens all --seqlen 2048 --device cuda  # H200

One JSON line a scheme goes to benchmarks/results/uniform.jsonl; benchmarks/report.py turns them into
the README's table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from aqsearch.bench import append_result
from aqsearch.config import Plan, QuantScheme
from aqsearch.data import calib_eval_sets
from aqsearch.models import load_model
from aqsearch.quality import build_reference, evaluate

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
SCHEMES = "w8g128,w4g32,w4g64,w4g128,w4g64s,w3g32,w3g64,w2g32,w2g64"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-data", default=str(DATA / "wikitext-2-valid.tokens.txt"))
    ap.add_argument("--eval-data", default=str(DATA / "wikitext-2-raw-test.txt"))
    ap.add_argument("--eval-tokens", default="4096", help="a number, or 'all' for every whole window")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--out", default=str(HERE / "results" / "uniform.jsonl"))
    args = ap.parse_args()

    t0 = time.time()
    loaded = load_model(args.model, device=args.device)
    load_s = time.time() - t0
    n_tok = None if args.eval_tokens == "all" else int(args.eval_tokens)
    _, ev = calib_eval_sets(loaded, args.calib_data, args.eval_data, eval_tokens=n_tok, seqlen=args.seqlen)
    bs = args.batch_size or (8 if args.device.startswith("cuda") else 1)
    ref = build_reference(loaded.model, ev, batch_size=bs)
    settings = {"model": args.model, "device": args.device, "seqlen": args.seqlen, "eval_windows": ev.windows.shape[0],
                "eval_data": ev.describe(), "calib_data": args.calib_data, "batch_size": bs,
                "reference_seconds": ref.seconds, "load_seconds": load_s}
    print(f"{'scheme':<9}{'bpw':>7}{'bytes':>12}{'KL mean':>9}{'KL p99':>8}{'top-1':>7}{'ppl x':>8}{'s':>6}", file=sys.stderr)
    for s in args.schemes.split(","):
        m = evaluate(loaded.model, ref, Plan.uniform(QuantScheme.parse(s)), batch_size=bs)
        append_result(args.out, {"bench": "uniform", "scheme": s, **settings, **m.to_json()})
        print(f"{s:<9}{m.bpw:>7.3f}{m.bytes:>12,}{m.kl_mean:>9.4f}{m.kl_p99:>8.3f}{m.top1:>7.3f}{m.ppl_ratio:>8.4f}"
              f"{m.seconds:>6.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
