"""M = 1 GEMV timing modes and profiles (issue 21): ours (the tuner's config) against cuBLAS fp16.

For each (K, N) and bit width, three figures a call, all over rotating weight copies holding > 3x the L2
(no call finds its weights in cache):

- ``eager_us``: back-to-back launches from Python, CUDA events around 200 calls: what a caller without
  CUDA graphs pays, CPU launch overhead included (Triton's Python launcher vs cuBLAS's C++ one);
- ``graph_us``: the same calls captured in one CUDA graph and replayed (``dispatch.graph_ms``: the
  figure ``benchmarks/matmul.py`` reports and the tuner ranks by);
- ``kernel_us``: the kernels' own durations in those graph replays (``torch.profiler``, CUPTI), with the
  kernel names: ``graph_us - kernel_us`` is what each kernel boundary costs inside a graph.

``--ncu``: each measured kernel is launched once more inside ``cudaProfilerStart/Stop``, so that
``ncu --profile-from-start off`` profiles exactly those launches (no kernel-name filter to get wrong:
the H100 run's ``regex:gemv_pk`` matched nothing because the tuner had picked the fp32 ``gemv_kernel``).

    python benchmarks/pk_profile.py --shapes 8192x8192,4096x14336 --bits 2,3,4,8 --out probe.jsonl
    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python benchmarks/pk_profile.py --shapes 8192x8192 --bits 2,4 --ncu

The config is the tuner's choice (``$AQSEARCH_CACHE``, written by ``benchmarks/matmul.py``), else the first
candidate; ``--cfg JSON`` forces one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def eager_us(calls, n: int = 200) -> float:
    for c in calls[:3]:
        c()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for i in range(n):
        calls[i % len(calls)]()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / n


def kernel_us(calls, replays: int = 10) -> tuple[float, dict]:
    """Mean kernel time a call inside graph replays, and {kernel name: (launches a call, us a call)}."""
    from torch.profiler import ProfilerActivity, profile

    from aqsearch.kernels.dispatch import capture

    g = capture(calls)
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    by = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower() \
                and "memset" not in e.name.lower():
            by[e.name][0] += 1
            by[e.name][1] += e.time_range.end - e.time_range.start  # us
    n = replays * len(calls)
    kern = {k: (round(v[0] / n, 3), round(v[1] / n, 3)) for k, v in by.items()}
    del g
    return sum(v[1] for v in kern.values()), kern


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x8192,4096x14336")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--cfg", default=None, help="a config (JSON) instead of the tuner's")
    ap.add_argument("--ncu", action="store_true", help="one launch each inside cudaProfilerStart/Stop, no timing")
    ap.add_argument("--out", default=None, help="JSONL records")
    ap.add_argument("--run", default="")
    args = ap.parse_args(argv)
    from matmul import copy_bandwidth, nbytes, problem

    from aqsearch.kernels import dispatch, launch, reference

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gpu = torch.cuda.get_device_name()
    bw = None if args.ncu else copy_bandwidth()
    with dispatch._LOCK:
        dispatch._load_disk()
    recs = []

    def emit(r):
        r = {"bench": "pk_profile", "run": args.run, "gpu": gpu, "copy_gbps": bw and round(bw, 1), **r}
        recs.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    def measure(what, calls, nbytes_, extra):
        if args.ncu:
            for c in calls[:4]:
                c()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            calls[-1]()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"ncu range: {what} {json.dumps(extra)}", flush=True)
            return
        ku, kern = kernel_us(calls)
        r = {"what": what, **extra, "eager_us": round(eager_us(calls), 3),
             "graph_us": round(dispatch.graph_ms(calls, 5.0, reps=(3, 200)) * 1e3, 3),
             "kernel_us": round(ku, 3), "kernels": kern, "bytes": nbytes_}
        r["graph_frac_copy"] = round(nbytes_ / r["graph_us"] / 1e3 / bw, 4)
        r["kernel_frac_copy"] = round(nbytes_ / max(ku, 1e-3) / 1e3 / bw, 4)
        emit(r)

    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        x = (torch.randn(1, k, device="cuda") * 0.5).half()
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        ws = [w] + [w.clone() for _ in range(max(1, -(-3 * l2 // nbytes(w))) - 1)]
        out = torch.empty(1, n, device="cuda", dtype=torch.float16)
        measure("cublas", [lambda w=w: torch.matmul(x, w.t(), out=out) for w in ws], nbytes(w), {"K": k, "N": n, "M": 1})
        del ws, w
        for bits in (int(b) for b in args.bits.split(",")):
            qw, s, z = problem(k, n, bits, args.group)
            kk = dispatch.key(1, n, k, bits, args.group, False, torch.float16)
            cfg = json.loads(args.cfg) if args.cfg else (dispatch._MEM.get(kk) or dispatch._shipped(kk)
                                                         or dispatch.candidates(1, n, k, bits, args.group, 132)[0])
            cfg = {a: v for a, v in cfg.items() if a not in ("ms", "us", "times")}
            wb = nbytes(qw, s, z)
            copies = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(max(1, -(-3 * l2 // wb)) - 1)]
            o = launch.run(x, qw, s, z, bits, args.group, k, cfg)
            ref = x.float() @ reference.dequantize_kn(qw, s, z, bits, args.group, k, torch.float32)
            err = reference.rel_err(o.float(), ref)
            calls = [lambda c=c: launch.run(x, *c, bits, args.group, k, cfg, out=out) for c in copies]
            measure("quant", calls, wb, {"K": k, "N": n, "M": 1, "bits": bits, "cfg": cfg, "rel_err": err})
            if cfg.get("pdl") and not args.ncu:  # PDL kernels overlap their neighbours: kernel_us there counts the
                nopdl = {a: v for a, v in cfg.items() if a != "pdl"}  # overlap twice; the same config without PDL
                calls = [lambda c=c: launch.run(x, *c, bits, args.group, k, nopdl, out=out) for c in copies]
                measure("quant-nopdl", calls, wb, {"K": k, "N": n, "M": 1, "bits": bits, "cfg": nopdl, "rel_err": err})
            del copies, qw, s, z
            torch.cuda.empty_cache()
    if recs:  # a short table
        for r in recs:
            top = max(r["kernels"].items(), key=lambda kv: kv[1][1])[0] if r["kernels"] else "?"
            print(f"{r['K']}x{r['N']} {('w%d' % r['bits']) if 'bits' in r else 'cuBLAS':>6}{' no PDL' if r['what'] == 'quant-nopdl' else ''}: eager {r['eager_us']:7.2f} us, "
                  f"graph {r['graph_us']:7.2f} us ({r['graph_frac_copy']:.1%} of copy), kernel {r['kernel_us']:7.2f} us "
                  f"({r['kernel_frac_copy']:.1%}); {top[:70]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
