"""``aqsearch progressive`` and ``aqsearch replay``."""

from __future__ import annotations

import sys

from aqsearch.cli.common import BUDGET_HELP, add_data, add_model, emit, parse_budget, positive_int, resolve_device
from aqsearch.errors import AqError


def register(sub) -> dict:
    p = sub.add_parser("progressive", help="progressive engine: a plan for a budget, block by block behind gates")
    add_model(p)
    p.add_argument("--budget", required=True, help=BUDGET_HELP)
    p.add_argument("--gate", default=None, help="kl=,p99=,ppl=,top1= (end to end) and mse= (per block); see README")
    p.add_argument("--out", required=True, help="plan JSON to write (polished weights beside it)")
    p.add_argument("--journal", required=True, help="rollback log (JSON lines); the same journal resumes a run")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration windows")
    p.add_argument("--calib-seqlen", type=positive_int, default=256, help="calibration window length")
    p.add_argument("--steps", type=positive_int, default=40, help="block-training steps (bank and polish)")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256), help="group size of the descent")
    p.add_argument("--no-train", action="store_true", help="a round-to-nearest bank (the polish still trains)")
    p.add_argument("--seed", type=int, default=0)
    add_data(p, eval_tokens=4096, seqlen=512)

    p = sub.add_parser("replay", help="rebuild the plan a journal's decisions lead to")
    p.add_argument("--journal", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true")
    return {"progressive": cmd_progressive, "replay": cmd_replay}


def cmd_progressive(args) -> int:
    from aqsearch.artifact import check_plan_out
    from aqsearch.bank import BankConfig
    from aqsearch.cli.run import data_config
    from aqsearch.config import Gate
    from aqsearch.curves import default_regressor
    from aqsearch.io import check_output
    from aqsearch.job import Job
    from aqsearch.pipeline import finish
    from aqsearch.strategies.journal import Journal
    from aqsearch.strategies.progressive import ProgressiveConfig, progressive
    from aqsearch.training import TrainSettings

    budget, gate = parse_budget(args.budget), Gate.parse(args.gate)
    check_plan_out(args.out, args.force)
    check_output(args.journal, "--journal", keep=True)
    data = data_config(args, args.calib_samples, args.calib_seqlen)
    cfg = ProgressiveConfig(group=args.group)
    bank_cfg = BankConfig(menu=cfg.menu(), granularity="layer", steps=0 if args.no_train else args.steps, seed=args.seed)
    job = Job.resolve(args.model, budget, data=data, bank=bank_cfg, polish=TrainSettings(steps=args.steps, seed=args.seed),
                      device=resolve_device(args.device), seed=args.seed)
    bank = job.new_bank(default_regressor() if bank_cfg.steps else None)
    bank.build()
    journal = Journal(args.journal)
    plan = progressive(bank, job.limit, gate, journal, cfg)
    art, rep = finish(job, plan, args.out, {"strategy": "progressive", "journal": str(args.journal)}, journal)
    failures = gate.check(rep["picked"])
    if failures:
        print(f"aqsearch: the plan meets the budget but not the gates: {'; '.join(failures)}", file=sys.stderr)
    m = rep["picked"]
    res = {"out": args.out, "bytes": art.meta["bytes"], "bpw": art.meta["bpw"], "budget_bytes": job.limit,
           "meets_budget": art.meta["bytes"] <= job.limit, "measurement": m, "gate_failures": failures,
           "bank": bank.stats(), "polish": rep["polish"], "plan": plan.to_json()}
    emit(args, res, f"plan: {args.out}  {art.meta['bytes']:,} B ({art.meta['bpw']:.3f} bpw) of {job.limit:,} B\n"
                    f"held-out: KL {m['kl_mean']:.4f} (p99 {m['kl_p99']:.3f}), top-1 {m['top1']:.3f}, "
                    f"ppl ratio {m['ppl_ratio']:.4f}")
    return 0


def cmd_replay(args) -> int:
    from aqsearch.artifact import Artifact, check_plan_out
    from aqsearch.strategies.journal import Journal, replay
    from aqsearch.weights import load_qtensors

    j = Journal(args.journal)
    if not j.path.is_file():
        raise AqError(f"journal not found: {args.journal}")
    check_plan_out(args.out, args.force)
    plan, refs = replay(j)
    trained = {}
    for name, ref in refs.items():
        trained[name] = load_qtensors(j.path.parent / ref["file"], ref["sha256"])[name]
    final = [r for r in j.records() if r["type"] == "final"][-1]
    if final.get("meets_budget") is False:
        print(f"aqsearch: warning: the run this journal records missed its budget: {final['bytes']:,} B of "
              f"{final['budget_bytes']:,} B; the plan is its best attempt", file=sys.stderr)
    if not trained:
        print("aqsearch: the journal holds no polished weights: the artifact is the plan only "
              "(round-to-nearest)", file=sys.stderr)
    Artifact(plan, trained, {"bytes": final["bytes"], "bpw": final["bpw"], "journal": str(args.journal)}).save(args.out)
    emit(args, {"plan": plan.to_json(), "bytes": final["bytes"], "bpw": final["bpw"], "out": args.out,
                "trained_layers": len(trained)}, f"plan rebuilt from {args.journal}: {args.out} ({len(trained)} polished layers)")
    return 0
