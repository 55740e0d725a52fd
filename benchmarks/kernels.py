"""Quantized matmul kernels against cuBLAS fp16 on one GPU: time, effective bandwidth, speedup.

For every shape (K x N), bits, group and M: the dispatcher's tuner picks a path and config (timed
with the L2 flushed), then that choice and cuBLAS fp16 (``F.linear`` on an fp16 weight) are timed
the same way: CUDA-graph replays over rotating weight copies (more bytes than 3x the L2, so no call
reads the previous one's weights from cache). Effective GB/s counts packed weights + scales/zeros
+ activations (x and out); the copy bandwidth of the same GPU is measured in the same run. Numerics:
every point is checked against an fp32 reference (rel err).

    python benchmarks/kernels.py                 # the full grid, JSON lines to benchmarks/results/kernels.jsonl
    python benchmarks/kernels.py --quick         # the acceptance points only
    python benchmarks/kernels.py --workers 14    # compile the candidates in 14 processes first
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))  # (K, N)
MS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def packed_problem(k: int, n: int, bits: int, group: int, device="cuda", seed=0):
    """Random packed weight: random words are random codes; scales ~1e-2, zeros random codes."""
    from aqsearch.kernels.packing import code_words

    gen = torch.Generator(device=device).manual_seed(seed)
    qw = torch.randint(-2**31, 2**31 - 1, (code_words(k, bits), n), dtype=torch.int32, device=device, generator=gen)
    g = -(-k // group)
    s = (torch.rand(g, n, device=device, generator=gen) * 0.01 + 0.001).half()
    z = torch.randint(0, 1 << bits, (g, n), device=device, generator=gen).half()
    return qw, s, z


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (e0.elapsed_time(e1) * 1e-3) / 1e9


_STREAM = []


def graph_time(calls, target_ms: float = 8.0) -> float:
    """Seconds per call: ``calls`` (one per weight copy) captured in one CUDA graph, replayed."""
    if not _STREAM:
        _STREAM.append(torch.cuda.Stream())  # one capture stream: the split-K workspace is per stream
    s = _STREAM[0]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on the capture stream (split-K workspace lives per stream)
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    one = e0.elapsed_time(e1)
    reps = max(3, min(200, int(target_ms / max(one, 1e-3))))
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    del g
    return e0.elapsed_time(e1) * 1e-3 / (reps * len(calls))


def n_copies(nbytes: int, l2: int) -> int:
    return max(2, min(64, math.ceil(3 * l2 / max(1, nbytes))))


def cublas_point(k, n, m, l2, xs):
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    r = n_copies(w.numel() * 2, l2)
    ws = [w] + [w.clone() for _ in range(r - 1)]
    x = xs[m]
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    t = graph_time([lambda w=w: torch.matmul(x, w.t(), out=out) for w in ws])
    del ws
    return t


def quant_point(k, n, m, bits, group, l2, xs, tune=True):
    from aqsearch.kernels import dispatch, launch

    qw, s, z = packed_problem(k, n, bits, group)
    x = xs[m]
    cfg = dispatch.choose(x, qw, s, z, bits, group, k, tune=tune)
    wbytes = qw.numel() * 4 + s.numel() * 2 + z.numel() * 2
    r = n_copies(wbytes, l2)
    copies = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(r - 1)]
    out = torch.empty(m, n, device="cuda", dtype=x.dtype)
    t = graph_time([lambda c=c: launch.run(x, c[0], c[1], c[2], bits, group, k, cfg, out=out) for c in copies])
    del copies
    # numerics: the dequant kernel (bit-exact to the reference, see tests) in fp32, then an fp32 matmul
    y = launch.run(x, qw, s, z, bits, group, k, cfg)
    wref = launch.dequant(qw, s, z, bits, group, k, torch.float32, {"BN": 256, "BKS": min(64, group)})
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = x.float() @ wref
    err = float((y.float() - ref).norm() / ref.norm())
    return t, cfg, wbytes, err


def run(args) -> list[dict]:
    from aqsearch.bench import append_result
    from aqsearch.kernels import dispatch

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    log(f"{props.name}: copy bandwidth {bw:.0f} GB/s, L2 {l2 >> 20} MiB, {props.multi_processor_count} SMs")
    append_result(args.out, {"bench": "kernels", "kind": "copy", "tag": args.tag, "copy_gbps": round(bw, 1)})
    rows = []
    for (k, n) in args.shapes:
        xs = {m: (torch.randn(m, k, device="cuda") * 0.5).half() for m in args.ms}
        cub = {}
        for m in args.ms:
            cub[m] = cublas_point(k, n, m, l2, xs)
            cb = (n * k * 2 + m * k * 2 + m * n * 2) / cub[m] / 1e9
            append_result(args.out, {"bench": "kernels", "kind": "cublas", "tag": args.tag, "K": k, "N": n, "M": m,
                                     "us": round(cub[m] * 1e6, 3), "gbps": round(cb, 1),
                                     "frac_copy": round(cb / bw, 4), "copy_gbps": round(bw, 1)})
        for bits, group in itertools.product(args.bits, args.groups):
            for m in args.ms:
                t, cfg, wbytes, err = quant_point(k, n, m, bits, group, l2, xs, tune=not args.no_tune)
                gb = (wbytes + m * k * 2 + m * n * 2) / t / 1e9
                key = dispatch.key(m, n, k, bits, group, False, torch.float16)
                cand = dispatch._MEM.get(key, {}).get("times")
                rec = {"bench": "kernels", "kind": "quant", "tag": args.tag, "K": k, "N": n, "M": m, "bits": bits,
                       "group": group, "scheme": f"w{bits}g{group}", "dtype": "float16", "path": cfg["path"],
                       "config": {a: b for a, b in cfg.items() if a not in ("ms", "times")},
                       "us": round(t * 1e6, 3), "gbps": round(gb, 1), "frac_copy": round(gb / bw, 4),
                       "cublas_us": round(cub[m] * 1e6, 3), "speedup": round(cub[m] / t, 3), "rel_err": err,
                       "copy_gbps": round(bw, 1), "candidates_ms": cand}
                append_result(args.out, rec)
                rows.append(rec)
                log(f"{k}x{n} w{bits}g{group} M={m:<5} {cfg['path']:<8} {t * 1e6:9.2f} us {gb:7.0f} GB/s "
                    f"{gb / bw:6.1%} of copy  x{cub[m] / t:5.2f} vs cuBLAS  err {err:.1e}")
        del xs
    return rows


def precompile(args) -> None:
    """Compile every candidate config of the grid in ``args.workers`` processes (Triton's disk cache)."""
    import multiprocessing as mp

    # one job per (bits, group, M range): the shapes share compiled kernels (same specialization),
    # so a job runs every shape for its M range and compiles each kernel once
    ranges = [[m for m in args.ms if m == 1], [m for m in args.ms if 1 < m <= 16], [m for m in args.ms if m > 16]]
    jobs = [(args.shapes, b, g, r) for b in args.bits for g in args.groups for r in ranges if r]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, _ in enumerate(pool.imap_unordered(_warm, jobs)):
            pass
    log(f"precompiled {len(jobs)} (shape, bits, group) jobs in {time.time() - t0:.0f} s")


def _warm(job):
    shapes, bits, group, ms = job
    from aqsearch.kernels import dispatch, launch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k, n in shapes:
        qw, s, z = packed_problem(k, n, bits, group)
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            for cfg in dispatch.candidates(m, n, k, bits, group, sms):
                try:
                    launch.run(x, qw, s, z, bits, group, k, cfg)
                except Exception as e:  # the tuner skips it too; say so here
                    print(f"warm: {k}x{n} w{bits}g{group} M={m} {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
        launch.dequant(qw, s, z, bits, group, k, torch.float32, {"BN": 256, "BKS": min(64, group)})
        torch.cuda.synchronize()
    return job


def summary(rows: list[dict]) -> str:
    lines = [f"{'shape':>12} {'scheme':>7} {'M':>5} {'path':>8} {'us':>9} {'GB/s':>7} {'%copy':>6} {'xcuBLAS':>8} {'err':>8}"]
    for r in rows:
        if r["M"] in (1, 1024, 4096) or r["bits"] == 4 and r["group"] == 128:
            lines.append(f"{r['K']}x{r['N']:>6} {r['scheme']:>7} {r['M']:>5} {r['path']:>8} {r['us']:>9.2f} "
                         f"{r['gbps']:>7.0f} {r['frac_copy']:>6.1%} {r['speedup']:>8.2f} {r['rel_err']:>8.1e}")
    return "\n".join(lines)


def write_tuned(path: str) -> None:
    """Write the tuner's choices for this GPU into ``kernels/_tuned.py`` (shipped defaults)."""
    from aqsearch.kernels import _tuned, dispatch

    table = dict(_tuned.TUNED)
    gpu = torch.cuda.get_device_name()
    table[gpu] = {**table.get(gpu, {}), **{k: {a: b for a, b in v.items() if a != "times"}
                                           for k, v in dispatch._MEM.items()}}
    lines = ["TUNED: dict[str, dict[str, dict]] = {"]
    for name, tab in table.items():  # one entry a line, Python literals
        lines.append(f"    {name!r}: {{")
        lines += [f"        {k!r}: {tab[k]!r}," for k in sorted(tab)]
        lines.append("    },")
    with open(path, "w") as f:
        f.write('"""Kernel choices measured on GPUs (written by ``benchmarks/kernels.py --write-tuned``): GPU name ->\n'
                'tuner key -> config."""\n\n' + "\n".join(lines) + "\n}\n")


def tables(path: str, run: str | None = None) -> str:
    """Markdown tables (for the README) from a results file: M = 1 per shape and scheme, and the
    ratio to cuBLAS at every M for w4g128. ``run``: keep records whose "run" starts with it."""
    import collections

    rows = [json.loads(line) for line in open(path) if line.strip()]
    if run:
        rows = [r for r in rows if str(r.get("run", "")).startswith(run)]
    q = [r for r in rows if r.get("kind") == "quant"]
    out = ["| K x N | scheme | us | GB/s | % of copy | x cuBLAS fp16 | path | rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in q if r["M"] == 1), key=lambda r: (r["K"], r["N"], r["bits"], r["group"])):
        out.append(f"| {r['K']}x{r['N']} | {r['scheme']} | {r['us']:.1f} | {r['gbps']:.0f} | {r['frac_copy']:.0%} | "
                   f"{r['speedup']:.2f} | {r['path']} | {r['rel_err']:.1e} |")
    by = collections.defaultdict(dict)
    for r in q:
        if r["scheme"] == "w4g128":
            by[(r["K"], r["N"])][r["M"]] = f"{r['speedup']:.2f} ({r['path']})"
    ms = sorted({m for d in by.values() for m in d})
    out += ["", "| K x N | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for (k, n), d in sorted(by.items()):
        out.append(f"| {k}x{n} | " + " | ".join(d.get(m, "") for m in ms) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="acceptance points: M in 1, 1024, 4096; 8192x8192 and 4096x14336; g128")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the four of the issue)")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels.jsonl"))
    ap.add_argument("--tag", default="", help="free text stored with every record")
    ap.add_argument("--workers", type=int, default=0, help="processes that compile the candidates first")
    ap.add_argument("--no-tune", action="store_true", help="use shipped/heuristic configs, no measuring")
    ap.add_argument("--precompile-only", action="store_true", help="compile (--workers) and stop")
    ap.add_argument("--table", default=None, metavar="JSONL", help="print markdown tables from a results file and stop")
    ap.add_argument("--run", default=None, help="with --table: only records whose 'run' starts with this")
    ap.add_argument("--write-tuned", default=None, help="write the tuner's choices to this _tuned.py")
    args = ap.parse_args(argv)
    if args.table:
        print(tables(args.table, args.run))
        return 0
    if args.quick:
        args.shapes, args.groups, args.ms = "8192x8192,4096x14336", "128", "1,1024,4096"
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or ",".join(f"{k}x{n}" for k, n in SHAPES)).split(",")]
    args.bits = [int(b) for b in args.bits.split(",")]
    args.groups = [int(g) for g in args.groups.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    if not torch.cuda.is_available():
        log("benchmarks/kernels.py needs a CUDA GPU")
        return 2
    if args.workers > 1:
        precompile(args)
    if args.precompile_only:
        return 0
    t0 = time.time()
    rows = run(args)
    if args.write_tuned:
        write_tuned(args.write_tuned)
    log(f"benchmark done in {time.time() - t0:.0f} s")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
