"""Packed low-bit weights and the kernels that multiply with them (installed as ``aqsearch.kernels``).

Imports torch only; triton loads on the first GPU matmul. The public entry point is :func:`linear`:
Triton kernels on CUDA tensors (config chosen by measurement, see :mod:`.dispatch`), the pure-torch
reference (:mod:`.reference`) elsewhere, with a one-time warning.

>>> import torch, warnings
>>> codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)                # W[N=1, K=4], 2-bit
>>> qweight = pack(codes, 2)                                                 # int32 (words, N)
>>> scales, zeros = torch.tensor([[0.5]]).half(), torch.tensor([[1.0]]).half()  # (groups, N)
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     linear(torch.ones(2, 4), qweight, scales, zeros, bits=2, group=32, k=4).tolist()
[[1.0], [1.0]]
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import triton_available, warn_once
from .packing import code_words, effective_group, pack, pack_zeros, storage_bytes, unpack, unpack_zeros, zero_words

__all__ = ["linear", "pack", "unpack", "pack_zeros", "unpack_zeros", "zero_words", "code_words", "effective_group", "storage_bytes", "reference", "backend_for", "note_fallback"]


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` on CUDA when triton imports, else ``"torch"`` (the reference)."""
    device = torch.device(device)
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def note_fallback(x: torch.Tensor) -> None:
    """Warn once that the pure-torch reference runs instead of the kernels, and why."""
    why = "Triton is not installed" if x.is_cuda else "the tensors are not on a CUDA GPU"
    warn_once(f"aqsearch.kernels: {why}; using the pure-torch reference (dequantize + matmul), which is slow")


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int | None,
    k: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x[..., K] @ W^T (+ bias) -> [..., N]`` for a packed weight (``zeros=None``: symmetric).

    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``. Output dtype is ``x.dtype``.
    """
    n = qweight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if backend == "auto":
        backend = backend_for(x.device)
        if backend == "torch":
            note_fallback(x)
    if backend == "triton":
        from .dispatch import matmul

        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = matmul(x2, qweight, scales, zeros, bits, group, k)
        if bias is not None:
            y = y + bias.to(y.dtype)
    elif backend == "torch":
        y = reference.linear(x2, qweight, scales, zeros, bits, group, k, bias)
    else:
        raise ValueError(f"unknown backend {backend!r}: use auto, triton or torch")
    return y.reshape(*lead, n)
