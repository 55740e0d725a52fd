"""``aqsearch progressive`` and ``aqsearch replay`` (contract: DESIGN.md)."""

from __future__ import annotations

import sys

from aqsearch.cli import BUDGET_HELP, _add_data, _add_model, _emit, _positive_int, resolve_device
from aqsearch.artifact import check_plan_out, write_plan
from aqsearch.errors import AqError
from aqsearch.io import check_output


def register(sub) -> dict:
    p = sub.add_parser("progressive", help="progressive engine: a plan for a budget, block by block behind gates")
    _add_model(p)
    p.add_argument("--budget", required=True, help=BUDGET_HELP)
    p.add_argument("--gate", default=None, help="kl=,p99=,ppl=,top1= (end to end) and mse= (per block); see README")
    p.add_argument("--out", required=True, help="plan JSON to write (trained weights beside it)")
    p.add_argument("--journal", required=True, help="rollback log (JSON lines); the same journal resumes a run")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration windows")
    p.add_argument("--calib-seqlen", type=_positive_int, default=256, help="calibration window length")
    p.add_argument("--steps", type=_positive_int, default=40, help="block-training steps")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256), help="group size of the descent")
    p.add_argument("--no-train", action="store_true", help="never train blocks")
    p.add_argument("--no-early-stop", action="store_true", help="train every run to its last step")
    p.add_argument("--seed", type=int, default=0)
    _add_data(p, eval_tokens=4096, seqlen=512)

    p = sub.add_parser("replay", help="rebuild the plan a journal's decisions lead to")
    p.add_argument("--journal", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true")
    return {"progressive": cmd_progressive, "replay": cmd_replay}


def cmd_progressive(args) -> int:
    from aqsearch.config import Budget, Gate
    from aqsearch.curves import default_regressor
    from aqsearch.data import calib_eval_sets
    from aqsearch.journal import Journal
    from aqsearch.memory import format_bytes
    from aqsearch.models import load_model
    from aqsearch.progressive import Engine, Settings
    from aqsearch.rebalance import absolute_floor, gated_floor
    from aqsearch.weights import save_qtensors

    from aqsearch.data import check_sources

    budget, gate = Budget.parse(args.budget), Gate.parse(args.gate)
    check_plan_out(args.out, args.force)
    check_output(args.journal, "--journal", keep=True)
    check_sources(args.calib_data, args.eval_data)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    calib, ev = calib_eval_sets(loaded, args.calib_data, args.eval_data, calib_windows=args.calib_samples,
                                calib_seqlen=args.calib_seqlen, eval_tokens=args.eval_tokens, seqlen=args.seqlen,
                                split=args.split)
    settings = Settings(calib_windows=args.calib_samples, calib_seqlen=args.calib_seqlen, steps=args.steps,
                        group=args.group, train=not args.no_train, early_stop=not args.no_early_stop, seed=args.seed)
    eng = Engine(loaded, budget, gate, settings, Journal(args.journal), calib, ev, default_regressor(),
                 eval_batch=args.batch_size or (8 if device.startswith("cuda") else 1))
    res = eng.run()
    write_plan(args.out, res, eng.trained_tensors(), save_qtensors)
    res["out"] = args.out
    if not res["meets_budget"]:
        gf, af = gated_floor(eng), absolute_floor(eng)
        raise AqError(f"budget {format_bytes(res['budget_bytes'])} ({res['budget_bytes']:,} B) cannot be met: the gates "
                      f"allow no less than {format_bytes(gf)} ({gf:,} B, {8 * gf / eng.n_weights:.2f} bpw); no plan is "
                      f"smaller than {format_bytes(af)} ({af:,} B); best plan found written to {args.out}")
    if res.get("gate_failures"):
        print(f"aqsearch: the plan meets the budget but not the gates: {'; '.join(res['gate_failures'])}", file=sys.stderr)
    m = res.get("measurement") or {}
    _emit(args, res, f"plan: {args.out}  {res['bytes']:,} B ({res['bpw']:.3f} bpw) of {res['budget_bytes']:,} B"
          + (f"\nheld-out: KL {m['kl_mean']:.4f} (p99 {m['kl_p99']:.3f}), top-1 {m['top1']:.3f}, ppl ratio "
             f"{m['ppl_ratio']:.4f}" if m else "")
          + f"\ntraining steps {res['train_steps']:,} of {res['train_steps_without_early_stop']:,}; {res['tries']} tries; "
          f"{res['seconds']:.0f} s")
    return 0


def cmd_replay(args) -> int:
    from aqsearch.journal import Journal, replay
    from aqsearch.weights import load_qtensors, save_qtensors

    j = Journal(args.journal)
    if not j.path.is_file():
        raise AqError(f"journal not found: {args.journal}")
    check_plan_out(args.out, args.force)
    plan, trained_refs = replay(j)
    trained = {}
    for name, ref in trained_refs.items():
        trained[name] = load_qtensors(j.path.parent / ref["file"], ref["sha256"])[name]
    final = [r for r in j.records() if r["type"] == "final"]
    if final and final[-1].get("meets_budget") is False:
        print(f"aqsearch: warning: the run this journal records missed its budget: {final[-1]['bytes']:,} B of "
              f"{final[-1]['budget_bytes']:,} B; the plan is its best attempt", file=sys.stderr)
    res = {"plan": plan.to_json(), "bytes": final[-1]["bytes"] if final else None,
           "bpw": final[-1]["bpw"] if final else None, "measurement": final[-1].get("measurement") if final else None}
    write_plan(args.out, res, trained, save_qtensors)
    _emit(args, {**res, "out": args.out, "trained_layers": len(trained)},
          f"plan rebuilt from {args.journal}: {args.out} ({len(trained)} trained layers)")
    return 0


