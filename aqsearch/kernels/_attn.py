"""Attention for one new token against a static KV cache, GQA included, in one launch (Triton).

transformers' SDPA path on CUDA with a mask and grouped KV heads first expands the whole static cache to
the query heads (``repeat_kv``: two copies of ``[B, Hq, max_len, D]`` a layer, ~3 us each on an H100 at an
8B shape), then runs a flash kernel built for long queries (~6.7 us for one). Here one program per
(batch row, query head, block of ``BL`` cache rows) reads its KV head's rows directly (the head
``h // groups``: no copy) and leaves its block's softmax partial (max, sum, weighted values, fp32) in a
workspace; the last program of a (row, head) to arrive merges them (flash-decoding's split over the cache,
in the one launch) into the ``[B, 1, Hq, D]`` output that transformers' attention functions return. A
loop over the blocks in one program per head ran 8-9 us a layer on an H100 (32 programs, each waiting on
its loads in turn; ``benchmarks/results/decode_attn.jsonl``). The mask is transformers' own (bool
"attend", or additive float), read in place.

:func:`decode_attention` returns ``None`` where it does not apply (more than one query, CPU tensors
outside the interpreter, another mask layout); the caller then runs the function it wraps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._fused import _launching, triton_ok
from .launch import _workspace


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, lock_ptr, L, NS, scale,
                        sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h,
                        GROUPS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                        MASK: tl.constexpr):
    """Program (b, h, j): cache rows ``j * BL ..`` of KV head ``h // GROUPS`` against query head h: this block's
    max, sum of exponentials and weighted values go to the workspace; the last block of (b, h) to arrive
    merges the NS partials (the flash-decoding split, in one launch) into ``o[b, 0, h]``.
    MASK: 0 none, 1 bool (True attends), 2 additive."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    kh = h // GROUPS
    d = tl.arange(0, BD)
    dm = d < D
    pos = j * BL + tl.arange(0, BL)
    lm = pos < L
    km = lm[:, None] & dm[None, :]
    k = tl.load(k_ptr + b * sk_b + kh * sk_h + pos[:, None] * sk_l + d[None, :], mask=km, other=0.0)
    v = tl.load(v_ptr + b * sv_b + kh * sv_h + pos[:, None] * sv_l + d[None, :], mask=km, other=0.0)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=dm, other=0.0).to(tl.float32) * scale
    s = tl.sum(k.to(tl.float32) * q[None, :], 1)
    if MASK == 1:
        s = tl.where(tl.load(m_ptr + b * sm_b + pos * sm_l, mask=lm, other=0) != 0, s, float("-inf"))
    elif MASK == 2:
        s += tl.load(m_ptr + b * sm_b + pos * sm_l, mask=lm, other=0.0).to(tl.float32)
    s = tl.where(lm, s, float("-inf"))
    m_j = tl.max(s, 0)
    p = tl.exp(s - tl.where(m_j == float("-inf"), 0.0, m_j))  # a block with nothing to attend: all zeros
    bh = b * tl.num_programs(1) + h  # this (row, head)'s counter; its partials start at bh * NS
    row = bh * NS
    part = ws_ptr + (row + j) * (BD + 2)
    tl.store(part + d, tl.sum(p[:, None] * v.to(tl.float32), 0), cache_modifier=".wt")
    tl.store(part + BD, m_j, cache_modifier=".wt")
    tl.store(part + BD + 1, tl.sum(p, 0), cache_modifier=".wt")
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(lock_ptr + bh, 1)  # acq_rel, gpu scope
    if arrived == NS - 1:
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BD], tl.float32)
        for i in range(0, NS):
            pi = ws_ptr + (row + i) * (BD + 2)
            mi = tl.load(pi + BD + tl.arange(0, 1), cache_modifier=".cv")
            m_new = tl.maximum(m_i, mi)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_old = tl.exp(m_i - m_use)
            a_new = tl.exp(mi - m_use)
            acc = acc * a_old + tl.load(pi + d, cache_modifier=".cv") * a_new
            l_i = l_i * a_old + tl.load(pi + BD + 1 + tl.arange(0, 1), cache_modifier=".cv") * a_new
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=dm)
        tl.atomic_xchg(lock_ptr + bh, 0)  # ready for the next launch


def _mask_2d(mask: torch.Tensor | None, b: int, length: int):
    """``(kind, tensor [B or 1, L] view, batch stride)`` of a ``[B, 1, 1, L]`` mask, or None for another layout."""
    if mask is None:
        return 0, None, 0
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != length \
            or mask.shape[0] not in (1, b):
        return None
    m2 = mask[:, 0, 0, :]
    if mask.dtype == torch.bool:
        m2 = m2.view(torch.uint8)  # Triton reads bytes; nonzero attends
        kind = 1
    elif mask.dtype.is_floating_point:
        kind = 2
    else:
        return None
    return kind, m2, (m2.stride(0) if m2.shape[0] == b and b > 1 else 0)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, block: int | None = None, warps: int = 4) -> torch.Tensor | None:
    """``[B, Hq, 1, D]`` queries against ``[B, Hk, L, D]`` keys and values (Hq a multiple of Hk) ->
    ``[B, 1, Hq, D]`` (contiguous), or None where this path does not apply. ``block`` (cache rows a step)
    and ``warps``: the launch shape (``benchmarks/decode_attn.py`` times the choices)."""
    if query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or key.shape != value.shape:
        return None
    bsz, hq, _, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    unit = query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    if hq % hk or key.shape[0] != bsz or key.shape[3] != d or not unit \
            or not (query.dtype == key.dtype == value.dtype) or not triton_ok(query, key, value):
        return None
    mk = _mask_2d(mask, bsz, length)
    if mk is None:
        return None
    kind, m2, smb = mk
    out = torch.empty(bsz, 1, hq, d, dtype=query.dtype, device=query.device)
    bd = triton.next_power_of_2(d)
    bl = block or (64 if bd <= 128 else 32)
    ns = triton.cdiv(length, bl)
    ws, locks = _workspace(query.device, bsz * hq * ns * (bd + 2), bsz * hq, pool="decode_attention")
    with _launching("decode_attention"):
        _decode_attn_kernel[(bsz, hq, ns)](
            query, key, value, query if m2 is None else m2, out, ws, locks, length, ns, float(scaling),
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), smb, 0 if m2 is None else m2.stride(1),
            out.stride(0), out.stride(2), GROUPS=hq // hk, D=d, BD=bd, BL=bl, MASK=kind, num_warps=warps)
    return out


def attention_torch(query, key, value, mask, scaling):
    """The reference: transformers' SDPA route for one query (KV heads repeated, then SDPA), ``[B, 1, Hq, D]``."""
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return o.transpose(1, 2).contiguous()
