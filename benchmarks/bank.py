"""The whole pipeline as one command (issue 9): bank (raced) -> 200-trial study -> picks at five sizes ->
polish -> whole-test-set evaluation. Writes JSON lines to ``benchmarks/results/bank.jsonl``.

    # GPU host (one worker process per visible GPU builds the bank):
    python benchmarks/bank.py --full
    # CPU, small settings (minutes on 2 cores):
    python benchmarks/bank.py --small

Sizes: the bytes of uniform integer-zero w4g64, w3g32, w3g64, w2g32 and w2g64 (4.3125, 3.59375, 3.296875,
2.5625, 2.28125 bpw); at each the front's best plan of no more bytes is polished and scored on the whole
WikiText-2 test set (``--full``; ``--small`` scores a slice) beside round-to-nearest of the uniform
scheme, and (``--uniform-trained``) the same trainer's uniform scheme. ``--compare-full`` then finishes
every candidate the race stopped and repeats study, picks and polish on the full bank: the racing
savings in steps and in KL at the five sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SIZES = ("w4g64", "w3g32", "w3g64", "w2g32", "w2g64")
MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w2g32", "w2g64")
SMALL_MENU = ("w4g64", "w3g32", "w3g64", "w2g64")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    import optuna
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
           "transformers": transformers.__version__, "host": platform.node(), "cpus": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def windows(path: Path, tok, seqlen: int, n: int | None, spread: bool):
    from aqsearch.data import TokenSet, file_ids

    ids = file_ids(str(path), tok)
    n = n or ids.numel() // seqlen
    return TokenSet.from_ids(ids, seqlen, n, path.name, spread=spread)


def pick_and_polish(loaded, storage, study, sizes, calib, ref, ts, bs, from_bank: bool = False) -> list[dict]:
    from aqsearch.polish import polish
    from aqsearch.quality import evaluate
    from aqsearch.search import pick
    from aqsearch.weights import trained_weight_fn

    rows = []
    for name, limit in sizes.items():
        plan, point, tensors = pick(storage, study, limit)
        t0 = time.time()
        init = tensors if from_bank else None  # from the model's weights by default: benchmarks/compose_gap.py
        polished, st = polish(loaded.model, plan, calib, ts, init=init, desc=f"polishing at {name}")
        t_pol = time.time() - t0
        m = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(polished), batch_size=bs)
        m0 = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(tensors), batch_size=bs)
        rows.append({"size": name, "budget_bytes": limit, "trial": point["trial"], "bytes": m.bytes, "bpw": m.bpw,
                     "kl": m.kl_mean, "kl_before_polish": m0.kl_mean, "ppl_ratio": m.ppl_ratio, "top1": m.top1,
                     "polish_seconds": t_pol, "polish_steps": st["steps"], "study_kl": point["kl_mean"]})
        log(f"{name}: {m.bpw:.4f} bpw KL {m.kl_mean:.4f} (before polish {m0.kl_mean:.4f})")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--full", action="store_true", help="128x2048 windows, 200 steps, 200 trials, whole test set")
    g.add_argument("--small", action="store_true", help="CPU settings")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--polish-steps", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--menu", default=None, help=f"schemes of every block (default {','.join(MENU)}; small: "
                                                 f"{','.join(SMALL_MENU)})")
    ap.add_argument("--workers", type=int, default=None, help="bank worker processes (default: one per GPU)")
    ap.add_argument("--rule", choices=("hull", "pareto"), default="hull")
    ap.add_argument("--no-race", action="store_true")
    ap.add_argument("--compare-full", action="store_true", help="also finish every stopped candidate and compare")
    ap.add_argument("--uniform-trained", action="store_true", help="also train the five uniform schemes (baseline)")
    ap.add_argument("--model", default="smollm2-135m", help="model name, folder or .gguf (bank workers load it too)")
    ap.add_argument("--data-dir", default=str(DATA), help="folder with the two WikiText-2 files")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "bank-work"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bank.jsonl"))
    ap.add_argument("--sizes", default=",".join(SIZES), help="uniform schemes whose bytes are the pick sizes")
    ap.add_argument("--polish-from", choices=("fp", "bank"), default="fp",
                    help="start the polish from the model's weights (fp) or the bank's trained weights (bank)")
    args = ap.parse_args()

    import torch

    from aqsearch.bank import Bank, BankSettings
    from aqsearch.bankbuild import build_bank
    from aqsearch.config import Plan
    from aqsearch.curves import default_regressor
    from aqsearch.data import TokenSet
    from aqsearch.memory import plan_bytes
    from aqsearch.models import load_model
    from aqsearch.polish import polish
    from aqsearch.quality import build_reference, evaluate
    from aqsearch.search import SearchSettings, run_study
    from aqsearch.training import TrainSettings
    from aqsearch.weights import trained_weight_fn

    full = args.full
    n_win, seqlen = args.windows or (128 if full else 16), args.seqlen or (2048 if full else 128)
    steps, trials = args.steps or (200 if full else 4), args.trials or (200 if full else 16)
    polish_steps = args.polish_steps or (50 if full else 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bs = 8 if device == "cuda" else 1
    t = {"start": time.time()}
    stage = {}
    loaded = load_model(args.model, device=device)
    data = Path(args.data_dir)
    calib = windows(data / "wikitext-2-valid.tokens.txt", loaded.tokenizer, seqlen, n_win, spread=True)
    test = windows(data / "wikitext-2-raw-test.txt", loaded.tokenizer, 2048 if full else 256, None if full else 8,
                   spread=False)
    menu = tuple((args.menu or ",".join(MENU if full else SMALL_MENU)).split(","))
    bset = BankSettings(schemes=menu, granularity="block", steps=steps, batch=8, race=not args.no_race, rule=args.rule)
    work = Path(args.work)
    bank = Bank(work / "bank", loaded.model, loaded.fingerprint, calib, bset, default_regressor())
    t0 = time.time()
    bstats = build_bank(bank, args.model, args.workers)
    stage["bank"] = time.time() - t0
    log(f"bank: {bstats} ({stage['bank']:.0f} s)")

    # trials are scored on held-out calibration windows (never trained on), not on the test set
    n_held = max(1, round(n_win * bset.heldout))
    held = calib.windows[n_win - n_held:][: max(1, (16384 if full else 1024) // seqlen)]
    score = TokenSet(held, f"{calib.source} held-out", f"{calib.hash}-held{len(held)}")
    sizes = {s: plan_bytes(loaded.model, Plan.uniform(s)).bytes for s in args.sizes.split(",")}
    settings = SearchSettings(granularity="block", schemes=menu, train=True, steps=steps, seed=0,
                              warm_budgets=tuple(sizes.values()), warm_uniform=True, seqlen=seqlen)
    storage = f"sqlite:///{work / 'study.db'}"
    study = f"bank-{bank.key}-{int(time.time())}"
    t0 = time.time()
    run_study(loaded, max(sizes.values()), trials, storage, study, settings, None, device, bank=bank, score=score)
    stage["study"] = time.time() - t0
    log(f"study: {trials} trials ({stage['study']:.0f} s)")

    t0 = time.time()
    ref = build_reference(loaded.model, test, batch_size=bs)
    stage["reference"] = time.time() - t0
    ts = TrainSettings(steps=polish_steps, batch=8)
    t0 = time.time()
    rows = pick_and_polish(loaded, storage, study, sizes, calib, ref, ts, bs, args.polish_from == "bank")
    stage["polish_and_eval"] = time.time() - t0
    for r in rows:
        r["kl_uniform_rtn"] = evaluate(loaded.model, ref, Plan.uniform(r["size"]), batch_size=bs).kl_mean
        if args.uniform_trained:
            q, _ = polish(loaded.model, Plan.uniform(r["size"]), calib, TrainSettings(steps=steps, batch=8))
            r["kl_uniform_trained"] = evaluate(loaded.model, ref, Plan.uniform(r["size"]),
                                               weight_fn=trained_weight_fn(q), batch_size=bs).kl_mean
            r["ratio_to_uniform_trained"] = r["kl"] / r["kl_uniform_trained"]
    stage["pipeline"] = time.time() - t["start"]
    rec = {"bench": "bank", "mode": "full" if full else "small", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": versions(), "settings": {**asdict(bset), "windows": n_win, "seqlen": seqlen, "trials": trials,
                                               "polish_steps": polish_steps, "test_windows": len(test.windows),
                                               "polish_from": args.polish_from},
           "stage_seconds": stage, "bank": bstats, "rows": rows, "study": study, "storage": storage}
    if args.compare_full:
        t0 = time.time()
        for c in bank.candidates():
            if not c.finished:
                bank.finish(c.unit, c.scheme)
        stage["finish_stopped"] = time.time() - t0
        study_full = study + "-fullbank"
        run_study(loaded, max(sizes.values()), trials, storage, study_full, settings, None, device, bank=bank, score=score)
        full_rows = pick_and_polish(loaded, storage, study_full, sizes, calib, ref, ts, bs, args.polish_from == "bank")
        rec["full_bank_rows"] = full_rows
        rec["racing_kl_ratio"] = {a["size"]: a["kl"] / b["kl"] for a, b in zip(rows, full_rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    log(f"stages: {json.dumps({k: round(v, 1) for k, v in stage.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
