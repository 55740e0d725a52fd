"""SASS instructions a weight of the M = 1 GEMV kernels, compiled for sm_90 on any machine (no GPU).

Compiles ``_gemv.gemv_kernel`` (fp32 FFMA), ``_gemv_h2.gemv_h2_kernel`` (packed half2) and
``_gemv_pk.gemv_pk_kernel`` (f16x2 inline PTX, its asm path) with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))``, disassembles the cubin with the
``cuobjdump`` Triton ships, finds the K loop (the backward branch) and divides its instructions by
the weights one thread decodes an iteration. Prints a markdown table (the one in
``benchmarks/results/kernel-notes.md``).

    python benchmarks/sass_count.py                 # the table (old, half2, pk at two tiles)
    python benchmarks/sass_count.py --pk --json     # pk kernel only, one JSON line a bit width
    python benchmarks/sass_count.py --record benchmarks/results/sass.jsonl   # the table, and JSON lines
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from aqsearch.kernels import _gemv, _gemv_h2, _gemv_pk, launch  # noqa: E402
from aqsearch.kernels.packing import kw_fits  # noqa: E402

OLD_SIG = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "out_ptr": "*fp16",
           "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "n_lo": "i32",
           "ZW": "i32", "ones": "i32", "stride_xm": "i32", "stride_om": "i32", "k_per_split": "i32",
           "n_split": "i32"}
NEW_SIG = {a: t for a, t in OLD_SIG.items() if a not in ("M", "stride_xm")}
PK_SIG = {a: t for a, t in NEW_SIG.items() if a != "ones"}


# Arguments a real launch on the Llama shapes specializes as multiples of 16 (Triton's "D" key: every
# pointer is 16-byte aligned; N, K, the zero words, strides and the K-slice are multiples of 16).
ALIGNED = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "lock_ptr", "N", "K", "n_lo", "ZW", "stride_xm",
           "stride_om", "k_per_split")


def sass(fn, sig, consts, num_warps, aligned=True):
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if aligned and a in ALIGNED}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs = re.search(r"\.maxnreg|reg", "")  # register count: from cuobjdump -res-usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    spill = re.search(r"STACK:(\d+)", res)
    return text, regs.group(1) if regs else "?", int(spill.group(1)) if spill else 0


def loop_body(text):
    """Opcodes of the longest backward-branch range (the K loop)."""
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(4)))
    best = []
    for i, (addr, op, rest) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and t and int(t.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(t.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


def count(bits, new, bn=256, nw=1, bks=None):
    bks = bks or {2: 128, 3: 64, 4: 64, 8: 32}[bits] if not new else {2: 64, 3: 64, 4: 64, 8: 32}[bits]
    consts = {"BITS": bits, "GROUP": 128, "ZMODE": 2, "BN": bn, "BKS": bks, "USE_WS": True, "EVEN_K": True,
              "EVEN_N": True}
    if new:
        text, regs, spills = sass(_gemv_h2.gemv_h2_kernel, NEW_SIG, consts, nw)
    else:
        text, regs, spills = sass(_gemv.gemv_kernel, OLD_SIG, dict(consts, BM=1, PREFETCH=False), nw)
    body = loop_body(text)
    weights = bks * bn // (32 * nw)  # one thread's weights an iteration
    return len(body) / weights, collections.Counter(body), regs, spills, bks


def count_pk(bits, bks=128, bn=256, nw=1, pdl=False, kw=1, kg=False, stages=1):
    """The pk GEMV's asm path (``ASM=True``), as ``count``: (instr/weight, opcodes, regs, spill bytes, bks).
    ``kw`` > 1: a tile's word rows dealt to kw warps (``nw`` = kw), weights counted per thread; ``kg``: each warp a
    whole tile (a loop step is kw tiles)."""
    s = _gemv_pk.shift_for(bits, bks)
    a0, a1 = launch._pk_asm(bits, s)
    nw = max(nw, kw)
    consts = {"BITS": bits, "GROUP": 128, "ZMODE": 2, "BN": bn, "BKS": bks, "USE_WS": True, "EVEN_K": True,
              "EVEN_N": True, "S": s, "ASM": True, "ASM0": a0, "ASM1": a1, "PDL": pdl, "STAGES": stages, "KW": kw,
              "PF": 1, "LATE": False, "KG": kg}
    text, regs, spills = sass(_gemv_pk.gemv_pk_kernel, PK_SIG, consts, nw)
    body = loop_body(text)
    return len(body) / (bks * bn * (kw if kg else 1) // (32 * nw)), collections.Counter(body), regs, spills, bks


def _row(bits, name, bks, per, ops, regs, spills, bn=256, nw=1):
    w = bks * bn // (32 * nw)
    top = ", ".join(f"{o} {n / w:.2f}" for o, n in ops.most_common(6))
    return (f"| w{bits} | {name} | {bn} x {bks}, {nw} | {per:.2f} | {regs}{f' +{spills} spill' if spills else ''} "
            f"| {top} |")


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pk", action="store_true", help="the pk kernel only")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--bks", default="64,128", help="pk tile K sizes")
    ap.add_argument("--kw", type=int, default=1, help="pk: warps a tile's word rows (3 bits: 32-code steps) are dealt to")
    ap.add_argument("--json", action="store_true", help="one JSON object a line instead of the table")
    ap.add_argument("--record", default=None, metavar="JSONL",
                    help="also append each row to this results file (e.g. benchmarks/results/sass.jsonl)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    bits_list = [int(b) for b in args.bits.split(",")]
    if not args.json:
        print("| bits | kernel | BN x BKS, warps | instr / weight (K loop) | regs | top opcodes per weight |")
        print("|---|---|---|---:|---:|---|")
    for bits in bits_list:
        rows = []
        if not args.pk:
            for new in (False, True):
                per, ops, regs, spills, bks = count(bits, new)
                rows.append(("half2 (h2)" if new else "fp32 (old)", bks, per, ops, regs, spills, 1))
        for bks in (int(b) for b in args.bks.split(",")):
            if not kw_fits(bits, bks, args.kw):
                continue
            per, ops, regs, spills, _ = count_pk(bits, bks, kw=args.kw)
            rows.append((f"f16x2 asm (pk{f', kw {args.kw}' if args.kw > 1 else ''})", bks, per, ops, regs, spills,
                         args.kw))
        for name, bks, per, ops, regs, spills, nw in rows:
            w = bks * 256 // (32 * nw)
            row = {"bits": bits, "kernel": name, "BN": 256, "BKS": bks, "warps": nw, "target": "sm_90",
                   "triton": triton.__version__, "instr_per_weight": round(per, 3),
                   "regs": int(regs) if str(regs).isdigit() else regs, "spill_bytes": spills,
                   "ops": {o: round(n / w, 3) for o, n in ops.most_common()}}
            if args.record:
                from aqsearch.bench import append_result

                append_result(args.record, {"bench": "sass", **row})
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(_row(bits, name, bks, per, ops, regs, spills, nw=nw), flush=True)


if __name__ == "__main__":
    main()
