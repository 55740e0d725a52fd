"""Fused elementwise kernels for the decode step (Triton), each with the pure-torch code it replaces as twin.

A Llama decode step at batch 1 is hundreds of tiny kernels besides the matmuls: HF's ``LlamaRMSNorm`` is
~7 (cast, pow, mean, add, rsqrt, mul, cast, mul), ``apply_rotary_pos_emb`` ~12 for q and k (two slices,
neg, cat, four muls, two adds, per tensor), the MLP's ``silu(gate) * up`` 2. Here each is one launch:

- :func:`rmsnorm`: one program a row; fp32 statistics, the normalized row rounded to the input dtype
  before the weight multiply, as HF does (``weight * x.to(input_dtype)``).
- :func:`rotary_qk`: q and k rotated in place in one launch (one program per (batch, position, head) of
  q and then of k), ``x * cos + rotate_half(x) * sin`` in fp32, rounded once.
- :func:`silu_mul`: ``silu(g)`` rounded to the dtype (as ``F.silu`` on fp16 does), times ``u``.

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
