"""GPTQ packing of aqsearch's tensors, with per-layer schemes in ``dynamic`` (GPTQModel's layout).

Per quantized Linear ``W[N, K]`` (checked against GPTQModel's ``GPTQQuantLinear`` buffers and the
``dequantize_weight`` of its torch kernel, and vLLM's ``gptq.py``):

- ``qweight`` int32 ``[K * b / 32, N]``: each column's K codes as one little-endian bit stream (3 bits:
  32 codes in 3 words, codes 10 and 21 straddling words; aqsearch's own 3-bit layout is two planes);
- ``qzeros`` int32 ``[G, N * b / 32]``: each group row's N zeros as the same stream along N. Checkpoint
  format ``gptq`` (v1) stores ``zero - 1`` (readers add the 1 back, word-wise with carries, so a zero of 0
  cannot be stored); ``gptq_v2`` stores the zero itself. v1 is written whenever every zero is at least 1,
  v2 otherwise;
- ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``, ``k // g`` (a short last group is group ``G - 1``).
  Symmetric schemes store the middle code ``2^(b-1)`` as their zero, as GPTQ does.

The base ``bits``/``group_size``/``sym`` are the most common scheme; every other layer gets a ``+:``
pattern in ``dynamic`` and every layer kept in full precision a ``-:`` pattern (stored as a plain fp16
``weight``). Each pattern also matches vLLM's fused names (``qkv_proj``, ``gate_up_proj``), which vLLM
serves only when the fused layers share a scheme.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from aqsearch.config import QuantScheme
from aqsearch.errors import AqError
from aqsearch.export_pack import integer_zeros, pack_stream
from aqsearch.quantizers import QTensor

BITS = (2, 3, 4, 8)  # GPTQModel's SUPPORTS_BITS for GPTQ kernels; vLLM's gptq.py: "only 2/3/4/8-bit"
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def check_layer(name: str, q: QTensor) -> None:
    """Refuse what GPTQ cannot hold, naming the layer and the scheme."""
    n, k = q.shape
    if q.scheme.bits not in BITS:
        raise AqError(f"layer {name} ({q.scheme}): GPTQ holds {'/'.join(map(str, BITS))} bits only")
    if k % 32 or n % 32:
        raise AqError(f"layer {name} ({q.scheme}): GPTQ packs codes and zeros in blocks of 32, but the "
                      f"layer is {n} x {k}")


def pattern(name: str) -> str:
    """A ``dynamic`` regex for one layer that also matches vLLM's fused name for it."""
    head, _, proj = name.rpartition(".")
    alt = f"(?:{re.escape(proj)}|{_FUSED[proj]})" if proj in _FUSED else re.escape(proj)
    return f"^{re.escape(head)}\\.{alt}$"


def _scheme_cfg(s: QuantScheme) -> dict:
    return {"bits": s.bits, "group_size": -1 if s.group is None else s.group, "sym": s.sym}


def pack_layer(name: str, q: QTensor, v2: bool) -> dict[str, torch.Tensor]:
    """``{name}.qweight``, ``.qzeros``, ``.scales``, ``.g_idx`` for one layer."""
    check_layer(name, q)
    n, k = q.shape
    b = q.scheme.bits
    g = k if q.scheme.group is None else q.scheme.group
    z = integer_zeros(name, q) - (0 if v2 else 1)  # [N, G]
    return {f"{name}.qweight": pack_stream(q.codes.t(), b),
            f"{name}.qzeros": pack_stream(z, b).t().contiguous(),
            f"{name}.scales": q.scale.t().contiguous().to(torch.float16),
            f"{name}.g_idx": (torch.arange(k, dtype=torch.int32) // g)}


def pack_model(tensors: dict[str, QTensor | None]) -> tuple[dict[str, torch.Tensor], dict]:
    """Packed tensors of every quantized layer and the ``quantization_config`` (GPTQModel's keys)."""
    quant = {n: q for n, q in tensors.items() if q is not None}
    if not quant:
        raise AqError("the plan quantizes no layer: there is nothing to export as GPTQ")
    for name, q in quant.items():
        check_layer(name, q)
    v2 = any(int(integer_zeros(n, q).min()) < 1 for n, q in quant.items())
    base = Counter(q.scheme for q in quant.values()).most_common(1)[0][0]
    dynamic: dict[str, dict] = {}
    for name, q in tensors.items():
        if q is None:
            dynamic[f"-:{pattern(name)}"] = {}
        elif q.scheme != base:
            dynamic[f"+:{pattern(name)}"] = _scheme_cfg(q.scheme)
    packed: dict[str, torch.Tensor] = {}
    for name, q in quant.items():
        packed.update(pack_layer(name, q, v2))
    cfg = {"quant_method": "gptq", **_scheme_cfg(base), "desc_act": False, "lm_head": False,
           "checkpoint_format": "gptq_v2" if v2 else "gptq", "format": "gptq_v2" if v2 else "gptq",
           "pack_dtype": "int32", "true_sequential": True, "dynamic": dynamic or None,
           "meta": {"quantizer": ["aqsearch"]}}
    return packed, cfg
