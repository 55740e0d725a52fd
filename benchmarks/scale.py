"""What a bank, a study and a polish cost at 135M, 1B and 8B (issue 22), and the 8B pipeline's end-to-end estimate.

Llama-family models with random weights built from a config (their quality numbers mean nothing, their cost
numbers are real), bf16 on the host. Every stage runs block by block (block offload: each block visits the GPU
in fp32, the pipeline's compute dtype, only for its turn; a forward hook on every block records the most
block weights ever resident at once):

1. stream: the calibration windows' embedding (``Activations.capture``) and the full-precision stream through a
   block, seconds a block (the bank needs every block's input and output);
2. bank: one representative block (block 1), every scheme of the menu, trained by ``BlockTraining`` on the
   full-precision stream at full settings (128x2048 windows, 200 steps, batch 8, a quarter held out); per
   candidate: round-to-nearest error, the racing prefix (20 % of the steps), then ``--extra-steps`` more; the
   rest of the run is extrapolated from those steps (the held-out checks keep their cadence), and one scheme
   (``--validate``) is also run to the end to check the extrapolation. Peak GPU memory and host RSS, the bytes
   of a score-only candidate record (JSON, its curve included) and, for reference, of its trained weights;
3. study: one trial = one held-out evaluation of a plan (``--eval-windows`` x seqlen tokens), block-major with
   the plan's weights quantized on the GPU, KL against a reference built the same way (``aqsearch.quality``'s
   statistics); and the cost of scoring a plan from bank scores;
4. polish: ``aqsearch.polish.polish(device=, dtype=)`` (the library's block offload) of uniform w4g64 over the
   first ``--polish-blocks`` blocks at full settings, per block, with its journal's training seconds; the whole
   model's polish is extrapolated block by block;
5. estimate: bank + study + plan racing + polish of the top plans and the uniform hull, on 1, 4 and 8 GPUs and
   two hosts (one process per GPU; the study's RDB storage as the queue), from the measured numbers only
   (``scale_estimate.estimate``; every parameter is in the record).

    python benchmarks/scale.py --shapes 8b,smollm2,1b --out DIR/scale.jsonl   # GPU, full settings
    python benchmarks/scale.py --small                                          # CPU smoke run, tiny shapes

Each stage appends one JSON line (``aqsearch.bench.append_result``) as it finishes, so a run cut short keeps
what it measured; ``--budget-s`` skips optional measurements (the validation run, a second polish block)
when they would not fit, and says so in the records. Shapes are spread one process per visible GPU
(``aqsearch.parallel``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "scale.jsonl"
sys.path.insert(0, str(HERE))
from scale_estimate import MENU  # noqa: E402
from scale_probes import log  # noqa: E402
from scale_shape import SHAPES, Shape  # noqa: E402


def measure(args, name: str) -> str:
    """One shape, every stage (a job of ``aqsearch.parallel.run_per_gpu``)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the project's benchmarks
    sh = Shape(args, name)
    sh.build()
    stages = [("stream", sh.stream), ("bank", sh.bank), ("study", sh.study), ("polish", sh.polish)]
    for k, (stage, fn) in enumerate(stages):
        if sh.left() < args.reserve_s and stage != "stream":
            sh.skipped.append(f"stage {stage} (out of time)")
            log(f"{name}: skipping {stage}, {sh.left():.0f} s left")
            continue
        fn()
    sh.finish()
    sh.watch.close()
    del sh
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return name


class _Job:
    def __init__(self, args):
        self.args = args

    def __call__(self, _state, name):
        return measure(self.args, name)


def _init():
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b,smollm2,1b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--small", action="store_true", help="tiny shapes and settings (a CPU smoke run)")
    ap.add_argument("--out", default=str(OUT), help="JSON-lines file the records are appended to")
    ap.add_argument("--windows", type=int, default=None, help="calibration windows (128; small 8)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration window length (2048; small 32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of a candidate (200; small 10)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--extra-steps", type=int, default=None, help="steps timed after the racing prefix (20; small 2)")
    ap.add_argument("--validate", default="w4g64", help="the scheme also run to the end (checks the extrapolation)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows of a trial (8; small 2)")
    ap.add_argument("--eval-seqlen", type=int, default=None, help="their length (2048; small 32)")
    ap.add_argument("--polish-blocks", type=int, default=2)
    ap.add_argument("--polish-steps", type=int, default=None, help="polish steps (= --steps)")
    ap.add_argument("--menu", default=",".join(MENU))
    ap.add_argument("--blocks", type=int, default=None, help="fewer blocks than the shape has (tests)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="wall seconds for the whole run: optional parts give way")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="seconds kept free for the records at the end")
    ap.add_argument("--device-bytes", type=int, default=24 << 30, help="activation storage allowed on the GPU")
    ap.add_argument("--run", default="", help="run id stored with every record (default: the start time)")
    args = ap.parse_args(argv)
    sm = args.small
    args.windows = args.windows or (8 if sm else 128)
    args.seqlen = args.seqlen or (32 if sm else 2048)
    args.steps = args.steps or (10 if sm else 200)
    args.extra_steps = args.extra_steps or (2 if sm else 20)
    args.eval_windows = args.eval_windows or (2 if sm else 8)
    args.eval_seqlen = args.eval_seqlen or (32 if sm else 2048)
    args.polish_steps = args.polish_steps or args.steps
    args.menu = tuple(s.strip() for s in args.menu.split(",") if s.strip())
    args.run = args.run or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    args.deadline = time.time() + args.budget_s
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"scale: unknown shape(s) {', '.join(bad)}: use {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    from aqsearch.config import QuantScheme
    from aqsearch.parallel import run_per_gpu, visible_gpus

    for s in args.menu + (args.validate,):
        QuantScheme.parse(s)
    gpus = visible_gpus()
    log(f"run {args.run}: shapes {shapes} on {max(1, len(gpus))} device(s) ({'GPUs ' + ','.join(gpus) if gpus else 'CPU'}), "
        f"{args.windows}x{args.seqlen} windows, {args.steps} steps -> {args.out}")
    t0 = time.time()
    out = run_per_gpu(_init, _Job(args), shapes, gpus=gpus, keep_going=True)
    for name, r in zip(shapes, out):
        if isinstance(r, Exception):
            log(f"{name} failed: {r}")
    log(f"done in {time.time() - t0:.0f} s")
    return 1 if any(isinstance(r, Exception) for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
