"""What any Triton kernel reaches at issue 21's shapes, so a missed target is measured against a ceiling.

Two questions, each answered by a kernel that does *less* work than ours, timed exactly as ``matmul.py``
times (CUDA-graph replays over rotating copies holding > 3x the L2):

- ``--m1``: how fast can a Triton kernel *read* the packed weight of an M = 1 GEMV? ``_read`` loads the
  words ``[K / per_word, N]`` in ``[BR, BN]`` tiles with split-K programs, XORs them (one ALU instruction a
  32-bit word, no x, no scales, no split-K reduction) and writes one partial row a program. Its best time
  over a grid of tiles, stages and programs an SM is the floor under any GEMV over the same bytes; the best
  tile again with our split-K epilogue (``splitk_reduce``) times that epilogue; narrow tiles with no split-K
  (one program a column block, the whole K) show what a GEMV without that epilogue could stream. A torch
  reduction (``sum`` over K of the words, not Triton) is a second, independent reader; our GEMV with the shipped config runs beside them.
- ``--gemm``: how close does a Triton fp16 GEMM with *no* dequantization come to cuBLAS at M = 1024 and
  4096? ``_mm`` (pointer loads, cp.async pipeline) and ``_mm_tma`` (tensor descriptors) over Hopper's usual
  tiles. A fused dequantize-GEMM does this GEMM's work plus the dequantization, so it cannot pass the best
  of them. Beside them, our fused loops at large tiles: ``kn`` and the swapped ``packed`` loop with the fp16
  tile (``f16w``, the weight as the MMA's first operand).

Every timed kernel's output is checked (the XOR against numpy's, the GEMMs against torch's fp32 matmul).

    python benchmarks/ceiling.py --m1 --gemm --out benchmarks/results/ceiling.jsonl   # ~4 min on an H100
    TRITON_INTERPRET=1 python benchmarks/ceiling.py --m1 --gemm --dry-run --out /tmp/c.jsonl  # CPU: it runs
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from matmul import copy_bandwidth, device, graph_time, n_copies, nbytes, problem, quant_point  # noqa: E402

from aqsearch.kernels._tl_common import grouped_tile, splitk_reduce  # noqa: E402

M1_SHAPES = ((8192, 8192), (4096, 14336))
GEMM_SHAPES = ((8192, 8192), (4096, 14336), (14336, 4096))
# (BM, BN, BK, stages, warps): Hopper's usual fp16 tiles (Triton's matmul tutorials)
MM_CFGS = ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
           (128, 128, 64, 4, 8), (128, 128, 128, 3, 8), (64, 256, 64, 4, 4))
# swapped fused loop (weight rows BN x tokens BM), fp16 tile: (BM, BN, BK, stages, warps)
PACKED_CFGS = ((128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8),
               (64, 256, 64, 4, 8), (128, 128, 128, 3, 8))
KN_CFGS = ((128, 128, 64, 4, 4), (256, 128, 64, 3, 8), (128, 256, 64, 3, 8), (128, 128, 64, 4, 8))
# the reader's grid at M = 1: (BN, BR word rows, stages, programs an SM; 0: no split-K, one program a BN columns)
READ_GRID = ([(bn, br, st, per) for bn in (256, 512, 1024) for br in (8, 16, 32) for st in (1, 3) for per in (1, 2, 4, 8)]
             + [(bn, br, st, 0) for bn in (32, 64, 128) for br in (32, 64, 128) for st in (3, 4, 6)
                if st * bn * br * 4 <= 160 << 10])
READ_BEST = [(512, 16, 3, 1), (32, 64, 4, 0)]  # --ours-only: the readers' best tiles of issue 21's H100 runs
# our GEMV with little or no split-K, kw warps along K each taking whole tiles (kg): (BN, kw, split)
KG_CFGS = ((64, 16, 1), (64, 16, 2), (32, 16, 1), (64, 8, 1), (64, 8, 2), (32, 8, 1), (32, 8, 2), (128, 8, 1),
           (128, 8, 2), (128, 4, 2), (64, 4, 2), (64, 4, 4))


@triton.jit
def _read(w_ptr, out_ptr, N, R, rows_per, ws_ptr, lock_ptr, BN: tl.constexpr, BR: tl.constexpr,
          STAGES: tl.constexpr, REDUCE: tl.constexpr = False):
    """``out[pid_k, n] = XOR of w[r, n]`` over this program's rows (N % BN == 0). ``REDUCE``: the same
    XOR as an fp32 value through our GEMVs' split-K epilogue (workspace, counter, the last program sums
    into ``out[0]``), to time that epilogue alone."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = tl.max_contiguous(tl.multiple_of(pid_n * BN + tl.arange(0, BN), BN), BN)
    r0 = pid_k * rows_per
    r1 = tl.minimum(R, r0 + rows_per)
    acc = tl.zeros([BR, BN], dtype=tl.int32)
    for r in tl.range(r0, r1, BR, num_stages=STAGES):
        rr = r + tl.arange(0, BR)
        acc ^= tl.load(w_ptr + rr[:, None] * N + rn[None, :], mask=(rr < r1)[:, None], other=0)
    if REDUCE:
        tl.store(ws_ptr + pid_k * N + rn, tl.xor_sum(acc, 0).to(tl.float32), cache_modifier=".wt")
        splitk_reduce(out_ptr, ws_ptr, lock_ptr, pid_n, tl.num_programs(1), 1, N, tl.arange(0, 1), rn, N, 1, BN)
    else:
        tl.store(out_ptr + pid_k * N + rn, tl.xor_sum(acc, 0))


@triton.jit
def _mm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    """``c[M, N] = a[M, K] @ b[N, K]^T``, fp16 in and out, fp32 accumulation (M, N, K multiples of the tile)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = tl.max_contiguous(tl.multiple_of(pid_m * BM + tl.arange(0, BM), BM), BM)
    rn = tl.max_contiguous(tl.multiple_of(pid_n * BN + tl.arange(0, BN), BN), BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    b = b_ptr + rn[None, :] * K + rk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(tl.load(a), tl.load(b), acc)
        a += BK
        b += BK
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16))


@triton.jit
def _mm_tma(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    """``_mm`` with tensor descriptors (TMA loads and store)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([pid_n * BN, k]).T, acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.float16))


def _timed(calls):
    """(us, None), or (None, why) for a config that does not compile or run (recorded, not fatal)."""
    try:
        return graph_time(calls) * 1e6, None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _flat(res: dict, **extra) -> dict:
    """One ``matmul.quant_point`` result as a flat record: the config's keys, us and rel_err (or error)."""
    if "us" not in res:
        return {**extra, **res["cfg"], "error": res["error"]}
    return {**extra, **res["cfg"], "us": round(res["us"], 3), "rel_err": round(res["rel_err"], 7)}


def _slices(r: int, split: int, br: int) -> tuple[int, int]:
    """Word rows a K-slice (whole BR tiles) and the slices that cover ``r`` rows."""
    rows_per = -(-(-(-r // split)) // br) * br
    return rows_per, -(-r // rows_per)


def _reader(n, r, bn, br, st, split, out, ws=None, lock=None):
    """A launch of ``_read`` over the word matrix it is given (``ws`` / ``lock``: through the split-K epilogue)."""
    rows_per, split = _slices(r, split, br)
    reduce = ws is not None
    return lambda w: _read[(n // bn, split)](w, out, n, r, rows_per, ws if reduce else out, lock if reduce else out,
                                              BN=bn, BR=br, STAGES=st, REDUCE=reduce,
                                              num_warps=4 if bn * br >= 4096 else 2)


def m1_point(k, n, bits, grid, kg_cfgs, l2, sms, bw, dev):
    """One M = 1 shape and bit width: the readers over ``grid`` (each checked against numpy's XOR), the best one
    with the split-K epilogue, torch's sum, and our GEMV with the shipped config and with ``kg_cfgs``."""
    from aqsearch.kernels import dispatch

    qw, s, z = problem(k, n, bits, 128)
    r, wb = qw.shape[0], nbytes(qw)
    copies = [qw] + [qw.clone() for _ in range(n_copies(wb, l2) - 1)]
    want = np.bitwise_xor.reduce(qw.cpu().numpy(), axis=0)
    pts = []
    for bn, br, st, per in grid:
        if n % bn:
            continue
        split = _slices(r, max(1, min(-(-r // br), (per * sms) // (n // bn))) if per else 1, br)[1]
        out = torch.empty(split, n, dtype=torch.int32, device=dev)
        fn = _reader(n, r, bn, br, st, split, out)
        us, err = _timed([lambda w=w, fn=fn: fn(w) for w in copies])
        pt = {"BN": bn, "BR": br, "stages": st, "per_sm": per}
        if us is None:
            pts.append({**pt, "error": err})
            continue
        ok = np.array_equal(np.bitwise_xor.reduce(out.cpu().numpy(), axis=0), want)
        pts.append({**pt, "split": split, "us": round(us, 3), "correct": bool(ok)})
    good = [p for p in pts if p.get("correct")]
    nosplit = min((p for p in good if p["per_sm"] == 0), key=lambda p: p["us"], default=None)
    best = min(good, key=lambda p: p["us"])
    # the best reader again with the split-K epilogue: what that epilogue costs
    bn, br, split = best["BN"], best["BR"], best["split"]
    rows_per = _slices(r, split, br)[0]
    red = torch.empty(1, n, dtype=torch.float32, device=dev)
    fn = _reader(n, r, bn, br, best["stages"], split, red, torch.empty(split, n, dtype=torch.float32, device=dev),
                 torch.zeros(n // bn, dtype=torch.int32, device=dev))
    rus, _ = _timed([lambda w=w: fn(w) for w in copies])
    fn(qw)
    wsum = sum(np.bitwise_xor.reduce(qw[i * rows_per:(i + 1) * rows_per].cpu().numpy(), axis=0).astype(np.float64)
               for i in range(split))
    best["reduce_us"] = rus and round(rus, 3)
    # the partials are fp32 roundings of integers up to 2**31 (an ulp of 256 there)
    best["reduce_correct"] = bool(np.allclose(red.cpu().numpy()[0], wsum, rtol=0, atol=1024.0 * split))
    # a non-Triton reader: torch's reduction over K of the same words
    tus, _ = _timed([lambda w=w: w.sum(0) for w in copies])
    del copies
    # our GEMV with this GPU's shipped config (or the first candidate), then the kg configs: matmul.py's timing
    x1 = torch.randn(1, k, device=dev, dtype=torch.float16)
    cfg = (dispatch.choose(x1, qw, s, z, bits, 128, k, tune=False) if dev == "cuda"
           else dispatch.candidates(1, n, k, bits, 128, sms)[0])
    res, qb = quant_point(k, n, 1, bits, 128, l2, x1, sms, only=[cfg] + kg_cfgs)
    ours = _flat(res[0])
    return {"series": "m1_read", "K": k, "N": n, "bits": bits, "weight_bytes": wb,
            "best": best, "best_gbps": round(wb / best["us"] / 1e3, 1), "best_no_split": nosplit,
            "no_split_frac_copy": nosplit and round(wb / nosplit["us"] / 1e3 / bw, 4),
            "best_frac_copy": round(wb / best["us"] / 1e3 / bw, 4), "torch_sum_us": tus and round(tus, 3),
            "torch_sum_frac_copy": tus and round(wb / tus / 1e3 / bw, 4),
            "ours": {"config": cfg, "us": ours.get("us"), "bytes": qb, "rel_err": ours.get("rel_err"),
                     "frac_copy": ours.get("us") and round(qb / ours["us"] / 1e3 / bw, 4)},
            "ours_no_split": [_flat(q) for q in res[1:]], "points": pts}


def gemm_point(k, n, ms, mm_cfgs, fused, l2, sms, dev, dry):
    """One GEMM shape at each M of ``ms``: cuBLAS, the Triton fp16 GEMMs over ``mm_cfgs`` (checked against torch's
    fp32 product), and our ``fused`` configs on a w4 weight (``matmul.quant_point``). Yields one record an M."""
    from aqsearch.kernels import reference

    w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
    ws = [w16] + [w16.clone() for _ in range(n_copies(nbytes(w16), l2) - 1)]
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        c = torch.empty(m, n, device=dev, dtype=torch.float16)
        ref = x.float() @ w16.float().t()
        cub, _ = _timed([lambda w=w: torch.matmul(x, w.t(), out=c) for w in ws])
        res = []
        for kern, name in ((_mm, "triton_fp16"), (_mm_tma, "triton_fp16_tma")):
            if dry and name.endswith("tma"):
                continue
            for bm, bn, bk, st, nw in mm_cfgs:
                grid = (-(-m // bm) * -(-n // bn),)
                fn = lambda w, kern=kern, bm=bm, bn=bn, bk=bk, st=st, nw=nw, grid=grid: kern[grid](
                    x, w, c, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=st, num_warps=nw, num_stages=st)
                us, err = _timed([lambda w=w, fn=fn: fn(w) for w in ws])
                cfg = {"kernel": name, "BM": bm, "BN": bn, "BK": bk, "stages": st, "warps": nw}
                if us is None:
                    res.append({**cfg, "error": err})
                    continue
                fn(w16)
                res.append({**cfg, "us": round(us, 3), "rel_err": round(reference.rel_err(c.float(), ref), 7)})
        del ref
        for q in quant_point(k, n, m, 4, 128, l2, x, sms, only=fused)[0]:  # our fused loops, dequantize-then-cuBLAS
            kind = ("dequant_cublas" if q["cfg"]["path"] == "dequant" else
                    "packed_f16w" if q["cfg"].get("packed") else "kn")
            res.append(_flat(q, kernel=kind))
        best = {}
        for r_ in res:
            if "us" in r_:
                r_["x_cublas"] = round(cub / r_["us"], 4)
                if r_["rel_err"] < 1e-2 and (r_["kernel"] not in best or r_["us"] < best[r_["kernel"]]["us"]):
                    best[r_["kernel"]] = r_
        yield {"series": "gemm", "M": m, "K": k, "N": n, "cublas_us": round(cub, 3), "best": best, "points": res}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--m1", action="store_true", help="the read ceiling of the M = 1 GEMV")
    ap.add_argument("--gemm", action="store_true", help="the Triton fp16 GEMM ceiling at M = 1024 / 4096")
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--ours-only", action="store_true", help="--m1: skip the readers (our GEMV's configs only)")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes")
    ap.add_argument("--run", default="")
    args = ap.parse_args(argv)
    from aqsearch.bench import append_result

    dev = device()
    dry = args.dry_run or dev == "cpu"
    props = torch.cuda.get_device_properties(0) if dev == "cuda" else None
    l2 = props.L2_cache_size if props else 1 << 20
    sms = props.multi_processor_count if props else 4
    bw = copy_bandwidth()
    meta = {"bench": "ceiling", "run": args.run, "copy_gbps": round(bw, 1)}
    print(f"{props.name if props else 'CPU (dry run)'}: copy {bw:.0f} GB/s, {sms} SMs", flush=True)
    if dev == "cuda":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))

    if args.m1:
        grid = [(256, 8, 1, 1), (64, 32, 3, 0)] if dry else (READ_BEST if args.ours_only else READ_GRID)
        kg = [{"path": "gemv", "pk": True, "BN": bn, "BKS": 64 if dry else 128, "num_warps": kw, "kw": kw, "kg": True,
               "split": sp} for bn, kw, sp in ([(32, 2, 1)] if dry else KG_CFGS)]
        for k, n in ((256, 512),) if dry else M1_SHAPES:
            for bits in (int(b) for b in args.bits.split(",")):
                row = {**meta, **m1_point(k, n, bits, grid, kg, l2, sms, bw, dev)}
                append_result(args.out, row)
                best, nos, ours = row["best"], row["best_no_split"], row["ours"]
                print(f"read {k}x{n} w{bits} ({row['weight_bytes'] / 1e6:.1f} MB): best Triton {best['us']:.2f} us = "
                      f"{row['best_frac_copy']:.1%} of copy ({best['BN']}x{best['BR']} st{best['stages']} "
                      f"{best['per_sm']}/SM split {best['split']}; with the split-K epilogue {best['reduce_us']} us, "
                      f"correct {best['reduce_correct']}); no split-K: "
                      f"{nos and (nos['us'], nos['BN'], nos['BR'], nos['stages'])} us; torch sum "
                      f"{row['torch_sum_us']} us; our GEMV {ours['us']} us = {ours['frac_copy']} of copy (words + "
                      f"scales + zeros); kg {min((q['us'] for q in row['ours_no_split'] if q.get('us')), default=None)} us",
                      flush=True)

    if args.gemm:
        fused = ([{"path": "gemm", "packed": True, "f16w": True, "BM": 16, "BN": 32, "BK": 32, "split": 1}] if dry else
                 [{"path": "gemm", "packed": True, "f16w": True, "BM": bm, "BN": bn, "BK": bk, "num_stages": st,
                   "num_warps": nw, "split": 1} for bm, bn, bk, st, nw in PACKED_CFGS]
                 + [{"path": "gemm", "kn": True, "BM": bm, "BN": bn, "BK": bk, "num_stages": st, "num_warps": nw,
                     "split": 1} for bm, bn, bk, st, nw in KN_CFGS]
                 + [{"path": "dequant", "BN": 256, "BKS": 64, "num_warps": 4, "chunk": 0}])
        for k, n in ((128, 256),) if dry else GEMM_SHAPES:
            for rec in gemm_point(k, n, (64,) if dry else tuple(int(m) for m in args.ms.split(",")),
                                  ((32, 32, 32, 1, 4),) if dry else MM_CFGS, fused, l2, sms, dev, dry):
                append_result(args.out, {**meta, **rec})
                print(f"gemm M={rec['M']} {k}x{n}: cuBLAS {rec['cublas_us']:.1f} us; " + "; ".join(
                    f"{kk} {v['us']:.1f} us x{v['x_cublas']:.2f}" for kk, v in rec["best"].items()), flush=True)
                for r_ in rec["points"]:
                    if "error" in r_:
                        print(f"  failed: {r_}", flush=True)


if __name__ == "__main__":
    main()
