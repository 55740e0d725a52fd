"""Fused dequantize + GEMM on the tensor cores (``tl.dot``, fp32 accumulation), and a dequantize kernel.

The GEMM builds each weight tile in registers from the packed words, scales it (to the reference's
fp16/bf16 weight, bit for bit) and feeds it to ``tl.dot``. Two K loops: ``_packed_loop`` loads each
word once and puts the weight tile first (swapped operands, for M = 1..16 and up); ``_gather_loop``
reads row ``k``'s word row ``k // per_word`` (the repeats hit L1). For large M, dequantize-then-cuBLAS
(``dequant_kernel`` + ``torch.mm``, whole or in L2-sized column chunks) can be faster: the dispatcher
measures all of them.

Taken from: the load-once unpack along a new register axis and the swapped operands for small M
follow triton_kernels' mixed-precision matmul (weights upcast in registers as the MMA's A operand) and
Marlin's small-batch layout; the magic-number int -> float (``2**23 + q`` by one OR) is the trick of
Marlin/FasterTransformer's ``lop3`` dequantization in fp32 form; gemlite's GEMM takes the gather loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl_common import group_zero, grouped_tile, lshift, tile_store, win


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
def _gather_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm, k_start, k_end,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr, BK: tl.constexpr,
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
            z = group_zero(z_ptr, gi, N, ZW, rn, nmask, BITS, ZMODE, False)[None, :]
        else:  # per element (row k's group; clamped inside K, masked columns)
            gk = (tl.minimum(kk, K - 1) // GROUP)[:, None]
            s = tl.load(s_ptr + gk * N + rn[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
            z = group_zero(z_ptr, gk, N, ZW, rn[None, :], nmask[None, :], BITS, ZMODE, False)
        b = ((qf - z) * s).to(x_ptr.dtype.element_ty)  # [BK, BN]: the reference's weight, to the bit
        acc = _dot(acc, a, b, DOT_F32)
    return acc


@triton.jit
def _packed_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm, k_start, k_end,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr, BK: tl.constexpr,
                 DOT_F32: tl.constexpr, F16W: tl.constexpr = False):
    """Swapped operands: ``acc[BN, BM] += W^T[BN, BK] @ x^T[BK, BM]`` (out transposed).

    Each packed word is loaded once, as a ``[BN, BK // per_word]`` block with N contiguous (16-byte
    vectors), and unpacked in registers along a new last axis, so the weight tile is the dot's first
    operand (Hopper's wgmma takes that one from registers; a small M is the narrow second operand:
    the "swap AB" of small-batch kernels such as Marlin's and triton_kernels' matmul_ogs). 3 bits:
    both planes in one pass; the unpacked order is ``(pair row, j, half)``, and x is loaded in that
    same permuted K order (a dot's sum is order-free), so no register shuffle is needed.
    ``F16W``: the tile built in fp16 as in ``_kn_loop`` (``0x6400 | q``), to the bit the same weight.
    Needs ``BK <= GROUP`` (one scale and zero a column a tile).
    """
    t = tl.arange(0, BK)
    for k0 in range(k_start, k_end, BK):
        if BITS == 3:
            R: tl.constexpr = BK // 32
            r2 = k0 // 32 + tl.arange(0, R)
            m2 = nmask[:, None]
            le = tl.load(w_ptr + (2 * r2)[None, :] * N + rn[:, None], mask=m2 & (2 * r2 < n_lo)[None, :], other=0)
            lo = tl.load(w_ptr + (2 * r2 + 1)[None, :] * N + rn[:, None], mask=m2 & (2 * r2 + 1 < n_lo)[None, :],
                         other=0)
            hw = tl.load(w_ptr + (n_lo + r2)[None, :] * N + rn[:, None], mask=m2 & (r2 < (K + 31) // 32)[None, :],
                         other=0)
            j = tl.arange(0, 16)[None, None, :]
            qe = ((le[:, :, None] >> (2 * j)) & 3) | (((hw[:, :, None] >> j) & 1) << 2)  # k = 32 r + j
            qo = ((lo[:, :, None] >> (2 * j)) & 3) | (((hw[:, :, None] >> (j + 16)) & 1) << 2)  # k = 32 r + 16 + j
            q = tl.reshape(tl.join(qe, qo), [qe.shape[0], BK])  # t = 32 r + 2 j + h
            kk = k0 + (t // 32) * 32 + (t % 2) * 16 + (t % 32) // 2
        else:
            PW: tl.constexpr = 32 // BITS
            R: tl.constexpr = BK // PW
            rows = k0 // PW + tl.arange(0, R)
            w = tl.load(w_ptr + rows[None, :] * N + rn[:, None], mask=nmask[:, None] & (rows < (K + PW - 1) // PW)[None, :],
                        other=0)  # [BN, R]
            j = tl.arange(0, PW)[None, None, :]
            q = tl.reshape((w[:, :, None] >> (j * BITS)) & ((1 << BITS) - 1), [w.shape[0], BK])  # k = k0 + t
            kk = k0 + t
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=mmask[None, :] & (kk < K)[:, None], other=0.0)
        gi = k0 // GROUP
        z = group_zero(z_ptr, gi, N, ZW, rn, nmask, BITS, ZMODE, False)
        if F16W:
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float16)
            qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q
            wt = (qh - (z + 1024.0).to(tl.float16)[:, None]) * s[:, None]
        else:
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)
            # 2**23 + q exactly (magic-number int -> float, FIELD-NOTES), minus 2**23 + z: q - z exact, * s
            # rounds once: the reference's weight to the bit
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)[:, None]
            wt = (qf * s[:, None]).to(x_ptr.dtype.element_ty)
        acc = _dot(acc, wt, xt, DOT_F32)
    return acc


@triton.jit
def _kn_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm, k_start, k_end,
             BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr, BK: tl.constexpr,
             DOT_F32: tl.constexpr, F16W: tl.constexpr):
    """Large-M K loop: ``acc[BM, BN] += x[BM, BK] @ W[BK, BN]`` (not swapped: M is the wide side).

    2/4/8 bits: each word is loaded once, as a ``[BK // per_word, BN]`` block (N contiguous), and
    unpacked along a new middle axis, so that a reshape gives the tile in natural K order (x needs no
    permutation); 3 bits read the codes per row (``_codes_kn``). ``F16W`` (fp16 x, integer or
    symmetric zeros): the tile is built in fp16: ``0x6400 | q`` is the fp16 ``1024 + q`` (magic
    number, no conversion instruction), minus ``1024 + z`` is ``q - z`` exactly, times the fp16 scale
    rounds once: the reference's weight to the bit (its fp32 ``(q - z) * s`` is exact before the
    rounding too). Otherwise fp32 as the gather loop. Needs ``BK <= GROUP`` (one scale a column a tile).
    """
    rk = tl.arange(0, BK)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if BITS == 3:
            q = _codes_kn(w_ptr, kk, rn, kmask, nmask, N, n_lo, BITS)
        else:
            PW: tl.constexpr = 32 // BITS
            R: tl.constexpr = BK // PW
            rows = k0 // PW + tl.arange(0, R)
            w = tl.load(w_ptr + rows[:, None] * N + rn[None, :],
                        mask=(rows < (K + PW - 1) // PW)[:, None] & nmask[None, :], other=0)  # [R, BN]
            j = tl.arange(0, PW)
            q = tl.reshape((w[:, None, :] >> (j * BITS)[None, :, None]) & ((1 << BITS) - 1), [BK, w.shape[1]])  # k = k0 + t
        gi = k0 // GROUP
        z = group_zero(z_ptr, gi, N, ZW, rn, nmask, BITS, ZMODE, False)
        if F16W:
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float16)
            zh = (z + 1024.0).to(tl.float16)  # an integer below 2048: exact
            qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q
            b = (qh - zh[None, :]) * s[None, :]
        else:
            s = tl.load(s_ptr + gi * N + rn, mask=nmask, other=0.0).to(tl.float32)
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exactly float(q)
            b = ((qf - z[None, :]) * s[None, :]).to(x_ptr.dtype.element_ty)
        acc = _dot(acc, a, b, DOT_F32)
    return acc


@triton.jit
def gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                M, N, K, n_lo, ZW, stride_xm, stride_om, k_per_split, n_split,
                BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                USE_WS: tl.constexpr, DOT_F32: tl.constexpr, PACKED: tl.constexpr,
                KN: tl.constexpr = False, F16W: tl.constexpr = False):
    """``out = x @ W``; grid ``(cdiv(M, BM) * cdiv(N, BN), n_split)``, tiles in GROUP_M-row bands.

    ``PACKED`` picks the load-once, swapped-operand loop (``_packed_loop``) over the gather loop;
    ``KN`` the large-M loop (``_kn_loop``, words loaded once, not swapped); ``F16W``: either loop builds
    the tile in fp16.
    ``DOT_F32`` runs the dot on fp32 copies of its operands: for fp32 activations, and under the CPU
    interpreter for bf16 (its bf16 ``tl.dot`` returns garbage, FIELD-NOTES). The operands are bf16
    values either way (the weight tile is rounded to bf16 first), so the products are the same exact
    fp32 numbers the GPU's bf16 MMA forms; only the summation order differs.
    """
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    if PACKED:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        acc = _packed_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm,
                           k_start, k_end, BITS, GROUP, ZMODE, BK, DOT_F32, F16W)
        tile_store(tl.trans(acc), out_ptr, ws_ptr, lock_ptr, pid_m * num_n + pid_n, pid_k, n_split, M, N, rm, rn,
                   stride_om, BM, BN, USE_WS)
    elif KN:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc = _kn_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm,
                       k_start, k_end, BITS, GROUP, ZMODE, BK, DOT_F32, F16W)
        tile_store(acc, out_ptr, ws_ptr, lock_ptr, pid_m * num_n + pid_n, pid_k, n_split, M, N, rm, rn, stride_om,
                   BM, BN, USE_WS)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc = _gather_loop(acc, x_ptr, w_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, K, N, n_lo, ZW, stride_xm,
                           k_start, k_end, BITS, GROUP, ZMODE, BK, DOT_F32)
        tile_store(acc, out_ptr, ws_ptr, lock_ptr, pid_m * num_n + pid_n, pid_k, n_split, M, N, rm, rn, stride_om,
                   BM, BN, USE_WS)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, n_lo, ZW, ones, n0, n_cols, stride_o,
                   BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr,
                   BN: tl.constexpr, BKS: tl.constexpr):
    """``out[K, n_cols] = (q - z) * s`` for the columns ``n0 .. n0 + n_cols`` of W, in out's dtype
    (row stride ``stride_o``); grid ``(cdiv(n_cols, BN), cdiv(K, BKS))``, BKS | GROUP."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BKS
    oc = pid_n * BN + tl.arange(0, BN)  # output columns
    cols = n0 + oc
    cmask = (oc < n_cols) & (cols < N)
    gi = k0 // GROUP
    s = tl.load(s_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    z = group_zero(z_ptr, gi, N, ZW, cols, cmask, BITS, ZMODE, False)
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
                    tl.store(out_ptr + kk[:, None] * stride_o + oc[None, :], (f * s).to(o_ty),
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
                tl.store(out_ptr + kk[:, None] * stride_o + oc[None, :], (f * s).to(o_ty),
                         mask=(kk < K)[:, None] & cmask[None, :])
