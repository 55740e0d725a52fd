"""The Optuna study: a scheme per unit, held-out KL against bytes, the budget as a constraint.

This module, its sampler (:mod:`aqsearch.strategies.sampler`), :mod:`aqsearch.storage`, the bank's store and
:mod:`aqsearch.plots` are the only ones that import optuna. A trial picks one scheme per unit of the bank's
space (plus embedding units with ``embeddings=True``), builds its plan through :func:`aqsearch.bank.build_plan`,
counts its exact bytes (``bytes - limit`` is its constraint, ``Trial.set_constraint``, mirrored into the
``constraints`` system attribute that optuna-dashboard reads) and is scored by one held-out evaluation at
round-to-nearest on the job's score windows. Its bank score (summed per-unit error) is recorded beside
it; :class:`~aqsearch.strategies.pruning.DominationPruner` may stop it before the evaluation.

Warm starts, queued first: the knapsack over the bank at the job's budgets, the uniform schemes (those that
fit first), plans given, an earlier study's trials. ``trials`` is the number of trials the study should
hold. Workers (``workers > 1``) are processes started through :mod:`aqsearch.parallel` (one per GPU, or
CPU processes without one) that load the model again and take queued trials; storages that take parallel
writers: ``postgresql://...`` or ``journal:///file``. A study records its job's description; resuming
it with another is refused.

>>> # tests/test_study.py runs studies on a tiny model
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass

import optuna

from aqsearch.apply import WeightCache
from aqsearch.bank.core import build_plan
from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.quality import build_reference, evaluate
from aqsearch.space import FULL, build_space
from aqsearch.storage import QueueEmpty, drain, load_study, make_storage
from aqsearch.strategies.pruning import DominationPruner

# heartbeats, set_constraint and objective names are marked experimental; they are what we need
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

METRICS = ["KL mean (nats/token)", "bytes"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
FIELDS = ("kl_p99", "kl_max", "top1", "ppl", "ppl_ref", "ppl_ratio", "bytes_total", "bpw")


@dataclass(frozen=True)
class StudyConfig:
    sampler: str = "local"  # moves around the front (aqsearch.strategies.sampler); or "tpe", "nsga2"
    population: int = 30  # NSGA-II's generation size
    seed: int = 0
    prune: bool = True
    warm_uniform: bool = True
    warm_knapsack: int = 4  # knapsack allocations queued first, at this many budgets up to the limit
    embeddings: bool = False
    heartbeat: int = 30


def make_sampler(c: StudyConfig):
    if c.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=c.seed, multivariate=True, group=True, n_startup_trials=10)
    if c.sampler == "local":
        from aqsearch.strategies.sampler import FrontMutationSampler

        return FrontMutationSampler(seed=c.seed)
    if c.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=c.seed, population_size=c.population)
    raise AqError(f"unknown sampler {c.sampler!r}: use tpe, nsga2 or local")


def study_space(bank, embeddings: bool):
    """The bank's decoder units, plus the embedding / LM-head units (with full precision) when asked."""
    if not embeddings:
        return bank.space
    full = build_space(bank.model, bank.config.granularity, embeddings=True, menu=bank.config.menu)
    from dataclasses import replace

    extra = tuple(u for u in full.units if u.choices[0] == FULL)
    return replace(full, units=extra + bank.space.units)


class Objective:
    """Scores trials: one held-out evaluation at round-to-nearest (weights cached across trials)."""

    def __init__(self, job, bank, space, limit: int, pruner: DominationPruner | None):
        self.job, self.bank, self.space, self.limit, self.pruner = job, bank, space, limit, pruner
        self.ref = build_reference(job.loaded.model, job.score, batch_size=job.batch, cache_key=job.loaded.fingerprint)
        self.weights = WeightCache()

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        if "fixed_params" not in trial.storage.get_trial_system_attrs(trial._trial_id):
            trial.study.stop()
            raise QueueEmpty
        choice = {u.name: trial.suggest_categorical(u.name, list(u.choices)) for u in self.space.units}
        plan = build_plan(self.space.units, choice)
        nbytes = self.space.bytes(choice)
        # a trial run again after its worker died carries the constraint its first run set
        if "constraints:memory" not in trial.storage.get_trial_system_attrs(trial._trial_id):
            trial.set_constraint("memory", float(nbytes - self.limit))
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [float(nbytes - self.limit)])
        score = self.bank.score(choice)  # embedding units, if any, are not banked and add nothing
        trial.set_user_attr("score", score)
        trial.set_user_attr("plan", json.dumps(plan.to_json()["layers"]))
        if self.pruner is not None:
            done = [(t.values[0], int(t.values[1]), t.user_attrs["score"]) for t in
                    trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if "score" in t.user_attrs]
            why = self.pruner.judge(score, nbytes, done)
            if why:
                trial.set_user_attr("pruned_because", why)
                raise optuna.TrialPruned(why)
        m = evaluate(self.job.loaded.model, self.ref, plan, list(self.space.layers), self.weights, self.job.batch)
        for k in FIELDS:
            trial.set_user_attr(k, getattr(m, k))
        return m.kl_mean, float(nbytes)


def _queue(study: optuna.Study, trials: int, warm: list[tuple[str, dict]]) -> None:
    """Make ``trials`` the number of trials the study holds (failed ones are run again, so they do not
    count): a fresh study gets the warm starts first, then blank trials (the sampler's)."""
    held = len([t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL])
    if held > trials:
        print(f"aqsearch: warning: study {study.study_name!r} already holds {held} trials, more than --trials "
              f"{trials}: none added", file=sys.stderr)
        return
    if held:
        warm = []
        if held < trials:
            print(f"aqsearch: study {study.study_name!r} holds {held} trials: adding {trials - held} to reach {trials}",
                  file=sys.stderr)
    for label, params in warm[:trials - held]:
        study.enqueue_trial(params, user_attrs={"warm_start": label})
    for _ in range(trials - held - min(len(warm), trials - held)):
        study.enqueue_trial({})


def warm_starts(bank, space, job, config: StudyConfig, plans=(), earlier=()) -> list[tuple[str, dict]]:
    """Knapsack choices at the job's budgets (or spread up to the limit), then the uniform schemes (those
    within the limit first, largest first), then the plans given, then an earlier study's trials."""
    from aqsearch.strategies.knapsack import knapsack_choice

    emb = {u.name: FULL for u in space.units if u.choices[0] == FULL}
    out: list[tuple[str, dict]] = []
    low = bank.bytes(bank.space.extreme(smallest=True))
    n = config.warm_knapsack
    budgets = job.budgets if len(job.budgets) > 1 or n <= 1 else tuple(
        low + (job.limit - low) * k // n for k in range(n, 0, -1))
    for b in (budgets if n else ()):
        c = knapsack_choice(bank, b)
        if c is not None and all({**emb, **c} != p for _, p in out):
            out.append((f"knapsack {8 * b / bank.space.weights:.3f} bpw", {**emb, **c}))
    if config.warm_uniform:
        common = sorted(set.intersection(*(set(u.choices) for u in bank.units)),
                        key=lambda c: (bank.bytes(bank.space.uniform(c)) > job.limit, -bank.bytes(bank.space.uniform(c))))
        out += [(f"uniform {c}", {**emb, **bank.space.uniform(c)}) for c in common]
    out += [(f"plan {p}", space.choice_of(Plan.load(p))) for p in plans]
    out += [(f"earlier trial {t.number}", dict(t.params)) for t in earlier if set(t.params) == {u.name for u in space.units}]
    return out


def check_resumable(job, storage: str, name: str, limit: int) -> None:
    """Before any work: a study of this name that exists must have been made for this job and budget."""
    if name not in optuna.get_all_study_names(make_storage(storage)):
        return
    held = optuna.load_study(study_name=name, storage=make_storage(storage)).user_attrs.get("aqsearch")
    if held is None:
        raise AqError(f"study {name!r} in the storage was not made by aqsearch; use another --study name")
    mine = json.loads(json.dumps(job.describe()))
    if held.get("job") != mine or held.get("budget_bytes") != limit:
        diff = [k for k in mine if (held.get("job") or {}).get(k) != mine[k]]
        diff += ["budget"] if held.get("budget_bytes") != limit else []
        raise AqError(f"study {name!r} in the storage was made with other settings ({', '.join(diff)} differ); "
                      "use another --study name, or the settings it was made with")


def open_study(job, storage: str, name: str, config: StudyConfig, space, limit: int, create: bool = True) -> optuna.Study:
    """Create or load the study; refuse to resume one made for another job (:func:`check_resumable`)."""
    check_resumable(job, storage, name, limit)
    study = optuna.create_study(storage=make_storage(storage, config.heartbeat), sampler=make_sampler(config),
                                study_name=name, directions=["minimize", "minimize"], load_if_exists=True)
    if study.user_attrs.get("aqsearch") is None:
        if not create:
            raise AqError(f"study {name!r} was not made by aqsearch")
        info = {"model": job.loaded.name, "fingerprint": job.loaded.fingerprint, "budget_bytes": limit,
                "weights": space.weights, "units": len(space.units), "job": job.describe(), "config": asdict(config)}
        study.set_metric_names(METRICS)  # the names optuna-dashboard shows
        study.set_user_attr("aqsearch", json.loads(json.dumps(info)))
    return study


def run_study(job, bank, storage: str, name: str, trials: int, config: StudyConfig = StudyConfig(),
              limit: int | None = None, workers: int = 1, warm_plans=(), warm_study: str | None = None) -> optuna.Study:
    """Create or continue a study over a built bank and run trials until its queue is empty."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    limit = job.limit if limit is None else limit
    space = study_space(bank, config.embeddings)
    smallest = space.bytes(space.extreme(smallest=True))
    if limit < smallest:
        raise AqError(f"budget {format_bytes(limit)} ({limit:,} B) is below the smallest model this space allows: "
                      f"{format_bytes(smallest)} ({smallest:,} B, {8 * smallest / space.weights:.3f} bpw)")
    if workers > 1 and storage.startswith("sqlite"):
        raise AqError("several workers need a storage that takes parallel writers: postgresql://... or journal:///file")
    study = open_study(job, storage, name, config, space, limit)
    if bank.store is not None:
        study.set_user_attr("bank", {"storage": bank.store.safe_url, "key": bank.key})
    if not [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]:
        earlier = load_study(storage, warm_study).get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if warm_study else []
        _queue(study, trials, warm_starts(bank, space, job, config, warm_plans, earlier))
    else:
        _queue(study, trials, [])
    handle = None
    if workers > 1:
        from functools import partial

        from aqsearch.parallel import start_workers, worker_slots

        spec = {"job": job, "storage": storage, "name": name, "config": config, "limit": limit}
        handle = start_workers(partial(_worker_init, spec), _worker_run, worker_slots(workers)[1:] or [""])
    obj = Objective(job, bank, space, limit, DominationPruner() if config.prune else None)
    from aqsearch.capture import progress

    with progress(trials, f"search {name}", unit="trial") as bar:
        def tick():
            bar.n = min(len(study.get_trials(deepcopy=False, states=FINISHED)), trials)
            bar.refresh()

        drain(study, obj, config.heartbeat, tick)
    if handle is not None:
        handle.wait()
    return study


def _worker_init(spec: dict):
    """A worker process: the same job again (its model loaded anew), the bank, the study."""
    import torch

    from aqsearch.job import Job

    old = spec["job"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    job = Job.resolve(old.loaded.name, list(old.budgets), data=old.data, bank=old.bank, polish=old.polish, device=dev,
                      seed=old.seed, bank_storage=old.bank_storage)
    if job.describe() != old.describe():
        raise AqError("a study worker resolved another job than its parent's (model or data differ)")
    bank = job.new_bank()
    study = open_study(job, spec["storage"], spec["name"], spec["config"], study_space(bank, spec["config"].embeddings),
                       spec["limit"], create=False)
    return job, bank, study, spec


def _worker_run(state, _job) -> int:
    job, bank, study, spec = state
    space = study_space(bank, spec["config"].embeddings)
    obj = Objective(job, bank, space, spec["limit"], DominationPruner() if spec["config"].prune else None)
    drain(study, obj, spec["config"].heartbeat)
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def study(bank, limit: int, job, storage: str, name: str, trials: int = 16, config: StudyConfig = StudyConfig(),
          workers: int = 1) -> Plan:
    """The strategy: run (or continue) the study, return the front's best plan within ``limit``."""
    run_study(job, bank, storage, name, trials, config, limit, workers)
    return pick(storage, name, limit)[0]


# ---- reading a study ------------------------------------------------------------------------------
def pareto_front(storage: str, name: str) -> list[dict]:
    """The feasible Pareto front, fewest bytes first: one dict per trial with its evaluation fields."""
    study = load_study(storage, name)
    pts = []
    for t in study.best_trials:
        a = t.user_attrs
        pts.append({"trial": t.number, "kl_mean": t.values[0], "bytes": int(t.values[1]),
                    **{k: a.get(k) for k in FIELDS}, "score": a.get("score"), "warm_start": a.get("warm_start"),
                    "polished": False})
    return sorted(pts, key=lambda p: p["bytes"])


def pick(storage: str, name: str, limit: int) -> tuple[Plan, dict]:
    """The front's lowest-KL plan within ``limit`` bytes: (plan, its point)."""
    study = load_study(storage, name)
    if not study.user_attrs.get("aqsearch"):
        raise AqError(f"study {name!r} was not made by aqsearch search (it records no model size)")
    front = pareto_front(storage, name)
    if not front:
        raise AqError(f"study {name!r} has no finished feasible trial yet")
    fits = [p for p in front if p["bytes"] <= limit]
    if not fits:
        raise AqError(f"budget {format_bytes(limit)} ({limit:,} B) is below the smallest plan on the front: "
                      f"{format_bytes(front[0]['bytes'])} ({front[0]['bytes']:,} B, trial {front[0]['trial']})")
    best = min(fits, key=lambda p: p["kl_mean"])
    t = study.trials[best["trial"]]
    return Plan.from_layers(json.loads(t.user_attrs["plan"])), best


def study_info(storage: str, name: str) -> dict:
    """What the study recorded of its job (model, data, budget, weights count)."""
    info = load_study(storage, name).user_attrs.get("aqsearch")
    if not info:
        raise AqError(f"study {name!r} was not made by aqsearch search (it records no model size)")
    return info


def study_names(storage: str) -> list[str]:
    return optuna.get_all_study_names(make_storage(storage))


def hypervolume(points: list[tuple[float, float]], limit: int, kl_ref: float = 10.0) -> float:
    """Area dominated by ``(kl, bytes)`` points in the plane (log10 KL, bytes / limit), up to the
    reference (log10 kl_ref, 1). Infeasible points and points worse than ``kl_ref`` add nothing."""
    import math

    pts = sorted((b / limit, math.log10(max(k, 1e-12))) for k, b in points if b <= limit and k < kl_ref)
    ref_y, area, best_y = math.log10(kl_ref), 0.0, math.log10(kl_ref)
    xs = [p[0] for p in pts] + [1.0]
    for (x, y), x_next in zip(pts, xs[1:]):
        best_y = min(best_y, y)
        area += (x_next - x) * (ref_y - best_y)
    return area


def hypervolume_history(storage: str, name: str) -> list[float]:
    study = load_study(storage, name)
    limit = study.user_attrs["aqsearch"]["budget_bytes"]
    out, pts = [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE:
            pts.append((t.values[0], t.values[1]))
        if t.state in FINISHED:
            out.append(hypervolume(pts, limit))
    return out
