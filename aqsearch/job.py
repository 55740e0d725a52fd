"""The main job, end to end: search -> front -> pick by budget -> evaluate on held-out text.

``aqsearch run`` (the README's first command) calls :func:`run_job` on the embedded SmolLM2 with small
settings: a few dozen round-to-nearest trials scored on held-out calibration windows, the Pareto front
printed and plotted, the best plan within the budget written, and that plan measured on separate
evaluation text beside the best uniform scheme of no more bytes.

>>> # run_job(load_model("smollm2-135m"), "4.5bpw", workdir="aqsearch-run")   # a few minutes on 2 cores
"""

from __future__ import annotations

import os
from pathlib import Path

from aqsearch.config import Budget, Plan, all_schemes
from aqsearch.data import calib_eval_sets
from aqsearch.memory import plan_bytes
from aqsearch.quality import build_reference, evaluate


def run_job(loaded, budget: str, workdir: str | os.PathLike = "aqsearch-run", trials: int = 24,
            calib: str | None = None, evaluation: str | None = None, eval_tokens: int = 2048, seqlen: int = 256,
            device: str = "cpu", seed: int = 0) -> dict:
    from aqsearch.search import SearchSettings, pareto_front, pick, plot_front, run_study
    from aqsearch.weights import save_qtensors

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work.resolve() / 'study.db'}"
    name = f"run-{loaded.fingerprint[:8]}-{Budget.parse(budget)}"
    s = SearchSettings(eval_tokens=eval_tokens, seqlen=seqlen, seed=seed)
    run_study(loaded, budget, trials, storage, name, s, calib, device)
    front = pareto_front(storage, name)
    plot_front(storage, name, str(work / "front.png"))
    plan, point, tensors = pick(storage, name, budget)
    from aqsearch.cli_progressive import write_plan

    write_plan(str(work / "plan.json"), {"plan": plan.to_json(), "bytes": point["bytes"], "bpw": point["bpw"],
                                         "measurement": point}, tensors, save_qtensors)
    # held-out evaluation: the calibration source's other text (never scored during the search)
    _, ev = calib_eval_sets(loaded, calib, evaluation, eval_tokens=eval_tokens, seqlen=seqlen, eval_seed=2,
                            split=0.5 if evaluation is None and calib is not None else None)
    bs = 8 if device.startswith("cuda") else 1
    ref = build_reference(loaded.model, ev, batch_size=bs, cache_key=loaded.fingerprint)
    picked = evaluate(loaded.model, ref, plan, batch_size=bs)
    limit = Budget.parse(budget).resolve(plan_bytes(loaded.model, plan).weights)
    fits = [sch for sch in all_schemes() if plan_bytes(loaded.model, Plan.uniform(sch)).bytes <= limit]
    best_uniform = max(fits, key=lambda sch: plan_bytes(loaded.model, Plan.uniform(sch)).bytes) if fits else None
    uni = evaluate(loaded.model, ref, Plan.uniform(best_uniform), batch_size=bs) if best_uniform else None
    return {"study": name, "storage": storage, "front": front, "plan": str(work / "plan.json"),
            "plot": str(work / "front.png"), "picked_trial": point["trial"], "picked": picked.to_json(),
            "uniform": {"scheme": str(best_uniform), **uni.to_json()} if uni else None,
            "eval_data": ev.describe(), "budget_bytes": limit}
