"""Reference group-wise round-to-nearest quantizer, pure torch: the oracle for everything else.

Numerics (DESIGN.md): groups run along the input dimension K of a weight ``W[N, K]``; a row has
``ceil(K / g)`` groups and the last one is shorter when ``g`` does not divide ``K``.

Asymmetric: ``lo = min(min(w) * clip_lo, 0)``, ``hi = max(max(w) * clip_hi, 0)``,
``s = fp16((hi - lo) / (2^b - 1))``, ``z = clamp(round(-lo / s), 0, 2^b - 1)`` (an integer: the default
layout packs it in ``b`` bits), ``q = clamp(round(w / s + v) + z, 0, 2^b - 1)``, ``w' = (q - z) * s``.
``f`` schemes compute the same zero and store it as fp16 (``QTensor.zero`` is fp16 either way). A float
zero that is not rounded (``fp16(-lo / s)``, HQQ-style) was measured on SmolLM2 with SignRound training
at 200 steps (H200, whole test set): KL 1.563 against 1.014 at w2g64, 0.267 against 0.260 at w3g64, 0.071
against 0.074 at w4g64; a worse trade at low bits, so the stored fp16 zero keeps the integer value.
Symmetric: ``s = fp16(max|w| * clip_hi / (2^(b-1) - 1))`` and ``z = 2^(b-1)``, not stored.

``v`` (a rounding offset per weight) and ``clip_lo``/``clip_hi`` (per group) are the parameters
that block training learns; without them this is plain round-to-nearest. Rounding uses a
straight-through estimator, so :func:`fake_quantize` is differentiable in ``v`` and the clips.

>>> import torch
>>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
>>> q = quantize(w, QuantScheme(2, None))
>>> q.codes.tolist(), q.scale.float().tolist(), q.zero.float().tolist()
([[0, 1, 2, 3]], [[1.0]], [[0.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aqsearch.config import QuantScheme

FP16_TINY = 2.0**-24  # smallest fp16 subnormal: floor for a scale so that an all-zero group stays exact


def n_groups(k: int, scheme: QuantScheme) -> int:
    """Groups per row: ``ceil(K / g)`` (one for per-channel)."""
    g = k if scheme.group is None else scheme.group
    return -(-k // g)


def group_view(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``W[N, K]`` -> ``[N, G, g]``, the short last group padded with a copy of its own first element.

    Padding with a value the group already holds leaves its min, max and max|w| unchanged.
    """
    n, k = w.shape
    g = k if scheme.group is None else scheme.group
    groups = -(-k // g)
    pad = groups * g - k
    if pad:
        first_of_last = w[:, (groups - 1) * g : (groups - 1) * g + 1]
        w = torch.cat([w, first_of_last.expand(n, pad)], dim=1)
    return w.reshape(n, groups, g)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def group_stats(wg: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, ...]:
    """What the scale and zero are computed from, each ``[N, G, 1]``: ``(max|w|,)`` when symmetric, else
    ``(min w, max w)``. Constant for a weight, so block training computes it once a run."""
    if scheme.sym:
        return (wg.abs().amax(dim=-1, keepdim=True),)
    return wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)


def scale_zero(
    wg: torch.Tensor,
    scheme: QuantScheme,
    clip_lo: torch.Tensor | None = None,
    clip_hi: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32 values that fp16 holds exactly), each ``[N, G, 1]``, from grouped ``wg``
    (or from its :func:`group_stats`, when given)."""
    stats = group_stats(wg, scheme) if stats is None else stats
    if scheme.sym:
        amax = stats[0]
        if clip_hi is not None:
            amax = amax * clip_hi.unsqueeze(-1)
        s = _fp16_ste(amax / ((1 << (scheme.bits - 1)) - 1)).clamp_min(FP16_TINY)
        z = torch.full_like(s, float(1 << (scheme.bits - 1)))
        return s, z
    lo, hi = stats
    if clip_lo is not None:
        lo = lo * clip_lo.unsqueeze(-1)
    if clip_hi is not None:
        hi = hi * clip_hi.unsqueeze(-1)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    s = _fp16_ste((hi - lo) / scheme.qmax).clamp_min(FP16_TINY)
    z = torch.clamp(_round_ste(-lo / s), 0, scheme.qmax)
    return s, z


@dataclass
class QTensor:
    """A quantized weight: codes ``uint8 [N, K]``, scale and zero ``fp16 [N, G]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def _codes(wg, s, z, scheme, v):
    x = wg / s
    if v is not None:
        x = x + v
    return torch.clamp(_round_ste(x) + z, 0, scheme.qmax)


def quantize(
    w: torch.Tensor,
    scheme: QuantScheme,
    v: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
    clip_hi: torch.Tensor | None = None,
) -> QTensor:
    """Quantize ``w[N, K]`` (computed in fp32); ``v`` is ``[N, K]``, the clips ``[N, G]``."""
    with torch.no_grad():
        n, k = w.shape
        wg = group_view(w.float(), scheme)
        vg = None if v is None else group_view(v.float(), scheme)
        s, z = scale_zero(wg, scheme, clip_lo, clip_hi)
        q = _codes(wg, s, z, scheme, vg).reshape(n, -1)[:, :k]
        return QTensor(q.to(torch.uint8), s.squeeze(-1).half(), z.squeeze(-1).half(), scheme)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - z) * s`` per group, back to ``[N, K]``."""
    n, k = q.shape
    g = k if q.scheme.group is None else q.scheme.group
    s = q.scale.float().repeat_interleave(g, dim=1)[:, :k]
    z = q.zero.float().repeat_interleave(g, dim=1)[:, :k]
    return ((q.codes.float() - z) * s).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    scheme: QuantScheme,
    v: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
    clip_hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(w))`` in one differentiable pass (straight-through rounding).

    Equal to the two-step path to the bit; block training calls this with ``v`` and clips.
    """
    n, k = w.shape
    wg = group_view(w.float(), scheme)
    vg = None if v is None else group_view(v, scheme)
    return fake_quantize_groups(wg, scheme, vg, clip_lo, clip_hi).reshape(n, -1)[:, :k].to(w.dtype)


def fake_quantize_groups(
    wg: torch.Tensor,
    scheme: QuantScheme,
    vg: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
    clip_hi: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` on grouped tensors: ``wg``, ``vg`` ``[N, G, g]`` -> ``[N, G, g]`` fp32.

    Rows are independent, so the Linears of a block that share K and a scheme can be stacked along N
    and quantized in one pass (block training does: fewer, larger kernels)."""
    s, z = scale_zero(wg, scheme, clip_lo, clip_hi, stats)
    return (_codes(wg, s, z, scheme, vg) - z) * s
