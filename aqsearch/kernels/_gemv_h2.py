"""Fused dequantize + GEMV at M = 1 in packed half2 arithmetic (two weights an instruction), split-K (Triton).

The fp32 GEMV (``_gemv.py``) spends ~4 instructions a 4-bit weight (a LOP3 and an FFMA each, plus
shifts and per-slot sums): at M = 1 it is issue-bound. Here two codes of one column share a 32-bit
register as the two halves of an fp16x2, so every step after the extraction works on pairs:

- extraction (Marlin's ``lop3`` dequantization, ``marlin/dequant.h``): code ``j`` of a word and code
  ``j + per_word / 2`` sit ``16`` bits apart, so ``(w & (m << P) * 0x00010001) | 0x64006400`` puts both
  into the mantissas of two fp16 with exponent 2**10: the pair ``(1024 + q_j * 2**P, 1024 + q_j' * 2**P)``
  exactly, one LOP3 for two weights. Positions ``P + bits <= 10`` are taken in place (Marlin's
  ``0x00F000F0`` mask with a ``1/16`` factor instead of a shift); the rest after one shift by 8 a word.
  The mask comes from a run-time value (``ones``) so that LOP3's one immediate is the 0x6400 OR.
- ``d = h * 2**-P - (2**(10 - P) + z)`` is one HFMA2 (HADD2 at P = 0) and exact: ``q - z`` as fp16.
  8 bits multiply by the scale here too (one HMUL2) so that fp16 products stay in range.
- ``acc += x2 * d`` is one HFMA2, with ``x2 = (x_k, x_k')`` the matching pair of activations.
- fp16 accumulation in short chains (gemlite's GEMV offers fp16 accumulation): ``acc[R, BN, 2]`` holds
  ``per_word / 2`` products a lane, summed over the R word rows of the tile in fp16, then flushed into an
  fp32 accumulator once a tile (a tile lies in one group): ``a += s * (lane0 + lane1)``. A flushed sum
  has at most ``R + per_word / 2`` fp16 roundings (<= 16 at the shipped tiles), each ``<= 2**-11``
  relative to the partial sum; the tests bound the relative error at 4e-3 (fp32: 1e-3).
- Range: with the scale applied after the flush, 2/3/4-bit products are ``x * (q - z)``, ``|q - z| <= 15``:
  finite while ``|x| * 15 * (R + per_word / 2)`` stays below 65504 (``|x|`` up to ~270 at R = 8, 4 bits).

3 bits (a 2-bit plane and a 1-bit plane): the low pair as for 2 bits; the high bits of codes ``j`` and
``j + 8`` of a low word are put 16 apart by one PRMT-like byte gather of the high word (bits 0..7 and
8..15 -> 0..7 and 16..23), then shifted so that each lands at mantissa bit 6..9, where the OR-ed
offset ``2**(10 - P_hi) * 4`` stays <= 64 and ``d = h_lo * f_lo + h_hi * f_hi - c`` is exact (two HFMA2).

x: fp16 only (bf16 x runs the fp32 GEMV). Counted with ptxas for sm_90: see
``benchmarks/results/kernel-notes.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl_common import group_zero, splitk_reduce


@triton.jit
def _h2(p):
    """int32/uint32 ``[...]`` -> fp16 ``[..., 2]``: (low half, high half) of each word, bit for bit."""
    p = p.to(tl.int32, bitcast=True)
    return tl.join(p.to(tl.int16), (p >> 16).to(tl.int16)).to(tl.float16, bitcast=True)


@triton.jit
def _pair2(v):
    """fp16 ``[BN]`` -> ``[BN, 2]`` (both lanes ``v``)."""
    return tl.join(v, v)


@triton.jit
def _xpair(x_ptr, k, K, D: tl.constexpr, EVEN_K: tl.constexpr):
    """fp16 ``[R, 2]``: ``(x[k], x[k + D])`` for each ``k[R]`` (0 past K), packed as one int32 a row
    first so that the compiler keeps one half2 register per row instead of re-packing it per column."""
    xb = x_ptr.to(tl.pointer_type(tl.int16))
    if EVEN_K:
        a = tl.load(xb + k)
        b = tl.load(xb + k + D)
    else:
        a = tl.load(xb + k, mask=k < K, other=0)
        b = tl.load(xb + k + D, mask=k + D < K, other=0)
    return _h2((a.to(tl.int32) & 0xFFFF) | (b.to(tl.int32) << 16))


@triton.jit
def _code(src, mask1, P: tl.constexpr, BITS: tl.constexpr):
    """fp16 ``[R, BN, 2]``: ``1024 + q * 2**P`` for the codes at bits ``[P, P+BITS)`` and ``[16+P, ...)``."""
    return _h2((src & (mask1 << P)) | 0x64006400)


@triton.jit
def _term(acc, w, w8, lanes, z, s2, x_ptr, k, K, J: tl.constexpr, BITS: tl.constexpr, EVEN_K: tl.constexpr):
    """2/4/8 bits: ``acc += x2 * (q - z)`` for pair J (codes J and J + per_word / 2 of each word)."""
    PW: tl.constexpr = 32 // BITS
    INPLACE: tl.constexpr = BITS * J + BITS <= 10
    P: tl.constexpr = BITS * J if INPLACE else BITS * J - 8
    CO: tl.constexpr = 1 << (10 - P)
    FP: tl.constexpr = 1.0 / (1 << P)
    h = _code(w if INPLACE else w8, lanes, P, BITS)
    c = _pair2((-CO - z).to(tl.float16))
    if P == 0:
        d = h + c[None, :, :]
    else:
        d = tl.fma(h, FP, c[None, :, :])
    if BITS == 8:
        d = d * s2[None, :, :]
    xv = _xpair(x_ptr, k, K, PW // 2, EVEN_K)
    return tl.fma(d, xv[:, None, :], acc)


@triton.jit
def _term3(acc, lw, lw8, hg, lanes, hbit, z, x_ptr, k, K, J: tl.constexpr, EVEN_K: tl.constexpr):
    """3 bits: pair J of a low-plane word (codes J, J + 8) with its high bits from ``hg`` at bits 6..9."""
    INPLACE: tl.constexpr = 2 * J + 2 <= 10
    PL: tl.constexpr = 2 * J if INPLACE else 2 * J - 8
    PH: tl.constexpr = 6 + (J % 4)
    CL: tl.constexpr = (1 << (10 - PL)) + (1 << (12 - PH))
    FL: tl.constexpr = 1.0 / (1 << PL)
    FH: tl.constexpr = 4.0 / (1 << PH)
    hl = _code(lw if INPLACE else lw8, lanes, PL, 2)
    hh = _h2((hg & (hbit << PH)) | 0x64006400)
    c = _pair2((-CL - z).to(tl.float16))
    d = tl.fma(hl, FL, c[None, :, :])
    d = tl.fma(hh, FH, d)
    xv = _xpair(x_ptr, k, K, 8, EVEN_K)
    return tl.fma(d, xv[:, None, :], acc)


@triton.jit
def gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                   N, K, n_lo, ZW, ones, stride_om, k_per_split, n_split,
                   BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr,
                   BN: tl.constexpr, BKS: tl.constexpr, USE_WS: tl.constexpr,
                   EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """``out[1, N] = x[1, K] @ W[K, N]`` (fp16 x); grid ``(cdiv(N, BN), n_split)``; ``ones`` = 0xFFFF.

    Same tiling as ``_gemv.gemv_kernel`` (BN columns, K-slices of whole BKS tiles, BKS | GROUP).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    lanes = (ones.to(tl.uint32) & ((1 << (BITS if BITS != 3 else 2)) - 1)) * 0x00010001  # run-time mask
    a = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BKS):
        gi = k0 // GROUP
        if EVEN_N:
            s = tl.load(s_ptr + gi * N + cols)
        else:
            s = tl.load(s_ptr + gi * N + cols, mask=cmask, other=0.0)
        z = group_zero(z_ptr, gi, N, ZW, cols, cmask, BITS, ZMODE, EVEN_N)  # fp32 [BN]
        if BITS == 3:
            R: tl.constexpr = BKS // 32
            r2 = k0 // 32 + tl.arange(0, R)
            if MASKED:
                le = tl.load(w_ptr + (2 * r2)[:, None] * N + cols[None, :],
                             mask=(2 * r2 < n_lo)[:, None] & cmask[None, :], other=0)
                lo = tl.load(w_ptr + (2 * r2 + 1)[:, None] * N + cols[None, :],
                             mask=(2 * r2 + 1 < n_lo)[:, None] & cmask[None, :], other=0)
                hw = tl.load(w_ptr + (n_lo + r2)[:, None] * N + cols[None, :],
                             mask=(r2 < (K + 31) // 32)[:, None] & cmask[None, :], other=0)
            else:
                le = tl.load(w_ptr + (2 * r2)[:, None] * N + cols[None, :])
                lo = tl.load(w_ptr + (2 * r2 + 1)[:, None] * N + cols[None, :])
                hw = tl.load(w_ptr + (n_lo + r2)[:, None] * N + cols[None, :])
            le = le.to(tl.uint32, bitcast=True)
            lo = lo.to(tl.uint32, bitcast=True)
            hw = hw.to(tl.uint32, bitcast=True)
            hbit = lanes & 0x00010001
            acc = tl.zeros([R, BN, 2], dtype=tl.float16)
            for half in tl.static_range(2):  # low word le (k = 32 r2 + j) then lo (k = 32 r2 + 16 + j)
                lw = le if half == 0 else lo
                # high bits of this half's 16 codes: bits 16*half + (0..7) -> 0..7, + (8..15) -> 16..23
                hsrc = hw >> (16 * half)
                hg = (hsrc & 0xFF) | ((hsrc << 8) & 0x00FF0000)
                lw8 = lw >> 8
                hg_a = hg << 6  # bits 0..3 -> 6..9 (pairs j = 0..3)
                hg_b = hg << 2  # bits 4..7 -> 6..9 (pairs j = 4..7)
                for j in tl.static_range(8):  # pair (k, k + 8), k = 32 r2 + 16 half + j
                    acc = _term3(acc, lw, lw8, hg_a if j < 4 else hg_b, lanes, hbit, z,
                                 x_ptr, 32 * r2 + 16 * half + j, K, j, EVEN_K)
        else:
            PW: tl.constexpr = 32 // BITS
            R: tl.constexpr = BKS // PW
            rows = k0 // PW + tl.arange(0, R)
            if MASKED:
                w = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                            mask=(rows < (K + PW - 1) // PW)[:, None] & cmask[None, :], other=0)
            else:
                w = tl.load(w_ptr + rows[:, None] * N + cols[None, :])
            w = w.to(tl.uint32, bitcast=True)
            w8 = w >> 8
            s2 = _pair2(s.to(tl.float16))  # used at 8 bits only
            acc = tl.zeros([R, BN, 2], dtype=tl.float16)
            for j in tl.static_range(PW // 2):  # pair (code j, code j + PW/2)
                acc = _term(acc, w, w8, lanes, z, s2, x_ptr, PW * rows + j, K, j, BITS, EVEN_K)
        t = tl.sum(tl.sum(acc, axis=0).to(tl.float32), axis=1)  # fp16 over the tile's rows, fp32 lanes
        if BITS == 8:
            a += t
        else:
            a += t * s.to(tl.float32)
    mask = cmask
    if USE_WS:
        tl.store(ws_ptr + pid_k * N + cols, a, mask=mask, cache_modifier=".wt")
        splitk_reduce(out_ptr, ws_ptr, lock_ptr, pid_n, n_split, 1, N, tl.arange(0, 1), cols, stride_om, 1, BN)
    else:
        tl.store(out_ptr + cols, a.to(out_ptr.dtype.element_ty), mask=mask)
