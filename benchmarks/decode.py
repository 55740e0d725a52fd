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
    python benchmarks/decode.py --llama8b --out DIR/decode.jsonl          # 8B-shaped, w4/w3/w2/w8 g128
    python benchmarks/decode.py --llama8b --dry-run --out /tmp/d.jsonl    # the same on a tiny config, CPU

``--llama8b``: a ``LlamaForCausalLM`` built from Llama-3-8B's config with random weights (no download;
speed does not depend on the values), fp16 on the GPU; fp16 is timed once at each batch size, then
each scheme of ``--schemes`` is materialized from it and timed the same way, in the same process.
Kernel configs come from the tuner's disk cache (``$AQSEARCH_CACHE``, written by
``benchmarks/matmul.py``); whatever is not there is measured during the warm-up, before capture.
The prompt is prefilled one token at a time, so every matmul has M = batch.
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
        if getattr(model, "aqsearch_fused", False):  # fastpath.fuse_llama'd: the KV-cache write in one launch too
            from aqsearch import fastpath

            n = fastpath.fuse_static_cache(self.cache)
            if n < len(self.cache.layers):
                log(f"KV-cache write fused in {n} of {len(self.cache.layers)} layers (the others: transformers')")
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.dev)  # static inputs of the step
        self.pos = torch.zeros(1, dtype=torch.long, device=self.dev)
        self.graph = None

    def _step(self) -> None:
        out = self.model(input_ids=self.tok, past_key_values=self.cache, cache_position=self.pos, use_cache=True)
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """One token at a time: M = batch in every matmul, as in the decode steps."""
        for i in range(prompt.shape[1]):
            out = self.model(input_ids=prompt[:, i:i + 1], past_key_values=self.cache,
                             cache_position=torch.tensor([i], device=self.dev), use_cache=True)
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.fill_(prompt.shape[1])

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (tunes the kernels for M = batch), then capture one step; restores the state."""
        if not (self.graphs and self.dev.type == "cuda"):
            return
        tok0, pos0 = self.tok.clone(), self.pos.clone()
        # each cache layer keeps its own write position (transformers 5.x): the warm-up steps advance it too
        lens = [(ly.cumulative_length, ly.cumulative_length.clone()) for ly in getattr(self.cache, "layers", [])
                if isinstance(getattr(ly, "cumulative_length", None), torch.Tensor)]
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
        for t, t0 in lens:
            t.copy_(t0)
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


def step_launches(model, batch: int) -> dict:
    """Launches of one eager decode step outside the matmuls (``aqsearch.fastpath.count_launches``), by op."""
    from aqsearch import fastpath
    from aqsearch.quantlinear import QuantLinear

    dec = Decoder(model, batch, 8, graphs=False)
    old = os.environ.get("AQSEARCH_AUTOTUNE")
    os.environ["AQSEARCH_AUTOTUNE"] = "0"  # no tuner (and its graph captures) inside the counting mode
    try:
        with torch.no_grad():
            dec.prefill(torch.zeros(batch, 1, dtype=torch.long, device=dec.dev))
            n = fastpath.count_launches(dec._step, model, (QuantLinear, torch.nn.Linear))
    finally:
        if old is None:
            os.environ.pop("AQSEARCH_AUTOTUNE")
        else:
            os.environ["AQSEARCH_AUTOTUNE"] = old
    return dict(n)


def step_bytes(model) -> int:
    """Bytes a batch-1 step must read at least: every parameter and buffer once (matmul weights, norms,
    packed codes, scales, zeros), the embedding table's one row instead of the table."""
    emb = model.get_input_embeddings().weight
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t is not emb)
    return total + emb.shape[1] * emb.element_size()


def profile_step(dec, replays: int = 4) -> dict:
    """Kernel time of a captured step by kernel (``torch.profiler`` over a few graph replays): the step's
    kernel total, the launches, and the top kernels by time (us a step), to set against the wall ms a step."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            dec.graph.replay()
        torch.cuda.synchronize()
    by = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[e.name][0] += 1
            by[e.name][1] += e.time_range.end - e.time_range.start
    top = sorted(by.items(), key=lambda kv: -kv[1][1])
    return {"kernel_us_per_step": round(sum(v[1] for v in by.values()) / replays, 1),
            "launches_per_step": round(sum(v[0] for v in by.values()) / replays, 1),
            "top": [[name[:90], round(v[0] / replays, 2), round(v[1] / replays, 1)] for name, v in top[:15]]}


def run_one(model, prompt, new_tokens: int, graphs: bool) -> dict:
    dec = Decoder(model, prompt.shape[0], prompt.shape[1] + new_tokens + 12, graphs)
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
    prof = None
    if dec.graph is not None and os.environ.get("AQSEARCH_DECODE_PROFILE", "0") not in ("", "0") and b == 1:
        try:  # the cache has 12 spare positions: 4 more steps fit
            prof = profile_step(dec)
            log(f"profile (batch 1): {prof['kernel_us_per_step']:.0f} us of kernels in {1e3 * secs / new_tokens:.3f} ms "
                f"a step, {prof['launches_per_step']:.0f} launches; top: "
                + "; ".join(f"{n[:48]} x{c:g} {u:.0f} us" for n, c, u in prof["top"][:8]))
        except Exception as e:
            log(f"profile failed: {type(e).__name__}: {e}")
    return {"tokens": toks, "seconds": secs, "tokens_per_s": b * new_tokens / secs,
            "ms_per_step": 1e3 * secs / new_tokens, "graphs": dec.graph is not None, "graph_error": err,
            "profile": prof}


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def random_llama(cfg: dict, device: str, dtype: torch.dtype):
    """``LlamaForCausalLM`` from a config, random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def pack_int_zeros(model) -> int:
    """fp16 integer zeros of each QuantLinear -> the packed int32 layout (``pack_zeros``), the default
    storage of asymmetric schemes; a no-op where materialize already stores them packed."""
    from aqsearch.kernels import pack_zeros
    from aqsearch.quantlinear import QuantLinear

    n = 0
    for mod in model.modules():
        z = getattr(mod, "zeros", None)
        if isinstance(mod, QuantLinear) and z is not None and z.dtype == torch.float16 and torch.equal(z, z.round()):
            mod.zeros = pack_zeros(z.float(), mod.scheme.bits)  # a registered buffer: replaced in place
            n += 1
    return n


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama8b", action="store_true", help="Llama-3-8B-shaped, random weights (no download)")
    ap.add_argument("--dry-run", action="store_true", help="with --llama8b: a tiny config on the CPU, eager")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scheme", default=None, help="one scheme (default w4g128; --llama8b: w4g128,w3g128,w2g128,w8g128)")
    g.add_argument("--plan", default=None)
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-graphs", action="store_true", help="eager steps (the CPU path)")
    ap.add_argument("--no-fuse", action="store_true", help="HF's stock RMSNorm, rotary and MLP (no fused kernels)")
    ap.add_argument("--no-fuse-matmuls", action="store_true", help="keep q/k/v and gate/up as separate matmuls")
    ap.add_argument("--copy-gbps", type=float, default=None, help="copy bandwidth for the bounds (default: measured)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--run", default="", help="run id stored with every record")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.no_graphs, args.new_tokens, args.prompt_len = "cpu", True, 3, 4
    return args


def _fp16(base, prompts, batches, args, name, dtype) -> dict:
    """fp16 timed with HF's stock modules, then fused (norms, rotary, silu*up in place on ``base``; q/k/v and
    gate/up on a copy): the tokens/s, launches a step and the weight-bandwidth bound of each."""
    from aqsearch import fastpath

    sys.path.insert(0, HERE)
    from matmul import copy_bandwidth

    f = {"bw": args.copy_gbps or copy_bandwidth(), "base_bytes": step_bytes(base), "stock": {}, "stock_launch": {}}
    if not args.no_fuse:  # fp16 with HF's stock modules first, then fused (what the quantized models run)
        f["stock"] = {b: run_one(base, prompts[b], args.new_tokens, not args.no_graphs) for b in batches}
        f["stock_launch"] = step_launches(base, 1)
        log(f"{name} stock: {sum(f['stock_launch'].values())} launches a step besides the matmuls; "
            + ", ".join(f"batch {b} {f['stock'][b]['tokens_per_s']:.0f} tok/s" for b in batches))
        log(f"fused: {fastpath.fuse_llama(base)}")
    f["mm"] = mm = not (args.no_fuse or args.no_fuse_matmuls)
    if mm:  # the fused q/k/v and gate/up shapes are not in benchmarks/matmul.py's grid: no tuning during warm-up
        os.environ.setdefault("AQSEARCH_AUTOTUNE", "0")
    fbase = copy.deepcopy(base) if mm else base
    if mm:
        log(f"fused matmuls: {fastpath.fuse_llama(fbase, matmuls=True)}")
    f["launch"] = step_launches(fbase, 1)
    f["refs"] = {b: run_one(fbase, prompts[b], args.new_tokens, not args.no_graphs) for b in batches}  # fp16, once
    del fbase
    for b in batches:
        log(f"{name} {str(dtype)[6:]} batch {b}: {f['refs'][b]['tokens_per_s']:.0f} tok/s ({sum(f['launch'].values())} "
            f"launches a step besides the matmuls; bound {f['bw'] * 1e9 / f['base_bytes']:.0f} tok/s at {f['bw']:.0f} GB/s)")
    return f


def _record(f, got, b, q_bytes, q_launch) -> dict:
    """The bandwidth-bound, launch-count and stock-fp16 fields of one decode record."""
    ref, bw = f["refs"][b], f["bw"]
    rec = {"fused": bool(f["stock"]), "fused_matmuls": f["mm"], "copy_gbps": round(bw, 1),
           "base_step_bytes": f["base_bytes"], "quant_step_bytes": q_bytes,
           "base_bound_tokens_per_s": round(b * bw * 1e9 / f["base_bytes"], 1),
           "quant_bound_tokens_per_s": round(b * bw * 1e9 / q_bytes, 1),
           "base_frac_of_bound": round(ref["tokens_per_s"] / (b * bw * 1e9 / f["base_bytes"]), 4),
           "quant_frac_of_bound": round(got["tokens_per_s"] / (b * bw * 1e9 / q_bytes), 4),
           "base_launches_per_step": sum(f["launch"].values()), "quant_launches_per_step": sum(q_launch.values()),
           "launches": q_launch}
    if f["stock"]:
        rec.update({"base_stock_tokens_per_s": round(f["stock"][b]["tokens_per_s"], 1),
                    "speedup_vs_stock_fp16": round(got["tokens_per_s"] / f["stock"][b]["tokens_per_s"], 3),
                    "base_stock_launches_per_step": sum(f["stock_launch"].values())})
    return rec


def main(argv=None) -> int:
    args = _parse(argv)
    from aqsearch import fastpath
    from aqsearch.bench import append_result
    from aqsearch.config import Plan
    from aqsearch.materialize import layer_infos, materialize
    from aqsearch.memory import plan_bytes

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32  # CPU half matmuls crawl
    t0 = time.time()
    if args.llama8b:
        name = "llama3-8b-random" if not args.dry_run else "llama-tiny-random"
        base = random_llama(TINY if args.dry_run else LLAMA3_8B, args.device, dtype)
        schemes = (args.scheme or "w4g128,w3g128,w2g128,w8g128").split(",")
    else:
        from aqsearch.models import load_model

        name, base = args.model, load_model(args.model, device=args.device, dtype=dtype).model
        schemes = [args.plan] if args.plan else (args.scheme or "w4g128").split(",")
    log(f"{name}: built in {time.time() - t0:.1f} s")
    batches = [int(v) for v in args.batch.split(",")]
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(args.device) for b in batches}
    mem_fp16 = plan_bytes(base, None)
    f = _fp16(base, prompts, batches, args, name, dtype)
    for sch in schemes:
        plan = Plan.load(sch) if args.plan else Plan.uniform(sch)
        mem_q = plan_bytes(base, plan)
        t1 = time.time()
        qmodel = copy.deepcopy(base)
        materialize(qmodel, plan, dtype=dtype)  # in place: QuantLinear in each governed Linear's place
        packed = pack_int_zeros(qmodel)
        n_layers = len(layer_infos(qmodel))  # before q/k/v and gate/up are fused
        if not args.no_fuse:
            fastpath.fuse_llama(qmodel, matmuls=f["mm"])
        q_bytes, q_launch = step_bytes(qmodel), step_launches(qmodel, 1)
        log(f"materialized {sch} in {time.time() - t1:.1f} s ({packed} layers' fp16 zeros packed as integers)")
        for b in batches:
            ref = f["refs"][b]
            try:
                got = run_one(qmodel, prompts[b], args.new_tokens, not args.no_graphs)
            except Exception as e:  # record the failure, go on with the next one
                log(f"{sch} batch {b}: {type(e).__name__}: {e}")
                continue
            same = sum(x == y for ra, rb in zip(ref["tokens"], got["tokens"]) for x, y in zip(ra, rb))
            rec = {"bench": "decode", "run": args.run, "tag": args.tag, "model": name, "plan": args.plan,
                   "scheme": sch, "device": args.device, "dtype": str(dtype).replace("torch.", ""), "batch": b,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "graphs": got["graphs"],
                   "graph_error": got["graph_error"] or ref["graph_error"],
                   "base_tokens_per_s": round(ref["tokens_per_s"], 1), "quant_tokens_per_s": round(got["tokens_per_s"], 1),
                   "speedup": round(got["tokens_per_s"] / ref["tokens_per_s"], 3),
                   "base_ms_per_step": round(ref["ms_per_step"], 4), "quant_ms_per_step": round(got["ms_per_step"], 4),
                   "greedy_agreement": round(same / (b * args.new_tokens), 4),
                   "bytes": mem_q.bytes, "bytes_total": mem_q.bytes_total, "bpw": round(mem_q.bpw, 4),
                   "base_bytes_total": mem_fp16.bytes_total, "layers": n_layers, **_record(f, got, b, q_bytes, q_launch)}
            if got.get("profile") or ref.get("profile"):
                rec["profile"] = got.get("profile")
                rec["base_profile"] = ref.get("profile")
            append_result(args.out, rec)
            print(f"{name} batch {b}: {rec['dtype']} {rec['base_tokens_per_s']:.0f} tok/s, {sch} "
                  f"{rec['quant_tokens_per_s']:.0f} tok/s (x{rec['speedup']:.2f}), greedy agreement "
                  f"{rec['greedy_agreement']:.2f}, graphs {rec['graphs']}", flush=True)
        del qmodel
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
