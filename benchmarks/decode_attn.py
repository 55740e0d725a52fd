"""One decode step's attention at a Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128, a static
cache of 172 rows, transformers' bool mask): ``aqsearch.kernels._attn.decode_attention`` at each launch shape
against transformers' SDPA route (KV heads repeated, then SDPA), timed as CUDA-graph replays over 32
layers' caches (as in a step: each layer's cache cold in L1). One JSON line a variant to
``benchmarks/results/decode_attn.jsonl``.

    python benchmarks/decode_attn.py            # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aqsearch.bench import append_result
from aqsearch.kernels import _attn
from aqsearch.kernels.dispatch import graph_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=172, help="cache rows (max_cache_len)")
    ap.add_argument("--valid", type=int, default=100, help="rows the mask lets through")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode_attn.jsonl"))
    ap.add_argument("--run", default="")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_attn: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt, hq, hk, d = "cuda", torch.float16, 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(a.batch, 1, hq + 2 * hk, d, device=dev, dtype=dt, generator=g)[:, :, :hq].transpose(1, 2)
    caches = [tuple(torch.randn(a.batch, hk, a.length, d, device=dev, dtype=dt, generator=g) for _ in range(2))
              for _ in range(a.layers)]
    mask = (torch.arange(a.length, device=dev) < a.valid)[None, None, None, :].expand(a.batch, 1, 1, -1)
    want = _attn.attention_torch(q.float(), caches[0][0].float(), caches[0][1].float(), mask, d ** -0.5)
    variants = [("sdpa (repeat_kv)", None)] + [(f"split BL {bl} x {w} warps", (bl, w))
                                                for bl, w in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8))]
    for name, shape in variants:
        if shape is None:
            fn = lambda k, v: _attn.attention_torch(q, k, v, mask, d ** -0.5)  # noqa: E731
        else:
            fn = lambda k, v, s=shape: _attn.decode_attention(q, k, v, mask, d ** -0.5, *s)  # noqa: E731
        err = ((fn(*caches[0]).float() - want).abs().max() / want.abs().max()).item()
        us = 1e3 * graph_ms([lambda c=c: fn(*c) for c in caches])
        append_result(a.out, {"bench": "decode_attn", "run": a.run, "variant": name, "us": round(us, 2), "rel_err": err,
                              "settings": {"batch": a.batch, "length": a.length, "valid": a.valid, "heads": [hq, hk],
                                           "head_dim": d, "layers": a.layers,
                                           "timing": "cuda-graph replays, one call a layer's cache"}})
        print(f"{name:24s} {us:7.2f} us a layer  rel. err {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
