"""The polished front against the uniform hull, with racing against polishing every promoted plan.

One command, the same windows and polish steps for everything (WikiText-2 validation calibrates and
scores, the raw test set evaluates):

1. the uniform hull: every scheme of the menu, polished like a pick;
2. the front across the budgets (a layer bank, the fitted score, the score study, plan racing), through
   :class:`aqsearch.strategies.front.Front`: what ``aqsearch search --budget A,B,...`` runs;
3. the plans racing stopped, polished fully afterwards (their journals keep rung 1's blocks), so that the
   front without racing is measured too: full polishes, steps, and the hypervolume of both fronts;
4. at every budget: the front's polished KL against the staircase (best uniform within it) and the uniform
   hull's line, for the whole front and for mixed plans only; the score's rank correlations.

    python benchmarks/front.py --small                 # CPU: 16x128 windows, 12 polish steps, 8x256 test
    python benchmarks/front.py                         # GPU: 128x2048 windows, 200 steps, the whole test set

Appends one JSON line to ``--out`` (default ``benchmarks/results/front.jsonl``) and draws ``--plot``.
The work folder (``--workdir``) keeps the study and the polished plans: a stopped run goes on from there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
MENU = "w8g128,w4g32,w4g64,w4g128,w3g32,w3g64,w3g128,w2g32,w2g64,w2g128"
BETWEEN = (2.4, 2.8, 3.0, 3.45, 3.8, 4.0)
AT = (2.5625, 3.296875, 4.3125)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def ratios(points, hull, budgets, weights):
    from aqsearch.strategies.front import hull_line, staircase

    rows = []
    for bpw, between in budgets:
        b = int(bpw * weights / 8)
        fits = [p for p in points if p[1] <= b]
        mixed = [p for p in fits if not p[2].startswith("uniform")]
        best = min(fits)[0] if fits else None
        best_mixed = min(mixed)[0] if mixed else None
        st, line = staircase(hull, b), hull_line(hull, b)
        rows.append({"bpw": bpw, "between": between, "bytes": b, "front_kl": best, "mixed_kl": best_mixed,
                     "staircase": st, "hull_line": line,
                     "front_vs_staircase": best / st if best and st else None,
                     "front_vs_hull": best / line if best and line else None,
                     "mixed_vs_staircase": best_mixed / st if best_mixed and st else None,
                     "mixed_vs_hull": best_mixed / line if best_mixed and line else None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU settings (see the module)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--menu", default=MENU)
    ap.add_argument("--promote", type=int, default=2)
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--steps", type=int, default=None, help="polish steps (default 12 small, 200 full)")
    ap.add_argument("--budgets", default=None, help="comma-separated bpw (default: 2.4 ... 4.0 between uniform sizes, "
                    "and 2.5625, 3.296875, 4.3125)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="past this many seconds from the start, race no more plans and polish no stopped one")
    ap.add_argument("--stage", choices=("all", "hull", "front"), default="all",
                    help="hull: the uniform hull only; front: the rest (the hull already in --workdir's study)")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--calib-windows", type=int, default=64, help="full settings: calibration windows of 2048")
    ap.add_argument("--workdir", default="/tmp/aqsearch-front-bench")
    ap.add_argument("--out", default=str(HERE / "results" / "front.jsonl"))
    ap.add_argument("--plot", default=str(HERE / "results" / "front.png"))
    args = ap.parse_args()

    import torch

    from aqsearch import BankConfig, DataConfig, Job, TrainSettings
    from aqsearch.bench import append_result
    from aqsearch.plots import plot_front
    from aqsearch.strategies.front import Front, FrontConfig, hull_points, summary
    from aqsearch.strategies.study import hypervolume

    t0 = time.time()
    d, small = Path(args.data_dir), args.small
    test = d / "wikitext-2-raw-test.txt"
    if small:
        data = DataConfig(str(d / "wikitext-2-valid.tokens.txt"), str(test), None, 16, 128, 8 * 256, 256)
    else:  # the whole raw test set in 2048-token windows; 32 score windows from the validation text
        from aqsearch.models import load_model

        n = len(load_model(args.model).tokenizer(test.read_text())["input_ids"])
        # the validation text's first half (137k tokens for SmolLM2) calibrates: 64 windows of 2048 at most;
        # its second half scores
        data = DataConfig(str(d / "wikitext-2-valid.tokens.txt"), str(test), None, args.calib_windows, 2048,
                          n // 2048 * 2048, 2048, score_tokens=32 * 2048)
    steps = args.steps or (12 if small else 200)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.budgets:
        budgets = sorted((float(b), float(b) not in AT) for b in args.budgets.split(","))
    else:
        budgets = sorted([(b, True) for b in BETWEEN] + [(b, False) for b in AT])
    job = Job.resolve(args.model, [f"{b}bpw" for b, _ in budgets], data=data, device=dev,
                      bank=BankConfig(menu=tuple(args.menu.split(",")), granularity="layer", steps=0),
                      polish=TrainSettings(steps=steps, batch=8))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    storage, name = f"sqlite:///{work / 'study.db'}", "front-bench"
    bank = job.new_bank()
    bank.build()
    t_bank = time.time() - t0
    front = Front(job, bank, storage, name, work, FrontConfig(hull="menu", promote=args.promote, trials=args.trials))
    front.hull()
    t_hull = time.time() - t0 - t_bank
    if args.stage == "hull":
        log(f"hull done in {t_hull:.0f} s: {hull_points(storage, name)}")
        return 0
    entrants = front.promoted(front.search())
    late = lambda: args.deadline_s is not None and time.time() - t0 > args.deadline_s  # noqa: E731
    trials = front.race(entrants, stop=late)
    unraced = [lab for _, lab, _ in entrants[len(trials):]]
    t_front = time.time() - t0 - t_bank - t_hull
    summ = summary(storage, name)
    # 3. the stopped plans polished fully: the front without racing
    stopped = [t for t in trials if t.state.name == "PRUNED"]
    extra = []
    for t in stopped:
        if late():
            extra.append({"trial": t.number, "label": t.user_attrs.get("label"), "skipped": "deadline"})
            continue
        plan = bank.plan(dict(t.params))
        r = front.polisher.full(plan, f"trial-{t.number:04d}", t.user_attrs["rungs"]["0"])
        extra.append({"trial": t.number, "label": t.user_attrs.get("label"), "bytes": t.user_attrs["bytes"],
                      "kl_mean": r["measurement"]["kl_mean"], "steps": r["steps"],
                      "predicted": t.user_attrs.get("prediction_1") or t.user_attrs.get("prediction_0"),
                      "stopped_because": t.user_attrs.get("stopped_because")})
        log(f"stopped trial {t.number} polished anyway: KL {extra[-1]['kl_mean']:.4f} "
            f"(predicted {extra[-1]['predicted']})")
    hull = hull_points(storage, name)
    raced = [(p["kl_mean"], p["bytes"], p["label"]) for p in summ["front"] if p["polished"]]
    done = front.polished()
    every = done + [(e["kl_mean"], e["bytes"], e["label"]) for e in extra if "kl_mean" in e]
    limit = job.limit
    hv_race, hv_all = hypervolume([(k, b) for k, b, _ in done], limit), hypervolume([(k, b) for k, b, _ in every], limit)
    rows = ratios(done, hull, budgets, bank.space.weights)
    between = [r["front_vs_hull"] for r in rows if r["between"] and r["front_vs_hull"]]
    full_all = summ["racing"]["promoted"]
    rec = {"bench": "front", "small": small, "model": args.model, "menu": args.menu, "device": dev,
           "settings": {"calib": [data.calib_windows, data.calib_seqlen], "eval_tokens": job.evaluation.windows.numel(),
                        "polish_steps": steps, "promote": args.promote, "trials": args.trials, "granularity": "layer"},
           "hull": [{"scheme": s, "kl_mean": k, "bytes": b, "bpw": 8 * b / bank.space.weights} for k, b, s in hull],
           "budgets": rows, "median_between_front_vs_hull": statistics.median(between) if between else None,
           "unraced_for_the_deadline": unraced,
           "racing": {**summ["racing"], "full_polishes_without_racing": full_all,
                      "fewer_full_polishes": full_all / max(summ["racing"]["full_polishes"], 1),
                      "hypervolume_racing": hv_race, "hypervolume_all": hv_all,
                      "hypervolume_diff": (hv_all - hv_race) / hv_all if hv_all else None, "stopped_then_polished": extra},
           "score_fits": summ["score_fits"], "front": raced,
           "seconds": {"bank": t_bank, "hull": t_hull, "front": t_front, "total": time.time() - t0}}
    plot_front(storage, name, args.plot)
    append_result(args.out, rec)
    log(json.dumps({k: rec[k] for k in ("median_between_front_vs_hull", "seconds")}))
    for r in rows:
        log(f"{r['bpw']:.4g} bpw: front {r['front_kl']}, staircase {r['staircase']}, hull {r['hull_line']}, "
            f"front/staircase {r['front_vs_staircase']}, front/hull {r['front_vs_hull']}")
    log(json.dumps(rec["racing"])[:600])
    return 0


if __name__ == "__main__":
    sys.exit(main())
