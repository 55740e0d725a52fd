"""``aqsearch eval`` and ``aqsearch uniform``."""

from __future__ import annotations

from aqsearch.cli.common import BUDGET_HELP, add_data, add_model, emit, format_table, parse_budget, resolve_device
from aqsearch.errors import AqError


def register(sub) -> dict:
    p = sub.add_parser("eval", help="evaluate a scheme or plan against the full-precision model")
    add_model(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheme", help="uniform scheme, e.g. w4g64 or w3g32s")
    g.add_argument("--plan", help="plan JSON file (an artifact: its polished weights are used)")
    add_data(p)

    p = sub.add_parser("uniform", help="evaluate several uniform schemes, marking those within a budget")
    add_model(p)
    add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--schemes", default="w8g128,w4g64,w4g128,w3g64,w2g64", help="comma-separated schemes")
    p.add_argument("--budget", default=None, help=BUDGET_HELP)
    return {"eval": cmd_eval, "uniform": cmd_uniform}


def setup(args, artifact=None):
    """Model, evaluation set and reference shared by eval and uniform (an artifact is checked against the
    model before any data is made)."""
    from aqsearch.data import calib_eval_sets, check_sources
    from aqsearch.models import load_model
    from aqsearch.quality import build_reference

    device = resolve_device(args.device)
    check_sources(args.calib_data, args.eval_data)
    loaded = load_model(args.model, device=device)
    if artifact is not None:
        from aqsearch.models import check_plan_fits

        check_plan_fits(artifact, loaded.model)
    _, ev = calib_eval_sets(loaded, args.calib_data, args.eval_data, eval_tokens=args.eval_tokens,
                            seqlen=args.seqlen, split=args.split)
    bs = args.batch_size or (8 if device.startswith("cuda") else 1)
    ref = build_reference(loaded.model, ev, batch_size=bs, cache_key=loaded.fingerprint)
    return loaded, ev, ref, bs


def cmd_eval(args) -> int:
    from aqsearch.apply import rtn_weight
    from aqsearch.artifact import Artifact
    from aqsearch.config import Plan
    from aqsearch.quality import evaluate

    art = Artifact(Plan.uniform(args.scheme)) if args.scheme is not None else (
        Artifact.load(args.plan) if args.plan is not None else None)
    loaded, ev, ref, bs = setup(args, art)
    m = evaluate(loaded.model, ref, art and art.plan, weight_fn=art.weight_fn() if art else rtn_weight, batch_size=bs)
    obj = {"model": args.model, "scheme": args.scheme, "plan": args.plan, **m.to_json(),
           "polished": bool(art and art.polished), "seqlen": ev.seqlen, "eval_data": ev.describe(),
           "device": str(next(loaded.model.parameters()).device)}
    emit(args, obj, format_table([dict(name=args.scheme or args.plan or "full precision", **m.to_json())]))
    return 0


def cmd_uniform(args) -> int:
    from aqsearch.config import Plan, QuantScheme
    from aqsearch.models import decoder_layers
    from aqsearch.quality import evaluate

    schemes = [QuantScheme.parse(s) for s in args.schemes.split(",") if s.strip()]
    if not schemes:
        raise AqError(f"--schemes {args.schemes!r} names no scheme: give a comma-separated list such as w8g128,w4g64")
    budget = parse_budget(args.budget) if args.budget else None
    loaded, ev, ref, bs = setup(args)
    limit = budget.resolve(sum(l.numel for l in decoder_layers(loaded.model))) if budget else None
    rows = []
    for s in schemes:
        m = evaluate(loaded.model, ref, Plan.uniform(s), batch_size=bs)
        rows.append({"name": str(s), **m.to_json(), "fits": None if limit is None else m.bytes <= limit})
    table = format_table(rows)
    if limit is not None:
        fits = [r for r in rows if r["fits"]]
        best = min(fits, key=lambda r: r["kl_mean"]) if fits else None
        table += f"\nbudget {budget} = {limit:,} bytes: " + (
            f"best uniform scheme {best['name']} (KL {best['kl_mean']:.4f})" if best else "no uniform scheme fits")
    emit(args, {"model": args.model, "eval_data": ev.describe(), "budget_bytes": limit, "results": rows}, table)
    return 0
