"""Bit streams and integer zeros shared by the export formats (GPTQ, compressed-tensors)."""

from __future__ import annotations

import torch

from aqsearch.errors import AqError
from aqsearch.quantizers import QTensor


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``[R, C]`` (each < 2**bits) -> int32 ``[ceil(R * bits / 32), C]``: each column a dense
    little-endian bit stream, value ``r`` at bits ``[r * bits, (r + 1) * bits)`` (a value may straddle two
    words, as GPTQ's 3-bit layout and compressed-tensors' dense packing do). Zero-padded at the end.

    >>> pack_stream(torch.tensor([[1], [2], [3]]), 2).tolist()  # 1 | 2 << 2 | 3 << 4
    [[57]]
    >>> hex(pack_stream(torch.full((11, 1), 7), 3)[1, 0].item())  # value 10 spills its top bit into word 1
    '0x1'
    """
    r, c = values.shape
    words = -(-r * bits // 32)
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"a value does not fit in {bits} bits")
    out = torch.zeros(words + 1, c, dtype=torch.int64)
    start = torch.arange(r, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    out.index_add_(0, word, (v << off[:, None]) & 0xFFFFFFFF)
    spill = off + bits > 32  # the part of a value past its first word
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - off[spill])[:, None])
    out = out[:words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # two's complement words



def unpack_stream(packed: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    """Inverse of :func:`pack_stream`: int32 ``[words, C]`` -> int64 ``[r, C]``."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(1, p.shape[1], dtype=torch.int64)])
    start = torch.arange(r, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    both = p[word] | (p[word + 1] << 32)  # 64 bits from the value's first word on
    return (both >> off[:, None]) & ((1 << bits) - 1)



def integer_zeros(name: str, q: QTensor) -> torch.Tensor:
    """The zeros as integers ``[N, G]`` (an ``f`` scheme's fp16 zeros hold integer values; anything else
    would be rounded, so it is refused)."""
    z = q.zero.float()
    if q.scheme.sym:
        return torch.full_like(z, float(1 << (q.scheme.bits - 1))).to(torch.int64)
    if not torch.equal(z, z.round()) or int(z.min()) < 0 or int(z.max()) > q.scheme.qmax:
        raise AqError(f"layer {name} ({q.scheme}): a zero is not an integer in [0, {q.scheme.qmax}]; "
                      "no exported format holds it")
    return z.to(torch.int64)

