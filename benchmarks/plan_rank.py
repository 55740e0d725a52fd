"""Do the bank's scores rank mixed plans as their polished quality does? (a diagnostic for the study)

The study and the knapsack rank plans by the bank's candidates composed (trained on the full-precision
stream); the pick is then polished from the model's weights on the quantized prefix. This builds one bank
over a menu and, for plans of the same bytes, measures on the whole WikiText-2 test set the KL of the bank's
candidates composed and the KL after the pick's polish:

- ``uniform``: the middle scheme everywhere (default w3g64);
- ``knapsack``: the least summed bank error within the uniform plan's bytes;
- ``anti``: the knapsack's choice with its large and small schemes swapped (the same bytes when the two
  average to the middle one, as w4g64 and w2g64 do to w3g64: 4.3125 + 2.28125 = 2 x 3.296875 bpw);
- ``randomK``: K random blocks at the large scheme and K others at the small one, the rest uniform.

    python benchmarks/plan_rank.py                 # GPU: 128x2048 windows, 200 steps, polish 50
    python benchmarks/plan_rank.py --small         # CPU: minutes

Appends one JSON line a plan (as soon as it is measured) to ``benchmarks/results/plan_rank.jsonl``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--menu", default="w4g64,w3g64,w2g64", help="large,middle,small schemes")
    ap.add_argument("--plans", default="uniform,knapsack,anti,random4,random8,random12",
                    help="measured in this order; a plan equal to an earlier one is skipped")
    ap.add_argument("--small", action="store_true", help="CPU settings: 16x128 windows, 20 steps, 8x256 test tokens")
    ap.add_argument("--steps", type=int, default=None, help="the bank's steps (200; small 20)")
    ap.add_argument("--polish-steps", type=int, default=None, help="the pick's polish (50; small 5)")
    ap.add_argument("--run", default=None, help="run id stored with every record (default: the time)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=str(HERE / "results" / "plan_rank.jsonl"))
    args = ap.parse_args()

    from aqsearch.bank import Bank, BankSettings
    from aqsearch.bench import append_result, wikitext_setup
    from aqsearch.compose import compose, knapsack_choice
    from aqsearch.config import Plan
    from aqsearch.memory import plan_bytes
    from aqsearch.polish import polish
    from aqsearch.quality import evaluate
    from aqsearch.training import TrainSettings
    from aqsearch.weights import trained_weight_fn

    big, mid, low = args.menu.split(",")
    small = args.small
    w = wikitext_setup(args.model, args.data_dir, small, args.steps, args.polish_steps)
    loaded, calib, test, ref, bs = w.loaded, w.calib, w.test, w.ref, w.bs
    steps, pol, n_win, seqlen = w.steps, w.pol, w.n_win, w.seqlen
    run_id = args.run or time.strftime("%Y%m%d-%H%M%S")
    budget = plan_bytes(loaded.model, Plan.uniform(mid)).bytes
    bset = BankSettings(schemes=(big, mid, low), granularity="block", steps=steps, batch=8, race=False)
    settings = {"menu": [big, mid, low], "windows": n_win, "seqlen": seqlen, "steps": steps, "polish_steps": pol,
                "test_tokens": int(test.windows.numel()), "budget_bytes": budget}
    with tempfile.TemporaryDirectory() as work:
        bank = Bank(Path(work), loaded.model, loaded.fingerprint, calib, bset)
        t0 = time.time()
        bank.build()
        bank_s = time.time() - t0
        print(f"bank: {len(bank.candidates())} candidates in {bank_s:.0f} s", file=sys.stderr, flush=True)
        names = [u.name for u in bank.units]
        knap = knapsack_choice(bank, budget)
        seen: list[dict] = []
        for name in args.plans.split(","):
            if name == "uniform":
                choice = dict.fromkeys(names, mid)
            elif name == "knapsack":
                choice = knap
            elif name == "anti":
                choice = {u: {big: low, low: big}.get(s, s) for u, s in knap.items()}
            elif name.startswith("random"):
                k = int(name[len("random"):])
                picked = random.Random(k).sample(names, 2 * k)
                choice = {u: big if u in picked[:k] else low if u in picked[k:] else mid for u in names}
            else:
                raise SystemExit(f"unknown plan {name!r}: uniform, knapsack, anti or randomK")
            if choice in seen:
                print(f"{name}: the same plan as an earlier one, skipped", file=sys.stderr)
                continue
            seen.append(choice)
            plan, tensors = compose(bank, choice)
            nbytes = plan_bytes(loaded.model, plan).bytes
            summed = sum(bank.get(u, s).error for u, s in choice.items())
            composed = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(tensors), batch_size=bs).kl_mean
            t0 = time.time()
            q, _ = polish(loaded.model, plan, calib, TrainSettings(steps=pol, batch=8), desc=f"polish {name}")
            pol_s = time.time() - t0
            polished = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(q), batch_size=bs).kl_mean
            counts = {s: sum(v == s for v in choice.values()) for s in (big, mid, low)}
            print(f"{name:10s} {counts} {nbytes:,} B  bank summed error {summed:.4f}  composed KL {composed:.4f}  "
                  f"polished KL {polished:.4f}", file=sys.stderr, flush=True)
            append_result(args.out, {"bench": "plan_rank", "run": run_id, "small": small, "settings": settings,
                                     "plan": name, "blocks": counts,
                                     "changed": {s: [i for i, u in enumerate(names) if choice[u] == s] for s in (big, low)}, "bytes": nbytes, "bank_error_sum": summed,
                                     "kl_composed": composed, "kl_polished": polished,
                                     "seconds": {"bank": bank_s, "polish": pol_s}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
