"""Quantized matmul kernels against cuBLAS fp16 on one GPU: every candidate timed, the best chosen.

One command measures everything and writes into one folder (``--out DIR``):

    python benchmarks/matmul.py --all --out $OUT          # ~7 min on an H200: compile, measure, decode
    python benchmarks/matmul.py --out $OUT --shapes 8192x8192 --ms 1 --bits 4   # a slice of the grid
    python benchmarks/matmul.py --dry-run --out /tmp/k     # CPU interpreter, tiny shapes: the script runs
    python benchmarks/matmul.py --table DIR/kernels.jsonl  # markdown tables from a results file

Phases: (1) every candidate config of the grid (``dispatch.candidates``) is compiled in parallel
processes (Triton's disk cache, then shared); (2) copy bandwidth; for each (K, N) shape and M, cuBLAS
fp16 and every candidate of each bit width are timed the same way: CUDA-graph replays over rotating
weight copies holding more than 3x the L2, so no call reads the previous one's weights from cache
(FIELD-NOTES); each candidate's output is checked against the torch reference (rel. err., fp32 with
TF32 off); a candidate that fails to compile or run, or whose error exceeds 1e-2, is skipped. (3) The
winner of each (bits, shape, M bucket) goes to ``tuned.py`` / ``tuned.json`` (``aqsearch/kernels/_tuned.py``'s
format) and to the tuner's disk cache, so (4) ``benchmarks/decode.py --llama8b`` (run as its own
process, same folder) decodes without measuring again. Records (``kernels.jsonl``, ``decode.jsonl``)
are flushed one by one with settings, machine and versions; a summary table is printed last.
Weights are integer-zero packed (``packing.pack_zeros``), group 128 unless ``--groups`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# (K, N): Llama-3-8B's decoder Linears (q/o, k/v, gate/up, down) and the issue's 8192x8192
SHAPES = ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024))
MS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
MAX_ERR = 1e-2  # a candidate above this is wrong, not slow: skipped (the tests hold every path to 1e-3)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def problem(k: int, n: int, bits: int, group: int, seed: int = 0):
    """Random packed weight (random words are random codes), scales ~1e-2, packed integer zeros."""
    from aqsearch.kernels.packing import code_words, pack_zeros

    dev = device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    qw = torch.randint(-2**31, 2**31 - 1, (code_words(k, bits), n), dtype=torch.int32, device=dev, generator=gen)
    g = -(-k // group)
    s = (torch.rand(g, n, device=dev, generator=gen) * 0.01 + 0.001).half()
    z = pack_zeros(torch.randint(0, 1 << bits, (g, n), device=dev, generator=gen), bits)
    return qw, s, z


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def copy_bandwidth(size: int = 2 << 30, reps: int = 20) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    if device() == "cpu":
        size, reps = 64 << 20, 3
    a = torch.empty(size // 2, dtype=torch.float16, device=device()).normal_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync()
    return 2 * size * reps / (time.perf_counter() - t0) / 1e9


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_time(calls, target_ms: float = 5.0) -> float:
    """Seconds a call: ``calls`` (one per weight copy) captured in one CUDA graph and replayed (the
    tuner's own timing, :func:`aqsearch.kernels.dispatch.graph_ms`); on the CPU (dry run) one plain call, timed."""
    if device() == "cpu":
        t0 = time.perf_counter()
        calls[0]()
        return time.perf_counter() - t0
    from aqsearch.kernels import dispatch

    return dispatch.graph_ms(calls, target_ms, reps=(3, 200)) * 1e-3


def n_copies(size: int, l2: int) -> int:
    return 1 if device() == "cpu" else max(2, min(64, math.ceil(3 * l2 / max(1, size))))


def cublas_point(k, n, m, l2, x):
    w = torch.randn(n, k, device=device(), dtype=x.dtype) * 0.02
    ws = [w] + [w.clone() for _ in range(n_copies(nbytes(w), l2) - 1)]
    out = torch.empty(m, n, device=device(), dtype=x.dtype)
    return graph_time([lambda w=w: torch.matmul(x, w.t(), out=out) for w in ws])


def quant_point(k, n, m, bits, group, l2, x, sms, only=None):
    """Time every candidate (or ``only``) for one problem; check each one's numerics.

    Returns (list of {cfg, us, rel_err} or {cfg, error}, weight bytes)."""
    from aqsearch.kernels import dispatch, launch, reference

    qw, s, z = problem(k, n, bits, group)
    wb = nbytes(qw, s, z)
    copies = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(n_copies(wb, l2) - 1)]
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = x.float() @ reference.dequantize_kn(qw, s, z, bits, group, k, torch.float32)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    res = []
    for cfg in only or dispatch.candidates(m, n, k, bits, group, sms):
        try:
            out.fill_(float("nan"))
            launch.run(x, qw, s, z, bits, group, k, cfg, out=out)
            err = reference.rel_err(out.float(), ref)
            if not err <= MAX_ERR:
                raise ValueError(f"rel err {err:.2e} > {MAX_ERR}")
            t = graph_time([lambda c=c: launch.run(x, c[0], c[1], c[2], bits, group, k, cfg, out=out) for c in copies])
            res.append({"cfg": cfg, "us": t * 1e6, "rel_err": err})
        except Exception as e:  # a config the compiler or the GPU refuses: skip it, say why
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"  skip {cfg}: {msg}")
            res.append({"cfg": cfg, "error": msg})
            sync()
    del copies
    return res, wb


def _warm(job):
    """Compile (by running once) every candidate of one (bits, M) over all shapes, in a worker."""
    shapes, bits, group, m, dry = job
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    from aqsearch.kernels import dispatch, launch

    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    t0, fails = time.time(), 0
    for k, n in shapes:
        qw, s, z = problem(k, n, bits, group)
        x = torch.randn(m, k, device=device()).half()
        cands = dispatch.candidates(m, n, k, bits, group, sms)
        for cfg in cands[:2] + [c for c in cands if c.get("h2")][:1] if dry else cands:
            try:
                launch.run(x, qw, s, z, bits, group, k, cfg)
            except Exception as e:
                fails += 1
                print(f"warm: {k}x{n} w{bits} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        sync()
    return bits, m, time.time() - t0, fails


def precompile(args) -> None:
    import multiprocessing as mp

    # one job per (bits, group, M) over all shapes (the shapes of one job share most compiled variants: per-shape
    # jobs would compile the same kernels side by side), longest first: M = 1 (most candidates), 3 bits
    jobs = [(args.shapes + (args.m1_shapes if m == 1 else []), b, g, m, args.dry_run) for m in sorted(args.ms)
            for b in sorted(args.bits, key=lambda b: b != 3) for g in args.groups]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, (b, m, dt, fails) in enumerate(pool.imap_unordered(_warm, jobs)):
            log(f"[compile {i + 1}/{len(jobs)}] w{b} M={m}: {dt:.0f} s{f', {fails} failed' if fails else ''} "
                f"({time.time() - t0:.0f} s total)")


def order(args):
    """The acceptance points first (M = 1, 1024, 4096 on 8192x8192 and 4096x14336), then the rest."""
    pts = [(k, n, m) for (k, n) in args.shapes for m in args.ms]
    first = lambda p: (p[2] not in (1, 1024, 4096), (p[0], p[1]) not in ((8192, 8192), (4096, 14336)))  # noqa: E731
    return sorted(pts, key=first) + [(k, n, 1) for (k, n) in args.m1_shapes if 1 in args.ms]


def run(args, rec) -> tuple[list[dict], dict]:
    """Measure the grid; returns the quant records and the chosen table (tuner key -> config)."""
    from aqsearch.kernels import dispatch

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    l2 = getattr(props, "L2_cache_size", 50 << 20) if cuda else 0
    sms = props.multi_processor_count if cuda else 132
    bw = copy_bandwidth()
    log(f"{props.name if cuda else 'CPU (dry run)'}: copy {bw:.0f} GB/s, L2 {l2 >> 20} MiB, {sms} SMs")
    rec({"kind": "copy", "copy_gbps": round(bw, 1)})
    rows, table, t0 = [], {}, time.time()
    pts = order(args)
    for i, (k, n, m) in enumerate(pts):
        if time.time() - t0 > args.budget_s:
            log(f"time budget of {args.budget_s} s spent: {len(pts) - i} points left out")
            break
        x = (torch.randn(m, k, device=device()) * 0.5).half()
        cub = cublas_point(k, n, m, l2, x)
        act = 2 * (m * k + m * n)
        rec({"kind": "cublas", "K": k, "N": n, "M": m, "us": round(cub * 1e6, 3),
             "gbps": round((2 * n * k + act) / cub / 1e9, 1), "copy_gbps": round(bw, 1)})
        for bits in args.bits:
            for group in args.groups:
                res, wb = quant_point(k, n, m, bits, group, l2, x, sms)
                ok = sorted((r for r in res if "us" in r), key=lambda r: r["us"])
                if not ok:
                    log(f"{k}x{n} w{bits}g{group} M={m}: no candidate ran")
                    continue
                best = ok[0]
                t = best["us"] * 1e-6
                gb = (wb + act) / t / 1e9
                r = {"kind": "quant", "K": k, "N": n, "M": m, "bits": bits, "group": group, "scheme": f"w{bits}g{group}",
                     "zeros": "int-packed", "dtype": "float16", "path": best["cfg"]["path"], "config": best["cfg"],
                     "us": round(best["us"], 3), "gbps": round(gb, 1), "frac_copy": round(gb / bw, 4),
                     "cublas_us": round(cub * 1e6, 3), "speedup": round(cub / t, 3), "rel_err": best["rel_err"],
                     "max_rel_err": max(c["rel_err"] for c in ok), "copy_gbps": round(bw, 1), "weight_bytes": wb,
                     "candidates": [{**c["cfg"], **({"us": round(c["us"], 3)} if "us" in c else {"error": c["error"]})}
                                    for c in res]}
                rec(r)
                rows.append(r)
                kk = dispatch.key(m, n, k, bits, group, False, torch.float16)
                table[kk] = {**best["cfg"], "us": round(best["us"], 3)}
                log(f"[{i + 1}/{len(pts)}] {k}x{n} w{bits}g{group} M={m:<5} {best['cfg']['path']:<8} "
                    f"{best['us']:8.2f} us {gb:6.0f} GB/s {gb / bw:6.1%} of copy x{cub / t:5.2f} cuBLAS "
                    f"err {best['rel_err']:.1e} ({len(ok)}/{len(res)} ran, {time.time() - t0:.0f} s)")
        del x
    return rows, table


def write_table(out_dir: str, table: dict) -> None:
    """``tuned.json`` and ``tuned.py`` (``aqsearch/kernels/_tuned.py``'s format) for this GPU, and the tuner's
    disk cache (``$AQSEARCH_CACHE``), so later processes on this machine use the measured choices."""
    from aqsearch.kernels import dispatch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    with open(os.path.join(out_dir, "tuned.json"), "w") as f:
        json.dump({gpu: table}, f, indent=1, sort_keys=True)
    lines = [f"        {k!r}: {table[k]!r}," for k in sorted(table)]
    with open(os.path.join(out_dir, "tuned.py"), "w") as f:
        f.write('"""Kernel choices measured on GPUs by ``benchmarks/matmul.py --all``: GPU name -> tuner key ->\n'
                'config (``dispatch.key``: bits:group:sym:dtype:M bucket:N:K), with the winner\'s time in us."""\n\n'
                "TUNED: dict[str, dict[str, dict]] = {\n" + f"    {gpu!r}: {{\n" + "\n".join(lines) + "\n    },\n}\n")
    if torch.cuda.is_available():
        with dispatch._LOCK:
            dispatch._load_disk()
            dispatch._MEM.update(table)
            dispatch._save_disk()


def summary(rows: list[dict], decode_path: str | None = None) -> str:
    lines = [f"{'K x N':>12} {'scheme':>7} {'M':>5} {'path':>8} {'us':>9} {'GB/s':>7} {'%copy':>6} {'xcuBLAS':>8} {'err':>8}"]
    for r in sorted(rows, key=lambda r: (r["M"], r["K"], r["N"], r["bits"])):
        if r["M"] in (1, 8, 1024, 4096):
            lines.append(f"{r['K']:>5}x{r['N']:<6} {r['scheme']:>7} {r['M']:>5} {r['path']:>8} {r['us']:>9.2f} "
                         f"{r['gbps']:>7.0f} {r['frac_copy']:>6.1%} {r['speedup']:>8.2f} {r['rel_err']:>8.1e}")
    if decode_path and os.path.exists(decode_path):
        lines += ["", f"{'decode model':>20} {'scheme':>7} {'batch':>5} {'fp16 tok/s':>11} {'quant tok/s':>11} {'x fp16':>7}"]
        for line in open(decode_path):
            d = json.loads(line)
            lines.append(f"{d['model']:>20} {d['scheme']:>7} {d['batch']:>5} {d['base_tokens_per_s']:>11.0f} "
                         f"{d['quant_tokens_per_s']:>11.0f} {d['speedup']:>7.2f}")
    return "\n".join(lines)


def tables(path: str) -> str:
    """Markdown table of a results file's points (what ``benchmarks/report.py`` prints)."""
    sys.path.insert(0, HERE)
    from report_gpu import kernels_rows

    from aqsearch.bench import read_results

    return kernels_rows(read_results(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="compile in parallel, the whole grid, then the 8B decode")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes: prove the script runs")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: Llama-3-8B's and 8192x8192)")
    ap.add_argument("--m1-shapes", default="", help="KxN,... measured at M = 1 only, after the grid (e.g. the "
                    "decode's fused q/k/v 4096x6144 and gate/up 4096x28672, so that the decode runs tuned configs)")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--groups", default="128")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "run"), help="output folder")
    ap.add_argument("--run", default=None, help="run id stored with every record (default: time and machine)")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--deadline-s", type=float, default=470, help="the whole run's wall-time limit: kernel points "
                    "left when only --decode-s remain are skipped (acceptance points run first)")
    ap.add_argument("--decode-s", type=float, default=170, help="seconds kept for the 8B decode")
    ap.add_argument("--decode-schemes", default=None, help="the decode's schemes (default: decode.py's four)")
    ap.add_argument("--table", default=None, metavar="JSONL", help="print the markdown table of a results file")
    args = ap.parse_args(argv)
    if args.table:
        print(tables(args.table))
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.shapes = args.shapes or "256x128,128x96"
        args.ms, args.workers = "1,8,64", min(args.workers, 2)
    elif not torch.cuda.is_available():
        log("benchmarks/matmul.py needs a CUDA GPU (or --dry-run)")
        return 2
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or ",".join(f"{k}x{n}" for k, n in SHAPES)).split(",")]
    args.m1_shapes = [tuple(int(v) for v in s.split("x")) for s in args.m1_shapes.split(",") if s]
    args.bits, args.groups = [int(b) for b in args.bits.split(",")], [int(g) for g in args.groups.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("AQSEARCH_CACHE", os.path.join(os.path.abspath(args.out), "cache"))
    from aqsearch.bench import append_result, environment

    env = environment()
    run_id = args.run or f"{time.strftime('%Y%m%d-%H%M%S')} {env['machine']}"
    settings = {"shapes": args.shapes, "m1_shapes": args.m1_shapes, "bits": args.bits, "groups": args.groups, "ms": args.ms, "zeros": "int-packed",
                "timing": "cuda-graph replays over rotating weight copies > 3x L2", "dry_run": args.dry_run}
    kpath = os.path.join(args.out, "kernels.jsonl")
    rec = lambda r: append_result(kpath, {"bench": "kernels", "run": run_id, "settings": settings, **r})  # noqa: E731
    t0 = time.time()
    if args.all or args.dry_run:
        precompile(args)
    args.budget_s = max(30.0, args.deadline_s - args.decode_s - (time.time() - t0))
    if args.dry_run:
        from aqsearch.kernels import dispatch  # the interpreter: two candidates a point keep it short

        full = dispatch.candidates
        def few(*a, **kw):  # two candidates a point, and the first half2 GEMV one where there is one
            c = full(*a, **kw)
            return c[:2] + [d for d in c if d.get("h2")][:1]

        dispatch.candidates = few
    rows, table = run(args, rec)
    write_table(args.out, table)
    log(f"kernels: {len(rows)} points in {time.time() - t0:.0f} s; table in {args.out}/tuned.py")
    dpath = os.path.join(args.out, "decode.jsonl")
    if args.all or args.dry_run:
        cmd = [sys.executable, os.path.join(HERE, "decode.py"), "--llama8b", "--out", dpath, "--run", run_id]
        if args.dry_run:
            cmd += ["--dry-run"]
        if args.decode_schemes:
            cmd += ["--scheme", args.decode_schemes]
        log("decode: " + " ".join(cmd))
        try:
            subprocess.run(cmd, timeout=max(60.0, args.deadline_s - (time.time() - t0)), check=False)
        except subprocess.TimeoutExpired:
            log(f"decode: stopped at the deadline (records so far are in {dpath})")
    text = summary(rows, dpath)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    log(f"all done in {time.time() - t0:.0f} s")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
