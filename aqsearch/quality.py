"""Held-out quality of a plan against the full-precision model: KL, top-1 agreement, perplexity.

The full-precision side is computed once per evaluation set (:func:`build_reference`) and reused by
every evaluation. It is stored as the model's final hidden states (after the last norm, before the LM
head), ``[windows, seqlen, hidden]`` in fp32, plus a copy of the full-precision LM head: the reference
logits are exactly ``hidden @ head.T``, recomputed per evaluation at about a fifth of a forward pass.
That is ``hidden / vocab`` of the memory of full-vocabulary distributions (576 / 49152 = 1.2 % for
SmolLM2: 0.7 GB instead of 59 GB for the whole WikiText-2 test set). Beyond ``max_memory`` bytes the
hidden states go to a memory-mapped file in the cache folder instead of RAM.

All statistics are over positions that have a next token (``seqlen - 1`` a window), as in llama.cpp's
``--kl-divergence``: mean, p99 and max of ``KL(p_full || p_quant)`` in nats, top-1 agreement, and the
perplexity of both models with their ratio.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aqsearch.apply import WeightFn, quantized, rtn_weight
from aqsearch.config import Plan
from aqsearch.data import TokenSet
from aqsearch.io import cache_dir
from aqsearch.memory import plan_bytes
from aqsearch.models import LayerInfo, decoder_layers

_CHUNK = 1024  # positions per log-softmax chunk: bounds memory at ~4 x chunk x vocab floats


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Reference:
    """Full-precision side of one evaluation set."""

    tokens: TokenSet
    hidden: torch.Tensor  # [W, L, d] fp32: final hidden states of the full model
    head_weight: torch.Tensor  # [V, d]: full-precision LM head (a copy: the head may be quantized later)
    head_bias: torch.Tensor | None
    nll: torch.Tensor  # [W, L - 1] fp32: the full model's per-token negative log-likelihood
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.double().mean().item())


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def _head(model: nn.Module) -> nn.Linear:
    return model.get_output_embeddings()


def _log_probs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Log-softmax of the LM head's logits, in fp32: ``[B, T, d] -> [B, T, V]``."""
    return F.log_softmax(F.linear(h.float(), weight.float(), None if bias is None else bias.float()), dim=-1)


def build_reference(
    model: nn.Module,
    tokens: TokenSet,
    batch_size: int = 1,
    max_memory: int = 4 << 30,
    cache_key: str | None = None,
) -> Reference:
    """Run the full-precision model once over ``tokens``; see the module docstring for the storage."""
    dev = device_of(model)
    w, l = tokens.windows.shape
    d = model.config.hidden_size
    path = None
    if cache_key is not None:
        path = cache_dir("refs") / f"{cache_key}-{tokens.hash}-{dev.type}-{str(next(model.parameters()).dtype)[6:]}.pt"
        if path.exists():
            obj = torch.load(path, map_location="cpu", mmap=True)
            head = _head(model)
            hidden = obj["hidden"].to(dev) if dev.type == "cuda" else obj["hidden"]
            return Reference(tokens, hidden, head.weight.detach().clone(),
                             None if head.bias is None else head.bias.detach().clone(), obj["nll"], obj["seconds"])
    t0 = time.time()
    nbytes = w * l * d * 4
    on_device = dev.type == "cuda" and nbytes <= max_memory
    if nbytes <= max_memory:
        hidden = torch.empty(w, l, d, dtype=torch.float32, device=dev if on_device else "cpu")
    else:  # too big for RAM: a memory-mapped file in the cache folder
        mm = cache_dir("refs") / f"hidden-{tokens.hash}.f32"
        hidden = torch.from_numpy(np.memmap(mm, dtype=np.float32, mode="w+", shape=(w, l, d)))
    nll = torch.empty(w, l - 1, dtype=torch.float32)
    head = _head(model)
    with torch.no_grad(), _progress(w * l, "reference (full precision)") as bar:
        for i in range(0, w, batch_size):
            ids = tokens.windows[i : i + batch_size].to(dev)
            h = _final_hidden(model, ids).float()
            hidden[i : i + batch_size] = h.to(hidden.device)
            for s in range(0, l - 1, _CHUNK):
                e = min(s + _CHUNK, l - 1)
                lp = _log_probs(h[:, s:e], head.weight, head.bias)
                nll[i : i + batch_size, s:e] = -lp.gather(-1, ids[:, s + 1 : e + 1, None]).squeeze(-1).cpu()
            bar.update(ids.numel())
    ref = Reference(tokens, hidden, head.weight.detach().clone(),
                    None if head.bias is None else head.bias.detach().clone(), nll, time.time() - t0)
    if path is not None and nbytes <= max_memory:
        from aqsearch.io import atomic_path

        with atomic_path(path) as tmp:
            torch.save({"hidden": hidden.cpu(), "nll": nll, "seconds": ref.seconds}, tmp)
    return ref


@dataclass
class Measurement:
    """What one evaluation measured. ``bytes``: governed layers as stored; ``bytes_total``: whole model."""

    kl_mean: float
    kl_p99: float
    kl_max: float
    top1: float
    ppl: float
    ppl_ref: float
    ppl_ratio: float
    bytes: int
    bytes_total: int
    bpw: float
    tokens: int
    seconds: float
    data_hash: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def token_stats(model: nn.Module, ref: Reference, batch_size: int = 1, desc: str = "evaluating") -> dict[str, torch.Tensor]:
    """Per-token KL, top-1 agreement and NLL of ``model`` (as it is now) against ``ref``."""
    dev = device_of(model)
    w, l = ref.tokens.windows.shape
    kls, agree, nlls = [], [], []
    head_w = ref.head_weight.to(dev)
    head_b = None if ref.head_bias is None else ref.head_bias.to(dev)
    head = _head(model)
    with torch.no_grad(), _progress(w * l, desc) as bar:
        for i in range(0, w, batch_size):
            ids = ref.tokens.windows[i : i + batch_size].to(dev)
            hq = _final_hidden(model, ids)
            hr = ref.hidden[i : i + batch_size].to(dev)
            for s in range(0, l - 1, _CHUNK):
                e = min(s + _CHUNK, l - 1)
                lq = _log_probs(hq[:, s:e], head.weight, head.bias)
                lr = _log_probs(hr[:, s:e], head_w, head_b)
                kls.append(F.kl_div(lq, lr, log_target=True, reduction="none").sum(-1).flatten().cpu())
                agree.append((lq.argmax(-1) == lr.argmax(-1)).flatten().cpu())
                nlls.append((-lq.gather(-1, ids[:, s + 1 : e + 1, None]).squeeze(-1)).flatten().cpu())
            bar.update(ids.numel())
    return {"kl": torch.cat(kls).clamp_min(0), "agree": torch.cat(agree), "nll": torch.cat(nlls)}


def evaluate(
    model: nn.Module,
    ref: Reference,
    plan: Plan | None,
    layers: list[LayerInfo] | None = None,
    weight_fn: WeightFn = rtn_weight,
    batch_size: int = 1,
) -> Measurement:
    """Quantize ``model`` by ``plan`` (temporarily), measure it on ``ref``'s windows, restore it."""
    t0 = time.time()
    layers = decoder_layers(model) if layers is None else layers
    mem = plan_bytes(model, plan, layers)
    with quantized(model, plan, layers, weight_fn):
        st = token_stats(model, ref, batch_size, desc=f"evaluating {plan_label(plan)}")
    return summarize(st, ref, mem.bytes, mem.bytes_total, mem.bpw, time.time() - t0)


def summarize(st: dict[str, torch.Tensor], ref: Reference, nbytes: int, nbytes_total: int, bpw: float, seconds: float) -> Measurement:
    kl = st["kl"].double().numpy()
    ppl = math.exp(st["nll"].double().mean().item())
    return Measurement(
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1=float(st["agree"].double().mean().item()),
        ppl=ppl,
        ppl_ref=ref.ppl,
        ppl_ratio=ppl / ref.ppl,
        bytes=nbytes,
        bytes_total=nbytes_total,
        bpw=bpw,
        tokens=int(kl.size),
        seconds=seconds,
        data_hash=ref.tokens.hash,
    )


def plan_label(plan: Plan | None) -> str:
    if plan is None:
        return "full precision"
    if len(plan.entries) == 1 and plan.entries[0][0] == "_default":
        return str(plan.entries[0][1])
    return f"plan ({len(plan.entries)} entries)"
