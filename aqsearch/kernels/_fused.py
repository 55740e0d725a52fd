"""Fused elementwise kernels for the decode step (Triton), each with the pure-torch code it replaces as twin.

A Llama decode step at batch 1 is hundreds of tiny kernels besides the matmuls: HF's ``LlamaRMSNorm`` is
~7 (cast, pow, mean, add, rsqrt, mul, cast, mul), ``apply_rotary_pos_emb`` ~12 for q and k (two slices,
neg, cat, four muls, two adds, per tensor), the MLP's ``silu(gate) * up`` 2. Here each is one launch:

- :func:`rmsnorm`: one program a row; fp32 statistics, the normalized row rounded to the input dtype
  before the weight multiply, as HF does (``weight * x.to(input_dtype)``).
- :func:`rotary_qk`: q and k rotated in place in one launch (one program per (batch, position, head) of
  q and then of k), ``x * cos + rotate_half(x) * sin`` in fp32, rounded once.
- :func:`silu_mul`: ``silu(g)`` rounded to the dtype (as ``F.silu`` on fp16 does), times ``u``.
- :func:`kv_write`: the static KV cache's write of k and v at its device-held length, and the length's
  advance (transformers' ``StaticLayer.update``: 5 launches).

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests); anywhere else the
torch twin runs. ``LAUNCHES`` counts the Triton launches by kernel name (the decode-step launch count
test adds them to the aten ops it counts).
"""

from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

LAUNCHES: collections.Counter = collections.Counter()
IN_LAUNCH = [0]  # > 0 while a fused kernel launches (the interpreter's own tensor copies are not the step's)


class _launching:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        IN_LAUNCH[0] += 1

    def __exit__(self, *exc):
        IN_LAUNCH[0] -= 1
        LAUNCHES[self.name] += 1


def triton_ok(*ts: torch.Tensor) -> bool:
    """Triton can take these tensors: on CUDA, or on the CPU under the interpreter."""
    if all(t.is_cuda for t in ts):
        return True
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not any(t.is_cuda for t in ts)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, o_ptr, D, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / D
    y = (x * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)  # HF: rounded to the input dtype
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(o_ptr + row * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm.forward``, verbatim."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` in one launch (rows of the last dimension; unit stride along it)."""
    if not triton_ok(x, weight) or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return rmsnorm_torch(x, weight, eps)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    with _launching("rmsnorm"):
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, out, d, x2.stride(0), out.stride(0), float(eps),
                                        BLOCK=triton.next_power_of_2(d), num_warps=4 if d >= 2048 else 1)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, c_ptr, s_ptr, HQ, HK, S,
                   sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sc_b, sc_s, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (b, s, head) of q (heads 0..HQ-1) then of k (HQ..HQ+HK-1); in place."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s = pid // (HQ + HK)
    h = pid % (HQ + HK)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    c1 = tl.load(c_ptr + b * sc_b + s * sc_s + offs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + b * sc_b + s * sc_s + HALF + offs, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + b * sc_b + s * sc_s + offs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + b * sc_b + s * sc_s + HALF + offs, mask=m, other=0.0).to(tl.float32)
    if h < HQ:
        p = q_ptr + b * sq_b + h * sq_h + s * sq_s
    else:
        p = k_ptr + b * sk_b + (h - HQ) * sk_h + s * sk_s
    x1 = tl.load(p + offs, mask=m, other=0.0)
    x2 = tl.load(p + HALF + offs, mask=m, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    tl.store(p + offs, (f1 * c1 - f2 * s1).to(x1.dtype), mask=m)
    tl.store(p + HALF + offs, (f2 * c2 + f1 * s2).to(x1.dtype), mask=m)


def rotary_torch(q, k, cos, sin, unsqueeze_dim=1):
    """HF ``apply_rotary_pos_emb``, verbatim."""
    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rot(q) * sin), (k * cos) + (rot(k) * sin)


def rotary_qk(q, k, cos, sin, unsqueeze_dim=1):
    """``apply_rotary_pos_emb`` for q ``[B, Hq, S, D]`` and k ``[B, Hk, S, D]`` (any strides, unit along D),
    cos/sin ``[B, S, D]``: one launch, q and k rotated in place and returned."""
    ok = (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and q.stride(-1) == 1
          and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride() and q.dtype == k.dtype
          and q.shape[-1] % 2 == 0 and triton_ok(q, k, cos, sin) and not (q.requires_grad or k.requires_grad))
    if not ok:
        return rotary_torch(q, k, cos, sin, unsqueeze_dim)
    bsz, hq, s, d = q.shape
    hk = k.shape[1]
    cb = cos.stride(0) if cos.shape[0] == bsz else 0  # cos/sin may be shared across the batch
    with _launching("rotary"):
        _rotary_kernel[(s * (hq + hk), bsz)](
            q, k, cos, sin, hq, hk, s, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            cb, cos.stride(1), HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), num_warps=1)
    return q, k


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n, sg, su, so, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, columns of block ``program_id(1)``: ``o = silu(g) * u`` (row strides sg, su, so)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + row * sg + offs, mask=m, other=0.0)
    u = tl.load(u_ptr + row * su + offs, mask=m, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu on fp16: fp32 inside, one rounding
    tl.store(o_ptr + row * so + offs, (a.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.silu(g) * u`` in one launch (same shape and dtype, unit stride along the last dimension; the rows
    may be strided, e.g. the two halves of one fused gate/up output)."""
    ok = triton_ok(g, u) and g.shape == u.shape and g.dtype == u.dtype and g.stride(-1) == 1 and u.stride(-1) == 1
    if ok:
        n = g.shape[-1]
        g2, u2 = g.reshape(-1, n), u.reshape(-1, n)  # views where the leading dimensions merge
        ok = g2.stride(-1) == 1 and u2.stride(-1) == 1
    if not ok:
        return torch.nn.functional.silu(g) * u
    out = torch.empty(g2.shape, dtype=g.dtype, device=g.device)
    blk = 1024
    with _launching("silu_mul"):
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, blk))](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                                                           BLOCK=blk, num_warps=4)
    return out.view(g.shape)


@triton.jit
def _kv_write_kernel(kc_ptr, vc_ptr, k_ptr, v_ptr, len_ptr, H, L, R, DK, DV, MAX_LEN,
                     sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, ck_b, ck_h, ck_l, cv_b, cv_h, cv_l,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: rows ``(b, h, l)`` of k and v (R = B*H*L) to cache position ``len + l``, then ``len += L``.

    One CTA because the position is read and advanced in the same launch: programs of a grid could see the
    advanced value, and the warps of this one are held at a barrier until all of them have read it."""
    pos = tl.load(len_ptr)
    d = tl.arange(0, BLOCK_D)[None, :]
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        l = r % L
        bh = (r // L).to(tl.int64)
        b, h = bh // H, bh % H
        t = pos + l
        row = ((r < R) & (t < MAX_LEN))[:, None]  # past the cache's end nothing is written (no raise in a graph)
        mk, mv = row & (d < DK), row & (d < DV)
        k = tl.load(k_ptr + (b * sk_b + h * sk_h + l * sk_l)[:, None] + d, mask=mk)
        v = tl.load(v_ptr + (b * sv_b + h * sv_h + l * sv_l)[:, None] + d, mask=mv)
        tl.store(kc_ptr + (b * ck_b + h * ck_h + t * ck_l)[:, None] + d, k, mask=mk)
        tl.store(vc_ptr + (b * cv_b + h * cv_h + t * cv_l)[:, None] + d, v, mask=mv)
    tl.debug_barrier()  # every warp has read pos before it is advanced
    tl.store(len_ptr, pos + L)


def kv_write_torch(keys, values, k, v, length):
    """transformers' ``StaticLayer.update`` write: k, v at ``length .. length + L - 1`` of dim 2, ``length += L``."""
    pos = torch.arange(k.shape[-2], device=keys.device) + length
    length.add_(k.shape[-2])
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)


def _kv_write_ok(keys, values, k, v, length) -> bool:
    """What the kernel takes; anything else goes to the twin, where ``index_copy_`` raises as transformers' would."""
    return (k.dim() == 4 and v.shape[:3] == k.shape[:3] and keys.shape[:2] == k.shape[:2]
            and values.shape[:2] == v.shape[:2] and keys.shape[2] == values.shape[2]
            and keys.shape[3] == k.shape[3] and values.shape[3] == v.shape[3]
            and k.dtype == keys.dtype and v.dtype == values.dtype  # index_copy_ refuses a mismatch too
            and all(t.stride(-1) == 1 for t in (keys, values, k, v))
            and length.numel() == 1 and length.dtype in (torch.int32, torch.int64)
            and not (k.requires_grad or v.requires_grad) and triton_ok(keys, values, k, v, length))


def kv_write(keys, values, k, v, length) -> None:
    """The static KV cache's write in one launch instead of five (arange, + length, ``length.add_``, two
    ``index_copy_``): k ``[B, H, L, Dk]`` and v ``[B, H, L, Dv]`` (any strides, unit along D) into
    ``keys``/``values`` ``[B, H, max_len, D]`` at the position held by the one-element int tensor
    ``length``, which is then advanced by L. The position is read on the device, so a CUDA graph that
    captures the step writes each replay where the last one stopped. Rows past ``max_len`` are dropped
    (``index_copy_`` would raise; a kernel cannot)."""
    if not _kv_write_ok(keys, values, k, v, length):
        return kv_write_torch(keys, values, k, v, length)
    bsz, h, seq = k.shape[:3]
    block_d = triton.next_power_of_2(max(k.shape[3], v.shape[3]))
    rows = bsz * h * seq
    with _launching("kv_write"):
        _kv_write_kernel[(1,)](keys, values, k, v, length, h, seq, rows, k.shape[3], v.shape[3], keys.shape[2],
                               *k.stride()[:3], *v.stride()[:3], *keys.stride()[:3], *values.stride()[:3],
                               BLOCK_R=min(triton.next_power_of_2(rows), max(1, 4096 // block_d)),
                               BLOCK_D=block_d, num_warps=4)
