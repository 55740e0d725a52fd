"""Fused dequantize + GEMV for M <= 4 on CUDA cores, split-K (Triton).

Work per weight: one LOP3 that drops the code into an fp32 mantissa (``_tl_common.win``) and one FFMA
per row of x; one shift serves ``8 // bits`` codes (a shifted copy of the word puts them at bits
15..22). The offset that the mantissa trick adds and the group's zero are taken out once a tile:
``sum_k x_k (q_k - z) = sum_k x_k v_k - sum_k x_k offset_k - z sum_k x_k``, and the scale is applied
once a tile too (a tile lies inside one group). Each row of x has its own accumulators (BM <= 4,
unrolled), so the decoded weights are reused across rows.

Taken from: split-K over many small programs with N-contiguous 16-byte loads (each thread owns 8
consecutive columns: two ``LDG.128`` a word row) as in gemlite's ``gemv_revsplitK`` and the
bitsandbytes 4-bit inference GEMV; the exponent-OR int -> float from Marlin's ``lop3`` dequantization;
the offset taken out once a tile is tinygemm's "subtract the zero after the dot" applied to the
magic-number offset. Counted with ptxas for sm_90 (Triton 3.9, BN 256, BKS 64, one warp): ~4
instructions a 4-bit weight (1 LOP3, 1 FFMA, shifts, x loads, per-slot sums); 3 bits ~4.3 (each plane
has its own LOP3 and FFMA). That, not the loads, is the ceiling at M = 1: 8192x8192 at 4 a weight is
~8 us of issue on 132 SMs against ~10.5 us for 80 % of copy bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl_common import group_zero, lshift, splitk_reduce, win


@triton.jit
def _xrow(x_ptr, row, M, kk, K, CHECK_M: tl.constexpr, EVEN_K: tl.constexpr):
    """x[row, kk] as fp32 ``[R]``; 0 outside M and K (no out-of-bounds access)."""
    if CHECK_M:
        xv = tl.load(x_ptr + kk, mask=(kk < K) & (kk * 0 + row < M), other=0.0)
    elif EVEN_K:
        xv = tl.load(x_ptr + kk)
    else:
        xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _slot(d, cs, xs, f, x_ptr, row, M, kk, K, OFF: tl.constexpr, ZS: tl.constexpr,
          CHECK_M: tl.constexpr, EVEN_K: tl.constexpr):
    """One code slot, one row of x: ``d[R, BN] += x[kk] * f``; ``x * offset`` to cs, ``x`` to xs."""
    xv = _xrow(x_ptr, row, M, kk, K, CHECK_M, EVEN_K)  # [R]
    d += xv[:, None] * f
    cs += xv * OFF
    if ZS:  # every slot but 3-bit's high plane, whose x the low plane already counts
        xs += xv
    return d, cs, xs


@triton.jit
def _rows(f, kk, K, M, x_ptr, stride_xm, d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3,
          OFF: tl.constexpr, ZS: tl.constexpr, BM: tl.constexpr, EVEN_K: tl.constexpr):
    """Apply the slot ``f[R, BN]`` (K indices ``kk[R]``) to each of the BM rows of x."""
    d0, c0, s0 = _slot(d0, c0, s0, f, x_ptr, 0, M, kk, K, OFF, ZS, False, EVEN_K)
    if BM > 1:
        d1, c1, s1 = _slot(d1, c1, s1, f, x_ptr + stride_xm, 1, M, kk, K, OFF, ZS, True, EVEN_K)
    if BM > 2:
        d2, c2, s2 = _slot(d2, c2, s2, f, x_ptr + 2 * stride_xm, 2, M, kk, K, OFF, ZS, True, EVEN_K)
        d3, c3, s3 = _slot(d3, c3, s3, f, x_ptr + 3 * stride_xm, 3, M, kk, K, OFF, ZS, True, EVEN_K)
    return d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3


@triton.jit
def _finish(acc, d, cs, xs, z, s):
    """``acc[BN] += s * (sum_rows d - sum(x * offset) - z * sum(x))``: the tile's share."""
    return acc + (tl.sum(d, axis=0) - tl.sum(cs, axis=0) - tl.sum(xs, axis=0) * z) * s


@triton.jit
def _row_out(a, row, out_ptr, ws_ptr, pid_k, M, N, cols, stride_om, USE_WS: tl.constexpr):
    mask = (cols < N) & (cols * 0 + row < M)
    if USE_WS:  # fp32 partial of this K-slice
        tl.store(ws_ptr + (pid_k * M + row) * N + cols, a, mask=mask, cache_modifier=".wt")
    else:
        tl.store(out_ptr + row * stride_om + cols, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _words(w_ptr, k0, K, N, cols, cmask, BITS: tl.constexpr, BKS: tl.constexpr, MASKED: tl.constexpr):
    """The tile's packed words, uint32 ``[BKS // per_word, BN]`` (2/4/8 bits)."""
    PW: tl.constexpr = 32 // BITS
    rows = k0 // PW + tl.arange(0, BKS // PW)
    if MASKED:
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                    mask=(rows < (K + PW - 1) // PW)[:, None] & cmask[None, :], other=0)
    else:
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :])
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _words3(w_ptr, k0, K, N, n_lo, cols, cmask, BKS: tl.constexpr, MASKED: tl.constexpr):
    """3-bit tile: low-plane rows 2*r2 and 2*r2+1 and high-plane row r2, each uint32 ``[BKS // 32, BN]``."""
    r2 = k0 // 32 + tl.arange(0, BKS // 32)
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
    return le.to(tl.uint32, bitcast=True), lo.to(tl.uint32, bitcast=True), hw.to(tl.uint32, bitcast=True)


@triton.jit
def _scale_zero(s_ptr, z_ptr, gi, N, ZW, cols, cmask, BITS: tl.constexpr, ZMODE: tl.constexpr, EVEN_N: tl.constexpr):
    """Group ``gi``'s scales and zeros of the columns, fp32 ``[BN]`` each (zeros: ``group_zero``)."""
    if EVEN_N:
        s = tl.load(s_ptr + gi * N + cols).to(tl.float32)
    else:
        s = tl.load(s_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)
    return s, group_zero(z_ptr, gi, N, ZW, cols, cmask, BITS, ZMODE, EVEN_N)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                M, N, K, n_lo, ZW, ones, stride_xm, stride_om, k_per_split, n_split,
                BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BKS: tl.constexpr, USE_WS: tl.constexpr,
                EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREFETCH: tl.constexpr):
    """``out[M, N] = x[M, K] @ W[K, N]``, M <= BM <= 4; grid ``(cdiv(N, BN), n_split)``.

    A program owns BN columns and a K-slice of ``k_per_split`` (a multiple of BKS; BKS divides
    GROUP, so a tile has one scale and zero a column). ``ones`` must be 0xFFFF. ``EVEN_K``/``EVEN_N``
    (BKS | K, BN | N) drop the bounds masks. ``PREFETCH`` loads the next tile's words, scales and
    zeros before decoding the current one, and touches the next tile's x so that it is in L1.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    a0 = tl.zeros([BN], dtype=tl.float32)
    a1 = tl.zeros([BN], dtype=tl.float32)
    a2 = tl.zeros([BN], dtype=tl.float32)
    a3 = tl.zeros([BN], dtype=tl.float32)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    k_last = k_start + ((k_end - k_start - 1) // BKS) * BKS  # last tile of the slice: the final prefetch re-reads it
    XPF: tl.constexpr = 64 if BKS > 64 else BKS
    xd = tl.zeros([XPF], dtype=tl.float32)
    if PREFETCH:
        if BITS == 3:
            ne, no, nh = _words3(w_ptr, k_start, K, N, n_lo, cols, cmask, BKS, MASKED)
        else:
            nw_ = _words(w_ptr, k_start, K, N, cols, cmask, BITS, BKS, MASKED)
        s_n, z_n = _scale_zero(s_ptr, z_ptr, k_start // GROUP, N, ZW, cols, cmask, BITS, ZMODE, EVEN_N)
    for k0 in range(k_start, k_end, BKS):
        if PREFETCH:
            s, z = s_n, z_n
            kn = tl.minimum(k0 + BKS, k_last)
            s_n, z_n = _scale_zero(s_ptr, z_ptr, kn // GROUP, N, ZW, cols, cmask, BITS, ZMODE, EVEN_N)
            xt = tl.arange(0, XPF)  # touch the next tile's x: its lines are in L1 when the slots read them
            if EVEN_K:
                xd += tl.load(x_ptr + kn + xt).to(tl.float32)
            else:
                xd += tl.load(x_ptr + kn + xt, mask=kn + xt < K, other=0.0).to(tl.float32)
        else:
            s, z = _scale_zero(s_ptr, z_ptr, k0 // GROUP, N, ZW, cols, cmask, BITS, ZMODE, EVEN_N)
        if BITS == 3:
            # Pair r2: low-plane rows 2*r2 (k = 32*r2 + j) and 2*r2+1 (k = 32*r2 + 16 + j), 2-bit
            # codes; high-plane row r2, bit j (k = 32*r2 + j), weight 4.
            R: tl.constexpr = BKS // 32
            r2 = k0 // 32 + tl.arange(0, R)
            if PREFETCH:
                le, lo, hw = ne, no, nh
                ne, no, nh = _words3(w_ptr, tl.minimum(k0 + BKS, k_last), K, N, n_lo, cols, cmask, BKS, MASKED)
            else:
                le, lo, hw = _words3(w_ptr, k0, K, N, n_lo, cols, cmask, BKS, MASKED)
        else:
            PW: tl.constexpr = 32 // BITS  # codes a word
            R: tl.constexpr = BKS // PW  # word rows in the tile
            rows = k0 // PW + tl.arange(0, R)
            if PREFETCH:
                w = nw_
                nw_ = _words(w_ptr, tl.minimum(k0 + BKS, k_last), K, N, cols, cmask, BITS, BKS, MASKED)
            else:
                w = _words(w_ptr, k0, K, N, cols, cmask, BITS, BKS, MASKED)  # [R, BN]
        d0 = tl.zeros([R, BN], dtype=tl.float32)  # per row of x: sum x * v
        d1 = tl.zeros([R, BN], dtype=tl.float32)
        d2 = tl.zeros([R, BN], dtype=tl.float32)
        d3 = tl.zeros([R, BN], dtype=tl.float32)
        c0 = tl.zeros([R], dtype=tl.float32)  # sum x * offset
        c1 = tl.zeros([R], dtype=tl.float32)
        c2 = tl.zeros([R], dtype=tl.float32)
        c3 = tl.zeros([R], dtype=tl.float32)
        s0 = tl.zeros([R], dtype=tl.float32)  # sum x (times the zero)
        s1 = tl.zeros([R], dtype=tl.float32)
        s2 = tl.zeros([R], dtype=tl.float32)
        s3 = tl.zeros([R], dtype=tl.float32)
        if BITS == 3:
            for v in tl.static_range(4):  # low plane: 4 codes a shifted copy, at bits 15, 17, 19, 21
                e_src = lshift(le, 15 - 8 * v)
                o_src = lshift(lo, 15 - 8 * v)
                for i in tl.static_range(4):
                    P = 15 + 2 * i
                    d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3 = _rows(
                        win(e_src, ones, 2, P, 0), 32 * r2 + 4 * v + i, K, M, x_ptr, stride_xm,
                        d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3, 1 << (23 - P), True, BM, EVEN_K)
                    d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3 = _rows(
                        win(o_src, ones, 2, P, 0), 32 * r2 + 16 + 4 * v + i, K, M, x_ptr, stride_xm,
                        d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3, 1 << (23 - P), True, BM, EVEN_K)
            for v in tl.static_range(4):  # high plane: 8 bits a shifted copy, at bits 15..22
                h_src = lshift(hw, 15 - 8 * v)
                for i in tl.static_range(8):
                    P = 15 + i
                    d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3 = _rows(
                        win(h_src, ones, 1, P, 2), 32 * r2 + 8 * v + i, K, M, x_ptr, stride_xm,
                        d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3, 1 << (25 - P), False, BM, EVEN_K)
        else:
            CPV: tl.constexpr = 8 // BITS  # codes a shifted copy holds in the window [15, 23)
            for v in tl.static_range(PW // CPV):
                src = lshift(w, 15 - BITS * CPV * v)
                for i in tl.static_range(CPV):
                    P = 15 + BITS * i
                    d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3 = _rows(
                        win(src, ones, BITS, P, 0), rows * PW + CPV * v + i, K, M, x_ptr, stride_xm,
                        d0, c0, s0, d1, c1, s1, d2, c2, s2, d3, c3, s3, 1 << (23 - P), True, BM, EVEN_K)
        a0 = _finish(a0, d0, c0, s0, z, s)
        if BM > 1:
            a1 = _finish(a1, d1, c1, s1, z, s)
        if BM > 2:
            a2 = _finish(a2, d2, c2, s2, z, s)
            a3 = _finish(a3, d3, c3, s3, z, s)
    a0 += tl.sum(xd, axis=0) * 0.0  # keeps the x touches alive (finite x: adds 0)
    _row_out(a0, 0, out_ptr, ws_ptr, pid_k, M, N, cols, stride_om, USE_WS)
    if BM > 1:
        _row_out(a1, 1, out_ptr, ws_ptr, pid_k, M, N, cols, stride_om, USE_WS)
    if BM > 2:
        _row_out(a2, 2, out_ptr, ws_ptr, pid_k, M, N, cols, stride_om, USE_WS)
        _row_out(a3, 3, out_ptr, ws_ptr, pid_k, M, N, cols, stride_om, USE_WS)
    if USE_WS:
        splitk_reduce(out_ptr, ws_ptr, lock_ptr, pid_n, n_split, M, N, tl.arange(0, BM), cols, stride_om, BM, BN)
