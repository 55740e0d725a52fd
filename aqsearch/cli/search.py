"""``aqsearch search`` (the polished front into a study), ``aqsearch front`` and ``aqsearch pick``."""

from __future__ import annotations

from aqsearch.cli.common import (BUDGET_HELP, add_data, add_model, emit, front_table, hull_table, parse_budget,
                                 positive_int, resolve_device)
from aqsearch.storage import check_storage


def _add_study(p) -> None:
    p.add_argument("--storage", required=True, help="sqlite:///study.db, postgresql://..., or journal:///file")
    p.add_argument("--study", required=True, help="study name")


def register(sub) -> dict:
    from aqsearch.cli.run import add_front

    p = sub.add_parser("search", help="the polished front: uniform hull, fitted score, score study, plan racing")
    add_model(p)
    _add_study(p)
    add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--budget", required=True, help=BUDGET_HELP + "; A:B a range, A,B,C a list")
    p.add_argument("--workdir", default=None, help="folder for the polished plans (default: beside a sqlite storage)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes building the bank (one per GPU if any)")
    add_front(p)

    p = sub.add_parser("front", help="the polished front of a study, its uniform hull (and a plot)")
    _add_study(p)
    p.add_argument("--plot", default=None, help="write the front as an image (png, svg, pdf)")
    p.add_argument("--force", action="store_true", help="replace an existing --plot")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pick", help="the best polished plan of a study within a budget (no recompute)")
    _add_study(p)
    p.add_argument("--budget", required=True, help=BUDGET_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true")
    return {"search": cmd_search, "front": cmd_front, "pick": cmd_pick}


def _workdir(args) -> str:
    from pathlib import Path

    from aqsearch.storage import storage_file

    if args.workdir:
        return args.workdir
    f = storage_file(args.storage)
    return str(Path(f).parent / f"{args.study}-polished") if f else f"{args.study}-polished"


def cmd_search(args) -> int:
    from aqsearch.cli.run import front_job
    from aqsearch.job import Job
    from aqsearch.storage import make_storage
    from aqsearch.strategies.front import polished_front

    budgets, is_range, data, bank_cfg, polish, cfg = front_job(args)
    check_storage(args.storage, create=True)
    make_storage(args.storage)  # a storage that cannot be opened: one line, before any work
    job = Job.resolve(args.model, budgets, data=data, bank=bank_cfg, polish=polish, device=resolve_device(args.device),
                      seed=args.seed, spread=args.points if is_range else 0)
    bank = job.new_bank()
    bank.build(args.workers)
    res = polished_front(job, bank, args.storage, args.study, _workdir(args), cfg)
    emit(args, res, f"{front_table(res['front'])}\n\nuniform hull:\n{hull_table(res['hull'])}")
    return 0


def cmd_front(args) -> int:
    from aqsearch.plots import check_plot, plot_front
    from aqsearch.strategies.front import summary

    check_storage(args.storage, create=False)
    if args.plot:
        check_plot(args.plot, args.force)
    res = summary(args.storage, args.study)
    if args.plot:
        plot_front(args.storage, args.study, args.plot)
    emit(args, {**res, "points": res["front"], "plot": args.plot},
         f"{front_table(res['front'])}\n\nuniform hull (polished):\n{hull_table(res['hull'])}")
    return 0


def cmd_pick(args) -> int:
    from aqsearch.artifact import check_plan_out
    from aqsearch.strategies.front import pick, save_pick, study_info

    budget = parse_budget(args.budget)
    check_storage(args.storage, create=False)
    check_plan_out(args.out, args.force)
    info = study_info(args.storage, args.study)
    limit = budget.resolve(info["weights"])
    point = pick(args.storage, args.study, limit)
    save_pick(point, args.study, args.out)
    emit(args, {"out": args.out, **point},
         f"trial {point['trial']} ({point['label']}): {point['bytes']:,} B ({point['bpw']:.3f} bpw), held-out KL "
         f"{point['kl_mean']:.4f} (polished) -> {args.out}")
    return 0
