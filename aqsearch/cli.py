"""The ``aqsearch`` command. Contract: DESIGN.md. ``--json`` puts one JSON object on stdout and
nothing else; progress goes to stderr; bad input gives one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time

from aqsearch.errors import AqError


BUDGET_HELP = "memory budget: bytes, 70MiB, 1.5GiB (binary: 2^20, 2^30 B), 70MB, 1.5GB (decimal: 10^6, 10^9 B) or 3.5bpw"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise AqError(f"{self.prog.split()[-1]}: {message}")


def _whole(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be {'positive' if least == 1 else 'zero or more'}, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _nonneg_int(text: str) -> int:
    return _whole(text, 0)


def _add_model(p: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="smollm2-135m (embedded), a Hugging Face id or folder, or a .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_data(p: argparse.ArgumentParser, eval_tokens: int = 4096, seqlen: int = 512) -> None:
    p.add_argument("--calib-data", default=None, help="text file or hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] (default: model samples)")
    p.add_argument("--eval-data", default=None, help="held-out text, same forms (default: model samples)")
    p.add_argument("--eval-tokens", type=_positive_int, default=eval_tokens, help="held-out tokens to evaluate on")
    p.add_argument("--seqlen", type=_positive_int, default=seqlen, help="evaluation window length")
    p.add_argument("--split", type=float, default=None, help="fraction of one text used for calibration when both are the same text")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="windows per forward pass (default: 1 on CPU, 8 on GPU)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="aqsearch", description="Fit a causal LM into a memory budget with the least loss of quality.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="evaluate a scheme or plan against the full-precision model")
    _add_model(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheme", help="uniform scheme, e.g. w4g64 or w3g32s")
    g.add_argument("--plan", help="plan JSON file")
    _add_data(p)

    p = sub.add_parser("run", help="the main job: search, front, pick by budget, evaluate (small settings)")
    _add_model(p)
    _add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--budget", default="4.5bpw", help=BUDGET_HELP)
    p.add_argument("--trials", type=_positive_int, default=16, help="trials of the study (16: under 10 minutes on 2 cores)")
    p.add_argument("--workdir", default="aqsearch-run", help="folder for the study, the plot and the plan")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("uniform", help="evaluate several uniform schemes, marking those within a budget")
    _add_model(p)
    _add_data(p, eval_tokens=2048, seqlen=256)
    p.add_argument("--schemes", default="w8g128,w4g64,w4g128,w3g64,w2g64", help="comma-separated schemes")
    p.add_argument("--budget", default=None, help=BUDGET_HELP)
    p = sub.add_parser("export", help="write an artifact as a folder that transformers / vLLM load (GPTQ, compressed-tensors)")
    p.add_argument("artifact", help="plan JSON written by run or pick (its trained weights file beside it)")
    p.add_argument("--format", required=True, help="gptq or compressed-tensors")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_model(p)
    _plugins(sub)
    return ap


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AqError(f"device {name!r} asked for but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise AqError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    return name


def _emit(args, obj: dict, table: str) -> None:
    if args.json:
        json.dump(obj, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table)


def _setup(args):
    """Model, evaluation set and reference shared by eval and uniform."""
    from aqsearch.data import calib_eval_sets, check_sources
    from aqsearch.models import load_model
    from aqsearch.quality import build_reference

    device = resolve_device(args.device)
    check_sources(args.calib_data, args.eval_data)
    loaded = load_model(args.model, device=device)
    _, ev = calib_eval_sets(loaded, args.calib_data, args.eval_data, eval_tokens=args.eval_tokens,
                            seqlen=args.seqlen, split=args.split)
    bs = args.batch_size or (8 if device.startswith("cuda") else 1)
    ref = build_reference(loaded.model, ev, batch_size=bs, cache_key=loaded.fingerprint)
    return loaded, ev, ref, bs


def cmd_eval(args) -> int:
    from aqsearch.config import Plan
    from aqsearch.quality import evaluate

    from aqsearch.apply import rtn_weight
    from aqsearch.models import decoder_layers
    from aqsearch.weights import load_plan

    plan, weight_fn = (Plan.uniform(args.scheme), rtn_weight) if args.scheme is not None else (
        load_plan(args.plan) if args.plan is not None else (None, rtn_weight))
    loaded, ev, ref, bs = _setup(args)
    if plan is not None:
        plan.check_names(l.name for l in decoder_layers(loaded.model))
    m = evaluate(loaded.model, ref, plan, weight_fn=weight_fn, batch_size=bs)
    obj = {"model": args.model, "scheme": args.scheme, "plan": args.plan, **m.to_json(),
           "seqlen": ev.seqlen, "eval_data": ev.describe(), "device": str(next(loaded.model.parameters()).device)}
    _emit(args, obj, format_table([dict(name=args.scheme or args.plan or "full precision", **m.to_json())]))
    return 0


def cmd_run(args) -> int:
    from aqsearch.config import Budget
    from aqsearch.data import check_sources
    from aqsearch.job import run_job
    from aqsearch.models import load_model

    from aqsearch.io import check_output

    Budget.parse(args.budget)
    check_output(args.workdir, "--workdir", folder=True, keep=True)  # the study in it resumes; plan and plot are its own
    check_sources(args.calib_data, args.eval_data)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    res = run_job(loaded, args.budget, args.workdir, args.trials, args.calib_data, args.eval_data, args.eval_tokens,
                  args.seqlen, device, args.seed)
    from aqsearch.cli_search import _table

    rows = [{"name": f"picked (trial {res['picked_trial']})", **res["picked"]}]
    if res["uniform"]:
        rows.append({"name": f"uniform {res['uniform']['scheme']}", **res["uniform"]})
    text = (f"Pareto front of {res['study']} ({res['storage']}):\n{_table(res['front'])}\n\n"
            f"held-out evaluation ({res['eval_data']['source']}), budget {res['budget_bytes']:,} B:\n{format_table(rows)}\n"
            f"plan: {res['plan']}   plot: {res['plot']}")
    _emit(args, res, text)
    return 0


def cmd_uniform(args) -> int:
    from aqsearch.config import Plan, QuantScheme
    from aqsearch.quality import evaluate

    from aqsearch.config import Budget
    from aqsearch.memory import budget_bytes
    from aqsearch.models import decoder_layers

    schemes = [QuantScheme.parse(s) for s in args.schemes.split(",") if s.strip()]
    if not schemes:
        raise AqError(f"--schemes {args.schemes!r} names no scheme: give a comma-separated list such as w8g128,w4g64")
    budget = Budget.parse(args.budget) if args.budget else None
    loaded, ev, ref, bs = _setup(args)
    limit = budget_bytes(budget, decoder_layers(loaded.model)) if budget else None
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
    _emit(args, {"model": args.model, "eval_data": ev.describe(), "budget_bytes": limit, "results": rows}, table)
    return 0


def format_table(rows: list[dict]) -> str:
    head = f"{'plan':<16}{'bpw':>7}{'bytes':>13}{'KL mean':>10}{'KL p99':>9}{'top-1':>8}{'ppl ratio':>11}{'s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<16}{r['bpw']:>7.3f}{r['bytes']:>13,}{r['kl_mean']:>10.4f}{r['kl_p99']:>9.3f}"
            f"{r['top1']:>8.3f}{r['ppl_ratio']:>11.4f}{r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def cmd_export(args) -> int:
    """``aqsearch export ARTIFACT --format F --out DIR``: the library's :func:`aqsearch.export.export`."""
    from aqsearch.artifact import read_artifact
    from aqsearch.export import check_format, check_loaders, export
    from aqsearch.io import check_output
    from aqsearch.models import load_model

    check_format(args.format)
    plan, tensors = read_artifact(args.artifact)
    check_output(args.out, folder=True, force=args.force)
    check_loaders(args.format)
    loaded = load_model(args.model, device=resolve_device(args.device))
    info = export(loaded.model, plan, tensors, args.out, args.format, loaded.tokenizer)
    obj = {"artifact": args.artifact, "model": args.model, **info}
    _emit(args, obj, f"wrote {args.out} ({args.format}): {info['layers_quantized']}/{info['layers']} decoder Linears "
                     f"quantized, {info['bytes']:,} bytes of quantized tensors (the plan counts {info['plan_bytes']:,})")
    return 0


COMMANDS = {"eval": cmd_eval, "run": cmd_run, "uniform": cmd_uniform, "export": cmd_export}
# Modules that add their own subcommands: each has ``register(sub) -> {name: handler}`` and keeps
# its heavy imports inside the handlers.
PLUGINS = ("aqsearch.cli_progressive", "aqsearch.cli_search", "aqsearch.materialize")


def _plugins(sub) -> None:
    import importlib

    for name in PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        COMMANDS.update(mod.register(sub))


def _join_dash_values(ap: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -3GiB`` -> ``--budget=-3GiB``: argparse would read the value as an unknown option,
    and the user should hear what is wrong with the value instead."""
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    takes_value = {o for sa in subs for sp in sa.choices.values() for a in sp._actions
                   if a.option_strings and a.nargs is None for o in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in takes_value:
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


# Packages of the optional extras (pyproject.toml): a command that needs one that is not installed says
# which extra to install, in one line, instead of an ImportError's traceback.
EXTRAS = {"optuna": "search", "optuna_dashboard": "search", "sklearn": "search", "pandas": "search",
          "matplotlib": "search", "plotly": "search", "triton": "kernels"}


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    try:
        ap = build_parser()
        args = ap.parse_args(_join_dash_values(ap, list(sys.argv[1:] if argv is None else argv)))
        return COMMANDS[args.command](args)
    except AqError as e:
        print(f"aqsearch: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise  # a module of aqsearch itself, or a required dependency: a bug or a broken install
        print(f"aqsearch: error: this command needs {top}: pip install 'aqsearch[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aqsearch: interrupted after {time.time() - t0:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
