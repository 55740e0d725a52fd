"""compressed-tensors ``pack-quantized`` packing of aqsearch's tensors (one config group a scheme).

Per quantized Linear ``W[N, K]`` (checked against compressed-tensors 0.20.1,
``compressors/pack_quantized/base.py`` and ``helpers.py``, and ``quantization/lifecycle/forward_helpers.py``):

- ``weight_packed`` int32 ``[N, ceil(K * b / 32)]``: each row's codes as one little-endian bit stream
  ("dense cross-element packing": 32 codes in exactly ``b`` words, 3 bits across word boundaries). The
  reader stores ``q + 2^(b-1)`` for its signed code ``q`` in ``[-2^(b-1), 2^(b-1))``: aqsearch's unsigned
  code, unchanged;
- ``weight_scale`` fp16 ``[N, G]``; ``weight_zero_point`` (asymmetric only) int32 ``[ceil(N * b / 32), G]``,
  the zeros packed along N the same way (again offset by ``2^(b-1)``: aqsearch's integer zero itself);
  ``weight_shape`` int64 ``[2]``. Symmetric: no zero point, the signed code is ``code - 2^(b-1)``, which is
  aqsearch's middle-code zero.

Limits: 1 to 8 bits (``can_compress``), strategy ``group`` (or ``channel`` for per-channel schemes), and
``_process_group`` raises unless the group size divides K: a short last group is refused.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from aqsearch.config import QuantScheme
from aqsearch.errors import AqError
from aqsearch.export_pack import integer_zeros, pack_stream
from aqsearch.quantizers import QTensor


def check_layer(name: str, q: QTensor) -> None:
    """Refuse what pack-quantized cannot hold, naming the layer and the scheme."""
    n, k = q.shape
    g = q.scheme.group
    if g is not None and k % g:
        raise AqError(f"layer {name} ({q.scheme}): compressed-tensors needs the group size to divide the "
                      f"layer's {k} inputs (a short last group of {k % g} is not readable)")


def weights_args(s: QuantScheme) -> dict:
    """The ``weights`` quantization args of one scheme."""
    return {"num_bits": s.bits, "type": "int", "symmetric": s.sym, "dynamic": False, "actorder": None,
            "strategy": "channel" if s.group is None else "group", "group_size": s.group,
            "observer": "minmax"}


def pack_layer(name: str, q: QTensor) -> dict[str, torch.Tensor]:
    """``{name}.weight_packed``, ``.weight_scale``, ``.weight_shape`` and (asymmetric) ``.weight_zero_point``."""
    check_layer(name, q)
    n, k = q.shape
    out = {f"{name}.weight_packed": pack_stream(q.codes.t(), q.scheme.bits).t().contiguous(),
           f"{name}.weight_scale": q.scale.contiguous().to(torch.float16),
           f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not q.scheme.sym:
        out[f"{name}.weight_zero_point"] = pack_stream(integer_zeros(name, q), q.scheme.bits)
    return out


def pack_model(tensors: dict[str, QTensor | None]) -> tuple[dict[str, torch.Tensor], dict]:
    """Packed tensors of every quantized layer and the ``quantization_config``."""
    groups: dict[QuantScheme, list[str]] = defaultdict(list)
    packed: dict[str, torch.Tensor] = {}
    for name, q in tensors.items():
        if q is not None:
            packed.update(pack_layer(name, q))
            groups[q.scheme].append(name)
    if not groups:
        raise AqError("the plan quantizes no layer: there is nothing to export as compressed-tensors")
    config_groups = {f"group_{i}": {"targets": names, "weights": weights_args(s), "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"}
                     for i, (s, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))}
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
           "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
           "global_compression_ratio": None}
    try:  # the format's own schema, when installed: a config it would refuse is never written
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return packed, cfg
    QuantizationConfig.model_validate(cfg)
    return packed, cfg
