"""The progressive engine on SmolLM2 against uniform schemes at the same budget (issue 3's acceptance).

One process runs one job, so that several can share a GPU side by side:

    # small settings (CPU): 32 windows of 256 tokens, 40 steps, 4096 held-out tokens
    python benchmarks/progressive.py plan --budget 4.5bpw
    python benchmarks/progressive.py plan --budget 4.5bpw --no-early-stop     # the same run, every step
    python benchmarks/progressive.py uniform --budget 4.5bpw                  # best RTN scheme that fits
    python benchmarks/progressive.py trained --scheme w4g64                   # a uniform scheme, trained
    # full settings (H200): --calib-windows 128 --calib-seqlen 2048 --steps 200 --eval-tokens all --seqlen 2048

Every job appends one JSON line to benchmarks/results/progressive.jsonl (journals go to
benchmarks/results/journals/, which git ignores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from aqsearch.bench import append_result
from aqsearch.config import Budget, Gate, Plan, QuantScheme, all_schemes
from aqsearch.curves import default_regressor
from aqsearch.data import calib_eval_sets
from aqsearch.journal import Journal
from aqsearch.memory import plan_bytes
from aqsearch.models import load_model
from aqsearch.polish import polish
from aqsearch.progressive import Engine, Settings
from aqsearch.quality import build_reference, evaluate
from aqsearch.training import TrainSettings
from aqsearch.weights import trained_weight_fn

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
OUT = HERE / "results" / "progressive.jsonl"


def setup(args):
    loaded = load_model(args.model, device=args.device)
    n_tok = None if args.eval_tokens == "all" else int(args.eval_tokens)
    calib, ev = calib_eval_sets(loaded, str(Path(args.data_dir) / "wikitext-2-valid.tokens.txt"), str(Path(args.data_dir) / "wikitext-2-raw-test.txt"),
                                calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen, eval_tokens=n_tok,
                                seqlen=args.seqlen)
    bs = 8 if args.device.startswith("cuda") else 1
    return loaded, calib, ev, bs


def settings_of(args, calib, ev) -> dict:
    return {"model": args.model, "device": args.device, "calib_windows": args.calib_windows,
            "calib_seqlen": args.calib_seqlen, "steps": args.steps, "eval_windows": ev.windows.shape[0],
            "seqlen": args.seqlen, "calib_hash": calib.hash, "eval_hash": ev.hash}


def job_plan(args, loaded, calib, ev, bs):
    tag = f"{args.budget}-{'es' if not args.no_early_stop else 'full'}-{args.tag}"
    jpath = Path(args.journal_dir) / f"progressive-{tag}.jsonl"
    if jpath.exists() and not args.resume:
        jpath.unlink()
    s = Settings(calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen, steps=args.steps,
                 early_stop=not args.no_early_stop, group=args.group)
    eng = Engine(loaded, args.budget, Gate.parse(args.gate), s, Journal(jpath), calib, ev, default_regressor(), bs)
    res = eng.run()
    return {"job": "plan", "budget": args.budget, "gate": args.gate, "early_stop": not args.no_early_stop,
            "plan": res["plan"], "bytes": res["bytes"], "bpw": res["bpw"], "meets_budget": res["meets_budget"],
            "train_steps": res["train_steps"], "train_steps_without_early_stop": res["train_steps_without_early_stop"],
            "tries": res["tries"], "engine_seconds": res["seconds"], "peak_rss_bytes": res.get("peak_rss_bytes"),
            "peak_gpu_bytes": res.get("peak_gpu_bytes"), "journal": jpath.name, **res["measurement"]}


def job_uniform(args, loaded, calib, ev, bs):
    """Every uniform RTN scheme that fits the budget; the record holds the best and all of them."""
    limit = Budget.parse(args.budget).resolve(plan_bytes(loaded.model, Plan.uniform("w8g128")).weights)
    fits = [s for s in all_schemes(False) + all_schemes(True)
            if plan_bytes(loaded.model, Plan.uniform(s)).bytes <= limit]
    fits = sorted(fits, key=lambda s: -plan_bytes(loaded.model, Plan.uniform(s)).bytes)[: args.top]
    ref = build_reference(loaded.model, ev, batch_size=bs)
    rows = [{"scheme": str(s), **evaluate(loaded.model, ref, Plan.uniform(s), batch_size=bs).to_json()} for s in fits]
    best = min(rows, key=lambda r: r["kl_mean"])
    return {"job": "uniform", "budget": args.budget, "budget_bytes": limit, "candidates": rows, **best}


def job_trained(args, loaded, calib, ev, bs):
    plan = Plan.uniform(QuantScheme.parse(args.scheme))
    ts = TrainSettings(steps=args.steps, batch=8)
    jpath = Path(args.journal_dir) / f"trained-{args.scheme}-{args.tag}.jsonl"
    if jpath.exists() and not args.resume:
        jpath.unlink()
    trained, st = polish(loaded.model, plan, calib, ts, regressor=None, journal=Journal(jpath),
                         desc=f"training uniform {args.scheme}")
    ref = build_reference(loaded.model, ev, batch_size=bs)
    m = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(trained), batch_size=bs)
    return {"job": "trained", "scheme": args.scheme, "train_steps": st["steps"], "train_seconds": st["seconds"],
            "journal": jpath.name, **m.to_json()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", choices=("plan", "uniform", "trained"))
    ap.add_argument("--budget", default="4.5bpw")
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--gate", default="mse=0.005")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA), help="folder with the WikiText-2 files")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-tokens", default="4096")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--no-early-stop", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep an existing journal (resume it)")
    ap.add_argument("--top", type=int, default=6, help="uniform: evaluate the N largest schemes that fit")
    ap.add_argument("--tag", default="")
    ap.add_argument("--journal-dir", default=str(HERE / "results" / "journals"))
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: numbers comparable with the CPU
    t0 = time.time()
    loaded, calib, ev, bs = setup(args)
    rec = {"plan": job_plan, "uniform": job_uniform, "trained": job_trained}[args.job](args, loaded, calib, ev, bs)
    rec.update(settings_of(args, calib, ev), seconds=time.time() - t0, tag=args.tag)
    append_result(args.out, rec)
    print({k: rec[k] for k in ("job", "kl_mean", "bytes", "bpw", "seconds") if k in rec}, file=sys.stderr)


if __name__ == "__main__":
    main()
