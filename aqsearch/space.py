"""The search space: units (sets of layers that share one scheme), each with its menu of schemes.

Granularity ``block``: a unit is a decoder block (its seven Linears). Granularity ``layer``: a unit is
a fused group inside a block (q/k/v share one scheme, gate/up one, o and down one each), or every
Linear alone with ``tie=False``. With ``embeddings=True`` the token embedding and the LM head (one unit
when tied) join the space, with full precision (``fp16``) as one of their choices. ``menu`` is the
decoder units' list of schemes (default: every scheme).

Plans are built from a choice (unit -> scheme) by one function, :func:`aqsearch.bank.build_plan`.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> sp = build_space(m, "layer")
>>> [u.name for u in sp.units][:4], len(sp.units[0].choices)
(['model.layers.0.qkv', 'model.layers.0.o', 'model.layers.0.gate_up', 'model.layers.0.down'], 16)
>>> sp.bytes(sp.uniform("w4g64")) == sum(sp.bytes_of_unit(u, "w4g64") for u in sp.units)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from aqsearch.config import BITS, GROUPS, Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.memory import layer_bytes
from aqsearch.models import LayerInfo, governed_layers, layer_name

FULL = "fp16"  # the choice that keeps a unit unquantized (embedding units only)
# Schemes the Triton kernels run (aqsearch.kernels): every bits, groups up to 128, asymmetric.
KERNEL_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]
    choices: tuple[str, ...]
    weights: int
    block: int


@dataclass(frozen=True)
class Space:
    units: tuple[Unit, ...]
    layers: tuple[LayerInfo, ...]
    granularity: str

    def bytes(self, choice: Mapping[str, str]) -> int:
        return sum(self.bytes_of_unit(u, choice[u.name]) for u in self.units)

    @property
    def weights(self) -> int:
        return sum(u.weights for u in self.units)

    def extreme(self, smallest: bool) -> dict[str, str]:
        """The choice of fewest (or most) bytes."""
        pick = min if smallest else max
        return {u.name: pick(u.choices, key=lambda c, u=u: self.bytes_of_unit(u, c)) for u in self.units}

    def uniform(self, scheme: str) -> dict[str, str]:
        """Every unit at ``scheme``."""
        return {u.name: str(QuantScheme.parse(scheme)) for u in self.units}

    def bytes_of_unit(self, u: Unit, choice: str) -> int:
        by = self._by_name()
        s = None if choice == FULL else QuantScheme.parse(choice)
        return sum(layer_bytes(by[n].out_features, by[n].in_features, s) for n in u.layers)

    def _by_name(self) -> dict[str, LayerInfo]:
        cached = self.__dict__.get("_by")
        if cached is None:
            cached = {l.name: l for l in self.layers}
            object.__setattr__(self, "_by", cached)
        return cached

    def choice_of(self, plan: Plan) -> dict[str, str]:
        """The choice a plan corresponds to (a unit takes its first layer's scheme).

        Raises when a plan's scheme is not on the unit's menu (e.g. a group the space excludes).
        """
        out = {}
        for u in self.units:
            s = plan.scheme_for(u.layers[0])
            c = FULL if s is None else str(s)
            if c not in u.choices:
                raise AqError(f"plan gives {u.name} the scheme {c}, which this search space does not offer")
            out[u.name] = c
        return out


def scheme_choices(kernel_only: bool = False, sym: bool = False, bits=BITS, groups=GROUPS) -> tuple[str, ...]:
    groups = tuple(g for g in groups if not kernel_only or g in KERNEL_GROUPS)
    return tuple(str(QuantScheme(b, g, sym)) for b in sorted(bits, reverse=True) for g in groups)


def build_space(model: nn.Module, granularity: str = "layer", tie: bool = True, embeddings: bool = False,
                kernel_only: bool = False, sym: bool = False, menu: Sequence[str] | None = None) -> Space:
    """The units of ``model`` at ``granularity``, decoder units offering ``menu`` (default: every scheme)."""
    if granularity not in ("layer", "block"):
        raise AqError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    layers = governed_layers(model, embeddings)
    choices = tuple(str(QuantScheme.parse(s)) for s in menu) if menu else scheme_choices(kernel_only, sym)
    if not choices:
        raise AqError("the menu names no scheme")
    groups: dict[str, list[LayerInfo]] = {}
    for l in layers:
        if l.block < 0 or l.fused == "head":
            key = l.name
        elif granularity == "block":
            key = layer_name(l.block)
        else:
            key = l.unit if tie else l.name
        groups.setdefault(key, []).append(l)
    units = []
    for key, ls in groups.items():
        emb = ls[0].block < 0 or ls[0].fused == "head"
        units.append(Unit(key, tuple(l.name for l in ls), ((FULL,) + scheme_choices(kernel_only, sym)) if emb else choices,
                          sum(l.numel for l in ls), ls[0].block))
    return Space(tuple(units), tuple(layers), granularity)
