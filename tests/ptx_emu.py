"""A tiny emulator of the PTX that ``aqsearch.kernels._gemv_pk`` inlines, so its asm text is checked on the CPU.

The interpreter cannot run inline asm, and the GPU is not always at hand: this runs the exact text that the
kernel passes to ``tl.inline_asm_elementwise`` on NumPy arrays, one element per lane, with the PTX ISA's
semantics for the handful of instructions used (``mov``, ``shl``/``shr`` .b32, ``lop3``, ``prmt`` without
sign modes, ``fma.rn``/``add.rn`` .f16x2, ``mov.b32 {l, h}``, ``cvt.f32.f16``, ``add.f32``). An instruction
it does not know is an error, not a guess.
"""

from __future__ import annotations

import re

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def _halves(u):
    u = u.astype(np.uint32)
    return (u & 0xFFFF).astype(np.uint16).view(np.float16), (u >> 16).astype(np.uint16).view(np.float16)


def _pack(lo, hi):
    return (lo.astype(np.float16).view(np.uint16).astype(np.uint32)
            | (hi.astype(np.float16).view(np.uint16).astype(np.uint32) << np.uint32(16)))


def _fma16(a, b, c):
    """One rounding: fp64 holds a*b+c exactly for fp16 operands of the magnitudes used here."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float16)


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for idx in range(8):
        if lut >> idx & 1:
            t = (a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)
            out |= t
    return out


def _prmt(a, b, sel):
    src = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(a, dtype=np.uint32)
    for i in range(4):
        s = sel >> (4 * i) & 0xF
        if s & 8:
            raise NotImplementedError("prmt sign-replicate modes")
        byte = (src >> np.uint64(8 * s)) & np.uint64(0xFF)
        out |= (byte.astype(np.uint32) << np.uint32(8 * i))
    return out


def run(asm: str, args: list, n_out: int) -> list[np.ndarray]:
    """Execute ``asm`` with ``$0..$(n_out-1)`` as outputs and the ``args`` (int32/uint32 arrays or ints,
    broadcast) as ``$n_out..``. Returns the outputs (uint32, or float32 where ``cvt``/``add.f32`` wrote them)."""
    shape = np.broadcast_shapes(*[np.shape(a) for a in args])
    regs: dict[str, np.ndarray] = {}
    for i, a in enumerate(args):
        regs[f"${n_out + i}"] = np.broadcast_to(np.asarray(a).astype(np.int64).astype(np.uint64) & M32,
                                                shape).astype(np.uint32)

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return np.full(shape, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)
        raise KeyError(f"unknown operand {tok!r}")

    for raw in asm.split(";"):
        line = raw.strip().lstrip("{").strip()
        if not line or line.startswith(".reg") or line == "}":
            continue
        line = line.rstrip("}").strip()
        if not line:
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.lstrip().startswith("{"):
            m = re.fullmatch(r"\{\s*(\w+)\s*,\s*(\w+)\s*\}\s*,\s*(\S+)", rest.strip())
            lo, hi = _halves(val(m.group(3)))
            regs[m.group(1)], regs[m.group(2)] = lo, hi
            continue
        ops = [t.strip() for t in rest.split(",")]
        d, src = ops[0], ops[1:]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "shr.b32":
            r = val(src[0]) >> np.uint32(int(src[1], 0))
        elif op == "shl.b32":
            r = (val(src[0]).astype(np.uint64) << np.uint64(int(src[1], 0)) & M32).astype(np.uint32)
        elif op == "lop3.b32":
            r = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "prmt.b32":
            r = _prmt(val(src[0]), val(src[1]), int(src[2], 0))
        elif op == "fma.rn.f16x2":
            (al, ah), (bl, bh), (cl, ch) = (_halves(val(t)) for t in src)
            r = _pack(_fma16(al, bl, cl), _fma16(ah, bh, ch))
        elif op == "add.rn.f16x2":
            (al, ah), (bl, bh) = (_halves(val(t)) for t in src)
            r = _pack((al.astype(np.float64) + bl).astype(np.float16), (ah.astype(np.float64) + bh).astype(np.float16))
        elif op == "cvt.f32.f16":
            r = regs[src[0]].astype(np.float32)
        elif op == "add.f32":
            r = regs[src[0]].astype(np.float32) + regs[src[1]].astype(np.float32)
        else:
            raise NotImplementedError(f"PTX instruction {op!r}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(n_out)]
