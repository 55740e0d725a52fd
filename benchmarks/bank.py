"""The whole pipeline as one command, through :func:`aqsearch.run` (what ``aqsearch run`` calls): a job on
WikiText-2 (validation calibrates and scores, the raw test set evaluates), the bank, a strategy, and the
pick polished and measured, at each of several sizes. One JSON line a size to ``benchmarks/results/bank.jsonl``.

    python benchmarks/bank.py --full --strategy study --sizes w3g64        # GPU: 128x2048 windows, 200 steps
    python benchmarks/bank.py --small --strategy knapsack --sizes w4g64    # CPU: minutes

Sizes are the bytes of uniform schemes (``w3g64`` = 3.296875 bpw) or budgets (``3.5bpw``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
MENU = "w8g128,w4g64,w4g128,w3g32,w3g64,w2g32,w2g64"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--full", action="store_true")
    g.add_argument("--small", action="store_true")
    ap.add_argument("--strategy", default="study", choices=("study", "knapsack", "progressive"))
    ap.add_argument("--sizes", default="w3g64", help="comma-separated schemes (their uniform bytes) or budgets")
    ap.add_argument("--menu", default=MENU)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--steps", type=int, default=None, help="bank training steps (200; small 0: round-to-nearest)")
    ap.add_argument("--polish-steps", type=int, default=None, help="200; small 6")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--workdir", default="/tmp/aqsearch-bench")
    ap.add_argument("--out", default=str(HERE / "results" / "bank.jsonl"))
    args = ap.parse_args()

    import torch

    from aqsearch import BankConfig, Budget, DataConfig, Job, QuantScheme, TrainSettings, run
    from aqsearch.bench import append_result
    from aqsearch.curves import default_regressor

    d, small = Path(args.data_dir), args.small
    data = DataConfig(str(d / "wikitext-2-valid.tokens.txt"), str(d / "wikitext-2-raw-test.txt"), None,
                      16 if small else 128, 128 if small else 2048, 2 * 8 * 256 if small else 2 * 64 * 2048,
                      256 if small else 2048)
    steps = args.steps if args.steps is not None else (0 if small else 200)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    menu = tuple(args.menu.split(","))
    for size in args.sizes.split(","):
        budget = f"{QuantScheme.parse(size).bpw}bpw" if size.startswith("w") else size
        t0 = time.time()
        job = Job.resolve(args.model, Budget.parse(budget), data=data, device=dev,
                          bank=BankConfig(menu=menu, granularity="layer" if args.strategy == "progressive" else "block",
                                          steps=steps),
                          polish=TrainSettings(steps=args.polish_steps or (6 if small else 200), batch=8))
        res = run(job, args.strategy, workdir=Path(args.workdir) / size, trials=args.trials,
                  regressor=default_regressor() if steps else None)
        rec = {"bench": "pipeline", "strategy": args.strategy, "size": size, "small": small, "budget_bytes": job.limit,
               "menu": list(menu), "steps": steps, "polish_steps": job.polish.steps, "trials": args.trials,
               "picked": res["picked"], "picked_before_polish": res["picked_before_polish"], "uniform": res["uniform"],
               "polish": res["polish"], "bank": res["bank"], "seconds": time.time() - t0,
               "search_seconds": res["search_seconds"]}
        append_result(args.out, rec)
        print(f"bench: {size}: pick {res['picked']['bpw']:.3f} bpw KL {res['picked']['kl_mean']:.4f} "
              f"(RTN {res['picked_before_polish']['kl_mean']:.4f}); {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
