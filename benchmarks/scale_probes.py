"""What ``benchmarks/scale.py`` measures with: block residency (:class:`Watch`), device time and memory
(:class:`Clock`), host memory, a random Llama built fast, the bytes of a bank record, and the quality statistics of
a plan from final hidden states (:func:`stats`)."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"scale: {msg}", file=sys.stderr, flush=True)


class Watch:
    """Forward pre-hooks on every block: the most block-parameter bytes ever resident on the device at once
    (resident: on ``device``'s type in the compute dtype; the host copy is bf16)."""

    def __init__(self, blocks, device, dtype):
        import torch

        self.dev, self.dtype = torch.device(device).type, dtype
        self.params = [p for b in blocks for p in b.parameters()]
        self.max_bytes, self.calls = 0, 0
        self.hooks = [b.register_forward_pre_hook(self._hook) for b in blocks]

    def _hook(self, _mod, _args):
        n = sum(p.numel() * p.element_size() for p in self.params if p.device.type == self.dev and p.dtype == self.dtype)
        self.max_bytes = max(self.max_bytes, n)
        self.calls += 1

    def close(self):
        for h in self.hooks:
            h.remove()


class Clock:
    """Wall seconds with the device synchronised; peak device memory per stage; host RSS."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        out = {"host_rss_bytes": rss_bytes(), "host_peak_rss_bytes": peak_rss_bytes()}
        if self.cuda:
            out.update(gpu_peak_bytes=self.torch.cuda.max_memory_allocated(),
                       gpu_peak_reserved_bytes=self.torch.cuda.max_memory_reserved(),
                       gpu_now_bytes=self.torch.cuda.memory_allocated())
        return out

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_llama(cfg: dict, gen_device: str, seed: int = 0):
    """A ``LlamaForCausalLM`` in bf16 on the host with N(0, 0.02) weights (norms 1), drawn tensor by tensor on
    ``gen_device`` (fast on a GPU; one tensor there at a time) instead of transformers' CPU initialisation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except Exception:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except Exception:  # its own (slower) initialisation, then overwritten anyway
            no_init_weights = contextlib.nullcontext
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            model = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.empty(p.shape, device=gen_device, dtype=p.dtype).normal_(0, 0.02, generator=g))
            else:
                p.fill_(1.0)  # RMSNorm weights
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.requires_grad_(False)
    return model.eval()


def candidate_record_bytes(unit: str, block: int, scheme: str, layers: list[str], nbytes: int, rtn: float,
                           curve, points: int) -> int:
    """JSON bytes of a score-only candidate (the bank's record: bytes, errors, prediction, curve; no weights),
    written as the bank writes it (indent 2), its curve padded to the ``points`` checks of a full run."""
    cj = curve.to_json()
    pts = list(cj["points"])
    while len(pts) < points:
        pts.append(dict(pts[-1]))
    cj["points"] = pts[:points]
    rec = {"unit": unit, "block": block, "scheme": scheme, "layers": layers, "bytes": nbytes, "rtn_error": rtn,
           "status": "finished", "trained_error": curve.best, "prediction": {"0.1": rtn, "0.5": rtn, "0.9": rtn},
           "steps_run": cj["steps"], "steps_saved": 0, "why": None, "curve": cj, "seconds": 12.345678,
           "weights": None, "worker": "w0"}
    return len((json.dumps(rec, indent=2) + "\n").encode())


def stats(h, hr, head_w, windows, nll_out):
    """Per-token statistics as ``aqsearch.quality.token_stats`` computes them, from final hidden states ``h``
    (``hr``: the reference's; ``None`` while building it, then the NLL goes to ``nll_out``). One window a time
    and 1024 positions a chunk bound the logits to [1024, vocab] fp32."""
    import torch
    import torch.nn.functional as F

    from aqsearch.quality import _CHUNK, _log_probs

    kls, agree, nlls = [], [], []
    w, l = windows.shape
    with torch.no_grad():
        for i in range(w):
            ids = windows[i : i + 1].to(h.device)
            for s in range(0, l - 1, _CHUNK):
                e = min(s + _CHUNK, l - 1)
                lq = _log_probs(h[i : i + 1, s:e], head_w, None)
                nll = -lq.gather(-1, ids[:, s + 1 : e + 1, None]).squeeze(-1)
                if hr is None:
                    nll_out[i, s:e] = nll[0].cpu()
                    continue
                lr = _log_probs(hr[i : i + 1, s:e], head_w, None)
                kls.append(F.kl_div(lq, lr, log_target=True, reduction="none").sum(-1).flatten().cpu())
                agree.append((lq.argmax(-1) == lr.argmax(-1)).flatten().cpu())
                nlls.append(nll.flatten().cpu())
    if hr is None:
        return None
    return {"kl": torch.cat(kls).clamp_min(0), "agree": torch.cat(agree), "nll": torch.cat(nlls)}
