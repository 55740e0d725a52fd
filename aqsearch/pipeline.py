"""The one pipeline: a :class:`~aqsearch.job.Job` -> bank -> plans -> polish -> artifact -> evaluation.

:func:`run` is what ``aqsearch run``, ``aqsearch progressive`` and ``benchmarks/bank.py`` call. With the
``study`` strategy (the main job) it builds the **polished front** (:mod:`aqsearch.strategies.front`: the
uniform hull, the fitted score, the score study, plan racing) and picks the best polished plan within the
budget, with no recompute; its baseline is the best *polished* uniform scheme that fits. The ``knapsack``
and ``progressive`` strategies return one plan, which :func:`finish` polishes block by block on the
quantized prefix's outputs, from the model's own weights, beside the best uniform scheme polished the same way.

>>> # from aqsearch import Job, run
>>> # res = run(Job.resolve("smollm2-135m", "4.5bpw"), strategy="knapsack", workdir="out")   # minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aqsearch.artifact import Artifact
from aqsearch.config import Gate, Plan
from aqsearch.io import sha256_bytes
from aqsearch.polish import polish
from aqsearch.quality import evaluate

STRATEGIES = ("study", "knapsack", "progressive")


def log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)


def finish(job, plan: Plan, out: str | Path | None = None, meta: dict | None = None, journal=None,
           workdir: str | Path | None = None) -> tuple[Artifact, dict]:
    """Polish ``plan`` (``job.polish`` steps a block), keep the polish where it scores better than
    round-to-nearest on the job's score windows (:meth:`~aqsearch.strategies.racing.Polisher.keep`), write the
    artifact to ``out`` and measure it on the evaluation windows, beside the best uniform scheme that fits,
    polished the same way (in ``workdir``). Returns the artifact and a report."""
    from aqsearch.strategies.racing import Polisher

    m, bs = job.loaded.model, job.batch
    pol = Polisher(job, Path(workdir or (Path(out).parent if out else ".")) / "uniform")
    weights, pstats = polish(m, plan, job.calib, job.polish, journal=journal, desc="polishing the pick")
    art, score_kl = pol.keep(plan, weights, pstats["steps"], pol.rtn(plan), meta)
    if out is not None:
        art.save(out)
    report = {"picked": art.evaluate(m, pol.eref, bs).to_json(),
              "picked_before_polish": evaluate(m, pol.eref, plan, batch_size=bs).to_json(),
              "polish": {"steps": pstats["steps"], "seconds": pstats["seconds"], "kept": art.meta["polish"]["kept"],
                         "score_kl": score_kl},
              "uniform": polished_uniform(job, pol), "eval_data": job.evaluation.describe(), "budget_bytes": job.limit}
    return art, report


def polished_uniform(job, pol) -> dict | None:
    """The largest uniform scheme of the menu within the budget, polished like a pick (by the
    :class:`~aqsearch.strategies.racing.Polisher` ``pol``), on held-out text."""
    size = {s: job.space.bytes(job.space.uniform(s)) for s in job.bank.menu}
    fits = [s for s in job.bank.menu if size[s] <= job.limit]
    if not fits:
        return None
    best = max(fits, key=size.get)
    plan = Plan.uniform(best)
    res = pol.full(plan, f"uniform-{best}", pol.rtn(plan))
    return {"scheme": best, **res["measurement"], "polished": True, "artifact": res["artifact"]}


def run(job, strategy: str = "study", *, workdir: str | Path = "aqsearch-run", trials: int = 200,
        storage: str | None = None, study_name: str | None = None, gate: Gate = Gate(), workers: int = 1,
        regressor=None, front_config=None, progressive_config=None) -> dict:
    """The main job: build the bank, then the polished front (``study``) or one strategy's plan, polished.
    Writes ``plan.json`` (+ weights) in ``workdir``; for ``study``, also ``study.db``, ``polished/`` and
    ``front.png``."""
    from aqsearch.errors import AqError

    if strategy not in STRATEGIES:
        raise AqError(f"unknown strategy {strategy!r}: use {', '.join(STRATEGIES)}")
    t0 = time.time()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    bank = job.new_bank(regressor)
    bank.build(workers)
    res: dict = {"bank": bank.stats(), "strategy": strategy}
    if strategy == "study":
        res.update(_front(job, bank, work, storage, study_name, trials, front_config))
        res.update(seconds=time.time() - t0)
        return res
    journal = None
    if strategy == "knapsack":
        from aqsearch.strategies.knapsack import knapsack

        plan = knapsack(bank, job.limit)
    else:
        from aqsearch.strategies.journal import Journal
        from aqsearch.strategies.progressive import ProgressiveConfig, progressive

        journal = Journal(work / "journal.jsonl")
        plan = progressive(bank, job.limit, gate, journal, progressive_config or ProgressiveConfig())
    res["search_seconds"] = time.time() - t0
    art, report = finish(job, plan, work / "plan.json", {"strategy": strategy}, journal, work)
    res.update(report, plan=str(work / "plan.json"), seconds=time.time() - t0)
    return res


def _front(job, bank, work: Path, storage, name, trials, config) -> dict:
    """The polished front in ``work``; the pick at the job's budget copied to ``work/plan.json``."""
    from dataclasses import replace

    from aqsearch.plots import plot_front
    from aqsearch.strategies.front import FrontConfig, best_uniform, pick, polished_front, save_pick

    storage = storage or f"sqlite:///{work.resolve() / 'study.db'}"
    name = name or "run-" + sha256_bytes(json.dumps(job.describe(), sort_keys=True).encode())[:10]
    from aqsearch.strategies.study import study_names

    from aqsearch.storage import storage_file

    f = storage_file(storage)  # a file that does not exist yet holds nothing (and is not created here)
    held = [n for n in study_names(storage) if ":" not in n] if f is None or f.exists() else []
    state = "resumed" if name in held else ("new; the storage also holds " + ", ".join(held) if held else "new")
    log(f"study {name} in {storage} ({state})")
    cfg = replace(config or FrontConfig(seed=job.seed), trials=trials)
    summ = polished_front(job, bank, storage, name, work, cfg)
    point = pick(storage, name, job.limit)
    save_pick(point, name, work / "plan.json")
    plot_front(storage, name, str(work / "front.png"))
    return {**summ, "storage": storage, "picked_trial": point["trial"], "picked": point,
            "uniform": best_uniform(storage, name, job.limit),
            "plan": str(work / "plan.json"), "plot": str(work / "front.png"), "budget_bytes": job.limit,
            "eval_data": job.evaluation.describe()}
