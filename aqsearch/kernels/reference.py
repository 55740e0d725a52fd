"""Pure-torch reference for every kernel: dequantize the packed layout, then an ordinary matmul.

The kernels are held to these functions in the tests, and the library runs them where Triton or a
GPU is missing. ``dequantize(...)`` is bit-identical to ``aqsearch.quantizers.dequantize`` of the
same codes (``(q - z) * s`` in fp32, then one rounding to ``dtype``).

>>> import torch
>>> from aqsearch.kernels.packing import pack
>>> codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)        # N = 1, K = 4, 2-bit
>>> scales = torch.tensor([[0.5]], dtype=torch.float16)             # (groups, N)
>>> zeros = torch.tensor([[1.0]], dtype=torch.float16)
>>> dequantize(pack(codes, 2), scales, zeros, bits=2, group=32, k=4).tolist()
[[-0.5, 0.0, 0.5, 1.0]]
>>> linear(torch.ones(1, 4), pack(codes, 2), scales, zeros, bits=2, group=32, k=4).tolist()
[[1.0]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import effective_group, unpack_kn, unpack_zeros


def dequantize_kn(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int | None,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weight transposed, ``[K, N]`` in ``dtype`` (the layout the kernels stream)."""
    g = effective_group(group, k)
    n_g, n = scales.shape
    codes = unpack_kn(qweight, bits, k)  # [K, N] uint8
    full = torch.zeros(n_g * g, n, dtype=torch.float32, device=qweight.device)
    full[:k] = codes
    s = scales.float().unsqueeze(1)  # [G, 1, N]
    if zeros is None:  # symmetric: the middle code
        z = float(1 << (bits - 1))
    elif zeros.dtype == torch.int32:  # integer zeros packed along N
        z = unpack_zeros(zeros, bits, n).float().unsqueeze(1)
    else:  # fp16 zeros
        z = zeros.float().unsqueeze(1)
    w = (full.view(n_g, g, n) - z) * s  # (q - z) * s in fp32, exact before the one rounding below
    return w.view(n_g * g, n)[:k].to(dtype)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int | None,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weight ``[N, K]`` (contiguous) in ``dtype`` from int32 ``qweight [words, N]``, fp16 ``scales (G, N)``
    and ``zeros``: int32 ``(G, zero_words(N, bits))`` packed integers, fp16 ``(G, N)``, or ``None`` for
    symmetric (the zero is ``2 ** (bits - 1)``)."""
    return dequantize_kn(qweight, scales, zeros, bits, group, k, dtype).t().contiguous()


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int | None,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W)`` with ``W`` dequantized to ``x.dtype``: what a fake-quantized model computes."""
    w = dequantize(qweight, scales, zeros, bits, group, k, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def matmul_f64(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int | None,
    k: int,
) -> torch.Tensor:
    """``x[M, K] @ W^T`` in float64, returned as fp32: the oracle the kernel tests compare with."""
    w = dequantize(qweight, scales, zeros, bits, group, k, dtype=torch.float64)
    return (x.double() @ w.t()).float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN never passes: it compares as NaN)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))
