"""Where the bank loses the trainer's quality, on one uniform scheme (a diagnostic for the bank's picks).

The bank trains every (block, scheme) candidate on the full-precision stream; a plan composes them, and
the pick is polished from them. This measures, for one scheme everywhere, on the whole WikiText-2 test set:

- ``rtn``: round-to-nearest;
- ``bank``: the bank's candidates composed (trained on the full-precision stream, no retraining);
- ``rtn_prefix``: every block trained (the bank's steps) on the outputs of a round-to-nearest prefix, not
  on the trained blocks before it, then composed: what a bank whose candidates are trained independently on
  a quantized prefix, instead of the full-precision stream, would give;
- ``polish_from_bank``: polished from the bank's weights (``polish(init=...)``, as ``pick`` does), N steps;
- ``polish_from_fp``: polished from the model's own weights (the trainer on the plan), N steps;
- ``trainer``: the trainer on the plan, the bank's steps (the uniform rows of the README's trainer table).

    python benchmarks/compose_gap.py --scheme w3g64                    # GPU: 128x2048 windows, 200 steps
    python benchmarks/compose_gap.py --scheme w3g64 --small            # CPU: minutes

Appends one JSON line to ``benchmarks/results/compose_gap.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--small", action="store_true", help="CPU settings: 16x128 windows, 20 steps, 8x256 test tokens")
    ap.add_argument("--steps", type=int, default=None, help="the bank's and the trainer's steps (200; small 20)")
    ap.add_argument("--polish-steps", type=int, default=None, help="the pick's polish (50, as benchmarks/bank.py; small 5)")
    ap.add_argument("--rows", default="rtn,bank,rtn_prefix,polish_from_bank,polish_from_fp,trainer",
                    help="which rows to measure (the trainer's row is in benchmarks/results/trainer.jsonl too)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=str(HERE / "results" / "compose_gap.jsonl"))
    args = ap.parse_args()

    from aqsearch.bank import Bank, BankSettings
    from aqsearch.bench import append_result, wikitext_setup
    from aqsearch.compose import compose
    from aqsearch.config import Plan
    from aqsearch.polish import polish
    from aqsearch.quality import evaluate
    from aqsearch.training import TrainSettings
    from aqsearch.weights import trained_weight_fn

    small = args.small
    w = wikitext_setup(args.model, args.data_dir, small, args.steps, args.polish_steps)
    loaded, calib, test, ref, bs = w.loaded, w.calib, w.test, w.ref, w.bs
    steps, pol, n_win, seqlen = w.steps, w.pol, w.n_win, w.seqlen
    plan = Plan.uniform(args.scheme)
    rows, secs = {}, {}
    wanted = set(args.rows.split(","))

    def score(name, tensors=None):
        kw = {"weight_fn": trained_weight_fn(tensors)} if tensors is not None else {}
        m = evaluate(loaded.model, ref, plan, batch_size=bs, **kw)
        rows[name] = {"kl_mean": m.kl_mean, "kl_p99": m.kl_p99, "top1": m.top1, "ppl_ratio": m.ppl_ratio}
        print(f"{name:18s} KL {m.kl_mean:.4f}  ({secs.get(name, 0):.0f} s)", file=sys.stderr, flush=True)

    score("rtn")
    if "rtn_prefix" in wanted:
        t0 = time.time()
        q, _ = polish(loaded.model, plan, calib, TrainSettings(steps=steps, batch=8), stream="rtn", desc="rtn_prefix")
        secs["rtn_prefix"] = time.time() - t0
        score("rtn_prefix", q)
    bset = BankSettings(schemes=(args.scheme,), granularity="block", steps=steps, batch=8, race=False)
    with tempfile.TemporaryDirectory() as work:
        tensors = None
        if wanted & {"bank", "polish_from_bank"}:
            bank = Bank(Path(work), loaded.model, loaded.fingerprint, calib, bset)
            t0 = time.time()
            bank.build()
            secs["bank"] = time.time() - t0
            _, tensors = compose(bank, {u.name: args.scheme for u in bank.units})
            score("bank", tensors)
        for name, n in (("polish_from_bank", pol), ("polish_from_fp", pol), ("trainer", steps)):
            if name not in wanted:
                continue
            t0 = time.time()
            init = tensors if name == "polish_from_bank" else None
            q, _ = polish(loaded.model, plan, calib, TrainSettings(steps=n, batch=8), init=init, desc=name)
            secs[name] = time.time() - t0
            score(name, q)
    rec = {"bench": "compose_gap", "scheme": args.scheme, "small": small,
           "settings": {"windows": n_win, "seqlen": seqlen, "steps": steps, "polish_steps": pol,
                        "test_tokens": int(test.windows.numel()), "bank": asdict(bset)},
           "rows": rows, "seconds": secs}
    append_result(args.out, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
