"""The decode step's non-matmul work in fewer launches, for Llama-family models in transformers.

:func:`fuse_llama` swaps, in place, each RMSNorm's forward for :func:`aqsearch.kernels._fused.rmsnorm`
(one launch instead of ~7), each SiLU MLP's ``silu(gate) * up`` for one launch, and transformers'
``apply_rotary_pos_emb`` for one launch that rotates q and k in place (instead of ~12). Where Triton
cannot run (CPU tensors outside the interpreter), each falls back to the torch code it replaced.
:func:`count_launches` counts what a step launches besides the matmuls: aten ops that compute
(views, aliases and allocations left out) plus the fused Triton launches; ``tests/kernels/test_fused.py``
holds a decode step of a tiny Llama to a fixed count with it.
"""

from __future__ import annotations

import collections
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aqsearch.kernels import _fused

_ORIG: dict = {}


def _norm_forward(self, hidden_states):
    return _fused.rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_fused.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu_mlp(mod) -> bool:
    act = getattr(getattr(mod, "config", None), "hidden_act", None)
    return all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")) and act in ("silu", "swish")


def fuse_llama(model) -> dict[str, int]:
    """Patch ``model`` (in place) and transformers' Llama rotary function; returns what was patched."""
    from transformers.models.llama import modeling_llama as ml

    n: collections.Counter = collections.Counter()
    for mod in model.modules():
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
    return dict(n)


def unfuse_llama(model) -> None:
    """Undo :func:`fuse_llama` (the model's forwards and the rotary function)."""
    from transformers.models.llama import modeling_llama as ml

    for mod in model.modules():
        if isinstance(mod.__dict__.get("forward"), types.MethodType) and mod.forward.__func__ in (_norm_forward,
                                                                                                  _mlp_forward):
            del mod.forward
    if "rotary" in _ORIG:
        ml.apply_rotary_pos_emb = _ORIG.pop("rotary")


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
