"""One shape's measurements for ``benchmarks/scale.py``: the model built from a config, then the stream, bank,
study and polish stages, each appending its record (the stages are described in ``scale.py``)."""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

from scale_estimate import estimate_record
from scale_probes import Clock, Watch, candidate_record_bytes, log, random_llama, stats

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
            stats(hr, None, head.weight, self.evalw, ref_nll)
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
                st = stats(hq, hr, head.weight, self.evalw, None)
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
