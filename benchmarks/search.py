"""The Optuna search on SmolLM2 (issue 4's acceptance): the study, its hypervolume, the knapsack
baseline, pruning on against off, and the comparison with uniform schemes and progressive plans.

    # the study (H200: --device cuda --workers 8 --storage journal:///tmp/s.journal ...)
    python benchmarks/search.py study --trials 200 --storage sqlite:///s.db --study smollm2
    # knapsack at three budgets against the study's front (same quantizer, same held-out windows)
    python benchmarks/search.py knapsack --storage sqlite:///s.db --study smollm2
    # every front point, uniform scheme and progressive plan on the WikiText-2 test set
    python benchmarks/search.py compare --storage sqlite:///s.db --study smollm2 --plans p45.json p35.json
    # two seeded studies with training, pruning on and off
    python benchmarks/search.py pruning --trials 40
    python benchmarks/search.py plots                                   # README figures from the results

Records go to benchmarks/results/search.jsonl; figures to benchmarks/results/*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aqsearch.bench import append_result, read_results

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
OUT = HERE / "results" / "search.jsonl"


def common(ap) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--storage", default=f"sqlite:///{HERE / 'results' / 'search.db'}")
    ap.add_argument("--study", default="smollm2")
    ap.add_argument("--budget", default="4.5bpw")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(OUT))


def settings(args, **kw):
    from aqsearch.search import SearchSettings

    base = dict(granularity=args.granularity, sampler=args.sampler, population=args.population,
                eval_tokens=args.eval_tokens, seqlen=args.seqlen,
                calib_windows=args.calib_samples, calib_seqlen=args.calib_seqlen, steps=args.steps, seed=args.seed)
    base.update(kw)
    return SearchSettings(**base)


def calib_file(args) -> str:
    return str(Path(args.data_dir) / "wikitext-2-valid.tokens.txt")


def cmd_study(args) -> None:
    from aqsearch.curves import default_regressor
    from aqsearch.models import load_model
    from aqsearch.search import hypervolume_history, pareto_front, run_study

    loaded = load_model(args.model, device=args.device)
    t0 = time.time()
    argv = [a for a in sys.argv[1:]]
    s = settings(args, train=args.train, prune=not args.no_prune)
    if args.workers > 1:  # the workers are `aqsearch search` processes on the same storage
        argv = ["search", "--model", args.model, "--device", args.device, "--storage", args.storage, "--study",
                args.study, "--budget", args.budget, "--trials", str(args.trials), "--seed", str(args.seed),
                "--calib-data", calib_file(args), "--eval-tokens", str(args.eval_tokens), "--seqlen", str(args.seqlen),
                "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
                "--steps", str(args.steps), "--granularity", args.granularity, "--sampler", args.sampler,
                "--population", str(args.population)]
        argv += ["--train"] if args.train else []
        argv += ["--no-prune"] if args.no_prune else []
    run_study(loaded, args.budget, args.trials, args.storage, args.study, s, calib_file(args), args.device,
              args.warm_start, None, args.workers, False, argv, 30, default_regressor() if args.train else None)
    front = pareto_front(args.storage, args.study)
    hv = hypervolume_history(args.storage, args.study)
    append_result(args.out, {"bench": "search-study", "study": args.study, "trials": args.trials,
                             "workers": args.workers, "settings": s.__dict__, "budget": args.budget,
                             "seconds": time.time() - t0, "front": front, "hypervolume": hv,
                             "train_steps": _steps(args.storage, args.study),
                             "trial_seconds": _trial_seconds(args.storage, args.study)})
    print(f"{len(front)} front points, hypervolume {hv[-1]:.4f}, {time.time() - t0:.0f} s", file=sys.stderr)


def _trial_seconds(storage, study_name) -> float:
    """Seconds the finished trials ran, summed (a resumed study's run time counts only its last part)."""
    from aqsearch.search import load_study

    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in load_study(storage, study_name).trials
               if t.datetime_complete and t.datetime_start)


def _steps(storage, study_name) -> dict:
    from aqsearch.search import load_study

    st = load_study(storage, study_name)
    run = sum(t.user_attrs.get("train_steps", 0) for t in st.trials)
    full = sum(t.user_attrs.get("train_steps_full", 0) for t in st.trials)
    pruned = sum(1 for t in st.trials if t.state.name == "PRUNED")
    return {"run": run, "without_pruning": full, "pruned_trials": pruned}


def cmd_pruning(args) -> None:
    """Two seeded single-worker studies with training, pruning on and off."""
    from aqsearch.curves import default_regressor
    from aqsearch.models import load_model
    from aqsearch.search import hypervolume_history, run_study

    loaded = load_model(args.model, device=args.device)
    rec = {"bench": "search-pruning", "trials": args.trials, "budget": args.budget}
    for prune in (True, False):
        name = f"{args.study}-prune-{'on' if prune else 'off'}"
        s = settings(args, train=True, prune=prune, unit_cache=False)  # neither run reuses the other's training
        t0 = time.time()
        run_study(loaded, args.budget, args.trials, args.storage, name, s, calib_file(args), args.device,
                  regressor=default_regressor())
        hv = hypervolume_history(args.storage, name)
        rec[f"prune_{'on' if prune else 'off'}"] = {"study": name, "hypervolume": hv[-1], "seconds": time.time() - t0,
                                                   "train_steps": _steps(args.storage, name)}
    on, off = rec["prune_on"], rec["prune_off"]
    rec["compute_saved"] = 1 - on["train_steps"]["run"] / max(off["train_steps"]["run"], 1)
    rec["hypervolume_lost"] = 1 - on["hypervolume"] / off["hypervolume"]
    append_result(args.out, rec)
    print(json.dumps({k: rec[k] for k in ("compute_saved", "hypervolume_lost")}), file=sys.stderr)


def _eval_setup(args, test: bool):
    from aqsearch.data import calib_eval_sets
    from aqsearch.models import load_model
    from aqsearch.quality import build_reference

    loaded = load_model(args.model, device=args.device)
    if test:  # the held-out test text: never searched on
        _, ev = calib_eval_sets(loaded, calib_file(args), str(Path(args.data_dir) / "wikitext-2-raw-test.txt"),
                                eval_tokens=None if args.test_tokens == 0 else args.test_tokens, seqlen=args.test_seqlen)
    else:  # the study's own held-out windows (second half of the validation text)
        _, ev = calib_eval_sets(loaded, calib_file(args), calib_file(args), calib_windows=args.calib_samples,
                                calib_seqlen=args.calib_seqlen, eval_tokens=args.eval_tokens, seqlen=args.seqlen, split=0.5)
    bs = 8 if args.device.startswith("cuda") else 1
    return loaded, build_reference(loaded.model, ev, batch_size=bs), bs


def cmd_knapsack(args) -> None:
    """Knapsack plans at three budgets, scored like the study's trials, against the study's front."""
    from aqsearch.data import calib_eval_sets
    from aqsearch.bank import Bank, BankSettings
    from aqsearch.compose import knapsack_choice
    from aqsearch.io import cache_dir
    from aqsearch.quality import evaluate
    from aqsearch.search import load_study, pareto_front
    from aqsearch.space import build_space

    loaded, ref, bs = _eval_setup(args, test=False)
    info = load_study(args.storage, args.study).user_attrs["aqsearch"]["settings"]
    space = build_space(loaded.model, info["granularity"], info["tie"], info["embeddings"], info["kernel_only"], info["sym"])
    cal, _ = calib_eval_sets(loaded, calib_file(args), calib_file(args), calib_windows=args.calib_samples,
                             calib_seqlen=args.calib_seqlen, eval_tokens=args.eval_tokens, seqlen=args.seqlen, split=0.5)
    menu = next(u.choices for u in space.units if u.block >= 0)
    bank = Bank(cache_dir("bank"), loaded.model, loaded.fingerprint, cal,
                BankSettings(schemes=menu, granularity=space.granularity, steps=0))  # round-to-nearest errors
    t0 = time.time()
    bank.build()
    measure_s = time.time() - t0
    front = pareto_front(args.storage, args.study)
    rows = []
    for b in args.budgets.split(","):
        from aqsearch.config import Budget

        limit = Budget.parse(b).resolve(space.weights)
        params = knapsack_choice(bank, limit)
        m = evaluate(loaded.model, ref, space.plan(params), list(space.layers), batch_size=bs)
        fits = [p for p in front if p["bytes"] <= limit]
        best = min(fits, key=lambda p: p["kl_mean"]) if fits else None
        rows.append({"budget": b, "budget_bytes": limit, "knapsack_bytes": space.bytes(params),
                     "knapsack_kl": m.kl_mean, "front_kl": best and best["kl_mean"], "front_bytes": best and best["bytes"],
                     "front_trial": best and best["trial"], "search_wins": bool(best and best["kl_mean"] < m.kl_mean)})
    append_result(args.out, {"bench": "search-knapsack", "study": args.study, "measure_seconds": measure_s, "rows": rows})
    for r in rows:
        print(r, file=sys.stderr)


def cmd_compare(args) -> None:
    """Front points, uniform schemes and progressive plans, all scored on the WikiText-2 test set."""
    from aqsearch.config import Plan, all_schemes
    from aqsearch.memory import plan_bytes
    from aqsearch.quality import evaluate
    from aqsearch.search import load_study, pareto_front
    from aqsearch.weights import load_plan

    loaded, ref, bs = _eval_setup(args, test=True)
    st = load_study(args.storage, args.study)
    limit = st.user_attrs["aqsearch"]["budget_bytes"]
    rows = []
    for p in pareto_front(args.storage, args.study):
        plan = Plan.from_layers(json.loads(st.trials[p["trial"]].user_attrs["plan"]))
        rows.append({"kind": "front", "trial": p["trial"], **evaluate(loaded.model, ref, plan, batch_size=bs).to_json()})
    for s in all_schemes():
        if plan_bytes(loaded.model, Plan.uniform(s)).bytes <= limit:  # only the schemes that fit are scored
            m = evaluate(loaded.model, ref, Plan.uniform(s), batch_size=bs)
            rows.append({"kind": "uniform", "name": str(s), **m.to_json()})
    for path in args.plans:
        plan, wfn = load_plan(path)
        rows.append({"kind": "progressive", "name": Path(path).name, "trained": True,
                     **evaluate(loaded.model, ref, plan, weight_fn=wfn, batch_size=bs).to_json()})
        plan_rtn = evaluate(loaded.model, ref, plan, batch_size=bs)
        rows.append({"kind": "progressive-rtn", "name": Path(path).name, **plan_rtn.to_json()})
    front = [r for r in rows if r["kind"] == "front"]
    for r in rows:
        if r["kind"] != "front":
            r["dominated_by_front"] = any(f["bytes"] <= r["bytes"] and f["kl_mean"] < r["kl_mean"] for f in front)
    append_result(args.out, {"bench": "search-compare", "study": args.study, "rows": rows})
    for r in rows:
        print({k: r.get(k) for k in ("kind", "name", "trial", "bytes", "kl_mean", "dominated_by_front")}, file=sys.stderr)


def cmd_plots(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_results(args.out)
    studies = [r for r in recs if r["bench"] == "search-study"]
    if studies:
        r = studies[-1]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(r["hypervolume"]) + 1), r["hypervolume"])
        ax.set_xlabel("finished trials")
        ax.set_ylabel("hypervolume (log10 KL x bytes/budget)")
        ax.set_title(f"{r['study']}: {r['trials']} trials, {r['env']['machine']}")
        fig.tight_layout()
        fig.savefig(HERE / "results" / "search-hypervolume.png", dpi=110)
    comp = [r for r in recs if r["bench"] == "search-compare"]
    if comp:
        rows = comp[-1]["rows"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, style in (("front", "o-"), ("uniform", "s"), ("progressive", "^"), ("progressive-rtn", "v")):
            pts = sorted((r["bytes"] / 2**20, r["kl_mean"]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, label=kind, ms=5)
        ax.set_xlabel("MiB (decoder Linears as stored)")
        ax.set_ylabel("KL on WikiText-2 test (nats/token)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "results" / "search-front.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("study", "pruning", "knapsack", "compare", "plots"):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--trials", type=int, default=200)
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--granularity", default="layer")
        p.add_argument("--sampler", default="local")
        p.add_argument("--population", type=int, default=30)
        p.add_argument("--train", action="store_true")
        p.add_argument("--no-prune", action="store_true")
        p.add_argument("--warm-start", nargs="*", default=[])
        p.add_argument("--budgets", default="3.5bpw,4bpw,4.5bpw")
        p.add_argument("--plans", nargs="*", default=[])
        p.add_argument("--test-tokens", type=int, default=0, help="compare: 0 = the whole test set")
        p.add_argument("--test-seqlen", type=int, default=2048)
    args = ap.parse_args()
    {"study": cmd_study, "pruning": cmd_pruning, "knapsack": cmd_knapsack, "compare": cmd_compare,
     "plots": cmd_plots}[args.cmd](args)


if __name__ == "__main__":
    main()
