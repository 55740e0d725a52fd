"""The search space: one categorical choice per unit, each unit a set of layers sharing a scheme.

Granularity ``block``: a unit is a decoder block (its seven Linears). Granularity ``layer``: a unit is
a fused group inside a block (q/k/v share one scheme, gate/up one, o and down one each), or every
Linear alone with ``tie=False``. With ``embeddings=True`` the token embedding and the LM head (one unit
when tied) join the space, with full precision (``fp16``) as one of their choices.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> sp = build_space(m, "layer")
>>> [u.name for u in sp.units][:4], len(sp.units[0].choices)
(['model.layers.0.qkv', 'model.layers.0.o', 'model.layers.0.gate_up', 'model.layers.0.down'], 16)
>>> sp.bytes({u.name: "w4g64" for u in sp.units}) == plan_bytes(m, sp.plan({u.name: "w4g64" for u in sp.units})).bytes
True
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from aqsearch.config import BITS, GROUPS, Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.memory import layer_bytes, plan_bytes  # noqa: F401  (plan_bytes: doctest)
from aqsearch.models import LayerInfo, governed_layers

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

    def plan(self, params: dict[str, str]) -> Plan:
        """Exact layer names -> schemes for one point of the space."""
        out: dict[str, str | None] = {}
        for u in self.units:
            c = params[u.name]
            for name in u.layers:
                out[name] = None if c == FULL else c
        return Plan.from_layers(out)

    def bytes(self, params: dict[str, str]) -> int:
        by = {l.name: l for l in self.layers}
        total = 0
        for u in self.units:
            c = params[u.name]
            s = None if c == FULL else QuantScheme.parse(c)
            total += sum(layer_bytes(by[n].out_features, by[n].in_features, s) for n in u.layers)
        return total

    @property
    def weights(self) -> int:
        return sum(u.weights for u in self.units)

    def extreme(self, smallest: bool) -> dict[str, str]:
        """The point of fewest (or most) bytes."""
        out = {}
        for u in self.units:
            key = lambda c: self.bytes_of_unit(u, c)  # noqa: E731
            out[u.name] = min(u.choices, key=key) if smallest else max(u.choices, key=key)
        return out

    def bytes_of_unit(self, u: Unit, choice: str) -> int:
        by = {l.name: l for l in self.layers}
        s = None if choice == FULL else QuantScheme.parse(choice)
        return sum(layer_bytes(by[n].out_features, by[n].in_features, s) for n in u.layers)

    def params_of(self, plan: Plan) -> dict[str, str]:
        """The point of this space a plan corresponds to (a unit takes its first layer's scheme).

        Raises when a plan's scheme is not a choice of the unit (e.g. a group the space excludes).
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
                kernel_only: bool = False, sym: bool = False) -> Space:
    if granularity not in ("layer", "block"):
        raise AqError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    layers = governed_layers(model, embeddings)
    choices = scheme_choices(kernel_only, sym)
    units: list[Unit] = []
    groups: dict[str, list[LayerInfo]] = {}
    for l in layers:
        if l.block < 0 or l.fused == "head":
            key = l.name
        elif granularity == "block":
            key = f"model.layers.{l.block}"
        else:
            key = l.unit if tie else l.name
        groups.setdefault(key, []).append(l)
    for key, ls in groups.items():
        emb = ls[0].block < 0 or ls[0].fused == "head"
        units.append(Unit(key, tuple(l.name for l in ls), ((FULL,) if emb else ()) + choices,
                          sum(l.numel for l in ls), ls[0].block))
    return Space(tuple(units), tuple(layers), granularity)
