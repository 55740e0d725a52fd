"""The decode step in fewer launches, for Llama-family models in transformers.

:func:`fuse_llama` swaps, in place, each RMSNorm's forward for :func:`aqsearch.kernels._fused.rmsnorm`
(one launch instead of ~7), each SiLU MLP's ``silu(gate) * up`` for one launch, and transformers'
``apply_rotary_pos_emb`` for one launch that rotates q and k in place (instead of ~12), and the "sdpa"
attention function for one query token by :func:`aqsearch.kernels._attn.decode_attention` (GQA heads read in
place: transformers' SDPA route copies the whole static cache to the query heads first). Where Triton
cannot run (CPU tensors outside the interpreter), each falls back to the torch code it replaced.
With ``matmuls=True`` it also concatenates q/k/v and gate/up (``nn.Linear`` or ``QuantLinear`` of one
scheme, the packed layout concatenated along N) so that a layer runs 4 matmuls instead of 7: the same
bytes, 3 fewer launches and their fixed cost.
:func:`fuse_static_cache` makes a transformers ``StaticCache``'s layers write k and v in one launch instead
of 5 (:func:`aqsearch.kernels._fused.kv_write`); the caller creates the cache, so the caller patches it
(``benchmarks/decode.py`` does where the model carries ``aqsearch_fused``, set by :func:`fuse_llama`).
:func:`count_launches` counts what a step launches besides the matmuls: aten ops that compute
(views, aliases and allocations left out) plus the fused Triton launches; ``tests/kernels/test_fused.py``
holds a decode step of a tiny Llama to a fixed count with it.
"""

from __future__ import annotations

import collections
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aqsearch.kernels import _attn, _fused

_ORIG: dict = {}


def _norm_forward(self, hidden_states):
    return _fused.rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_fused.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _mlp_forward_fused(self, x):
    y = self.gate_up_proj(x)
    i = y.shape[-1] // 2
    return self.down_proj(_fused.silu_mul(y[..., :i], y[..., i:]))


def cat_linears(mods):
    """One matmul module for several of one input (``nn.Linear``s, or ``QuantLinear``s of one scheme):
    outputs concatenated in order. Exact: the packed codes, scales and zeros of each column are kept."""
    from aqsearch.kernels import pack_zeros, unpack_zeros
    from aqsearch.quantlinear import QuantLinear

    m0 = mods[0]
    n = sum(m.out_features for m in mods)
    bias = None if m0.bias is None else torch.cat([m.bias for m in mods])
    if isinstance(m0, QuantLinear):
        if any(not isinstance(m, QuantLinear) or m.scheme != m0.scheme or m.in_features != m0.in_features for m in mods):
            return None
        out = QuantLinear(m0.in_features, n, m0.scheme, bias=bias is not None, dtype=bias.dtype if bias is not None
                          else torch.float16, device=m0.qweight.device)
        out.qweight = torch.cat([m.qweight for m in mods], 1)
        out.scales = torch.cat([m.scales for m in mods], 1)
        if m0.zeros is not None:
            if m0.zeros.dtype == torch.int32:  # packed along N: unpack, concatenate, pack (3 bits: two planes)
                b = m0.scheme.bits
                out.zeros = pack_zeros(torch.cat([unpack_zeros(m.zeros, b, m.out_features) for m in mods], 1), b)
            else:
                out.zeros = torch.cat([m.zeros for m in mods], 1)
        if bias is not None:
            out.bias = bias
        out.backend, out.cache_weight = m0.backend, m0.cache_weight
        return out
    if type(m0) is not torch.nn.Linear or any(type(m) is not torch.nn.Linear for m in mods):
        return None
    out = torch.nn.Linear(m0.in_features, n, bias=bias is not None, device=m0.weight.device, dtype=m0.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in mods], 0))
        if bias is not None:
            out.bias.copy_(bias)
    return out


class FusedLinear(torch.nn.Module):
    """Stands in for the first of several Linears of one input: computes all their outputs in one matmul,
    returns the first and keeps the others (views) for the :class:`TakeSlice` modules in their places."""

    def __init__(self, mm, sizes):
        super().__init__()
        self.mm, self.sizes = mm, list(sizes)
        self._x = self._parts = None

    def forward(self, x):
        parts = self.mm(x).split(self.sizes, -1)
        self._x, self._parts = x, parts
        return parts[0]

    def take(self, i, x):
        if self._parts is None or self._x is not x:  # called on another input: compute it
            return self.mm(x).split(self.sizes, -1)[i]
        part = self._parts[i]
        if i == len(self.sizes) - 1:
            self._x = self._parts = None
        return part


class TakeSlice(torch.nn.Module):
    """Output ``i`` of a :class:`FusedLinear` (a Linear of the same input, fused into it)."""

    def __init__(self, fused, i):
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # not a submodule: its weights are counted once
        self.i = i

    def forward(self, x):
        return self._fused.take(self.i, x)


def _fuse_matmuls(mod, n) -> None:
    if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj")) and not isinstance(mod.q_proj, FusedLinear):
        parts = [mod.q_proj, mod.k_proj, mod.v_proj]
        mm = cat_linears(parts)
        if mm is not None:
            f = FusedLinear(mm, [p.out_features for p in parts])
            mod.q_proj, mod.k_proj, mod.v_proj = f, TakeSlice(f, 1), TakeSlice(f, 2)
            n["qkv"] += 1
    if _is_silu_mlp(mod) and not hasattr(mod, "gate_up_proj") and mod.gate_proj.out_features == mod.up_proj.out_features:
        mm = cat_linears([mod.gate_proj, mod.up_proj])
        if mm is not None:
            mod.gate_up_proj = mm
            del mod.gate_proj, mod.up_proj
            mod.forward = types.MethodType(_mlp_forward_fused, mod)
            n["gate_up"] += 1


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' "sdpa" attention function, one query token in one launch where it applies."""
    plain = not dropout and all(kwargs.get(a) is None for a in ("position_bias", "softcap", "s_aux")) \
        and not kwargs.get("output_attentions")
    if plain:
        out = _attn.decode_attention(query, key, value, attention_mask,
                                     query.shape[-1] ** -0.5 if scaling is None else scaling)
        if out is not None:
            return out, None
    return _ORIG["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)


def _is_silu_mlp(mod) -> bool:
    act = getattr(getattr(mod, "config", None), "hidden_act", None)
    return all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")) and act in ("silu", "swish")


def fuse_llama(model, matmuls: bool = False) -> dict[str, int]:
    """Patch ``model`` (in place) and transformers' Llama rotary function; returns what was patched.
    ``matmuls``: also q/k/v and gate/up as one matmul each (not undone by :func:`unfuse_llama`)."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.llama import modeling_llama as ml

    n: collections.Counter = collections.Counter()
    if matmuls:
        for mod in list(model.modules()):
            _fuse_matmuls(mod, n)
    for mod in model.modules():
        if hasattr(mod, "gate_up_proj"):
            continue
        if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
            mod.forward = types.MethodType(_norm_forward, mod)
            n["rmsnorm"] += 1
        elif _is_silu_mlp(mod):
            mod.forward = types.MethodType(_mlp_forward, mod)
            n["silu_mul"] += 1
    if "rotary" not in _ORIG:
        _ORIG["rotary"] = ml.apply_rotary_pos_emb
        ml.apply_rotary_pos_emb = _fused.rotary_qk
    n["rotary"] = 1
    if "sdpa" not in _ORIG:
        _ORIG["sdpa"] = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface._global_mapping["sdpa"] = _attention
    n["attention"] = 1
    model.aqsearch_fused = True  # tells whoever creates the model's KV cache to fuse_static_cache it
    return dict(n)


def unfuse_llama(model) -> None:
    """Undo :func:`fuse_llama` (the model's forwards, the rotary and attention functions)."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.llama import modeling_llama as ml

    for mod in model.modules():
        if isinstance(mod.__dict__.get("forward"), types.MethodType) and mod.forward.__func__ in (_norm_forward,
                                                                                                  _mlp_forward) \
                and not hasattr(mod, "gate_up_proj"):
            del mod.forward
    if "rotary" in _ORIG:
        ml.apply_rotary_pos_emb = _ORIG.pop("rotary")
    if "sdpa" in _ORIG:
        AttentionInterface._global_mapping["sdpa"] = _ORIG.pop("sdpa")
    model.__dict__.pop("aqsearch_fused", None)


_KV_ATTRS = ("keys", "values", "cumulative_length", "is_initialized")


def _kv_update(self, key_states, value_states, *args, **kwargs):
    """``StaticLayer.update`` with the write in one launch, once the layer holds its tensors: the first call
    (the lazy allocation) and tensors Triton cannot take go to transformers' own update."""
    if not self.is_initialized or not _fused.triton_ok(key_states, value_states, self.keys, self.values):
        return type(self).update(self, key_states, value_states, *args, **kwargs)
    _fused.kv_write(self.keys, self.values, key_states, value_states, self.cumulative_length)
    return self.keys, self.values


def fuse_static_cache(cache) -> int:
    """Patch the layers of a transformers ``StaticCache`` (in place) to write k and v with
    :func:`aqsearch.kernels._fused.kv_write`; returns how many were patched. A layer is left to transformers
    where its class has its own update (sliding windows) or lacks the attributes the write uses (another
    transformers version may name them otherwise)."""
    from transformers import cache_utils

    static = getattr(cache_utils, "StaticLayer", None)
    n = 0
    for layer in cache.layers:
        if static is not None and type(layer).update is static.update and all(hasattr(layer, a) for a in _KV_ATTRS):
            layer.update = types.MethodType(_kv_update, layer)
            n += 1
    return n


_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "alias", "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "size", "stride",
              "dim", "is_same_size", "promote_types", "result_type"}


def launches_kernel(func) -> bool:
    """Does this aten op compute (write memory)? Views and aliases (outputs that alias an input without
    writing it), allocations and metadata reads do not; in-place ops and everything else do."""
    name = func.__name__.split(".")[0]
    if name in _NO_KERNEL:
        return False
    rets = func._schema.returns
    if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
        return False  # a view
    return True


class _Count(TorchDispatchMode):
    def __init__(self, skip):
        super().__init__()
        self.skip, self.ops = skip, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.skip[0] and not _fused.IN_LAUNCH[0] and launches_kernel(func):
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def count_launches(step, model, matmul_types=(torch.nn.Linear,)) -> collections.Counter:
    """Run ``step()`` once and count its launches outside modules of ``matmul_types`` (their forwards, all
    they call included): computing aten ops by name, plus ``triton:<kernel>`` for the fused launches."""
    depth = [0]

    def pre(mod, args):
        depth[0] += 1

    def post(mod, args, out):
        depth[0] -= 1

    hooks = []
    for mod in model.modules():
        if isinstance(mod, matmul_types):
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    before = collections.Counter(_fused.LAUNCHES)
    try:
        with _Count(depth) as mode:
            step()
    finally:
        for h in hooks:
            h.remove()
    out = collections.Counter(mode.ops)
    for name, v in (collections.Counter(_fused.LAUNCHES) - before).items():
        out[f"triton:{name}"] += v
    return out
