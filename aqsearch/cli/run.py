"""``aqsearch run``: the main job (``make run``)."""

from __future__ import annotations

from aqsearch.cli.common import (BUDGET_HELP, add_data, add_model, emit, format_table, front_table, hull_table,
                                 parse_budgets, positive_int, resolve_device)


def add_front(p, trials: int = 300, hull: str = "range", granularity: str = "layer", promote: int = 3) -> None:
    """Options of the polished front (``run`` and ``search``)."""
    p.add_argument("--points", type=positive_int, default=6, help="budgets a range A:B is cut into (default 6)")
    p.add_argument("--trials", type=positive_int, default=trials, help="trials of the score study (no model evaluation)")
    p.add_argument("--promote", type=positive_int, default=promote, help="plans a byte range sends to the race")
    p.add_argument("--hull", choices=("range", "menu"), default=hull,
                   help="uniform schemes polished: those around the budgets (range) or every scheme of the menu")
    p.add_argument("--no-race", action="store_true", help="polish every promoted plan fully (no racing)")
    p.add_argument("--menu", default=None, help="comma-separated schemes of the units (default: the job's menu)")
    p.add_argument("--granularity", choices=("layer", "block"), default=granularity,
                   help="units: fused layer groups in each block, or whole blocks")
    p.add_argument("--polish-steps", type=positive_int, default=12, help="polish steps a block")
    p.add_argument("--calib-windows", type=positive_int, default=16, help="calibration windows (a quarter judge)")
    p.add_argument("--calib-seqlen", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)


def register(sub) -> dict:
    p = sub.add_parser("run", help="the main job: bank, polished front, pick by budget, evaluate (small settings)")
    add_model(p)
    add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--budget", default="4.5bpw", help=BUDGET_HELP + "; A:B builds a front across a range, A,B,C a list")
    p.add_argument("--strategy", choices=("study", "knapsack", "progressive"), default="study")
    p.add_argument("--workdir", default="aqsearch-run", help="folder for the study, the polished plans, the plot and the plan")
    # whole blocks, two plans a range: make run within 10 minutes on 2 cores (search: layer units, three)
    add_front(p, trials=100, granularity="block", promote=2)
    return {"run": cmd_run}


def data_config(args, calib_windows: int = 16, calib_seqlen: int = 128):
    from aqsearch.job import DataConfig

    return DataConfig(args.calib_data, args.eval_data, args.split, calib_windows, calib_seqlen, args.eval_tokens,
                      args.seqlen)


def front_job(args):
    """The job and the front's settings that ``run`` and ``search`` share, checked before any work."""
    from aqsearch.bank import BankConfig
    from aqsearch.job import JOB_MENU
    from aqsearch.strategies.front import FrontConfig
    from aqsearch.training import TrainSettings

    budgets, is_range = parse_budgets(args.budget)
    data = data_config(args, args.calib_windows, args.calib_seqlen)
    data.check()
    menu = tuple(s for s in args.menu.split(",") if s.strip()) if args.menu else JOB_MENU
    bank = BankConfig(menu=menu, granularity=args.granularity, steps=0, seed=args.seed)
    cfg = FrontConfig(hull=args.hull, promote=args.promote, trials=args.trials, race=not args.no_race, seed=args.seed)
    return budgets, is_range, data, bank, TrainSettings(steps=args.polish_steps, batch=8, seed=args.seed), cfg


def cmd_run(args) -> int:
    from pathlib import Path

    from aqsearch.errors import AqError
    from aqsearch.io import check_output
    from aqsearch.job import Job
    from aqsearch.pipeline import run

    budgets, is_range, data, bank, polish, cfg = front_job(args)
    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise AqError(f"--workdir: {args.workdir} is a file, not a folder")
    check_output(args.workdir, "--workdir", folder=True, keep=True)  # the study in it resumes; plan and plot are its own
    job = Job.resolve(args.model, budgets, data=data, bank=bank, polish=polish, device=resolve_device(args.device),
                      seed=args.seed, spread=args.points if is_range else 0)
    res = run(job, args.strategy, workdir=args.workdir, trials=args.trials, front_config=cfg)
    name = f"picked (trial {res.get('picked_trial')})" if args.strategy == "study" else f"picked ({args.strategy})"
    rows = [{"name": name, **res["picked"]}]
    if res["uniform"]:
        rows.append({"name": f"uniform {res['uniform']['scheme']}", **res["uniform"]})
    text = ((f"polished front of {res['study']} ({res['storage']}):\n{front_table(res['front'])}\n\n"
             f"uniform hull (polished the same way):\n{hull_table(res['hull'])}\n\n" if "front" in res else "")
            + f"held-out evaluation ({res['eval_data']['source']}), budget {res['budget_bytes']:,} B, both polished:\n"
            + f"{format_table(rows)}\n" + f"plan: {res['plan']}" + (f"   plot: {res['plot']}" if "plot" in res else ""))
    emit(args, res, text)
    return 0
