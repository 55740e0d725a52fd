"""Exact bytes of a plan: the one function the planner, the search, the report and the checkpoint share.

Stored layout of a quantized layer ``W[N, K]`` (the layout ``aqsearch.kernels`` packs):

- codes: each output column's K codes packed along K into 32-bit words, ``ceil(K * b / 32)`` words
  a column; 3 bits as a 2-bit plane plus a 1-bit plane, ``ceil(2K / 32) + ceil(K / 32)`` words. This is
  exactly ``ceil(N * K * b / 8)`` bytes whenever ``K * b`` is a multiple of 32 (every real model).
- metadata: ``G = ceil(K / g)`` groups a column, each an fp16 scale, and a zero as the scheme stores it:
  integer zeros (the default) packed along N into 32-bit words, ``zero_words(N, b)`` words for each of
  the G group rows (exactly ``b`` bits a zero whenever 32 divides N, as in every real model; otherwise
  the padding to the last word is counted); fp16 zeros (``f`` schemes) 2 bytes each; none when symmetric.

Everything else (embeddings, norms, biases, layers a plan keeps in full precision) counts at the
stored dtype of the materialized model: fp16, 2 bytes an element. Tied weights count once.

``bytes`` is the total over the governed layers (those a plan decides: the decoder Linears), ``bpw``
is ``8 * bytes / weights`` over them, ``bytes_total`` the whole model.

>>> layer_bytes(576, 576, QuantScheme(4, 128))  # 4 full groups and one of 64 a row
172224
>>> layer_bytes(576, 576, QuantScheme(4, 128, fzero=True))
177408
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from aqsearch.config import Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.models import LayerInfo, decoder_layers
from aqsearch.quantizers import n_groups

STORED_DTYPE_BYTES = 2  # fp16: unquantized tensors as the materialized checkpoint stores them


def code_words(k: int, bits: int) -> int:
    """32-bit words holding one column of ``k`` codes."""
    if bits == 3:
        return -(-2 * k // 32) + -(-k // 32)
    return -(-k * bits // 32)


def zero_bytes(n: int, groups: int, scheme: QuantScheme) -> int:
    """Bytes of the zeros of ``groups`` group rows of ``n`` columns, as stored."""
    fmt = scheme.zero_format
    if fmt == "none":
        return 0
    if fmt == "fp16":
        return n * groups * 2
    return groups * code_words(n, scheme.bits) * 4  # packed along N, the codes' word layout


def layer_bytes(n: int, k: int, scheme: QuantScheme | None, dtype_bytes: int = STORED_DTYPE_BYTES) -> int:
    """Stored bytes of a Linear ``W[n, k]`` under ``scheme`` (``None``: kept at ``dtype_bytes``):
    codes + fp16 scales + zeros, exactly the tensors of the materialized checkpoint."""
    if scheme is None:
        return n * k * dtype_bytes
    g = n_groups(k, scheme)
    return n * code_words(k, scheme.bits) * 4 + n * g * 2 + zero_bytes(n, g, scheme)


@dataclass(frozen=True)
class MemoryReport:
    per_layer: dict[str, int]
    bytes: int  # governed layers as stored
    bytes_total: int  # whole model
    weights: int  # weights in governed layers
    other_bytes: int = 0
    schemes: dict[str, str | None] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes / self.weights

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "bytes_total": self.bytes_total, "bpw": round(self.bpw, 6), "weights": self.weights}


def other_params(model: nn.Module, governed: list[LayerInfo]) -> int:
    """Elements of every parameter outside the governed layers (tied tensors once)."""
    gov = {f"{l.name}.weight" for l in governed}
    params = list(model.named_parameters(remove_duplicate=False))
    seen, total = {p.data_ptr() for name, p in params if name in gov}, 0
    for name, p in params:
        if name in gov or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def plan_bytes(model: nn.Module, plan: Plan | None, layers: list[LayerInfo] | None = None) -> MemoryReport:
    """Exact bytes of ``model`` materialized under ``plan`` (``None``: nothing quantized)."""
    layers = decoder_layers(model) if layers is None else layers
    per_layer, schemes = {}, {}
    for l in layers:
        s = plan.scheme_for(l.name) if plan is not None else None
        per_layer[l.name] = layer_bytes(l.out_features, l.in_features, s)
        schemes[l.name] = None if s is None else str(s)
    gov = sum(per_layer.values())
    other = other_params(model, layers) * STORED_DTYPE_BYTES
    return MemoryReport(per_layer, gov, gov + other, sum(l.numel for l in layers), other, schemes)


def smallest_bytes(layers: list[LayerInfo], schemes: list[QuantScheme]) -> int:
    """The fewest bytes any plan over ``schemes`` can take."""
    if not schemes:
        raise AqError("no candidate schemes")
    return sum(min(layer_bytes(l.out_features, l.in_features, s) for s in schemes) for l in layers)


def format_bytes(n: int) -> str:
    for unit, f in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"
