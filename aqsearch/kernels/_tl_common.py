"""Triton helpers shared by the kernels: code -> float without conversions, and the split-K epilogue.

Code -> float: OR-ing a code that sits at bits ``[P, P + b)`` of a word into the exponent
``E = 150 - P + m`` of an fp32 gives the value ``2 ** (23 - P + m) + code * 2 ** m`` exactly (the code
lands in the mantissa), so one LOP3 replaces shift + mask + a quarter-rate int -> float conversion.
With ``P >= 15`` the offset ``2 ** (23 - P)`` is at most 256: a GEMV may then multiply x by the
offset value directly and subtract ``offset * sum(x)`` once a tile (fp32 keeps >= 16 bits of the
code's share), which saves the per-weight subtraction.

Zeros (``ZMODE``): 0 symmetric (the middle code), 1 fp16 ``(G, N)``, 2 integers packed along N into
int32 ``(G, zero_words(N, bits))`` (``packing.pack_zeros``; 3 bits as a 2-bit plane of ``ceil(N / 16)``
words then a 1-bit plane). A program reads its columns' zero words once a group: a ``[BN]`` gather
whose repeats (``per_word`` columns share a word) are L1 hits, then one shift and mask a column.

Split-K: every K-slice writes its fp32 partial tile to a workspace, then bumps a per-tile counter;
the last slice to arrive sums the partials in slice order (deterministic), writes the output and
resets the counter to 0 for the next launch. No memset, no second kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def win(src, ones, BITS: tl.constexpr, P: tl.constexpr, MUL: tl.constexpr):
    """fp32 ``2**(23-P+MUL) + code * 2**MUL`` exactly, for the code at bits ``[P, P+BITS)`` of uint32 ``src``.

    ``ones`` is a run-time 0xFFFF: with the mask in a register ptxas emits one LOP3 a weight instead
    of re-materialising a constant before each one. Needs ``P + BITS <= 23``.
    """
    return ((src & ((ones & ((1 << BITS) - 1)) << P)) | ((150 - P + MUL) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def group_zero(z_ptr, gi, N, ZW, cols, cmask, BITS: tl.constexpr, ZMODE: tl.constexpr, EVEN_N: tl.constexpr):
    """Group ``gi``'s zeros of the columns ``cols``, fp32 ``[BN]`` (ZMODE: see the module docstring).

    ``ZW`` is the int32 words a group row of packed zeros takes (``zero_words(N, BITS)``).
    """
    if ZMODE == 0:
        z = (cols * 0 + (1 << (BITS - 1))).to(tl.float32)
    elif ZMODE == 1:
        if EVEN_N:
            z = tl.load(z_ptr + gi * N + cols).to(tl.float32)
        else:
            z = tl.load(z_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        row = z_ptr + gi * ZW
        if BITS == 3:  # 2-bit plane (16 a word) then 1-bit plane (32 a word)
            lo = tl.load(row + cols // 16, mask=cmask, other=0)
            hi = tl.load(row + (N + 15) // 16 + cols // 32, mask=cmask, other=0)
            zi = ((lo >> ((cols % 16) * 2)) & 3) | (((hi >> (cols % 32)) & 1) << 2)
        else:
            PW: tl.constexpr = 32 // BITS
            wz = tl.load(row + cols // PW, mask=cmask, other=0)
            zi = (wz >> ((cols % PW) * BITS)) & ((1 << BITS) - 1)  # the mask drops the sign copies
        z = zi.to(tl.float32)
    return z


@triton.jit
def lshift(w, T: tl.constexpr):
    """Logical shift of uint32 ``w``: left by T if T > 0, right by -T if T < 0."""
    if T > 0:
        r = w << T
    elif T < 0:
        r = w >> (-T)
    else:
        r = w
    return r


@triton.jit
def splitk_reduce(out_ptr, ws_ptr, lock_ptr, tile, n_split, M, N, rm, cols, stride_om,
                  BM: tl.constexpr, BN: tl.constexpr):
    """Once this slice's partial is in the workspace: the last slice of ``tile`` to arrive sums all
    partials ``ws[slice, M, N]`` in slice order, writes ``out`` and re-arms the tile's counter.

    The slice loop is unrolled 16 deep (masked): 16 partial loads are in flight at once instead of
    one L2 round trip per slice at the kernel's tail.
    """
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(lock_ptr + tile, 1)  # acq_rel, gpu scope: one per program
    if arrived == n_split - 1:
        mask = (rm < M)[:, None] & (cols < N)[None, :]
        tot = tl.zeros([BM, BN], dtype=tl.float32)
        for s0 in range(0, n_split, 16):
            for j in tl.static_range(16):
                sl = s0 + j
                tot += tl.load(ws_ptr + (sl * M + rm[:, None]) * N + cols[None, :],
                               mask=mask & (rm[:, None] * 0 + sl < n_split), other=0.0, cache_modifier=".cv")
        tl.store(out_ptr + rm[:, None] * stride_om + cols[None, :], tot.to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch


@triton.jit
def tile_store(acc, out_ptr, ws_ptr, lock_ptr, tile, pid_k, n_split, M, N, rm, cols, stride_om,
               BM: tl.constexpr, BN: tl.constexpr, USE_WS: tl.constexpr):
    """Store ``acc[BM, BN]`` (rows ``rm``, columns ``cols``); with split-K through the workspace."""
    mask = (rm < M)[:, None] & (cols < N)[None, :]
    if USE_WS:
        tl.store(ws_ptr + (pid_k * M + rm[:, None]) * N + cols[None, :], acc, mask=mask, cache_modifier=".wt")
        splitk_reduce(out_ptr, ws_ptr, lock_ptr, tile, n_split, M, N, rm, cols, stride_om, BM, BN)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` with the tiles taken in bands of GROUP_M tile rows (L2 reuse of the
    weight columns across a band)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % gsize, (pid % width) // gsize
