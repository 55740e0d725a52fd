"""Learning curves of SmolLM2 block training: collect them (the regressor's shipped data) and measure
how well the regressor predicts a run's final held-out loss from its first 20 %.

    python benchmarks/curves.py collect --steps 40 --windows 32 --seqlen 256 --per-block 2
    python benchmarks/curves.py collect --steps 200 --windows 16 --seqlen 256 --batch 4 --per-block 1
    python benchmarks/curves.py evaluate            # grouped cross-validation by block, vs simple rules
    python benchmarks/curves.py ship                # copy the collected curves into the package

``collect`` appends to benchmarks/results/curves-smollm2.jsonl (one curve a line); ``evaluate`` appends
its figures to benchmarks/results/regressor.jsonl. Other journals' curves (``--from-journal``) can be
added to the collection, e.g. the full-settings runs made on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CURVES = HERE / "results" / "curves-smollm2.jsonl"
SHIPPED = HERE.parent / "aqsearch" / "data" / "curves_smollm2.jsonl"
CONFIGS = ["w4g128", "w4g64", "w3g128", "w3g64", "w2g128", "w2g64", "w8g128", "mixed"]


def collect(args) -> None:
    import torch

    from aqsearch.capture import Activations
    from aqsearch.config import QuantScheme
    from aqsearch.data import calib_eval_sets
    from aqsearch.models import BLOCK_LINEARS, FUSED, decoder_blocks, load_model
    from aqsearch.quantizers import fake_quantize
    from aqsearch.training import TrainSettings, rel_error, train_block

    loaded = load_model(args.model, device=args.device)
    calib, _ = calib_eval_sets(loaded, str(Path(args.data_dir) / "wikitext-2-valid.tokens.txt"), str(Path(args.data_dir) / "wikitext-2-raw-test.txt"),
                               calib_windows=args.windows, calib_seqlen=args.seqlen, eval_tokens=args.seqlen,
                               seqlen=args.seqlen)
    acts = Activations.capture(loaded.model, calib.windows, batch=args.batch)
    n = calib.windows.shape[0]
    n_held = max(1, round(n * 0.25))
    held, train = torch.arange(n - n_held, n), torch.arange(n - n_held)
    rng = random.Random(args.seed)
    upstream = QuantScheme.parse(args.upstream)
    for i, blk in enumerate(decoder_blocks(loaded.model)):
        y = acts.run(blk, acts.x_fp)
        floor = rel_error(acts, blk, {}, y, held)
        for cfg in rng.sample(CONFIGS, args.per_block):
            if cfg == "mixed":  # a random scheme for each fused group
                per_unit = {u: rng.choice(["w8g128", "w4g128", "w4g64", "w3g128", "w2g64"]) for u in set(FUSED.values())}
                schemes = {sfx: QuantScheme.parse(per_unit[FUSED[sfx]]) for sfx in BLOCK_LINEARS}
            else:
                schemes = {sfx: QuantScheme.parse(cfg) for sfx in BLOCK_LINEARS}
            ts = TrainSettings(steps=args.steps, batch=args.batch, seed=args.seed)
            _, curve = train_block(blk, schemes, acts, y, train, held, ts, floor=floor, tag=f"collect {cfg}")
            rec = {**curve.to_json(), "settings": {"windows": n, "seqlen": args.seqlen, "device": args.device}}
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"block {i:2d} {cfg:7s} initial {curve.initial:.4g} best {curve.best:.4g} "
                  f"({curve.best / curve.initial:.2f}) {curve.seconds:.0f}s", file=sys.stderr, flush=True)
        w = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, upstream) for sfx in BLOCK_LINEARS}
        acts.advance(blk, w, y_fp=y)


def from_journal(path: str) -> None:
    """Add the complete curves of a progressive or training journal to the collection."""
    from aqsearch.curves import complete
    from aqsearch.training import Curve

    n = 0
    with open(CURVES, "a") as f:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r.get("curve") and complete(Curve.from_json(r["curve"])):
                f.write(json.dumps({**r["curve"], "settings": {"journal": Path(path).name}}) + "\n")
                n += 1
    print(f"added {n} curves from {path}", file=sys.stderr)


def _powerlaw(curve, pre: int) -> float:
    """Simple rule: fit L(t) = a + b t^-c to the prefix, extrapolate to the last step."""
    from scipy.optimize import curve_fit

    pts = [(p["step"], p["heldout"]) for p in curve.points if 0 < p["step"] <= pre]
    if len(pts) < 3:
        return curve.best
    t, y = map(np.array, zip(*pts))
    try:
        (a, b, c), _ = curve_fit(lambda t, a, b, c: a + b * t ** (-c), t, y, p0=(y[-1] * 0.8, y[0], 0.5), maxfev=5000)
        return float(min(max(a + b * curve.steps ** (-c), 0.0), min(y)))
    except Exception:
        return float(min(y))


def evaluate(args) -> None:
    from aqsearch.bench import append_result
    from aqsearch.curves import PREFIX, CurveRegressor, complete, load_curves

    curves = [c for c in load_curves(CURVES) if complete(c)]
    blocks = sorted({c.block for c in curves})
    folds = [blocks[k :: args.folds] for k in range(args.folds)]
    rel, rel_pl, rel_last, cover, by_steps = [], [], [], [], {}
    for test_blocks in folds:
        train = [c for c in curves if c.block not in test_blocks]
        test = [c for c in curves if c.block in test_blocks]
        reg = CurveRegressor(train)
        for c in test:
            pre = math.ceil(PREFIX * c.steps)
            pred = reg.predict(c, pre)
            mid = pred[0.5]
            rel.append(abs(mid - c.best) / c.best)
            by_steps.setdefault(c.steps, []).append(rel[-1])
            cover.append(pred[0.1] <= c.best <= pred[0.9])
            rel_pl.append(abs(_powerlaw(c, pre) - c.best) / c.best)
            seen = min(p["heldout"] for p in c.points if p["step"] <= pre)
            rel_last.append(abs(seen - c.best) / c.best)
    out = {"bench": "regressor", "curves": len(curves), "folds": args.folds, "prefix": PREFIX,
           "median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.percentile(rel, 90)),
           "interval_80_coverage": float(np.mean(cover)),
           "powerlaw_median_rel_error": float(np.median(rel_pl)),
           "last_seen_median_rel_error": float(np.median(rel_last)),
           "by_steps": {str(k): {"curves": len(v), "median_rel_error": float(np.median(v))} for k, v in by_steps.items()}}
    append_result(HERE / "results" / "regressor.jsonl", out)
    print(json.dumps(out, indent=1))


def ship(args) -> None:
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    from aqsearch.curves import complete, load_curves

    curves = [c for c in load_curves(CURVES) if complete(c)]
    SHIPPED.write_text("".join(json.dumps(c.to_json()) + "\n" for c in curves))
    print(f"shipped {len(curves)} curves to {SHIPPED}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--windows", type=int, default=32)
    c.add_argument("--seqlen", type=int, default=256)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--per-block", type=int, default=2)
    c.add_argument("--upstream", default="w4g128", help="scheme of the blocks before, round-to-nearest")
    c.add_argument("--device", default="cpu")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--data-dir", default=str(DATA))
    c.add_argument("--out", default=str(CURVES))
    c.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate")
    e.add_argument("--folds", type=int, default=5)
    sub.add_parser("ship")
    j = sub.add_parser("from-journal")
    j.add_argument("path")
    args = ap.parse_args()
    if args.cmd == "from-journal":
        return from_journal(args.path)
    {"collect": collect, "evaluate": evaluate, "ship": ship}[args.cmd](args)


if __name__ == "__main__":
    main()
