"""``aqsearch run``: the main job (``make run``)."""

from __future__ import annotations

from aqsearch.cli.common import BUDGET_HELP, add_data, add_model, emit, format_table, front_table, parse_budget, positive_int, resolve_device


def register(sub) -> dict:
    p = sub.add_parser("run", help="the main job: bank, search, pick by budget, polish, evaluate (small settings)")
    add_model(p)
    add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--budget", default="4.5bpw", help=BUDGET_HELP)
    p.add_argument("--strategy", choices=("study", "knapsack", "progressive"), default="study")
    p.add_argument("--trials", type=positive_int, default=16, help="trials of the study (16: under 10 minutes on 2 cores)")
    p.add_argument("--workdir", default="aqsearch-run", help="folder for the study, the plot and the plan")
    p.add_argument("--seed", type=int, default=0)
    return {"run": cmd_run}


def data_config(args, calib_windows: int = 16, calib_seqlen: int = 128):
    from aqsearch.job import DataConfig

    return DataConfig(args.calib_data, args.eval_data, args.split, calib_windows, calib_seqlen, args.eval_tokens,
                      args.seqlen)


def cmd_run(args) -> int:
    from aqsearch.io import check_output
    from aqsearch.job import Job
    from aqsearch.pipeline import run

    budget = parse_budget(args.budget)
    data = data_config(args)
    data.check()
    from pathlib import Path

    from aqsearch.errors import AqError

    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise AqError(f"--workdir: {args.workdir} is a file, not a folder")
    check_output(args.workdir, "--workdir", folder=True, keep=True)  # the study in it resumes; plan and plot are its own
    job = Job.resolve(args.model, budget, data=data, device=resolve_device(args.device), seed=args.seed)
    res = run(job, args.strategy, workdir=args.workdir, trials=args.trials)
    rows = [{"name": f"picked (trial {res.get('picked_trial')})" if args.strategy == "study" else f"picked ({args.strategy})",
             **res["picked"]}]
    if res["uniform"]:
        rows.append({"name": f"uniform {res['uniform']['scheme']}", **res["uniform"]})
    text = ((f"Pareto front of {res['study']} ({res['storage']}):\n{front_table(res['front'])}\n\n" if "front" in res else "")
            + f"held-out evaluation ({res['eval_data']['source']}), budget {res['budget_bytes']:,} B:\n{format_table(rows)}\n"
            + f"plan: {res['plan']}" + (f"   plot: {res['plot']}" if "plot" in res else ""))
    emit(args, res, text)
    return 0
