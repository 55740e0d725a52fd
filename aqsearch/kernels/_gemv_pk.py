"""Fused dequantize + GEMV at M = 1 in f16x2 arithmetic on int32 registers (inline PTX), split-K (Triton).

The half2 GEMV (``_gemv_h2``) gets one LOP3 and two HFMA2 per two weights, but Triton re-packs its
``tl.join`` pairs with PRMTs (0.6-1.0 a weight). Here every value the inner loop touches is an int32
register holding an fp16 pair, and each word of codes goes through one ``tl.inline_asm_elementwise``
block that the compiler cannot re-pack:

- extraction (FasterTransformer's ``lop3`` + magic number; Marlin ``dequant.h``): code ``j`` of a word
  and code ``j + per_word / 2`` sit 16 bits apart, so ``lop3(w, (2**b - 1) * 0x00010001 << P, 0x64006400)``
  is the fp16 pair ``(1024 + q_j * 2**P, 1024 + q_j' * 2**P)`` exactly: one LOP3 for two weights.
  Positions with ``P + b <= 10`` are read in place, the rest after one shift by 8 of the word. 8 bits:
  one ``prmt`` with 0x64 bytes makes the pair (Marlin's 8-bit path), no shift.
- ``d = h * 2**-(P + S) + c_P`` is one ``fma.rn.f16x2`` and exact: ``(q - z) * 2**-S``. The constant
  ``c_P = -(2**(10 - P) + z) * 2**-S`` is built from the integer zero with one IMAD a column and group
  (its fp16 bits are ``sign | exponent | z << P``), so no per-weight zero work and no rounding of z.
- ``acc += d * x2`` is one ``fma.rn.f16x2``; ``x2`` is the matching pair ``(x_k, x_k')``, one ``prmt``
  from two x words, per row (shared by the columns a thread owns).
- 3 bits (a 2-bit plane + a 1-bit plane): the 16 high bits of a low word are spread once (prmt, two
  shift+lop3 steps) so that one LOP3 per half merges them with the low bits into two 4-bit-like words
  (even codes, odd codes; 3 bits in each nibble), then as 4 bits.

Accumulation: four f16x2 accumulators a column (pairs ``j % 4``), summed in fp16 and flushed into fp32
once a tile (one tile lies in one group): ``a += s * 2**S * (lane0 + lane1)``. The ``2**-S`` folded into
``d`` (exact: a power of two, ``|q - z| >= 1`` stays normal) keeps every fp16 partial sum of a tile
finite for any finite fp16 x: ``S = ceil(log2(BKS / 2 * (2**b - 1)))``. A lane's flushed sum has at most
``BKS / 8 + 2`` fp16 roundings in a chain (``BKS / 2`` products over four accumulators).

Inline asm is not supported by the interpreter: ``ASM=False`` runs a pure-Triton twin of each block
(same int32 inputs and outputs, the fp16 pair arithmetic spelt out with fp64 and one rounding, as
``fma.rn`` rounds once); the interpreter tests hold the twin to the reference, and
``benchmarks/sass_count.py`` compiles the asm path for sm_90.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pk_words import _cp, _cps, _flush, _l2_prefetch, _word3, _word_row, _xwords, _zero_int
from ._tl_common import splitk_reduce


def shift_for(bits: int, bks: int) -> int:
    """``S``: ``2**S >= (BKS / 2) * (2**bits - 1)`` (no fp16 partial sum of a tile can overflow)."""
    need, s = (bks // 2) * ((1 << bits) - 1), 0
    while (1 << s) < need:
        s += 1
    return s


def pow2_pair(e: int) -> int:
    """fp16x2 bits of ``(2**e, 2**e)``, ``-24 <= e <= 15`` (subnormal below -14)."""
    h = (e + 15) << 10 if e >= -14 else 1 << (e + 24)
    return h * 0x10001


def cbase(p: int, s: int) -> int:
    """fp16x2 bits of ``-(2**(10 - p)) * 2**-s`` in both halves: ``c_P`` with a zero of 0."""
    return (0x8000 | ((25 - p - s) << 10)) * 0x10001


def _asm_fma(d, t, f, c):
    return f"fma.rn.f16x2 {d}, {t}, {f}, {c};\n"


def asm_w24(bits: int, s: int) -> tuple[str, list[int]]:
    """PTX for one word of 2- or 4-bit codes. Operands: $0..$3 accumulators out; $4 the word;
    x words (x[2i], x[2i+1]) next; then one c_P per distinct P; then the four accumulators in.
    Returns the text and the list of distinct P (the c_P operands, in order)."""
    pw = 32 // bits
    npairs = pw // 2
    nx = pw // 2  # x words: pw halves of x
    ps = []
    plan = []  # (source, P) per pair j
    for j in range(npairs):
        if bits * j + bits <= 10:
            plan.append(("w", bits * j))
        else:
            plan.append(("v", bits * j - 8))
        if plan[-1][1] not in ps:
            ps.append(plan[-1][1])
    xo = 5
    co = xo + nx
    ao = co + len(ps)
    lines = ["{\n", ".reg .b32 v, m, xp, h, f;\n", "shr.b32 v, $4, 8;\n"]
    for j, (src, p) in enumerate(plan):
        a = j % 2  # pair j: x halves j and j + pw/2 = word j//2 (half j%2) and word j//2 + nx/2
        wa, wb = xo + j // 2, xo + j // 2 + nx // 2
        sel = "0x5410" if a == 0 else "0x7632"
        mask = ((1 << bits) - 1) * 0x10001 << p
        lines.append(f"prmt.b32 xp, ${wa}, ${wb}, {sel};\n")
        lines.append(f"lop3.b32 h, {'$4' if src == 'w' else 'v'}, 0x{mask:08x}, 0x64006400, 0xea;\n")
        lines.append(f"mov.b32 f, 0x{pow2_pair(-(p + s)):08x};\n")
        lines.append(_asm_fma("h", "h", "f", f"${co + ps.index(p)}"))
        acc = j % 4
        src_acc = f"${ao + acc}" if j < 4 else f"${acc}"
        lines.append(_asm_fma(f"${acc}", "h", "xp", src_acc))
    lines.append("}\n")
    return "".join(lines), ps


def asm_w8(s: int) -> str:
    """PTX for one word of 8-bit codes: $0..$1 accumulators out; $2 the word; $3, $4 x words
    (x0, x1), (x2, x3); $5 c_0; $6, $7 accumulators in."""
    f = pow2_pair(-s)
    return ("{\n.reg .b32 e, h, xp, f;\n"
            "mov.b32 e, 0x64646464;\n"
            f"mov.b32 f, 0x{f:08x};\n"
            "prmt.b32 h, $2, e, 0x4240;\n"       # bytes 0 and 2: codes k, k + 2
            "prmt.b32 xp, $3, $4, 0x5410;\n"     # (x0, x2)
            + _asm_fma("h", "h", "f", "$5")
            + _asm_fma("$0", "h", "xp", "$6")
            + "prmt.b32 h, $2, e, 0x4341;\n"     # bytes 1 and 3: codes k + 1, k + 3
            "prmt.b32 xp, $3, $4, 0x7632;\n"     # (x1, x3)
            + _asm_fma("h", "h", "f", "$5")
            + _asm_fma("$1", "h", "xp", "$7")
            + "}\n")


def asm_w3(half: int, s: int) -> str:
    """PTX for one low-plane word of 3-bit codes (16 codes, k = base + c at bits 2c) with its high
    bits (bits 16*half + c of the high-plane word). Operands: $0..$3 accumulators out; $4 the low
    word; $5 the high word; $6..$13 x words (x[2i], x[2i+1]); $14 c_0; $15 c_4; $16..$19 accumulators in."""
    sel = "0x4140" if half == 0 else "0x4342"
    lines = ["{\n", ".reg .b32 z, b, t, c1, c2, e, o, ev, ov, h, f, xp;\n",
             "mov.b32 z, 0;\n",
             f"prmt.b32 b, $5, z, {sel};\n",  # high bits c = 0..7 -> bits 0..7, c = 8..15 -> 16..23
             "shl.b32 t, b, 4;\n",
             "lop3.b32 b, b, t, 0x0F0F0F0F, 0xa8;\n",  # (b | t) & m: c -> 8 (c // 4) + c % 4
             "shl.b32 t, b, 2;\n",
             "lop3.b32 b, b, t, 0x33333333, 0xa8;\n",  # c -> 4 (c // 2) + c % 2
             "shl.b32 c2, b, 2;\n",  # even c at 4 (c // 2) + 2
             "shl.b32 c1, b, 1;\n",  # odd c at 4 (c // 2) + 2
             "lop3.b32 e, $4, 0x33333333, c2, 0xe2;\n",  # (a & m) | (c & ~m): even codes, a nibble each
             "shr.b32 o, $4, 2;\n",
             "lop3.b32 o, o, 0x33333333, c1, 0xe2;\n",  # odd codes, a nibble each
             "shr.b32 ev, e, 8;\n",
             "shr.b32 ov, o, 8;\n"]
    # (source, P, pair j): E nibble i = code 2i, O nibble i = code 2i + 1; pair j = (c, c + 8)
    plan = [("e", 0, 0), ("e", 4, 2), ("ev", 0, 4), ("ev", 4, 6), ("o", 0, 1), ("o", 4, 3), ("ov", 0, 5), ("ov", 4, 7)]
    seen = set()
    for src, p, j in plan:
        wa, wb = 6 + j // 2, 6 + j // 2 + 4
        sel_x = "0x5410" if j % 2 == 0 else "0x7632"
        mask = 7 * 0x10001 << p
        lines.append(f"prmt.b32 xp, ${wa}, ${wb}, {sel_x};\n")
        lines.append(f"lop3.b32 h, {src}, 0x{mask:08x}, 0x64006400, 0xea;\n")
        lines.append(f"mov.b32 f, 0x{pow2_pair(-(p + s)):08x};\n")
        lines.append(_asm_fma("h", "h", "f", "$14" if p == 0 else "$15"))
        acc = j % 4
        src_acc = f"${16 + acc}" if acc not in seen else f"${acc}"
        seen.add(acc)
        lines.append(_asm_fma(f"${acc}", "h", "xp", src_acc))
    lines.append("}\n")
    return "".join(lines)


@triton.jit
def _kg_fetch(w_ptr, s_ptr, z_ptr, k0, k_end, rk, cc, wm, N, K, ZW, BITS: tl.constexpr, GROUP: tl.constexpr,
              ZMODE: tl.constexpr, BKS: tl.constexpr, EVEN_N: tl.constexpr):
    """The step at ``k0`` of the kg loop: warp rk's tile ``k0 + rk * BKS`` (a tuple of its word rows), its group's
    scales (fp32) and integer zeros; a tile at or past ``k_end`` (the step after the last) loads nothing."""
    PW: tl.constexpr = 32 // BITS
    R: tl.constexpr = BKS // PW
    kt = k0 + rk * BKS  # [KW, 1]
    ok = kt < k_end
    m = ok if EVEN_N else ok & wm
    gi = kt // GROUP
    s = tl.load(s_ptr + gi * N + cc, mask=m, other=0.0).to(tl.float32)
    zi = _zero_int(z_ptr, gi, N, ZW, cc, m, BITS, ZMODE)
    rows = kt // PW
    wp = w_ptr + rows * N + cc
    last = (K + PW - 1) // PW  # word rows of K: a tile's rows past it (K not whole tiles) load zeros
    t = ()
    for r in tl.static_range(R):
        t = t + (tl.load(wp + r * N, mask=m & (rows + r < last), other=0),)
    return t, s, zi


@triton.jit
def _kg_loop(a, zero, x_ptr, w_ptr, s_ptr, z_ptr, rk, cc, wm, k_start, k_end, N, K, ZW, BITS: tl.constexpr,
             GROUP: tl.constexpr, ZMODE: tl.constexpr, BKS: tl.constexpr, KW: tl.constexpr, S: tl.constexpr,
             ASM: tl.constexpr, ASMTXT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """The K loop of ``KG`` (2/4/8 bits): a step is KW tiles, warp rk decodes the whole tile ``k0 + rk * BKS`` with
    its own group's scales and zeros, so each (column, group) is flushed once. The next step's words, scales and
    zeros are loaded into registers before this step is decoded (double-buffered by hand: Triton pipelines loads
    only through shared memory), so the memory stays busy while the warps decode."""
    PW: tl.constexpr = 32 // BITS
    R: tl.constexpr = BKS // PW
    STEP: tl.constexpr = KW * BKS
    nw, ns, nz = _kg_fetch(w_ptr, s_ptr, z_ptr, k_start, k_end, rk, cc, wm, N, K, ZW, BITS, GROUP, ZMODE, BKS, EVEN_N)
    for k0 in range(k_start, k_end, STEP):
        cw, s, zi = nw, ns, nz
        nw, ns, nz = _kg_fetch(w_ptr, s_ptr, z_ptr, k0 + STEP, k_end, rk, cc, wm, N, K, ZW, BITS, GROUP, ZMODE, BKS,
                               EVEN_N)
        cs = _cps(zi, BITS, S)
        a0, a1, a2, a3 = zero, zero, zero, zero
        kx = k0 + rk * BKS  # this warp's tile
        xk = x_ptr.to(tl.pointer_type(tl.int64)) + kx // 4
        for r in tl.static_range(R):
            xw = _xwords(x_ptr, xk, kx, PW * r, K, PW // 2, EVEN_K)
            a0, a1, a2, a3 = _word_row(cw[r], xw, cs, r, a0, a1, a2, a3, BITS, S, ASM, ASMTXT)
        a += _flush(a0, a1, a2, a3, ASM) * s
    return a


@triton.jit
def gemv_pk_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                   N, K, n_lo, ZW, stride_om, k_per_split, n_split,
                   BITS: tl.constexpr, GROUP: tl.constexpr, ZMODE: tl.constexpr,
                   BN: tl.constexpr, BKS: tl.constexpr, USE_WS: tl.constexpr,
                   EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr,
                   ASM0: tl.constexpr, ASM1: tl.constexpr, PDL: tl.constexpr = False, STAGES: tl.constexpr = 1,
                   KW: tl.constexpr = 1, PF: tl.constexpr = 1, LATE: tl.constexpr = False,
                   KG: tl.constexpr = False):
    """``out[1, N] = x[1, K] @ W[K, N]`` (fp16 x, integer or symmetric zeros); grid ``(cdiv(N, BN), n_split)``.

    Same tiling as ``_gemv.gemv_kernel`` (BN columns, K-slices of whole BKS tiles, BKS | GROUP, BKS a
    multiple of 32). ``S = shift_for(BITS, BKS)``; ``ASM0``/``ASM1``: the PTX text (``asm_w24``,
    ``asm_w8``, ``asm_w3`` for the two halves), used when ``ASM``.

    ``PDL`` (launched with ``launch_pdl=True``, GPU only): programmatic dependent launch. The program
    asks L2 for the words of its first ``PF`` tiles (``prefetch.global.L2``, no registers held: they do not
    depend on the kernel before, so they stream in while that one finishes), then waits for the previous
    grid before it reads x or touches the split-K workspace and counters (which the previous kernel may
    still be reducing). It lets the next kernel launch at its start, or with ``LATE`` once its K loop is
    done (the next grid's prefetch then lands during this one's split-K epilogue, not under its stream).
    Measured on the H100 (issue 21, ``benchmarks/gemv_overhead.py``): chained to itself, ``LATE`` takes 0.3-0.5 us
    off the ~4 us a launch that the bytes do not explain, the start trigger adds ~3 us; in the 8B decode the
    tuner's PDL picks cost 2.7 %, so ``dispatch.candidates`` offers none (a config may still ask for it).

    ``KW`` > 1 (``num_warps = KW``; at 3 bits the 32-code steps): the tile's word rows are dealt round-robin
    to KW warps, each with its own accumulators ``[KW, BN]``, summed across warps once at the end. The same
    grid then keeps KW times the warps an SM busy: Nsight Compute on the H100 (issue 21) found the one-warp
    programs issue-bound on dependency stalls (5 cycles a warp between issues, ~2 warps a scheduler).

    ``KG`` (with ``KW`` > 1, 2/4/8 bits): the warps take whole tiles instead (``_kg_loop``): a step of the K loop
    is KW tiles, warp ``rk`` decodes tile ``k0 + rk * BKS`` with its own group's scales and zeros. Each (column,
    group) is then summed by one warp, so a tile's fp16 partials are flushed once, not KW times; the K-slice must
    be a multiple of ``KW * BKS`` (the launcher's split does that) and ``EVEN_K`` means K is one too (otherwise the
    tiles past K are masked: zero words against zero x). This lets a program own its columns for the whole K with
    many warps: no split-K epilogue (``benchmarks/ceiling.py``: 1.6-3.6 us of it at issue 21's shapes).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    # warp rk takes word rows (3 bits: 32-code steps) rk, rk + KW, ... of a tile; one warp: rk 0, 1-D tensors
    if KW == 1:
        zero = tl.zeros([BN], dtype=tl.int32)  # one accumulator's start: a column, or a warp's row of columns
        rk = 0
        cc = cols
        wm = cmask
    else:
        zero = tl.zeros([KW, BN], dtype=tl.int32)
        rk = tl.arange(0, KW)[:, None]
        cc = cols[None, :]
        wm = cmask[None, :]
    a = zero.to(tl.float32)
    if PDL:
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()
        if PF > 0:  # the first PF tiles' word rows, one prefetch a 128-byte line (clamped inside the matrix)
            lc = tl.minimum(pid_n * BN + tl.arange(0, BN // 32) * 32, N - 1)[None, :]
            if BITS == 3:
                rl = tl.minimum(k_start // 16 + tl.arange(0, PF * BKS // 16), n_lo - 1)[:, None]
                _l2_prefetch(w_ptr + rl * N + lc, ASM)
                rh = n_lo + tl.minimum(k_start // 32 + tl.arange(0, PF * BKS // 32), (K + 31) // 32 - 1)[:, None]
                _l2_prefetch(w_ptr + rh * N + lc, ASM)
            else:
                rw = tl.minimum(k_start // (32 // BITS) + tl.arange(0, PF * BKS // (32 // BITS)),
                                (K * BITS + 31) // 32 - 1)[:, None]
                _l2_prefetch(w_ptr + rw * N + lc, ASM)
        tl.extra.cuda.gdc_wait()
    if KG:
        a = _kg_loop(a, zero, x_ptr, w_ptr, s_ptr, z_ptr, rk, cc, wm, k_start, k_end, N, K, ZW, BITS, GROUP, ZMODE,
                     BKS, KW, S, ASM, ASM0, EVEN_K, EVEN_N)
    else:  # one tile a step; with KW > 1 its word rows (3 bits: 32-code steps) dealt round-robin to the warps
        for k0 in tl.range(k_start, k_end, BKS, num_stages=STAGES):
            gi = k0 // GROUP
            if EVEN_N:
                s = tl.load(s_ptr + gi * N + cols).to(tl.float32)
            else:
                s = tl.load(s_ptr + gi * N + cols, mask=cmask, other=0.0).to(tl.float32)
            zi = _zero_int(z_ptr, gi, N, ZW, cols, cmask, BITS, ZMODE)
            a0, a1, a2, a3 = zero, zero, zero, zero
            xq = x_ptr.to(tl.pointer_type(tl.int64)) + k0 // 4  # the tile's x, 8 bytes a load
            if BITS == 3:
                c0 = _cp(zi, 0, S)
                c4 = _cp(zi, 4, S)
                # 32 codes a step: two low-plane rows and one high-plane row, advanced KW steps at a time
                wl = w_ptr + (k0 // 16 + 2 * rk) * N + cc  # low-plane rows
                wh = w_ptr + (n_lo + k0 // 32 + rk) * N + cc  # high-plane rows
                xk = xq + rk * 8  # this warp's x: 32 halves (8 eight-byte loads) a step further on
                kx = k0 + rk * 32
                rr = k0 // 32 + rk + cc * 0
                for r2 in tl.static_range(BKS // 32 // KW):
                    if MASKED:
                        le = tl.load(wl, mask=(2 * rr < n_lo) & wm, other=0)
                        lo = tl.load(wl + N, mask=(2 * rr + 1 < n_lo) & wm, other=0)
                        hw = tl.load(wh, mask=(rr < (K + 31) // 32) & wm, other=0)
                    else:
                        le = tl.load(wl)
                        lo = tl.load(wl + N)
                        hw = tl.load(wh)
                    wl += 2 * KW * N
                    wh += KW * N
                    rr += KW
                    xe = _xwords(x_ptr, xk, kx, 32 * KW * r2, K, 8, EVEN_K)
                    a0, a1, a2, a3 = _word3(le, hw, xe, c0, c4, a0, a1, a2, a3, 0, S, ASM, ASM0)
                    xo = _xwords(x_ptr, xk, kx, 32 * KW * r2 + 16, K, 8, EVEN_K)
                    a0, a1, a2, a3 = _word3(lo, hw, xo, c0, c4, a0, a1, a2, a3, 1, S, ASM, ASM1)
            else:
                PW: tl.constexpr = 32 // BITS
                R: tl.constexpr = BKS // PW
                cs = _cps(zi, BITS, S)
                wp = w_ptr + (k0 // PW + rk) * N + cc  # advanced KW word rows at a time
                xk = xq + rk * (PW // 4)  # this warp's x words start PW * rk further on
                kx = k0 + rk * PW
                wrow = k0 // PW + rk + cc * 0
                for r in tl.static_range(R // KW):
                    if MASKED:
                        w = tl.load(wp, mask=(wrow + KW * r < (K + PW - 1) // PW) & wm, other=0)
                    else:
                        w = tl.load(wp)
                    wp += KW * N
                    xw = _xwords(x_ptr, xk, kx, PW * KW * r, K, PW // 2, EVEN_K)
                    a0, a1, a2, a3 = _word_row(w, xw, cs, r, a0, a1, a2, a3, BITS, S, ASM, ASM0)
            a += _flush(a0, a1, a2, a3, ASM) * s
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if KW > 1:
        a = tl.sum(a, 0)  # the warps' partial sums (fp32)
    a = a * (1 << S)  # the 2**-S folded into every d (exact)
    if USE_WS:
        tl.store(ws_ptr + pid_k * N + cols, a, mask=cmask, cache_modifier=".wt")
        splitk_reduce(out_ptr, ws_ptr, lock_ptr, pid_n, n_split, 1, N, tl.arange(0, 1), cols, stride_om, 1, BN)
    else:
        tl.store(out_ptr + cols, a.to(out_ptr.dtype.element_ty), mask=cmask)
