"""``aqsearch search``, ``aqsearch front`` and ``aqsearch pick``."""

from __future__ import annotations

import sys

from aqsearch.cli.common import BUDGET_HELP, add_model, emit, front_table, nonneg_int, parse_budget, positive_int, resolve_device
from aqsearch.storage import check_storage


def _add_study(p) -> None:
    p.add_argument("--storage", required=True, help="sqlite:///study.db, postgresql://..., or journal:///file")
    p.add_argument("--study", required=True, help="study name")


def register(sub) -> dict:
    p = sub.add_parser("search", help="Optuna study: the Pareto front of held-out KL against bytes")
    add_model(p)
    _add_study(p)
    p.add_argument("--budget", required=True, help="largest size of interest; " + BUDGET_HELP[len("memory budget: "):])
    p.add_argument("--trials", type=positive_int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive_int, default=1, help="processes (one per GPU if any)")
    p.add_argument("--granularity", choices=("layer", "block"), default="layer")
    p.add_argument("--embeddings", action="store_true", help="the token embedding and LM head as units too")
    p.add_argument("--menu", default=None, help="comma-separated schemes of the decoder units (default: every scheme)")
    p.add_argument("--kernel-schemes", action="store_true", help="only schemes the Triton kernels run")
    p.add_argument("--sampler", choices=("local", "tpe", "nsga2"), default="local")
    p.add_argument("--population", type=positive_int, default=30, help="NSGA-II's generation size")
    p.add_argument("--calib-data", default=None, help="text file or hf:... (default: model samples); split in two")
    p.add_argument("--eval-data", default=None, help="held-out text for the pick's numbers (default: model samples)")
    p.add_argument("--split", type=float, default=None, help="fraction of one text used for calibration")
    p.add_argument("--eval-tokens", type=positive_int, default=4096, help="held-out tokens (half score the trials)")
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--calib-samples", type=positive_int, default=16, help="windows to train units on")
    p.add_argument("--calib-seqlen", type=positive_int, default=256)
    p.add_argument("--train", action="store_true", help="train the bank's candidates (default: round-to-nearest)")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--no-prune", action="store_true", help="never prune trials")
    p.add_argument("--warm-start", action="append", default=[], help="plan JSON to enqueue (repeatable)")
    p.add_argument("--warm-start-study", default=None, help="enqueue the finished trials of this study")
    p.add_argument("--no-uniform", action="store_true", help="do not enqueue the uniform schemes")
    p.add_argument("--warm-knapsack", type=nonneg_int, default=4, metavar="N",
                   help="enqueue the knapsack allocation at N budgets up to the limit first (0: none)")
    p.add_argument("--heartbeat", type=positive_int, default=30, help="seconds between heartbeats (RDB storages)")

    p = sub.add_parser("front", help="the Pareto table of a study (and a plot)")
    _add_study(p)
    p.add_argument("--plot", default=None, help="write the front as an image (png, svg, pdf)")
    p.add_argument("--force", action="store_true", help="replace an existing --plot")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pick", help="the best plan of a study within a budget, polished like run's")
    _add_study(p)
    p.add_argument("--budget", required=True, help=BUDGET_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--no-polish", action="store_true", help="write the plan only (round-to-nearest), no polish")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true")
    return {"search": cmd_search, "front": cmd_front, "pick": cmd_pick}


def _menu(args) -> tuple[str, ...]:
    from aqsearch.space import scheme_choices

    if args.menu is not None:
        return tuple(s for s in args.menu.split(",") if s.strip())
    return scheme_choices(args.kernel_schemes)


def cmd_search(args) -> int:
    from aqsearch.bank import BankConfig
    from aqsearch.cli.run import data_config
    from aqsearch.curves import default_regressor
    from aqsearch.job import Job
    from aqsearch.strategies.study import StudyConfig, check_resumable, pareto_front, run_study

    from aqsearch.storage import make_storage

    budget = parse_budget(args.budget)
    check_storage(args.storage, create=True)
    make_storage(args.storage, args.heartbeat)  # a storage that cannot be opened: one line, before any work
    data = data_config(args, args.calib_samples, args.calib_seqlen)
    data.check()
    bank_cfg = BankConfig(menu=_menu(args), granularity=args.granularity, steps=args.steps if args.train else 0,
                          seed=args.seed)
    job = Job.resolve(args.model, budget, data=data, bank=bank_cfg, device=resolve_device(args.device), seed=args.seed)
    check_resumable(job, args.storage, args.study, job.limit)
    bank = job.new_bank(default_regressor() if args.train else None)
    bank.build(args.workers)
    cfg = StudyConfig(sampler=args.sampler, population=args.population, seed=args.seed, prune=not args.no_prune,
                      warm_uniform=not args.no_uniform, warm_knapsack=args.warm_knapsack, embeddings=args.embeddings,
                      heartbeat=args.heartbeat)
    run_study(job, bank, args.storage, args.study, args.trials, cfg, workers=args.workers, warm_plans=args.warm_start,
              warm_study=args.warm_start_study)
    front = pareto_front(args.storage, args.study)
    emit(args, {"study": args.study, "points": front}, front_table(front))
    return 0


def cmd_front(args) -> int:
    from aqsearch.plots import check_plot, plot_front
    from aqsearch.strategies.study import pareto_front

    check_storage(args.storage, create=False)
    if args.plot:
        check_plot(args.plot, args.force)
    front = pareto_front(args.storage, args.study)
    if args.plot:
        plot_front(args.storage, args.study, args.plot)
    emit(args, {"study": args.study, "points": front, "plot": args.plot}, front_table(front))
    return 0


def cmd_pick(args) -> int:
    from aqsearch.artifact import Artifact, check_plan_out
    from aqsearch.strategies.study import pick, study_info

    budget = parse_budget(args.budget)
    check_storage(args.storage, create=False)
    check_plan_out(args.out, args.force)
    info = study_info(args.storage, args.study)
    limit = budget.resolve(info["weights"])
    plan, point = pick(args.storage, args.study, limit)
    if args.no_polish:
        Artifact(plan, {}, {"bytes": point["bytes"], "bpw": point["bpw"], "trial": point["trial"]}).save(args.out)
        print(f"aqsearch: {args.out} is the plan only (not polished: --no-polish); eval and materialize use "
              "round-to-nearest weights", file=sys.stderr)
        emit(args, {"out": args.out, "polished": False, **point}, f"trial {point['trial']}: {point['bytes']:,} B "
             f"({point['bpw']:.3f} bpw), score KL {point['kl_mean']:.4f} -> {args.out} (plan only)")
        return 0
    job = _job_of(info, limit, resolve_device(args.device))
    art, rep = _finish(job, plan, args.out, point)
    emit(args, {"out": args.out, "polished": art.polished, "trial": point["trial"], **rep},
         f"trial {point['trial']}: {art.meta['bytes']:,} B ({art.meta['bpw']:.3f} bpw), held-out KL "
         f"{rep['picked']['kl_mean']:.4f} after the polish -> {args.out}")
    return 0


def _job_of(info: dict, limit: int, device: str):
    """The job the study was made for (its recorded model, data and settings), at ``limit`` bytes."""
    from aqsearch.bank import BankConfig
    from aqsearch.errors import AqError
    from aqsearch.job import DataConfig, Job
    from aqsearch.training import TrainSettings

    j = info.get("job")
    if not j:
        raise AqError("the study records no job (made by an older aqsearch): pick --no-polish writes its plan only")
    job = Job.resolve(j["model"], limit, data=DataConfig(**j["data"]),
                      bank=BankConfig(**{**j["bank"], "menu": tuple(j["bank"]["menu"])}),
                      polish=TrainSettings(**j["polish"]), device=device, seed=j["seed"])
    if job.loaded.fingerprint != j["fingerprint"] or job.calib.hash != j["calib"]:
        raise AqError(f"model {j['model']} or its data is not what the study was made with (fingerprint or windows differ)")
    return job


def _finish(job, plan, out: str, point: dict):
    from aqsearch.pipeline import finish

    return finish(job, plan, out, {"strategy": "study", "trial": point["trial"], "score_kl": point["kl_mean"]})
