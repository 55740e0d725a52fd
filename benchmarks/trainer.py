"""The block trainer on uniform schemes: wall time, time a step, and end-to-end quality (issue 8).

Each scheme trains SmolLM2's 30 blocks in order (SignRound, each block fed the trained blocks before
it: ``aqsearch.polish``) and is then evaluated on held-out text. Schemes run one process per visible
GPU (``aqsearch.parallel``): with 4 GPUs and 8 schemes, two rounds of four, each job alone on its GPU.

    # small settings (CPU): 32 windows of 256 tokens, 40 steps, 4096 held-out tokens
    python benchmarks/trainer.py --schemes w4g64,w3g64
    # full settings (H200s): the acceptance table in one command
    python benchmarks/trainer.py --full --schemes w4g64,w3g32,w3g64,w2g32,w2g64,w4g64f,w3g64f,w2g64f

Every scheme appends one JSON line to benchmarks/results/trainer.jsonl as it finishes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
OUT = HERE / "results" / "trainer.jsonl"


def init(args):
    """Once a worker: the model on its GPU, calibration and evaluation windows, the reference."""
    import torch

    from aqsearch.data import calib_eval_sets
    from aqsearch.models import load_model
    from aqsearch.quality import build_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 evaluation means fp32
    loaded = load_model(args.model, device=device)
    n_tok = None if args.eval_tokens == "all" else int(args.eval_tokens)
    calib, ev = calib_eval_sets(loaded, str(Path(args.data_dir) / "wikitext-2-valid.tokens.txt"),
                                str(Path(args.data_dir) / "wikitext-2-raw-test.txt"), calib_windows=args.calib_windows,
                                calib_seqlen=args.calib_seqlen, eval_tokens=n_tok, seqlen=args.seqlen)
    bs = 8 if device == "cuda" else 1
    ref = build_reference(loaded.model, ev, batch_size=bs)
    return loaded, calib, ev, ref, bs


def job(state, item):
    """Train one uniform scheme, evaluate it: the record."""
    import os

    import torch

    from aqsearch.config import Plan, QuantScheme
    from aqsearch.memory import plan_bytes
    from aqsearch.polish import polish
    from aqsearch.quality import evaluate
    from aqsearch.training import TrainSettings
    from aqsearch.weights import trained_weight_fn

    args, scheme = item
    loaded, calib, ev, ref, bs = state
    plan = Plan.uniform(QuantScheme.parse(scheme))
    ts = TrainSettings(steps=args.steps, batch=args.batch, amp=not args.fp32)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trained, st = polish(loaded.model, plan, calib, ts, regressor=None, desc=f"training {scheme}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    m = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(trained), batch_size=bs)
    mem = plan_bytes(loaded.model, plan)
    return {"job": "trained", "scheme": scheme, "zero": plan.scheme_for("x").zero_format, "train_steps": st["steps"],
            "train_seconds": round(st["seconds"], 2), "seconds_per_step": round(st["seconds"] / max(1, st["steps"]), 5),
            "amp": ts.amp, "batch": ts.batch, "gpu_index": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "calib_windows": args.calib_windows, "calib_seqlen": args.calib_seqlen, "steps": args.steps,
            "eval_windows": ev.windows.shape[0], "seqlen": args.seqlen, "calib_hash": calib.hash,
            "eval_hash": ev.hash, **m.to_json(), "bytes": mem.bytes, "bpw": mem.bpw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="w4g64,w3g64", help="comma-separated uniform schemes")
    ap.add_argument("--full", action="store_true", help="128x2048 calibration windows, 200 steps, whole test set")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA), help="folder with the WikiText-2 files")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-tokens", default="4096")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--fp32", action="store_true", help="train in fp32 (no bf16 autocast): the old trainer's numerics")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.full:
        args.calib_windows, args.calib_seqlen, args.steps, args.eval_tokens, args.seqlen = 128, 2048, 200, "all", 2048
    from aqsearch.bench import append_result
    from aqsearch.config import QuantScheme
    from aqsearch.models import load_model
    from aqsearch.parallel import run_per_gpu, visible_gpus

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for s in schemes:
        QuantScheme.parse(s)  # bad names fail here, before any work
    load_model(args.model)  # convert once here, so that the workers only read the cache
    gpus = visible_gpus()
    t0 = time.time()

    def done(i, rec):
        if isinstance(rec, Exception):
            print(f"{schemes[i]} failed: {rec}", file=sys.stderr)
            return
        rec.update(workers=max(1, min(len(gpus), len(schemes))), tag=args.tag, wall_since_start=round(time.time() - t0, 1))
        append_result(args.out, rec)
        print(f"{rec['scheme']:>8}  train {rec['train_seconds']:7.1f} s  {1e3 * rec['seconds_per_step']:6.1f} ms/step  "
              f"KL {rec['kl_mean']:.4f}  p99 {rec['kl_p99']:.3f}  top1 {rec['top1']:.3f}  ppl x{rec['ppl_ratio']:.3f}  "
              f"{rec['bpw']:.4f} bpw", file=sys.stderr, flush=True)

    run_per_gpu(_Init(args), job, [(args, s) for s in schemes], gpus=gpus, on_result=done, keep_going=True)
    print(f"all {len(schemes)} schemes in {time.time() - t0:.1f} s on {max(1, len(gpus))} device(s)", file=sys.stderr)


class _Init:
    """A picklable ``init`` bound to the arguments (it crosses into the spawned workers)."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        return init(self.args)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
