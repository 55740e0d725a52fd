"""Which plans does the bank's score rank as their polished quality does? Strategies compared at one budget.

One job (WikiText-2 validation calibrates, the raw test set evaluates), one layer bank (fused units, every
scheme of the progressive engine's menu), then plans of the strategies - uniform (the largest scheme of the
menu that fits), knapsack, progressive - plus plans given as files (``--plan NAME=FILE``, e.g. the old
engine's), plus random mixes near the budget. Each plan gets its bank score (summed unit errors), its KL at
round-to-nearest on the score windows and its KL after the pick's polish on the evaluation windows (the same
:func:`aqsearch.pipeline.finish` for all). The rank correlations (Spearman, Kendall) of score and RTN KL with
the polished KL close the run.

    python benchmarks/plan_rank.py --small --budget 4.5bpw --plan old-engine=/tmp/old_engine_plan.json
    python benchmarks/plan_rank.py --budget 3.5bpw                                 # GPU: full settings

Appends one JSON line a plan, then a summary line, to ``--out`` (the CPU run of 2026-12-06 is
``benchmarks/results/strategy_rank.jsonl``; ``plan_rank.jsonl`` holds the older script's records).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="4.5bpw")
    ap.add_argument("--small", action="store_true", help="CPU: 16x128 windows, RTN bank, polish 5 steps, 8x256 test")
    ap.add_argument("--plan", action="append", default=[], help="NAME=FILE: a plan to rank too")
    ap.add_argument("--random", type=int, default=2, help="random mixes near the budget")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=str(HERE / "results" / "strategy_rank.jsonl"))
    args = ap.parse_args()

    import torch
    from scipy.stats import kendalltau, spearmanr

    from aqsearch import BankConfig, DataConfig, Job, Plan, TrainSettings
    from aqsearch.bench import append_result
    from aqsearch.pipeline import finish
    from aqsearch.quality import build_reference, evaluate
    from aqsearch.strategies.knapsack import knapsack_choice
    from aqsearch.strategies.progressive import ProgressiveConfig, progressive

    d = Path(args.data_dir)
    small = args.small
    data = DataConfig(str(d / "wikitext-2-valid.tokens.txt"), str(d / "wikitext-2-raw-test.txt"), None,
                      16 if small else 128, 128 if small else 2048, 2 * 8 * 256 if small else 2 * 64 * 2048,
                      256 if small else 2048)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ProgressiveConfig()
    job = Job.resolve(args.model, args.budget, data=data, device=dev,
                      bank=BankConfig(menu=cfg.menu(), granularity="layer", steps=0 if small else 200),
                      polish=TrainSettings(steps=5 if small else 50, batch=8))
    bank = job.new_bank()
    bank.build()
    choices: dict[str, dict] = {}
    fits = [s for s in job.bank.menu if bank.bytes(bank.space.uniform(s)) <= job.limit]
    choices["uniform"] = bank.space.uniform(max(fits, key=lambda s: bank.bytes(bank.space.uniform(s))))
    choices["knapsack"] = knapsack_choice(bank, job.limit)
    choices["progressive"] = bank.space.choice_of(progressive(bank, job.limit))
    for spec in args.plan:
        name, path = spec.split("=", 1)
        choices[name] = bank.space.choice_of(Plan.load(path))
    rng = random.Random(0)
    for k in range(args.random):  # the knapsack's choice with random units moved one scheme up or down, refit
        c = dict(choices["knapsack"])
        for u in rng.sample(bank.units, 12):
            c[u.name] = rng.choice(u.choices)
        while bank.bytes(c) > job.limit:
            u = rng.choice(bank.units)
            c[u.name] = min(u.choices, key=lambda s: bank.space.bytes_of_unit(u, s))
        choices[f"random{k}"] = c
    sref = build_reference(job.loaded.model, job.score, batch_size=job.batch)
    rows, run_id = [], time.strftime("%Y-%m-%dT%H:%M:%S")
    for name, c in choices.items():
        t0 = time.time()
        plan = bank.plan(c)
        rtn = evaluate(job.loaded.model, sref, plan, batch_size=job.batch).kl_mean
        art, rep = finish(job, plan)
        row = {"bench": "plan_rank", "run": run_id, "plan": name, "budget": args.budget, "small": small,
               "bytes": bank.bytes(c), "bpw": 8 * bank.bytes(c) / bank.space.weights, "score": bank.score(c),
               "rtn_kl_score_windows": rtn, "polished_kl": rep["picked"]["kl_mean"], "polish_kept": rep["polish"]["kept"],
               "eval_tokens": rep["picked"]["tokens"], "seconds": time.time() - t0}
        log(f"{name}: {row['bpw']:.3f} bpw score {row['score']:.4f} rtn {rtn:.4f} polished {row['polished_kl']:.4f}")
        append_result(args.out, row)
        rows.append(row)
    pol = [r["polished_kl"] for r in rows]
    summary = {"bench": "plan_rank", "run": run_id, "summary": True, "plans": len(rows), "small": small,
               "spearman_score": spearmanr([r["score"] for r in rows], pol).statistic,
               "kendall_score": kendalltau([r["score"] for r in rows], pol).statistic,
               "spearman_rtn_kl": spearmanr([r["rtn_kl_score_windows"] for r in rows], pol).statistic,
               "kendall_rtn_kl": kendalltau([r["rtn_kl_score_windows"] for r in rows], pol).statistic,
               "best": min(rows, key=lambda r: r["polished_kl"])["plan"]}
    append_result(args.out, summary)
    log(str(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
