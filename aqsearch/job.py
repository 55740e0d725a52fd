"""The main job, end to end: bank -> search -> front -> pick by budget -> polish -> artifact -> evaluate.

``aqsearch run`` (the README's first command) calls :func:`run_job` on the embedded SmolLM2 with small
settings: a bank of block candidates (a small menu, a few training steps, raced by the learning-curve
regressor), a few dozen trials composing them (knapsack starts at exactly the budget first), the Pareto
front printed and plotted, the best plan within the budget polished block by block on the quantized
prefix's outputs starting from the bank's weights, written as one artifact (plan + weights), and
measured on separate evaluation text beside its unpolished self and the best uniform scheme of no
more bytes.

>>> # run_job(load_model("smollm2-135m"), "4.5bpw", workdir="aqsearch-run")   # minutes on 2 cores
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from aqsearch.config import Budget, Plan
from aqsearch.data import calib_eval_sets
from aqsearch.memory import plan_bytes
from aqsearch.quality import build_reference, evaluate


@dataclass(frozen=True)
class JobSettings:
    """Small settings: minutes on a 2-core CPU for SmolLM2.

    One block-training step of SmolLM2 takes about a second on 2 shared cores, so a trained bank of
    30 blocks x 5 schemes does not fit the 10 minutes of ``make run``: its bank holds round-to-nearest
    candidates (``steps=0``) and the pick is trained by the polish (``polish_steps`` a block). GPU runs
    (``benchmarks/bank.py``) train and race the bank at full settings."""

    schemes: tuple[str, ...] = ("w8g128", "w4g64", "w4g128", "w3g64", "w2g64")
    calib_windows: int = 8
    calib_seqlen: int = 128
    steps: int = 0  # bank training steps a candidate (0: round-to-nearest candidates)
    polish_steps: int = 6


def run_job(loaded, budget: str, workdir: str | os.PathLike = "aqsearch-run", trials: int = 16,
            calib: str | None = None, evaluation: str | None = None, eval_tokens: int = 2048, seqlen: int = 256,
            device: str = "cpu", seed: int = 0, job: JobSettings = JobSettings()) -> dict:
    from aqsearch.artifact import write_artifact
    from aqsearch.curves import default_regressor
    from aqsearch.polish import polish
    from aqsearch.plots import plot_front
    from aqsearch.search import SearchSettings, build_space, pareto_front, pick, run_study, study_bank, with_menu
    from aqsearch.training import TrainSettings
    from aqsearch.weights import trained_weight_fn

    t0 = time.time()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work.resolve() / 'study.db'}"
    name = f"run-{loaded.fingerprint[:8]}-{Budget.parse(budget)}"
    s = SearchSettings(granularity="block", eval_tokens=eval_tokens // 2, seqlen=seqlen, seed=seed, train=True,
                       steps=job.steps, calib_windows=job.calib_windows, calib_seqlen=job.calib_seqlen,
                       schemes=job.schemes)
    space = with_menu(build_space(loaded.model, "block"), job.schemes)
    limit = Budget.parse(budget).resolve(space.weights)  # resolved once, for the layers the plan governs
    s = SearchSettings(**{**s.__dict__, "warm_budgets": (limit,)})
    cal, score = calib_eval_sets(loaded, calib, calib, calib_windows=job.calib_windows, calib_seqlen=job.calib_seqlen,
                                 eval_tokens=s.eval_tokens, seqlen=seqlen, split=0.5 if calib else None)
    bank = study_bank(loaded, space, cal, s, default_regressor())
    run_study(loaded, limit, trials, storage, name, s, calib, device, bank=bank, score=score)
    t_search = time.time() - t0
    front = pareto_front(storage, name)
    plot_front(storage, name, str(work / "front.png"))
    plan, point, tensors = pick(storage, name, limit)
    ts = TrainSettings(steps=job.polish_steps, batch=8, seed=seed)
    # From the model's own weights, not the bank's: dequantized bank weights sit on the quantization grid,
    # where the trainer's rounding offsets (|v| < 0.5) cannot move a code. Measured on an H200, w3g64 with
    # 50 polish steps: KL 0.292 from the model's weights, 0.516 from the bank's (benchmarks/compose_gap.py).
    polished, pstats = polish(loaded.model, plan, cal, ts, desc="polishing the pick")
    # Keep the polish only where it helps on the text the search scored: with the few calibration windows
    # of small settings it can overfit (measured on SmolLM2, 2 cores: held-out KL 0.302 -> 0.377).
    bs = 8 if device.startswith("cuda") else 1
    sref = build_reference(loaded.model, score, batch_size=bs, cache_key=loaded.fingerprint)
    kl_pol = evaluate(loaded.model, sref, plan, weight_fn=trained_weight_fn(polished), batch_size=bs).kl_mean
    kl_bank = evaluate(loaded.model, sref, plan, weight_fn=trained_weight_fn(tensors), batch_size=bs).kl_mean
    pstats["kept"] = kl_pol <= kl_bank
    pstats["score_kl"] = {"polished": kl_pol, "bank": kl_bank}
    if not pstats["kept"]:
        polished = tensors
    mem = plan_bytes(loaded.model, plan)
    write_artifact(work / "plan.json", plan, polished, {"bytes": mem.bytes, "bpw": mem.bpw, "measurement": point,
                                                        "trial": point["trial"], "bank": str(bank.dir)})
    # held-out evaluation: the calibration source's other text (never scored during the search)
    _, ev = calib_eval_sets(loaded, calib, evaluation, eval_tokens=eval_tokens, seqlen=seqlen, eval_seed=2,
                            split=0.5 if evaluation is None and calib is not None else None)
    ref = build_reference(loaded.model, ev, batch_size=bs, cache_key=loaded.fingerprint)
    picked = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(polished), batch_size=bs)
    unpolished = evaluate(loaded.model, ref, plan, weight_fn=trained_weight_fn(tensors), batch_size=bs)
    # the uniform baseline: the largest scheme of the study's own menu that fits (the study was seeded with it)
    fits = [sch for sch in job.schemes if plan_bytes(loaded.model, Plan.uniform(sch)).bytes <= limit]
    best_uniform = max(fits, key=lambda sch: plan_bytes(loaded.model, Plan.uniform(sch)).bytes) if fits else None
    uni = evaluate(loaded.model, ref, Plan.uniform(best_uniform), batch_size=bs) if best_uniform else None
    return {"study": name, "storage": storage, "front": front, "plan": str(work / "plan.json"),
            "plot": str(work / "front.png"), "picked_trial": point["trial"], "picked": picked.to_json(),
            "picked_before_polish": unpolished.to_json(), "polish": {k: pstats[k] for k in ("steps", "seconds", "kept", "score_kl")},
            "bank": {**bank.stats(), "folder": str(bank.dir)}, "search_seconds": t_search,
            "uniform": {"scheme": str(best_uniform), **uni.to_json()} if uni else None,
            "eval_data": ev.describe(), "budget_bytes": limit, "seconds": time.time() - t0}
