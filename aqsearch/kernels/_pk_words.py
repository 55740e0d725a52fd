"""The pk GEMV's device-side pieces (``_gemv_pk.gemv_pk_kernel`` calls them): the per-word blocks, each an
inline-PTX block (``_gemv_pk.asm_w24`` / ``asm_w8`` / ``asm_w3`` build the text) with a pure-Triton twin for the
interpreter (int32 pairs in, int32 pairs out, the fp16 pair arithmetic spelt out with fp64 and one rounding),
the flush of a tile's f16x2 accumulators, the x words of a word row, and a group's integer zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---- pure-Triton twins: int32 pairs in, int32 pairs out, the same arithmetic ----

@triton.jit
def _lo(u):
    """fp16 of the low half of int32 ``u``."""
    return (u & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _hi(u):
    return (u >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pk(lo, hi):
    """Two fp16 -> int32 (lo | hi << 16)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _fma2(a, b, c):
    """``fma.rn.f16x2`` on int32 pairs: each lane ``a * b + c`` in fp64 (exact here), rounded once to fp16."""
    lo = (_lo(a).to(tl.float64) * _lo(b).to(tl.float64) + _lo(c).to(tl.float64)).to(tl.float16)
    hi = (_hi(a).to(tl.float64) * _hi(b).to(tl.float64) + _hi(c).to(tl.float64)).to(tl.float16)
    return _pk(lo, hi)


@triton.jit
def _prmt_lo(a, b):
    """prmt 0x5410: (low half of a, low half of b)."""
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def _prmt_hi(a, b):
    """prmt 0x7632: (high half of a, high half of b)."""
    return ((a >> 16) & 0xFFFF) | (b & -65536)


@triton.jit
def _xp(xw, J: tl.constexpr, NX: tl.constexpr):
    """x pair j of a word row: (x[j], x[j + NX]) from the x words (x[2i], x[2i+1]) (tuple ``xw``)."""
    if J % 2 == 0:
        r = _prmt_lo(xw[J // 2], xw[J // 2 + NX // 2])
    else:
        r = _prmt_hi(xw[J // 2], xw[J // 2 + NX // 2])
    return r


@triton.jit
def _twin_pair(acc, src, xp, c, BITS: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    h = (src & (((1 << BITS) - 1) * 0x10001 << P)) | 0x64006400
    d = _fma2(h, _pow2_pair(-(P + S)), c)
    return _fma2(d, xp, acc)


@triton.jit
def _pow2_pair(E: tl.constexpr):
    """int32 fp16x2 bits of (2**E, 2**E) (``pow2_pair``)."""
    H: tl.constexpr = ((E + 15) << 10) if E >= -14 else (1 << (E + 24))
    return tl.full([], H * 0x10001, tl.int32)


@triton.jit
def _word24(w, xw, cs, a0, a1, a2, a3, BITS: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr, ASMTXT: tl.constexpr):
    """One row of 2/4-bit words ``w [BN]`` int32 into the accumulators; ``xw`` its x words (scalars),
    ``cs`` the c_P of each distinct P (see ``asm_w24``)."""
    if ASM:
        if BITS == 4:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                ASMTXT, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r",
                [w, xw[0], xw[1], xw[2], xw[3], cs[0], cs[1], a0, a1, a2, a3],
                (tl.int32, tl.int32, tl.int32, tl.int32), True, 1)
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                ASMTXT, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                [w, xw[0], xw[1], xw[2], xw[3], xw[4], xw[5], xw[6], xw[7], cs[0], cs[1], cs[2], cs[3], cs[4],
                 a0, a1, a2, a3],
                (tl.int32, tl.int32, tl.int32, tl.int32), True, 1)
    else:
        v = (w >> 8) & 0x00FFFFFF
        PW: tl.constexpr = 32 // BITS
        for j in tl.static_range(PW // 2):
            INPL: tl.constexpr = BITS * j + BITS <= 10
            P: tl.constexpr = BITS * j if INPL else BITS * j - 8
            # index of P among the distinct P values, in asm_w24's order: in place first, then shifted ones
            CI: tl.constexpr = (P // BITS) if BITS == 4 else P // 2
            src = w if INPL else v
            xp = _xp(xw, j, PW // 2)
            if j % 4 == 0:
                a0 = _twin_pair(a0, src, xp, cs[CI], BITS, P, S)
            elif j % 4 == 1:
                a1 = _twin_pair(a1, src, xp, cs[CI], BITS, P, S)
            elif j % 4 == 2:
                a2 = _twin_pair(a2, src, xp, cs[CI], BITS, P, S)
            else:
                a3 = _twin_pair(a3, src, xp, cs[CI], BITS, P, S)
    return a0, a1, a2, a3


@triton.jit
def _word8(w, xw, c0, a0, a1, S: tl.constexpr, ASM: tl.constexpr, ASMTXT: tl.constexpr):
    """One row of 8-bit words into two accumulators; ``xw`` = ((x0, x1), (x2, x3))."""
    if ASM:
        a0, a1 = tl.inline_asm_elementwise(ASMTXT, "=r,=r,r,r,r,r,r,r", [w, xw[0], xw[1], c0, a0, a1],
                                           (tl.int32, tl.int32), True, 1)
    else:
        f = _pow2_pair(-S)
        h0 = (w & 0x00FF00FF) | 0x64006400  # prmt 0x4240: bytes 0 and 2 under 0x64
        h1 = ((w >> 8) & 0x00FF00FF) | 0x64006400  # prmt 0x4341: bytes 1 and 3
        a0 = _fma2(_fma2(h0, f, c0), _prmt_lo(xw[0], xw[1]), a0)
        a1 = _fma2(_fma2(h1, f, c0), _prmt_hi(xw[0], xw[1]), a1)
    return a0, a1


@triton.jit
def _word_row(w, xw, cs, r: tl.constexpr, a0, a1, a2, a3, BITS: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr,
              ASMTXT: tl.constexpr):
    """Word row ``r`` of a 2/4/8-bit tile into the four accumulators (8 bits: even rows into a0/a1, odd into a2/a3,
    two independent chains)."""
    if BITS == 8:
        if r % 2 == 0:
            a0, a1 = _word8(w, xw, cs[0], a0, a1, S, ASM, ASMTXT)
        else:
            a2, a3 = _word8(w, xw, cs[0], a2, a3, S, ASM, ASMTXT)
    else:
        a0, a1, a2, a3 = _word24(w, xw, cs, a0, a1, a2, a3, BITS, S, ASM, ASMTXT)
    return a0, a1, a2, a3


@triton.jit
def _word3(lw, hw, xw, c0, c4, a0, a1, a2, a3, HALF: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr,
           ASMTXT: tl.constexpr):
    """One 3-bit low-plane word ``lw`` with its high bits (half ``HALF`` of ``hw``)."""
    if ASM:
        a0, a1, a2, a3 = tl.inline_asm_elementwise(
            ASMTXT, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [lw, hw, xw[0], xw[1], xw[2], xw[3], xw[4], xw[5], xw[6], xw[7], c0, c4, a0, a1, a2, a3],
            (tl.int32, tl.int32, tl.int32, tl.int32), True, 1)
    else:
        hs = (hw >> (16 * HALF)) & 0xFFFF
        b = (hs & 0xFF) | ((hs << 8) & 0x00FF0000)
        b = (b | (b << 4)) & 0x0F0F0F0F
        b = (b | (b << 2)) & 0x33333333
        e = (lw & 0x33333333) | ((b << 2) & -858993460)  # ~0x33333333 = 0xCCCCCCCC
        o = (((lw >> 2) & 0x3FFFFFFF) & 0x33333333) | ((b << 1) & -858993460)
        ev = (e >> 8) & 0x00FFFFFF
        ov = (o >> 8) & 0x00FFFFFF
        a0 = _twin_pair(a0, e, _xp(xw, 0, 8), c0, 3, 0, S)
        a2 = _twin_pair(a2, e, _xp(xw, 2, 8), c4, 3, 4, S)
        a0 = _twin_pair(a0, ev, _xp(xw, 4, 8), c0, 3, 0, S)
        a2 = _twin_pair(a2, ev, _xp(xw, 6, 8), c4, 3, 4, S)
        a1 = _twin_pair(a1, o, _xp(xw, 1, 8), c0, 3, 0, S)
        a3 = _twin_pair(a3, o, _xp(xw, 3, 8), c4, 3, 4, S)
        a1 = _twin_pair(a1, ov, _xp(xw, 5, 8), c0, 3, 0, S)
        a3 = _twin_pair(a3, ov, _xp(xw, 7, 8), c4, 3, 4, S)
    return a0, a1, a2, a3


# (a0 + a1) + (a2 + a3) in f16x2, then lane0 + lane1 in fp32: $0 fp32 out, $1..$4 the accumulators
FLUSH_ASM = tl.constexpr(
    "{\n.reg .b32 t, u;\n.reg .f16 l, h;\n.reg .f32 fl, fh;\n"
    "add.rn.f16x2 t, $1, $2;\nadd.rn.f16x2 u, $3, $4;\nadd.rn.f16x2 t, t, u;\n"
    "mov.b32 {l, h}, t;\ncvt.f32.f16 fl, l;\ncvt.f32.f16 fh, h;\nadd.f32 $0, fl, fh;\n}\n")


@triton.jit
def _flush(a0, a1, a2, a3, ASM: tl.constexpr):
    """fp32 ``[BN]``: lane0 + lane1 of ``(a0 + a1) + (a2 + a3)`` (f16x2 sums, then fp32)."""
    if ASM:
        r = tl.inline_asm_elementwise(FLUSH_ASM, "=r,r,r,r,r", [a0, a1, a2, a3], tl.float32, True, 1)
    else:
        one = 0x3C003C00
        t = _fma2(a0, one, a1)
        u = _fma2(a2, one, a3)
        t = _fma2(t, one, u)
        r = _lo(t).to(tl.float32) + _hi(t).to(tl.float32)
    return r


@triton.jit
def _l2_prefetch(ptrs, ASM: tl.constexpr):
    """Ask L2 for the 128-byte line at each of ``ptrs`` (``prefetch.global.L2``; nothing is returned or waited
    for). Without ASM (the interpreter) nothing: a prefetch changes no value."""
    if ASM:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _xword(x_ptr, k, K, EVEN_K: tl.constexpr):
    """int32 (x[k], x[k + 1]) (k even; 0 past K)."""
    if EVEN_K:
        r = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + k // 2)
    else:
        xb = x_ptr.to(tl.pointer_type(tl.int16))
        lo = tl.load(xb + k, mask=k < K, other=0).to(tl.int32)
        hi = tl.load(xb + k + 1, mask=k + 1 < K, other=0).to(tl.int32)
        r = (lo & 0xFFFF) | (hi << 16)
    return r


@triton.jit
def _xdw(x_ptr, xq, k, OFF: tl.constexpr, K, EVEN_K: tl.constexpr):
    """Two x words (x[k], x[k+1]), (x[k+2], x[k+3]) for k = tile start + OFF (OFF a multiple of 4):
    one 64-bit load at a constant offset from the tile's ``xq`` (int64 pointer) when EVEN_K."""
    if EVEN_K:
        d = tl.load(xq + OFF // 4)
        r = (d.to(tl.int32), (d >> 32).to(tl.int32))
    else:
        r = (_xword(x_ptr, k + OFF, K, EVEN_K), _xword(x_ptr, k + OFF + 2, K, EVEN_K))
    return r


@triton.jit
def _xwords(x_ptr, xq, k, OFF: tl.constexpr, K, NW: tl.constexpr, EVEN_K: tl.constexpr):
    """The NW (2, 4 or 8) x words from tile start ``k`` + OFF on, a tuple."""
    w0, w1 = _xdw(x_ptr, xq, k, OFF, K, EVEN_K)
    if NW == 2:
        r = (w0, w1)
    else:
        w2, w3 = _xdw(x_ptr, xq, k, OFF + 4, K, EVEN_K)
        if NW == 4:
            r = (w0, w1, w2, w3)
        else:
            w4, w5 = _xdw(x_ptr, xq, k, OFF + 8, K, EVEN_K)
            w6, w7 = _xdw(x_ptr, xq, k, OFF + 12, K, EVEN_K)
            r = (w0, w1, w2, w3, w4, w5, w6, w7)
    return r


@triton.jit
def _zero_int(z_ptr, gi, N, ZW, cols, cmask, BITS: tl.constexpr, ZMODE: tl.constexpr):
    """Group ``gi``'s integer zeros, int32 ``[BN]`` (ZMODE 0: the middle code; 2: packed words)."""
    if ZMODE == 0:
        zi = cols * 0 + (1 << (BITS - 1))
    else:
        row = z_ptr + gi * ZW
        if BITS == 3:
            lo = tl.load(row + (cols >> 4), mask=cmask, other=0)
            hi = tl.load(row + (N + 15) // 16 + (cols >> 5), mask=cmask, other=0)
            zi = ((lo >> ((cols & 15) * 2)) & 3) | (((hi >> (cols & 31)) & 1) << 2)
        else:
            PW: tl.constexpr = 32 // BITS
            LPW: tl.constexpr = 4 if BITS == 2 else (3 if BITS == 4 else 2)
            wz = tl.load(row + (cols >> LPW), mask=cmask, other=0)
            zi = (wz >> ((cols & (PW - 1)) * BITS)) & ((1 << BITS) - 1)
    return zi


@triton.jit
def _cp(zi, P: tl.constexpr, S: tl.constexpr):
    """int32 [BN]: fp16x2 bits of ``-(2**(10 - P) + z) * 2**-S`` (needs ``z < 2**(10 - P)``): one IMAD."""
    B: tl.constexpr = (0x8000 | ((25 - P - S) << 10)) * 0x10001
    BS: tl.constexpr = B - (1 << 32) if B >= (1 << 31) else B
    return zi * (0x10001 << P) + BS


@triton.jit
def _cps(zi, BITS: tl.constexpr, S: tl.constexpr):
    """The c_P of a 2/4/8-bit word's distinct P (``asm_w24`` / ``asm_w8`` order), a tuple."""
    if BITS == 8:
        r = (_cp(zi, 0, S),)
    elif BITS == 4:
        r = (_cp(zi, 0, S), _cp(zi, 4, S))
    else:
        r = (_cp(zi, 0, S), _cp(zi, 2, S), _cp(zi, 4, S), _cp(zi, 6, S), _cp(zi, 8, S))
    return r
