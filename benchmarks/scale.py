"""What a bank, a study and a polish cost at 135M, 1B and 8B (issue 22), and the 8B pipeline's end-to-end estimate.

Llama-family models with random weights built from a config (their quality numbers mean nothing, their cost
numbers are real), bf16 on the host. Every stage runs block by block (block offload: each block visits the GPU
in fp32, the pipeline's compute dtype, only for its turn; a forward hook on every block records the most
block weights ever resident at once):

1. stream: the calibration windows' embedding (``Activations.capture``) and the full-precision stream through a
   block, seconds a block (the bank needs every block's input and output);
2. bank: one representative block (block 1), every scheme of the menu, trained by ``BlockTraining`` on the
   full-precision stream at full settings (128x2048 windows, 200 steps, batch 8, a quarter held out); per
   candidate: round-to-nearest error, the racing prefix (20 % of the steps), then ``--extra-steps`` more; the
   rest of the run is extrapolated from those steps (the held-out checks keep their cadence), and one scheme
   (``--validate``) is also run to the end to check the extrapolation. Peak GPU memory and host RSS, the bytes
   of a score-only candidate record (JSON, its curve included) and, for reference, of its trained weights;
3. study: one trial = one held-out evaluation of a plan (``--eval-windows`` x seqlen tokens), block-major with
   the plan's weights quantized on the GPU, KL against a reference built the same way (``aqsearch.quality``'s
   statistics); and the cost of scoring a plan from bank scores;
4. polish: ``aqsearch.polish.polish(device=, dtype=)`` (the library's block offload) of uniform w4g64 over the
   first ``--polish-blocks`` blocks at full settings, per block, with its journal's training seconds; the whole
   model's polish is extrapolated block by block;
5. estimate: bank + study + plan racing + polish of the top plans and the uniform hull, on 1, 4 and 8 GPUs and
   two hosts (one process per GPU; the study's RDB storage as the queue), from the measured numbers only
   (:func:`estimate`; every parameter is in the record).

    python benchmarks/scale.py --shapes 8b,smollm2,1b --out DIR/scale.jsonl   # GPU, full settings
    python benchmarks/scale.py --small                                          # CPU smoke run, tiny shapes

Each stage appends one JSON line (``aqsearch.bench.append_result``) as it finishes, so a run cut short keeps
what it measured; ``--budget-s`` skips optional measurements (the validation run, a second polish block)
when they would not fit, and says so in the records. Shapes are spread one process per visible GPU
(``aqsearch.parallel``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "scale.jsonl"

try:
    from aqsearch.bank import MENU  # the bank's menu (the decision layer is being restructured)
except Exception:  # pragma: no cover
    MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64")

# Llama-family configs. SmolLM2-135M and Llama-3.2-1B tie the LM head to the embedding; Llama-3-8B does not.
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False),
}
# --small: the same families, shrunk for a CPU smoke run (minutes on 2 cores)
SMALL_SHAPES = {
    "smollm2": dict(SHAPES["smollm2"], vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(SHAPES["1b"], vocab_size=1024, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
               num_attention_heads=6, num_key_value_heads=2),
    "8b": dict(SHAPES["8b"], vocab_size=2048, hidden_size=128, intermediate_size=448, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2),
}


@dataclass(frozen=True)
class Pipeline:
    """How many of each thing the end-to-end pipeline does (the estimate's inputs besides the measured costs)."""

    trials: int = 200  # study trials (benchmarks/bank.py --full)
    trial_mode: str = "evaluate"  # "evaluate": a trial is one held-out evaluation (today); "score": from bank scores
    race_stop_fraction: float = 0.0  # candidates the race stops after their prefix (0 measured at full settings)
    race_plans: int = 10  # plans raced at a low fidelity (issue 17)
    race_fidelity: float = 0.2  # their share of the polish's training steps
    top_plans: int = 5  # plans polished fully (benchmarks/bank.py's five sizes)
    hull: int = len(MENU)  # uniform schemes polished like a pick (the uniform hull)
    polish_step_fraction: float = 1.0  # polish steps / measured steps (1: 200 steps; 0.25: bank.py's 50)
    final_eval_windows: int = 140  # each polished plan evaluated on about the WikiText-2 test set (140 x 2048)
    rdb_op_s: float = 0.01  # one round trip to the study's PostgreSQL storage (not measured here)
    rdb_ops_per_item: int = 4  # round trips a candidate or trial takes (claim, heartbeat, result, read)


VARIANTS = {
    "today": Pipeline(),
    "lean": Pipeline(trial_mode="score", polish_step_fraction=0.25),
}
TARGET_S, TARGET_GPUS = 3600.0, 4
LAYOUTS = ((1, 1), (1, 4), (1, 8), (2, 4), (2, 8))  # (hosts, GPUs a host)


def log(msg: str) -> None:
    print(f"scale: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the estimate
def estimate(c: dict, p: Pipeline, hosts: int, gpus: int) -> dict:
    """Wall seconds of each stage on ``hosts`` x ``gpus`` workers (one process a GPU), from measured costs ``c``:

    - bank: every worker walks the full-precision stream through all blocks (a worker claims whole blocks in
      order, and block i needs block i-1's output), then trains ``ceil(blocks / workers)`` blocks' menus; a
      candidate the race stops costs its prefix only;
    - study: each worker builds the reference once, then ``ceil(trials / workers)`` trials (or, scored from the
      bank, ``trials`` cheap scores);
    - race: ``ceil(race_plans / workers)`` rounds of a low-fidelity polish plus a held-out evaluation;
    - polish: ``ceil((top_plans + hull) / workers)`` rounds of a full polish plus the final evaluation;
    - across hosts, a candidate or a trial pays ``rdb_ops_per_item`` round trips to the shared storage (a study
      scored from the bank runs in one process: no storage traffic);
    - a final evaluation costs a trial scaled by its windows (an upper bound: the block transfers do not grow).
    """
    w = hosts * gpus
    blocks = c["blocks"]
    rdb = p.rdb_op_s * p.rdb_ops_per_item if hosts > 1 else 0.0
    cand = {s: c["prefix_s"][s] + (1.0 - p.race_stop_fraction) * (c["candidate_s"][s] - c["prefix_s"][s]) for s in c["candidate_s"]}
    per_block_menu = sum(cand.values()) + rdb * len(cand)
    bank = c["capture_s"] + blocks * c["stream_block_s"] + math.ceil(blocks / w) * per_block_menu
    saved = math.ceil(blocks / w) * sum(c["candidate_s"][s] - cand[s] for s in cand)
    if p.trial_mode == "evaluate":
        study = c["reference_s"] + math.ceil(p.trials / w) * (c["trial_s"] + rdb)
    else:
        study = p.trials * c["score_plan_s"]

    def polish_s(fidelity: float) -> float:
        train = c["polish_block_train_s"] * p.polish_step_fraction * fidelity
        return c["capture_s"] + blocks * (c["polish_block_fixed_s"] + train)

    final_eval = c["trial_s"] * p.final_eval_windows / c["eval_windows"]
    race = math.ceil(p.race_plans / w) * (polish_s(p.race_fidelity) + c["trial_s"]) if p.race_plans else 0.0
    race_saved = math.ceil(p.race_plans / w) * (polish_s(1.0) - polish_s(p.race_fidelity)) if p.race_plans else 0.0
    polish = math.ceil((p.top_plans + p.hull) / w) * (polish_s(1.0) + final_eval)
    stages = {"bank": bank, "study": study, "race": race, "polish": polish}
    total = sum(stages.values())
    return {"hosts": hosts, "gpus_per_host": gpus, "workers": w, **{f"{k}_s": v for k, v in stages.items()},
            "total_s": total, "racing_saved_s": saved + race_saved, "one_polish_s": polish_s(1.0),
            "dominant": max(stages, key=stages.get)}


def verdict(row: dict, target_s: float = TARGET_S) -> dict:
    """Within the target? If not, the dominant stage and how much of it must go for the total to fit."""
    over = row["total_s"] - target_s
    d = row["dominant"]
    out = {"target_s": target_s, "within": over <= 0, "dominant": d, "over_s": max(0.0, over)}
    if over > 0:
        t = row[f"{d}_s"]
        out["dominant_must_lose"] = over / t  # share of the dominant stage that must go (>= 1: not enough alone)
        out["dominant_speedup_needed"] = t / (t - over) if over < t else None
    return out


def estimate_record(c: dict) -> dict:
    out = {}
    for name, p in VARIANTS.items():
        rows = [estimate(c, p, h, g) for h, g in LAYOUTS]
        target = next(r for r in rows if r["hosts"] == 1 and r["gpus_per_host"] == TARGET_GPUS)
        out[name] = {"pipeline": asdict(p), "rows": rows, "verdict_4gpu": verdict(target)}
    return out


# ------------------------------------------------------------------------------------------------ measuring
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


class Shape:
    """One shape's measurements, stage by stage; each stage appends its record."""

    def __init__(self, args, name: str):
        import torch

        self.args, self.name, self.torch = args, name, torch
        self.cfg = dict((SMALL_SHAPES if args.small else SHAPES)[name])
        if args.blocks:
            self.cfg["num_hidden_layers"] = args.blocks
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float32  # the pipeline's compute dtype (load_model's default); the host copy is bf16
        self.clock = Clock(self.dev)
        self.t_start = time.time()
        self.costs: dict = {"blocks": self.cfg["num_hidden_layers"]}
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.args.deadline - time.time()

    def write(self, stage: str, rec: dict) -> None:
        from aqsearch.bench import append_result

        full = {"bench": "scale", "run": self.args.run, "stage": stage, "shape": self.name,
                "mode": "small" if self.args.small else "full", "device": self.dev.type, "settings": self.settings(),
                "model": self.model_info, **rec}
        append_result(self.args.out, full)
        log(f"{self.name} {stage}: " + json.dumps({k: v for k, v in rec.items() if not isinstance(v, (dict, list))})[:400])

    def settings(self) -> dict:
        a = self.args
        return {"windows": a.windows, "seqlen": a.seqlen, "steps": a.steps, "batch": a.batch, "heldout": 0.25,
                "extra_steps": a.extra_steps, "eval_windows": a.eval_windows, "eval_seqlen": a.eval_seqlen,
                "polish_blocks": a.polish_blocks, "polish_steps": a.polish_steps, "menu": list(a.menu),
                "compute_dtype": "float32", "host_dtype": "bfloat16", "amp": True,
                "tf32": bool(self.torch.backends.cuda.matmul.allow_tf32)}

    # -------------------------------------------------------------------------------------------- stages
    def build(self) -> None:
        torch = self.torch
        t0 = time.time()
        self.model = random_llama(self.cfg, "cuda" if self.dev.type == "cuda" else "cpu")
        self.clock.free()
        from aqsearch.models import decoder_blocks, decoder_layers

        self.blocks = decoder_blocks(self.model)
        blk = self.blocks[0]
        n_block = sum(p.numel() for p in blk.parameters())
        n_all = sum(p.numel() for p in self.model.parameters())
        self.model_info = {"config": self.cfg, "params": n_all, "block_params": n_block,
                           "linear_params_per_block": sum(l.numel for l in decoder_layers(self.model) if l.block == 0),
                           "host_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                           "block_device_bytes": n_block * 4}
        self.watch = Watch(self.blocks, self.dev, self.dtype)
        self.costs.update(params=n_all, block_params=n_block)
        g = torch.Generator().manual_seed(1)
        v = self.cfg["vocab_size"]
        self.calib = torch.randint(0, v, (self.args.windows, self.args.seqlen), generator=g)
        self.evalw = torch.randint(0, v, (self.args.eval_windows, self.args.eval_seqlen), generator=g)
        self.write("build", {"seconds": time.time() - t0, "memory": self.clock.memory(),
                             "note": f"random weights drawn on the {self.dev.type} tensor by tensor, kept bf16 on the host"})

    def stream(self) -> None:
        """Capture the calibration windows' embedding, push the full-precision stream through blocks 0 and 1."""
        from aqsearch.capture import Activations, offloaded

        c = self.clock
        c.reset_peak()
        t0 = c.now()
        acts = Activations.capture(self.model, self.calib, batch=self.args.batch, device=self.dev, dtype=self.dtype,
                                   device_bytes=self.args.device_bytes)
        t_cap = c.now() - t0
        self.rep = min(1, len(self.blocks) - 1)
        times = []
        y = None
        for i in range(self.rep + 1):
            t1 = c.now()
            with offloaded(self.blocks[i], self.dev, self.dtype) as blk:
                y = acts.run(blk, acts.x_fp)  # [W, L, d] fp32 on the device: block i's output
            times.append(c.now() - t1)
            if i < self.rep:
                acts.x_fp.copy_(y)  # the input of the next block
        self.kwargs, self.x, self.y = acts.kwargs, acts.x_fp, y
        del acts  # its quantized-stream copy is not needed here (the bank trains on the full-precision stream)
        stream_bytes = self.x.numel() * 4
        self.costs.update(capture_s=t_cap, stream_block_s=sum(times) / len(times))
        self.write("stream", {"capture_s": t_cap, "stream_block_s": times, "stream_bytes_per_block": stream_bytes,
                              "host_bytes_all_block_inputs": stream_bytes * (len(self.blocks) + 1),
                              "memory": c.memory(),
                              "note": "stream_block_s: one block (moved to the device in fp32, and back) over every "
                                      "calibration window; host_bytes_all_block_inputs: what keeping every block's "
                                      "input on the host (the bank's FpStream today) would take"})

    def bank(self) -> None:
        """Every scheme of the menu on the representative block: RTN error, prefix, extra steps (+ validation)."""
        import torch

        from aqsearch.capture import Activations, offloaded
        from aqsearch.config import QuantScheme
        from aqsearch.memory import layer_bytes
        from aqsearch.models import BLOCK_LINEARS
        from aqsearch.quantizers import fake_quantize
        from aqsearch.training import BlockTraining, TrainSettings, rel_error

        a, c = self.args, self.clock
        n = a.windows
        n_held = max(1, round(n * 0.25))
        held, train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
        ts = TrainSettings(steps=a.steps, batch=a.batch)
        pre = math.ceil(ts.prefix * ts.steps)
        extra = min(a.extra_steps, ts.steps - pre)
        acts = Activations(self.x, self.x, self.kwargs, self.dev, a.batch, self.rep)
        rows, cand_s, prefix_s = {}, {}, {}
        with offloaded(self.blocks[self.rep], self.dev, self.dtype) as blk:
            layers = {sfx: blk.get_submodule(sfx).weight.shape for sfx in BLOCK_LINEARS}
            t0 = c.now()  # warm-up (kernel selection, allocator): once a worker, kept out of the candidates
            warm = BlockTraining(blk, {sfx: QuantScheme.parse(a.menu[0]) for sfx in BLOCK_LINEARS}, acts, self.y,
                                 train_idx, held, ts)
            warm.advance(2)
            del warm
            warmup_s = c.now() - t0
            for s in a.menu:
                sch = QuantScheme.parse(s)
                c.reset_peak()
                t0 = c.now()
                rtn_w = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, sch) for sfx in BLOCK_LINEARS}
                rtn = rel_error(acts, blk, rtn_w, self.y, held)
                del rtn_w
                run = BlockTraining(blk, {sfx: sch for sfx in BLOCK_LINEARS}, acts, self.y, train_idx, held, ts,
                                    tag=f"scale {self.name} {s}")
                t1 = c.now()
                run.advance(pre)
                t2 = c.now()
                run.advance(pre + extra)
                t3 = c.now()
                rest = ts.steps - pre - extra
                per_extra = (t3 - t2) / max(1, extra)
                validated = None
                if s == a.validate and rest > 0:
                    need = per_extra * rest * 1.2 + 5
                    if self.left() - a.reserve_s > need:
                        run.advance()
                        validated = c.now() - t3
                    else:
                        self.skipped.append(f"bank validation of {s} ({need:.0f} s needed)")
                t4 = c.now()
                q, curve = run.finish()
                t5 = c.now()
                init_s, prefix_steps_s, extra_s, finish_s = t1 - t0, t2 - t1, t3 - t2, t5 - t4
                extrap = init_s + prefix_steps_s + per_extra * rest + extra_s + finish_s
                measured = None if validated is None else init_s + prefix_steps_s + extra_s + validated + finish_s
                cand_s[s] = measured if measured is not None else extrap
                prefix_s[s] = init_s + prefix_steps_s
                nbytes = sum(layer_bytes(shp[0], shp[1], sch) for shp in layers.values())
                wbytes = sum(t.codes.numel() * t.codes.element_size() + t.scale.numel() * 2 + t.zero.numel() * 2
                             for t in q.values())
                unit = f"model.layers.{self.rep}"
                rows[s] = {"init_and_rtn_s": init_s, "prefix_steps": pre, "prefix_s": prefix_s[s],
                           "extra_steps": extra, "extra_s": extra_s, "finish_s": finish_s,
                           "candidate_s_extrapolated": extrap, "candidate_s_measured": measured,
                           "candidate_s": cand_s[s], "checks": len(curve.points), "steps_run": curve.steps_run,
                           "rtn_error": rtn, "trained_error": curve.best, "candidate_bytes": nbytes,
                           "record_json_bytes": candidate_record_bytes(unit, self.rep, s,
                                                                       [f"{unit}.{x}" for x in BLOCK_LINEARS], nbytes,
                                                                       rtn, curve, ts.eval_points + 1),
                           "weights_bytes_unpacked": wbytes, "weights_bytes_packed": nbytes, **c.memory()}
                del run, q
        self.costs.update(candidate_s=cand_s, prefix_s=prefix_s)
        m = len(a.menu)
        self.write("bank", {"block": self.rep, "schemes": rows, "warmup_s": warmup_s,
                            "candidate_s_mean": sum(cand_s.values()) / m,
                            "menu_s_per_block": sum(cand_s.values()),
                            "gpu_peak_bytes_max": max((r.get("gpu_peak_bytes", 0) for r in rows.values()), default=0),
                            "record_json_bytes_mean": sum(r["record_json_bytes"] for r in rows.values()) / m,
                            "weights_bytes_unpacked_mean": sum(r["weights_bytes_unpacked"] for r in rows.values()) / m,
                            "resident_block_bytes_max": self.watch.max_bytes,
                            "skipped": list(self.skipped),
                            "note": f"one block, every scheme; steps beyond {pre}+{extra} extrapolated from the {extra} "
                                    f"after the prefix (candidate_s_measured: run to the end)"})
        del self.x, self.y, self.kwargs
        c.free()

    def study(self) -> None:
        """Reference and trials, block-major over the evaluation windows; and scoring a plan from bank scores."""
        import torch

        from aqsearch.capture import Activations, blocks_on, offloaded
        from aqsearch.config import Plan
        from aqsearch.data import TokenSet
        from aqsearch.memory import plan_bytes
        from aqsearch.models import BLOCK_LINEARS
        from aqsearch.quality import Reference, summarize
        from aqsearch.quantizers import fake_quantize

        a, c = self.args, self.clock
        tokens = TokenSet(self.evalw, "random", f"scale-{self.name}-eval")
        c.reset_peak()

        def hidden(plan: Plan | None) -> torch.Tensor:
            """Final hidden states (after the norm) of every evaluation window: [W, L, d] fp32 on the device."""
            acts = Activations.capture(self.model, self.evalw, batch=a.batch, device=self.dev, dtype=self.dtype,
                                       device_bytes=a.device_bytes)
            x = acts.x_fp
            for i, blk in blocks_on(self.blocks, self.dev, self.dtype):
                w = None
                if plan is not None:
                    w = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, plan.scheme_for(f"model.layers.{i}.{sfx}"))
                         for sfx in BLOCK_LINEARS}
                acts.run(blk, x, out=x, weights=w)
            with offloaded(self.model.model.norm, self.dev, self.dtype) as norm, torch.no_grad():
                for j in range(x.shape[0]):
                    x[j] = norm(x[j : j + 1])[0].float()
            return x

        t0 = c.now()
        hr = hidden(None)
        ref_nll = torch.empty(hr.shape[0], hr.shape[1] - 1)
        with offloaded(self.model.lm_head, self.dev, self.dtype) as head:
            _stats(hr, None, head.weight, self.evalw, ref_nll)
            ref = Reference(tokens, hr, None, None, ref_nll, 0.0)  # summarize reads its NLL and tokens only
        t_ref = c.now() - t0
        rng = random.Random(0)
        plans = {"w4g64": Plan.uniform("w4g64"),
                 "mixed": Plan.from_layers({f"model.layers.{i}.{sfx}": a.menu[rng.randrange(len(a.menu))]
                                            for i in range(len(self.blocks)) for sfx in BLOCK_LINEARS})}
        trials = {}
        for k, plan in plans.items():
            if trials and self.left() - a.reserve_s < 2 * list(trials.values())[0]["seconds"]:
                self.skipped.append(f"second trial ({k})")
                break
            t1 = c.now()
            hq = hidden(plan)
            with offloaded(self.model.lm_head, self.dev, self.dtype) as head:
                st = _stats(hq, hr, head.weight, self.evalw, None)
            mem = plan_bytes(self.model, plan)
            m = summarize(st, ref, mem.bytes, mem.bytes_total, mem.bpw, 0.0)
            trials[k] = {"seconds": c.now() - t1, "kl_mean": m.kl_mean, "top1": m.top1, "bpw": m.bpw, "tokens": m.tokens}
            del hq
        del hr, ref
        t_trial = sum(t["seconds"] for t in trials.values()) / len(trials)
        # scoring from the bank: a sum of per-unit errors and bytes over a table, for 2,000 random plans
        errs = [[rng.random() for _ in a.menu] for _ in self.blocks]
        byts = [[rng.randrange(1 << 30) for _ in a.menu] for _ in self.blocks]
        t1 = time.perf_counter()
        n_plans = 2000
        for _ in range(n_plans):
            ch = [rng.randrange(len(a.menu)) for _ in self.blocks]
            _ = (sum(e[j] for e, j in zip(errs, ch)), sum(b[j] for b, j in zip(byts, ch)))
        t_score = (time.perf_counter() - t1) / n_plans
        self.costs.update(reference_s=t_ref, trial_s=t_trial, score_plan_s=t_score, eval_windows=self.evalw.shape[0])
        self.write("study", {"reference_s": t_ref, "trial_s": t_trial, "trials": trials, "score_plan_s": t_score,
                             "eval_tokens": self.evalw.numel(), "memory": c.memory(),
                             "resident_block_bytes_max": self.watch.max_bytes,
                             "note": "a trial: embedding, every block on the device in turn with the plan's weights "
                                     "quantized there (round-to-nearest), the final norm, the LM head and the KL "
                                     "statistics of aqsearch.quality against the reference"})
        c.free()

    def polish(self) -> None:
        """``aqsearch.polish.polish`` with block offload, uniform w4g64, on the first blocks; per block from its journal."""
        import torch

        from aqsearch.config import Plan
        from aqsearch.data import TokenSet
        from aqsearch.strategies.journal import Journal
        from aqsearch.polish import polish
        from aqsearch.training import TrainSettings

        a, c = self.args, self.clock
        n_blocks = len(self.blocks)
        n_p = min(a.polish_blocks, n_blocks)
        # one block's predicted cost: fixed passes (about five block passes over the windows) + its training
        cands = self.costs.get("candidate_s") or {"": 0.0}
        w4 = cands.get("w4g64") or max(cands.values())
        per_block_guess = w4 * a.polish_steps / a.steps + 5 * self.costs["stream_block_s"]
        while n_p > 1 and self.left() - a.reserve_s < self.costs["capture_s"] + n_p * per_block_guess * 1.3:
            n_p -= 1
            self.skipped.append(f"polish block {n_p + 1}")
        ts = TrainSettings(steps=a.polish_steps, batch=a.batch)
        calib = TokenSet(self.calib, "random", f"scale-{self.name}-calib")
        full_layers = self.model.model.layers
        self.model.model.layers = torch.nn.ModuleList(list(full_layers)[:n_p])  # the first n_p blocks only
        n_cfg = self.model.config.num_hidden_layers
        self.model.config.num_hidden_layers = n_p
        with tempfile.TemporaryDirectory() as tmp:
            journal = Journal(Path(tmp) / "polish.jsonl")
            c.reset_peak()
            try:
                t0 = c.now()
                _, st = polish(self.model, Plan.uniform("w4g64"), calib, ts, journal=journal, device=self.dev,
                               dtype=self.dtype, desc=f"polish {self.name}")
                t = c.now() - t0
            finally:
                self.model.model.layers = full_layers
                self.model.config.num_hidden_layers = n_cfg
            recs = [r for r in journal.records() if r["type"] == "polish"]
            disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        mem = c.memory()
        train = [r["curve"]["seconds"] for r in recs]
        per_block = (t - self.costs["capture_s"]) / n_p
        train_mean = sum(train) / len(train)
        fixed = max(0.0, per_block - train_mean)
        # at the bank's steps: the training part scaled by steps (the checks keep their cadence)
        train_full = train_mean * a.steps / a.polish_steps
        self.costs.update(polish_block_s=fixed + train_full, polish_block_fixed_s=fixed,
                          polish_block_train_s=train_full)
        self.write("polish", {"plan": "w4g64", "blocks_polished": n_p, "seconds": t, "block_train_s": train,
                              "per_block_s": per_block, "per_block_fixed_s": fixed, "per_block_train_s": train_mean,
                              "per_block_full_steps_s": fixed + train_full,
                              "model_polish_s_extrapolated": self.costs["capture_s"] + n_blocks * (fixed + train_full),
                              "steps": st["steps"], "journal_disk_bytes": disk, "activations": st["activations"],
                              "memory": mem, "resident_block_bytes_max": self.watch.max_bytes,
                              "skipped": list(self.skipped),
                              "note": "capture from the stream stage; fixed = per block minus its training (journal "
                                      "curve seconds); the whole model = capture + blocks x per block"})
        c.free()

    def finish(self) -> None:
        c = self.costs
        gb, gm = c["block_params"] / 1e9, c["params"] / 1e9
        derived = {}
        if "candidate_s" in c:
            mean = sum(c["candidate_s"].values()) / len(c["candidate_s"])
            derived.update(candidate_s_mean=mean, candidate_s_per_gparam=mean / gb,
                           menu_s_per_block=sum(c["candidate_s"].values()),
                           bank_gpu_s=c["blocks"] * sum(c["candidate_s"].values()))
        if "stream_block_s" in c:
            derived.update(stream_s_per_gparam=c["stream_block_s"] / gb)
        if "trial_s" in c:
            derived.update(trial_s_per_gparam=c["trial_s"] / gm, trial_s_per_block=c["trial_s"] / c["blocks"])
        if "polish_block_s" in c:
            derived.update(polish_block_s_per_gparam=c["polish_block_s"] / gb,
                           polish_model_s=c["capture_s"] + c["blocks"] * c["polish_block_s"])
        a = self.args
        provenance = {
            "capture_s, stream_block_s": "measured (the embedding of every calibration window; blocks 0 and 1)",
            "candidate_s": f"{a.validate}: measured to the end when it fit (see the bank record); the others: init, "
                           f"RTN error, the racing prefix and {a.extra_steps} more steps measured, the remaining steps "
                           f"extrapolated at the same cadence of held-out checks",
            "prefix_s": "measured",
            "reference_s, trial_s": "measured (trial_s: the mean of the plans timed)",
            "polish_block_*": f"measured on the first {a.polish_blocks} block(s) (fewer if out of time) at "
                              f"{a.polish_steps} steps; scaled to {a.steps} steps by its training part when they differ",
            "estimate": "computed from costs by estimate(); model loading and host-side contention not included"}
        rec = {"costs": c, "derived": derived, "provenance": provenance, "skipped": self.skipped,
               "resident_block_bytes_max": self.watch.max_bytes,
               "resident_blocks_max": self.watch.max_bytes / self.model_info["block_device_bytes"],
               "hook_calls": self.watch.calls, "wall_s": time.time() - self.t_start}
        need = ("capture_s", "stream_block_s", "candidate_s", "prefix_s", "reference_s", "trial_s", "score_plan_s",
                "polish_block_fixed_s", "polish_block_train_s", "eval_windows")
        if all(k in c for k in need):
            rec["estimate"] = estimate_record(c)
        else:
            rec["estimate_missing"] = [k for k in need if k not in c]
        self.write("estimate", rec)


def _stats(h, hr, head_w, windows, nll_out):
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


def measure(args, name: str) -> str:
    """One shape, every stage (a job of ``aqsearch.parallel.run_per_gpu``)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the project's benchmarks
    sh = Shape(args, name)
    sh.build()
    stages = [("stream", sh.stream), ("bank", sh.bank), ("study", sh.study), ("polish", sh.polish)]
    for k, (stage, fn) in enumerate(stages):
        if sh.left() < args.reserve_s and stage != "stream":
            sh.skipped.append(f"stage {stage} (out of time)")
            log(f"{name}: skipping {stage}, {sh.left():.0f} s left")
            continue
        fn()
    sh.finish()
    sh.watch.close()
    del sh
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return name


class _Job:
    def __init__(self, args):
        self.args = args

    def __call__(self, _state, name):
        return measure(self.args, name)


def _init():
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b,smollm2,1b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--small", action="store_true", help="tiny shapes and settings (a CPU smoke run)")
    ap.add_argument("--out", default=str(OUT), help="JSON-lines file the records are appended to")
    ap.add_argument("--windows", type=int, default=None, help="calibration windows (128; small 8)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration window length (2048; small 32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of a candidate (200; small 10)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--extra-steps", type=int, default=None, help="steps timed after the racing prefix (20; small 2)")
    ap.add_argument("--validate", default="w4g64", help="the scheme also run to the end (checks the extrapolation)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows of a trial (8; small 2)")
    ap.add_argument("--eval-seqlen", type=int, default=None, help="their length (2048; small 32)")
    ap.add_argument("--polish-blocks", type=int, default=2)
    ap.add_argument("--polish-steps", type=int, default=None, help="polish steps (= --steps)")
    ap.add_argument("--menu", default=",".join(MENU))
    ap.add_argument("--blocks", type=int, default=None, help="fewer blocks than the shape has (tests)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="wall seconds for the whole run: optional parts give way")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="seconds kept free for the records at the end")
    ap.add_argument("--device-bytes", type=int, default=24 << 30, help="activation storage allowed on the GPU")
    ap.add_argument("--run", default="", help="run id stored with every record (default: the start time)")
    args = ap.parse_args(argv)
    sm = args.small
    args.windows = args.windows or (8 if sm else 128)
    args.seqlen = args.seqlen or (32 if sm else 2048)
    args.steps = args.steps or (10 if sm else 200)
    args.extra_steps = args.extra_steps or (2 if sm else 20)
    args.eval_windows = args.eval_windows or (2 if sm else 8)
    args.eval_seqlen = args.eval_seqlen or (32 if sm else 2048)
    args.polish_steps = args.polish_steps or args.steps
    args.menu = tuple(s.strip() for s in args.menu.split(",") if s.strip())
    args.run = args.run or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    args.deadline = time.time() + args.budget_s
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"scale: unknown shape(s) {', '.join(bad)}: use {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    from aqsearch.config import QuantScheme
    from aqsearch.parallel import run_per_gpu, visible_gpus

    for s in args.menu + (args.validate,):
        QuantScheme.parse(s)
    gpus = visible_gpus()
    log(f"run {args.run}: shapes {shapes} on {max(1, len(gpus))} device(s) ({'GPUs ' + ','.join(gpus) if gpus else 'CPU'}), "
        f"{args.windows}x{args.seqlen} windows, {args.steps} steps -> {args.out}")
    t0 = time.time()
    out = run_per_gpu(_init, _Job(args), shapes, gpus=gpus, keep_going=True)
    for name, r in zip(shapes, out):
        if isinstance(r, Exception):
            log(f"{name} failed: {r}")
    log(f"done in {time.time() - t0:.0f} s")
    return 1 if any(isinstance(r, Exception) for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
