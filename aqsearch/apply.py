"""Put a plan's quantized weights into a model for evaluation, and take them out again.

Evaluation runs the ordinary model with each governed Linear's weight replaced by its dequantized
("fake-quantized") values: numerically what the packed kernels compute, at full-precision speed.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> w0 = m.model.layers[0].mlp.up_proj.weight.clone()
>>> with quantized(m, Plan.uniform("w2g32")):
...     changed = not torch.equal(m.model.layers[0].mlp.up_proj.weight, w0)
>>> changed, torch.equal(m.model.layers[0].mlp.up_proj.weight, w0)
(True, True)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from aqsearch.config import Plan, QuantScheme
from aqsearch.models import LayerInfo, decoder_layers
from aqsearch.quantizers import fake_quantize

# (layer name, scheme) -> dequantized weight; lets a search reuse work across trials.
WeightFn = Callable[[LayerInfo, torch.Tensor, QuantScheme], torch.Tensor]


def rtn_weight(layer: LayerInfo, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest: the reference quantizer's dequantized weight, in ``w``'s dtype."""
    return fake_quantize(w, scheme)


class WeightCache:
    """Memoizes dequantized weights per (layer, scheme) so trials share them (bounded by ``max_bytes``)."""

    def __init__(self, fn: WeightFn = rtn_weight, max_bytes: int = 8 << 30):
        self.fn, self.max_bytes, self.used = fn, max_bytes, 0
        self._store: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, layer: LayerInfo, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        key = (layer.name, str(scheme))
        hit = self._store.get(key)
        if hit is not None:
            return hit
        out = self.fn(layer, w, scheme)
        size = out.numel() * out.element_size()
        if self.used + size <= self.max_bytes:
            self._store[key] = out
            self.used += size
        return out


def check_governed(plan: Plan | None, names: Iterable[str]) -> None:
    """Refuse a plan whose exact entries name layers outside ``names`` (the layers it can govern)."""
    from aqsearch.errors import AqError

    if plan is None:
        return
    names = set(names)
    extra = [k for k, s in plan.entries if not k.startswith("re:") and k != "_default" and k not in names
             and s is not None]
    if extra:
        raise AqError(f"the plan quantizes {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which this "
                      "command cannot quantize (it governs the decoder's Linears only)")


@contextlib.contextmanager
def quantized(
    model: nn.Module,
    plan: Plan | None,
    layers: list[LayerInfo] | None = None,
    weight_fn: WeightFn = rtn_weight,
) -> Iterator[dict[str, QuantScheme | None]]:
    """Swap in the plan's dequantized weights; restore the originals on exit (even on error)."""
    layers = decoder_layers(model) if layers is None else layers
    check_governed(plan, (l.name for l in layers))  # an entry it cannot honour is an error, not dropped
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    resolved: dict[str, QuantScheme | None] = {}
    try:
        with torch.no_grad():
            for l in layers:
                s = plan.scheme_for(l.name) if plan is not None else None
                resolved[l.name] = s
                if s is None:
                    continue
                lin = model.get_submodule(l.name)
                saved.append((lin, lin.weight.data))
                lin.weight.data = weight_fn(l, lin.weight.data, s).to(lin.weight.dtype)
        yield resolved
    finally:
        for lin, w in saved:
            lin.weight.data = w
