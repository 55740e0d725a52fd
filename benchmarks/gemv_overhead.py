"""Where the M = 1 GEMV's time goes that the weight bytes do not explain: a fit of time against bytes.

Issue 21's six shapes fit ``t = t0 + bytes / bw`` with t0 ~ 4-5 us for every kernel, cuBLAS included, and bw
close to the copy bandwidth at 4 and 8 bits: at 8192 x 8192 (a 34 MB w4 weight) that fixed part is a third of
the time. This probe measures it directly, the same way ``matmul.py`` times (CUDA-graph replays over rotating
weight copies, > 3x L2), over a ladder of N at K = 4096 and 8192:

- ``empty``: a chain of empty Triton kernels (the launch gap a graph node costs);
- ``copy``: ``torch.Tensor.copy_`` of the same bytes as each w4 weight (read + write counted);
- ``cublas``: fp16 ``x @ W.T`` at M = 1;
- ``pk``: our GEMV at 2/4/8 bits with one base config each, with programmatic dependent launch off, at the
  start (``early``, prefetch 0 / 1 tile) and after the K loop (``late``, prefetch 0 / 1 / 2 tiles).

Issue 21's run ten also timed the words stored column-block-major (each program's K-slice one contiguous run;
commit 29658df, series ``lb256`` in ``results/gemv_overhead.jsonl``): no change, so that layout was not kept.

Each line of ``--out`` (JSON) holds one series' points and its least-squares ``t0_us`` / ``bw_gbps``.

    python benchmarks/gemv_overhead.py --out benchmarks/results/gemv_overhead.jsonl   # ~1 min on an H100
    python benchmarks/gemv_overhead.py --dry-run --out /tmp/o.jsonl                  # CPU: the script runs
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from matmul import cublas_point, device, graph_time, n_copies, quant_point  # noqa: E402

LADDER = ((4096, 4096), (4096, 8192), (8192, 8192), (4096, 14336), (4096, 28672), (8192, 28672))
# one base config a bit width (BN, warps = kw, BKS, split at 2 programs an SM, pipelined): issue 21's w4 winner
BASE = {"pk": True, "BN": 256, "BKS": 128, "num_warps": 4, "kw": 4, "num_stages": 3}
BASE3 = {"pk": True, "BN": 128, "BKS": 128, "num_warps": 1, "num_stages": 3}
MODES = {"off": {}, "early-pf0": {"pdl": True, "pf": 0}, "early": {"pdl": True},
         "late-pf0": {"pdl": True, "late": True, "pf": 0}, "late": {"pdl": True, "late": True},
         "late-pf2": {"pdl": True, "late": True, "pf": 2}}


def fit(points):
    """(t0 us, GB/s) of ``t = t0 + bytes / bw`` over [(bytes, us)]."""
    b = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    a = np.vstack([np.ones_like(b), b]).T
    (t0, inv), *_ = np.linalg.lstsq(a, t, rcond=None)
    return float(t0), float(1e-3 / inv) if inv > 0 else float("inf")


def empty_chain_us(n: int = 64) -> float:
    import triton

    @triton.jit
    def _empty(p):
        pass

    buf = torch.empty(1, device=device())
    return graph_time([lambda: _empty[(132,)](buf)] * n) * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--no-baselines", action="store_true", help="skip the empty-kernel, copy and cuBLAS series")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes")
    ap.add_argument("--run", default="")
    args = ap.parse_args(argv)
    from aqsearch.bench import append_result
    from aqsearch.kernels import dispatch

    dev = device()
    ladder = ((64, 256), (64, 512)) if args.dry_run or dev == "cpu" else LADDER
    props = torch.cuda.get_device_properties(0) if dev == "cuda" else None
    l2 = props.L2_cache_size if props else 1 << 20
    sms = props.multi_processor_count if props else 4
    meta = {"bench": "gemv_overhead", "run": args.run, "ladder": ladder}

    def record(series, points, **extra):
        t0, bw = fit(points)
        row = {**meta, "series": series, **extra, "points": [{"bytes": b, "us": round(u, 3), **e} for b, u, e in points],
               "t0_us": round(t0, 3), "bw_gbps": round(bw, 1)}
        append_result(args.out, row)
        print(f"{series:>24}: t0 {t0:6.2f} us, {bw:7.0f} GB/s  "
              + " ".join(f"{p['us']:.2f}" for p in row["points"]), flush=True)

    if dev == "cuda" and not args.no_baselines:
        e = empty_chain_us()
        append_result(args.out, {**meta, "series": "empty", "us_per_kernel": round(e, 3)})
        print(f"{'empty kernel':>24}: {e:.2f} us a graph node", flush=True)
        pts = []
        for k, n in ladder:
            size = k * n // 2  # the w4 weight's bytes, read and written by a copy of half of them
            a = [torch.empty(size // 2, dtype=torch.uint8, device=dev) for _ in range(n_copies(size, l2))]
            b = [torch.empty_like(t) for t in a]
            pts.append((size, graph_time([lambda s=s, d=d: d.copy_(s) for s, d in zip(a, b)]) * 1e6, {"K": k, "N": n}))
            del a, b
        record("copy", pts)
        x = torch.randn(1, max(k for k, _ in ladder), device=dev, dtype=torch.float16)
        record("cublas", [(2 * k * n, cublas_point(k, n, 1, l2, x[:, :k]) * 1e6, {"K": k, "N": n}) for k, n in ladder])
    modes = args.modes.split(",")
    for bits in (int(b) for b in args.bits.split(",")):
        base = BASE3 if bits == 3 else BASE
        bks = dispatch.pk_bks(bits, 128, base["BKS"])
        pts: dict[str, list] = {mode: [] for mode in modes}
        for k, n in ladder:  # one problem a shape, timed in every mode (matmul.py's timing and numerics check)
            split = dispatch._split_for(-(-n // base["BN"]), k, bks, sms, per_sm=2, min_steps=3)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            res, wb = quant_point(k, n, 1, bits, 128, l2, x, sms,
                                  only=[{"path": "gemv", **base, "split": split, **MODES[mode]} for mode in modes])
            for mode, r in zip(modes, res):
                if "us" in r:
                    pts[mode].append((wb, r["us"], {"K": k, "N": n, "split": split, "rel_err": round(r["rel_err"], 7)}))
        for mode in modes:
            record(f"w{bits} {mode}", pts[mode], bits=bits, config={**base, **MODES[mode]})


if __name__ == "__main__":
    main()
