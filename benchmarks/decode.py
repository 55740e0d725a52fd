"""Decode tokens/s of a materialized model against its fp16 original, batch 1 and 8, with CUDA graphs.

Greedy decoding with a static KV cache: the prompt is prefilled eagerly, then one decode step (all
batch rows, one token each) is captured in a CUDA graph and replayed; the graph also advances the
cache position, so replays run back to back. The kernels' configs for M = batch are tuned during
the warm-up step, before capture. Each record (``aqsearch.bench.append_result``) carries tokens/s
of the base model (fp16 on CUDA, fp32 on the CPU: ``dtype``) and the quantized one, ms a step, the
greedy tokens' agreement between them, and the bytes.

    python benchmarks/decode.py --model smollm2-135m                      # w4g128, batch 1 and 8, on CUDA
    python benchmarks/decode.py --scheme w4g64 --plan plan.json ...       # another scheme or a plan
    python benchmarks/decode.py --device cpu --batch 1 --new-tokens 4 --no-graphs   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Decoder:
    """A model, a static KV cache and (on CUDA) one captured decode step for ``batch`` rows."""

    def __init__(self, model, batch: int, max_len: int, graphs: bool):
        from transformers import StaticCache

        self.model, self.batch, self.graphs = model, batch, graphs
        self.dev = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.dev)  # static inputs of the step
        self.pos = torch.zeros(1, dtype=torch.long, device=self.dev)
        self.graph = None

    def _step(self) -> None:
        out = self.model(input_ids=self.tok, past_key_values=self.cache, cache_position=self.pos, use_cache=True)
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        p = prompt.shape[1]
        out = self.model(input_ids=prompt, past_key_values=self.cache,
                         cache_position=torch.arange(p, device=self.dev), use_cache=True)
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.fill_(p)

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (tunes the kernels for M = batch), then capture one step; restores the state."""
        if not (self.graphs and self.dev.type == "cuda"):
            return
        tok0, pos0 = self.tok.clone(), self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # on the capture stream: the split-K workspace belongs to it
            for _ in range(2):
                self._step()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=s):
            self._step()
        self.tok.copy_(tok0)
        self.pos.copy_(pos0)  # the cache rows written by warm-up are overwritten by the real steps
        torch.cuda.synchronize()

    @torch.no_grad()
    def decode(self, n: int) -> tuple[list[list[int]], float]:
        """n greedy steps: the new tokens of each row and the seconds they took."""
        toks = []
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            toks.append(self.tok.clone())
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        return torch.cat(toks, 1).tolist(), secs


def run_one(model, prompt, new_tokens: int, graphs: bool) -> dict:
    dec = Decoder(model, prompt.shape[0], prompt.shape[1] + new_tokens + 4, graphs)
    dec.prefill(prompt)
    err = None
    try:
        dec.capture()
    except Exception as e:  # record it and time eager steps instead of failing the run
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"CUDA-graph capture failed, timing eager steps: {err}")
        dec = Decoder(model, prompt.shape[0], prompt.shape[1] + new_tokens + 4, False)
        dec.prefill(prompt)
    toks, secs = dec.decode(new_tokens)
    b = prompt.shape[0]
    return {"tokens": toks, "seconds": secs, "tokens_per_s": b * new_tokens / secs,
            "ms_per_step": 1e3 * secs / new_tokens, "graphs": dec.graph is not None, "graph_error": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scheme", default="w4g128")
    g.add_argument("--plan", default=None)
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-graphs", action="store_true", help="eager steps (the CPU path)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode.jsonl"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    from aqsearch.bench import append_result
    from aqsearch.config import Plan
    from aqsearch.materialize import layer_infos, materialize
    from aqsearch.memory import plan_bytes
    from aqsearch.models import load_model

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32  # CPU half matmuls crawl
    loaded = load_model(args.model, device=args.device, dtype=dtype)
    base = loaded.model
    plan = Plan.load(args.plan) if args.plan else Plan.uniform(args.scheme)
    mem_fp16 = plan_bytes(base, None)
    mem_q = plan_bytes(base, plan)
    t0 = time.time()
    qmodel = copy.deepcopy(base)
    materialize(qmodel, plan, dtype=dtype)  # in place: QuantLinear in each governed Linear's place
    log(f"materialized {args.plan or args.scheme} in {time.time() - t0:.1f} s")
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    for b in (int(v) for v in args.batch.split(",")):
        prompt = torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(args.device)
        ref = run_one(base, prompt, args.new_tokens, not args.no_graphs)
        got = run_one(qmodel, prompt, args.new_tokens, not args.no_graphs)
        same = sum(x == y for ra, rb in zip(ref["tokens"], got["tokens"]) for x, y in zip(ra, rb))
        rec = {"bench": "decode", "tag": args.tag, "model": args.model, "plan": args.plan, "scheme": args.scheme,
               "device": args.device, "dtype": str(dtype).replace("torch.", ""), "batch": b,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "graphs": got["graphs"],
               "graph_error": got["graph_error"] or ref["graph_error"],
               "base_tokens_per_s": round(ref["tokens_per_s"], 1), "quant_tokens_per_s": round(got["tokens_per_s"], 1),
               "speedup": round(got["tokens_per_s"] / ref["tokens_per_s"], 3),
               "base_ms_per_step": round(ref["ms_per_step"], 4), "quant_ms_per_step": round(got["ms_per_step"], 4),
               "greedy_agreement": round(same / (b * args.new_tokens), 4),
               "bytes": mem_q.bytes, "bytes_total": mem_q.bytes_total, "bpw": round(mem_q.bpw, 4),
               "base_bytes_total": mem_fp16.bytes_total, "layers": len(layer_infos(qmodel))}
        append_result(args.out, rec)
        print(f"batch {b}: {rec['dtype']} {rec['base_tokens_per_s']:.0f} tok/s, {args.plan or args.scheme} "
              f"{rec['quant_tokens_per_s']:.0f} tok/s (x{rec['speedup']:.2f}), greedy agreement "
              f"{rec['greedy_agreement']:.2f}, graphs {rec['graphs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
