"""One M = 1 GEMV of the pk kernel (or any config) on a real shape, for a profiler (Nsight Compute).

    ncu --kernel-name regex:gemv_pk --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python benchmarks/pk_profile.py --bits 4 --k 8192 --n 8192

The config is the tuner's choice for the shape (``$AQSEARCH_CACHE``, written by ``benchmarks/matmul.py``),
else the first pk candidate. Prints the config, the time a call (CUDA events, 200 calls, rotating weight
copies > 3x the L2) and the relative error against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    from matmul import nbytes, problem

    from aqsearch.kernels import dispatch, launch, reference

    qw, s, z = problem(args.k, args.n, args.bits, args.group)
    x = (torch.randn(1, args.k, device="cuda") * 0.5).half()
    kk = dispatch.key(1, args.n, args.k, args.bits, args.group, False, torch.float16)
    with dispatch._LOCK:
        dispatch._load_disk()
    cfg = dispatch._MEM.get(kk) or dispatch.candidates(1, args.n, args.k, args.bits, args.group, 132)[0]
    cfg = {a: v for a, v in cfg.items() if a not in ("ms", "us", "times")}
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(max(1, -(-3 * l2 // nbytes(qw, s, z))) - 1)]
    out = launch.run(x, qw, s, z, args.bits, args.group, args.k, cfg)
    ref = x.float() @ reference.dequantize_kn(qw, s, z, args.bits, args.group, args.k, torch.float32)
    err = reference.rel_err(out.float(), ref)
    for c in copies[:3]:
        launch.run(x, *c, args.bits, args.group, args.k, cfg)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for i in range(200):
        launch.run(x, *copies[i % len(copies)], args.bits, args.group, args.k, cfg)
    e1.record()
    torch.cuda.synchronize()
    us = e0.elapsed_time(e1) * 1e3 / 200
    print(json.dumps({"cfg": cfg, "us_eager": round(us, 3), "rel_err": err, "weight_bytes": nbytes(qw, s, z),
                      "gbps_eager": round(nbytes(qw, s, z) / us / 1e3, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
