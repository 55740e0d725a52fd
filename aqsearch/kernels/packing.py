"""Bit packing of quantized codes: int32 words along K, shaped ``(words, N)``, N contiguous.

Layout (the one ``aqsearch.memory.code_words`` counts, FIELD-NOTES' common layout):

- bits 2, 4, 8: ``per_word = 32 // bits`` codes a word, lowest bits first: word ``w`` of column ``n``
  holds codes ``k = w * per_word + j`` at bits ``[j * bits, (j + 1) * bits)``. ``ceil(K / per_word)``
  words a column; codes past K are 0.
- bits 3: a 2-bit plane (the low two bits of each code, 16 a word, ``ceil(K / 16)`` rows) followed
  by a 1-bit plane (the high bit, 32 a word, ``ceil(K / 32)`` rows), stacked along dim 0. Exactly
  3 bits a weight whenever 32 divides K, and every group of 32 or more starts on a word.

Scales are stored transposed to ``(groups, N)`` fp16 so that the kernels read them with N contiguous.
Zeros come in two formats, told apart by dtype:

- integer (the default, the layout of GPTQ, AWQ and AutoRound checkpoints): each group row's N zeros
  packed along N with the codes' word layout, int32 ``(groups, zero_words(N, bits))``: word ``w`` of
  group row ``r`` holds the zeros of columns ``n = w * per_word + j`` at bits ``[j * bits, (j + 1) * bits)``;
  3 bits as a 2-bit plane (``ceil(N / 16)`` words) then a 1-bit plane (``ceil(N / 32)`` words). Exactly
  ``bits`` bits a zero whenever 32 divides N (every real model); see :func:`pack_zeros`.
- float: fp16 ``(groups, N)`` (the ``f`` schemes, HQQ-style).

Symmetric schemes store no zeros (the zero is the middle code ``2 ** (bits - 1)``).

>>> import torch
>>> codes = torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8)  # N = 1, K = 5
>>> packed = pack(codes, 2)
>>> packed.shape, hex(packed[0, 0].item())
(torch.Size([1, 1]), '0x139')
>>> unpack(packed, 2, 5).tolist()
[[1, 2, 3, 0, 1]]
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)


def code_words(k: int, bits: int) -> int:
    """int32 words holding one column of ``k`` codes (same formula as ``aqsearch.memory.code_words``)."""
    if bits == 3:
        return -(-k // 16) + -(-k // 32)
    return -(-k * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes ``[N, K]`` (each < 2**bits) -> int32 ``[ceil(K * bits / 32), N]``."""
    n, k = codes.shape
    per = 32 // bits
    words = -(-k // per)
    c = torch.zeros(words * per, n, dtype=torch.int32, device=codes.device)
    c[:k] = codes.t().to(torch.int32)
    c = c.view(words, per, n)
    out = c[:, 0].clone()
    for j in range(1, per):  # int32 shifts wrap into the sign bit: the two's complement word
        out |= c[:, j] << (j * bits)
    return out


def _unpack_plane(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 ``[words, N]`` -> codes ``[K, N]`` uint8 (K-major, as the kernels read them)."""
    per = 32 // bits
    words, n = packed.shape
    out = torch.empty(words, per, n, dtype=torch.uint8, device=packed.device)
    for j in range(per):  # arithmetic shifts: the sign copies land above the mask
        out[:, j] = ((packed >> (j * bits)) & ((1 << bits) - 1)).to(torch.uint8)
    return out.view(words * per, n)[:k]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``uint8 [N, K]`` into int32 words ``[code_words(K, bits), N]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is >= 2**{bits}")
    if bits == 3:
        lo = _pack_plane(codes & 3, 2)  # [ceil(K/16), N]
        hi = _pack_plane(codes >> 2, 1)  # [ceil(K/32), N]
        return torch.cat([lo, hi], 0).contiguous()
    return _pack_plane(codes, bits)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[words, N]`` -> codes ``uint8 [N, K]`` (a transposed view)."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != code_words(k, bits):
        raise ValueError(
            f"packed must be int32 [{code_words(k, bits)}, N] for K={k}, bits={bits}; "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    return unpack_kn(packed, bits, k).t()


def unpack_kn(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes ``uint8 [K, N]`` (the transpose of :func:`unpack`, without a copy to [N, K])."""
    if bits == 3:
        n_lo = -(-k // 16)
        return _unpack_plane(packed[:n_lo], 2, k) | (_unpack_plane(packed[n_lo:], 1, k) << 2)
    return _unpack_plane(packed, bits, k)


def zero_words(n: int, bits: int) -> int:
    """int32 words holding one group row of ``n`` packed integer zeros (the codes' formula along N)."""
    return code_words(n, bits)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zeros ``[G, N]`` (each < 2**bits) -> int32 ``[G, zero_words(N, bits)]``, packed along N.

    >>> pack_zeros(torch.tensor([[1, 2, 3, 0, 1]]), 2).tolist()
    [[313]]
    >>> unpack_zeros(pack_zeros(torch.tensor([[1, 2, 3, 0, 1]]), 2), 2, 5).tolist()
    [[1, 2, 3, 0, 1]]
    """
    if zeros.is_floating_point() and not torch.equal(zeros, zeros.round()):
        raise ValueError("integer zeros expected: a zero is not a whole number")
    if zeros.numel() and (int(zeros.min()) < 0):
        raise ValueError("a zero is negative")
    return pack(zeros.to(torch.uint8) if zeros.numel() else zeros.to(torch.uint8), bits).t().contiguous()


def unpack_zeros(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros`: int32 ``[G, zero_words(N, bits)]`` -> ``uint8 [G, N]``."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != zero_words(n, bits):
        raise ValueError(f"packed zeros must be int32 [G, {zero_words(n, bits)}] for N={n}, bits={bits}; "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return unpack_kn(packed.t(), bits, n).t()


def effective_group(group: int | None, k: int) -> int:
    """Group size the kernels use: ``group``, or for per-channel (``None``) a power of two >= K.

    A power of two >= K puts every k in group 0 and keeps the kernels' tiles dividing the group.
    """
    if group is not None:
        return group
    g = 32
    while g < k:
        g *= 2
    return g


def storage_bytes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> int:
    """Bytes of a packed layer as stored: codes + fp16 scales (+ packed int32 or fp16 zeros)."""
    total = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
    if zeros is not None:
        total += zeros.numel() * zeros.element_size()
    return total


def kw_fits(bits: int, bks: int, kw: int) -> bool:
    """Whether a pk GEMV tile of ``bks`` codes deals evenly to ``kw`` warps: its word rows (3 bits: its 32-code
    steps, two low-plane rows and one high-plane row). The round-robin loop decodes ``rows // kw`` of them a warp,
    so a tile that does not deal evenly would drop rows: the candidates never hold one, the launcher refuses one."""
    return (bks // (32 if bits == 3 else 32 // bits)) % kw == 0
