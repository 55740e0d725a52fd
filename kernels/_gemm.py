"""Fused dequantize + GEMM on the tensor cores (``tl.dot``, fp32 accumulation), and a dequantize kernel.

The GEMM builds each weight tile ``[BK, BN]`` in registers from the packed words (row ``k`` reads word
row ``k // per_word``; the repeats hit L1), scales it and feeds it to ``tl.dot`` in the activation
dtype. For large M, dequantize-then-cuBLAS (``dequant_kernel`` + ``torch.matmul``) can be faster: the
dispatcher measures both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl_common import lshift, tile_store, win


@triton.jit
def _codes_kn(w_ptr, kk, rn, kmask, nmask, N, n_lo, BITS: tl.constexpr):
    """Codes ``q[BK, BN]`` (int32) of K indices ``kk`` and columns ``rn``."""
    m = kmask[:, None] & nmask[None, :]
    if BITS == 3:
        lo = tl.load(w_ptr + (kk // 16)[:, None] * N + rn[None, :], mask=m, other=0)
        hi = tl.load(w_ptr + (n_lo + kk // 32)[:, None] * N + rn[None, :], mask=m, other=0)
        q = ((lo >> ((kk % 16) * 2)[:, None]) & 3) | (((hi >> (kk % 32)[:, None]) & 1) << 2)
    else:
        PW: tl.constexpr = 32 // BITS
        wv = tl.load(w_ptr + (kk // PW)[:, None] * N + rn[None, :], mask=m, other=0)
        q = (wv >> ((kk % PW) * BITS)[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def _dot(acc, a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gather_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, stride_xm, k_start, k_end,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, BK: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """K loop with the weight tile ``[BK, BN]`` in natural K order: row k reads word row k // per_word
    (the repeats come from L1); one dot a tile."""
    rk = tl.arange(0, BK)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        q = _codes_kn(w_ptr, kk, rn, kmask, nmask, N, n_lo, BITS)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exactly float(q)
        if BK <= GROUP:  # the tile lies in one group: one scale and zero a column
            gi = k0 // GROUP
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if SYM:
                z = 1 << (BITS - 1)
            else:
                z = tl.load(z_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        else:
            g2 = (kk // GROUP)[:, None] * N + rn[None, :]
            m2 = kmask[:, None] & nmask[None, :]
            s = tl.load(s_ptr + g2, mask=m2, other=0.0).to(tl.float32)
            if SYM:
                z = 1 << (BITS - 1)
            else:
                z = tl.load(z_ptr + g2, mask=m2, other=0.0).to(tl.float32)
        b = ((qf - z) * s).to(x_ptr.dtype.element_ty)  # [BK, BN]: the reference's weight, to the bit
        acc = _dot(acc, a, b, DOT_F32)
    return acc


@triton.jit
def _slots_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ones, stride_xm, k_start, k_end,
                BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, BK: tl.constexpr,
                DOT_F32: tl.constexpr):
    """K loop that loads each packed word once: code slot j of the R word rows is one ``[R, BN]``
    weight block, multiplied with the matching strided columns of x (``k = row * per_word + j``);
    the order of a dot's terms is free, so no reshuffle is needed. R = BK // per_word >= 16."""
    for k0 in range(k_start, k_end, BK):
        if BITS == 3:
            R: tl.constexpr = BK // 32  # pairs of low-plane rows = high-plane rows
            r2 = k0 // 32 + tl.arange(0, R)
            wm = (r2 < (K + 31) // 32)[:, None] & nmask[None, :]
            le = tl.load(w_ptr + (2 * r2)[:, None] * N + rn[None, :], mask=(2 * r2 < n_lo)[:, None] & nmask[None, :],
                         other=0).to(tl.uint32, bitcast=True)
            lo = tl.load(w_ptr + (2 * r2 + 1)[:, None] * N + rn[None, :],
                         mask=(2 * r2 + 1 < n_lo)[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
            hw = tl.load(w_ptr + (n_lo + r2)[:, None] * N + rn[None, :], mask=wm, other=0).to(tl.uint32, bitcast=True)
            kb = 32 * r2
        else:
            PW: tl.constexpr = 32 // BITS
            R: tl.constexpr = BK // PW
            rows = k0 // PW + tl.arange(0, R)
            wm = (rows < (K + PW - 1) // PW)[:, None] & nmask[None, :]
            w = tl.load(w_ptr + rows[:, None] * N + rn[None, :], mask=wm, other=0).to(tl.uint32, bitcast=True)
            kb = rows * PW
        if BK <= GROUP:
            gi = k0 // GROUP
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if SYM:
                z = tl.zeros([1, 1], dtype=tl.float32) + (1 << (BITS - 1))
            else:
                z = tl.load(z_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        else:  # a word row lies in one group (per_word <= 32 <= GROUP)
            g2 = (kb // GROUP)[:, None] * N + rn[None, :]
            s = tl.load(s_ptr + g2, mask=wm, other=0.0).to(tl.float32)
            if SYM:
                z = tl.zeros([1, 1], dtype=tl.float32) + (1 << (BITS - 1))
            else:
                z = tl.load(z_ptr + g2, mask=wm, other=0.0).to(tl.float32)
        if BITS == 3:
            for j in tl.static_range(32):
                if j < 16:
                    lsrc = lshift(le, 15 - 2 * j)
                else:
                    lsrc = lshift(lo, 15 - 2 * (j - 16))
                f = (win(lsrc, ones, 2, 15, 0) - (z + 256.0)) + (win(lshift(hw, 15 - j), ones, 1, 15, 2) - 1024.0)
                kk = kb + j
                a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :],
                            other=0.0)
                acc = _dot(acc, a, (f * s).to(x_ptr.dtype.element_ty), DOT_F32)
        else:
            for j in tl.static_range(PW):
                f = win(lshift(w, 15 - BITS * j), ones, BITS, 15, 0) - (z + 256.0)  # q - z, exact
                kk = kb + j
                a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :],
                            other=0.0)
                acc = _dot(acc, a, (f * s).to(x_ptr.dtype.element_ty), DOT_F32)
    return acc


@triton.jit
def gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                M, N, K, n_lo, ones, stride_xm, stride_om, k_per_split, n_split,
                BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                USE_WS: tl.constexpr, DOT_F32: tl.constexpr, SLOTS: tl.constexpr):
    """``out = x @ W``; grid ``(cdiv(M, BM) * cdiv(N, BN), n_split)``, tiles in GROUP_M-row bands.

    ``SLOTS`` picks the compact-load loop (one dot per code slot) over the gather loop. ``DOT_F32``
    runs the dot on fp32 copies of the operands (the CPU interpreter's bf16 dot is wrong).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    rk = tl.arange(0, BK)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if SLOTS:
        acc = _slots_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ones, stride_xm,
                          k_start, k_end, BITS, GROUP, SYM, BK, DOT_F32)
    else:
        acc = _gather_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, stride_xm,
                           k_start, k_end, BITS, GROUP, SYM, BK, DOT_F32)
    tile_store(acc, out_ptr, ws_ptr, lock_ptr, pid_m * num_n + pid_n, pid_k, n_split, M, N, rm, rn, stride_om,
               BM, BN, USE_WS)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, n_lo, ones,
                   BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                   BN: tl.constexpr, BKS: tl.constexpr):
    """``out[K, N] = (q - z) * s`` in out's dtype; grid ``(cdiv(N, BN), cdiv(K, BKS))``, BKS | GROUP."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BKS
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    gi = k0 // GROUP
    s = tl.load(s_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SYM:
        z = tl.zeros([BN], dtype=tl.float32) + (1 << (BITS - 1))
    else:
        z = tl.load(z_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)
    o_ty = out_ptr.dtype.element_ty
    if BITS == 3:
        R: tl.constexpr = BKS // 32
        r2 = k0 // 32 + tl.arange(0, R)
        le = tl.load(w_ptr + (2 * r2)[:, None] * N + cols[None, :],
                     mask=(2 * r2 < n_lo)[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        lo = tl.load(w_ptr + (2 * r2 + 1)[:, None] * N + cols[None, :],
                     mask=(2 * r2 + 1 < n_lo)[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        hw = tl.load(w_ptr + (n_lo + r2)[:, None] * N + cols[None, :],
                     mask=(r2 < (K + 31) // 32)[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        for half in tl.static_range(2):  # even low rows: k = 32*r2 + j; odd: k = 32*r2 + 16 + j
            if half == 0:
                lw = le
            else:
                lw = lo
            for v in tl.static_range(4):
                src = lshift(lw, 15 - 8 * v)
                for i in tl.static_range(4):
                    j = 4 * v + i
                    P = 15 + 2 * i
                    H = 16 * half + j  # bit of the high plane
                    PH = 15 + H % 8
                    hsrc = lshift(hw, 15 - 8 * (H // 8))
                    f = (win(src, ones, 2, P, 0) - (z + (1 << (23 - P)))[None, :]) \
                        + (win(hsrc, ones, 1, PH, 2) - (1 << (25 - PH)))  # q - z, exact
                    kk = 32 * r2 + 16 * half + j
                    tl.store(out_ptr + kk[:, None] * N + cols[None, :], (f * s).to(o_ty),
                             mask=(kk < K)[:, None] & cmask[None, :])
    else:
        PW: tl.constexpr = 32 // BITS
        CPV: tl.constexpr = 8 // BITS
        R: tl.constexpr = BKS // PW
        rows = k0 // PW + tl.arange(0, R)
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                    mask=(rows < (K + PW - 1) // PW)[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        for v in tl.static_range(PW // CPV):
            src = lshift(w, 15 - BITS * CPV * v)
            for i in tl.static_range(CPV):
                P = 15 + BITS * i
                f = win(src, ones, BITS, P, 0) - (z + (1 << (23 - P)))[None, :]  # q - z, exact
                kk = rows * PW + CPV * v + i
                tl.store(out_ptr + kk[:, None] * N + cols[None, :], (f * s).to(o_ty),
                         mask=(kk < K)[:, None] & cmask[None, :])
