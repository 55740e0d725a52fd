"""``aqsearch search``, ``aqsearch front`` and ``aqsearch pick`` (contract: DESIGN.md)."""

from __future__ import annotations

import argparse
import os
import sys

from aqsearch.cli import BUDGET_HELP, _add_model, _emit, _nonneg_int, _positive_int, resolve_device
from aqsearch.storage import check_storage


def _add_study(p) -> None:
    p.add_argument("--storage", required=True, help="sqlite:///study.db, postgresql://..., or journal:///file")
    p.add_argument("--study", required=True, help="study name")


def register(sub) -> dict:
    p = sub.add_parser("search", help="Optuna study: the Pareto front of held-out KL against bytes")
    _add_model(p)
    _add_study(p)
    p.add_argument("--budget", required=True, help="largest size of interest; " + BUDGET_HELP[len("memory budget: "):])
    p.add_argument("--trials", type=_positive_int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_positive_int, default=1, help="processes on this host (one per GPU if any)")
    p.add_argument("--granularity", choices=("layer", "block"), default="layer")
    p.add_argument("--untie", action="store_true", help="every Linear its own unit (q/k/v, gate/up not tied)")
    p.add_argument("--embeddings", action="store_true", help="the token embedding and LM head as units too")
    p.add_argument("--kernel-schemes", action="store_true", help="only schemes the Triton kernels run")
    p.add_argument("--sampler", choices=("local", "tpe", "nsga2"), default="local")
    p.add_argument("--population", type=_positive_int, default=30, help="NSGA-II's generation size")
    p.add_argument("--calib-data", default=None, help="text file or hf:... (default: model samples); split in two")
    p.add_argument("--eval-tokens", type=_positive_int, default=4096, help="held-out tokens a trial is scored on")
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--calib-samples", type=_positive_int, default=16, help="windows to train units on")
    p.add_argument("--calib-seqlen", type=_positive_int, default=256)
    p.add_argument("--train", action="store_true", help="train the units of every trial (cached per unit and scheme)")
    p.add_argument("--steps", type=_positive_int, default=40)
    p.add_argument("--no-prune", action="store_true", help="never prune trials from partial curves")
    p.add_argument("--warm-start", action="append", default=[], help="plan JSON to enqueue (repeatable)")
    p.add_argument("--warm-start-study", default=None, help="enqueue the finished trials of this study")
    p.add_argument("--no-uniform", action="store_true", help="do not enqueue the uniform schemes")
    p.add_argument("--warm-knapsack", type=_nonneg_int, default=4, metavar="N",
                   help="enqueue the knapsack allocation at N budgets up to the limit first (0: none)")
    p.add_argument("--heartbeat", type=_positive_int, default=30, help="seconds between heartbeats (RDB storages)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set for the processes it starts

    p = sub.add_parser("front", help="the Pareto table of a study (and a plot)")
    _add_study(p)
    p.add_argument("--plot", default=None, help="write the front as an image (png, svg, pdf)")
    p.add_argument("--force", action="store_true", help="replace an existing --plot")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pick", help="the best plan of a study within a budget")
    _add_study(p)
    p.add_argument("--budget", required=True, help=BUDGET_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true")
    return {"search": cmd_search, "front": cmd_front, "pick": cmd_pick}


def cmd_search(args) -> int:
    import torch

    from aqsearch.config import Budget
    from aqsearch.curves import default_regressor
    from aqsearch.data import check_sources
    from aqsearch.models import load_model
    from aqsearch.search import SearchSettings, pareto_front, run_study

    Budget.parse(args.budget)
    check_storage(args.storage, create=True)
    check_sources(args.calib_data)
    device = resolve_device(args.device)
    k = int(os.environ.get("AQSEARCH_WORKER", "0"))
    if device == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{k % torch.cuda.device_count()}"
    loaded = load_model(args.model, device=device)
    s = SearchSettings(granularity=args.granularity, tie=not args.untie, embeddings=args.embeddings,
                       kernel_only=args.kernel_schemes, sampler=args.sampler, population=args.population, seed=args.seed,
                       eval_tokens=args.eval_tokens, seqlen=args.seqlen, calib_windows=args.calib_samples,
                       calib_seqlen=args.calib_seqlen, train=args.train, steps=args.steps, prune=not args.no_prune,
                       warm_uniform=not args.no_uniform, warm_knapsack=args.warm_knapsack)
    argv = [a for a in sys.argv[1:] if a != "--worker"]
    run_study(loaded, args.budget, args.trials, args.storage, args.study, s, args.calib_data, device,
              args.warm_start, args.warm_start_study, args.workers, args.worker, argv, args.heartbeat,
              default_regressor() if args.train else None)
    if args.worker:
        return 0
    front = pareto_front(args.storage, args.study)
    _emit(args, {"study": args.study, "points": front}, _table(front))
    return 0


def _table(points: list[dict]) -> str:
    head = f"{'trial':>6}{'bytes':>13}{'bpw':>7}{'KL mean':>10}{'KL p99':>9}{'ppl ratio':>11}{'top-1':>8}  start"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(f"{p['trial']:>6}{p['bytes']:>13,}{p['bpw'] or 0:>7.3f}{p['kl_mean']:>10.4f}{p['kl_p99'] or 0:>9.3f}"
                     f"{p['ppl_ratio'] or 0:>11.4f}{p['top1'] or 0:>8.3f}  {p.get('warm_start') or ''}")
    return "\n".join(lines)


def cmd_front(args) -> int:
    from aqsearch.plots import check_plot, plot_front
    from aqsearch.search import pareto_front

    check_storage(args.storage, create=False)
    if args.plot:
        check_plot(args.plot, args.force)
    front = pareto_front(args.storage, args.study)
    if args.plot:
        plot_front(args.storage, args.study, args.plot)
    _emit(args, {"study": args.study, "points": front, "plot": args.plot}, _table(front))
    return 0


def cmd_pick(args) -> int:
    from aqsearch.artifact import check_plan_out, write_plan
    from aqsearch.config import Budget
    from aqsearch.search import pick
    from aqsearch.weights import save_qtensors

    Budget.parse(args.budget)
    check_storage(args.storage, create=False)
    check_plan_out(args.out, args.force)
    plan, point, tensors = pick(args.storage, args.study, args.budget)
    write_plan(args.out, {"plan": plan.to_json(), "bytes": point["bytes"], "bpw": point["bpw"],
                          "measurement": point}, tensors, save_qtensors)
    _emit(args, {"out": args.out, **point}, f"trial {point['trial']}: {point['bytes']:,} B ({point['bpw']:.3f} bpw), "
          f"KL {point['kl_mean']:.4f} -> {args.out}")
    return 0
