"""The score study: a scheme per unit, the fitted score against bytes, the budget as a constraint.

This module, its sampler (:mod:`aqsearch.strategies.sampler`), :mod:`aqsearch.storage`, the bank's store and
:mod:`aqsearch.plots` are the only ones that import optuna. A trial picks one scheme per unit of the bank's
space (plus embedding units with ``embeddings=True``), builds its plan through :func:`aqsearch.bank.build_plan`,
counts its exact bytes (``bytes - limit`` is its constraint, ``Trial.set_constraint``, mirrored into the
``constraints`` system attribute that optuna-dashboard reads) and is valued by the **fitted score**
(:class:`aqsearch.bank.score.Score`: the predicted polished KL, no model evaluation, so thousands of trials
cost seconds). Its values are predictions, never quality: the polished front
(:mod:`aqsearch.strategies.front`) races the best of them and reports what the polish measured.

Warm starts, queued first: the knapsack on the fitted score at exactly each of the job's budgets, the
uniform schemes (those that fit first), plans given, an earlier study's trials. ``trials`` is the number of trials the study should
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

from aqsearch.bank.core import build_plan
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.space import FULL, build_space
from aqsearch.storage import QueueEmpty, drain, load_study, make_storage

# heartbeats, set_constraint and objective names are marked experimental; they are what we need
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

METRICS = ["score: predicted polished KL (not measured)", "bytes"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass(frozen=True)
class StudyConfig:
    sampler: str = "local"  # moves around the front (aqsearch.strategies.sampler); or "tpe", "nsga2"
    population: int = 30  # NSGA-II's generation size
    seed: int = 0
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
    """Values trials by the fitted score (``score(bank, choice)``: the predicted polished KL)."""

    def __init__(self, bank, space, limit: int, score):
        self.bank, self.space, self.limit, self.score = bank, space, limit, score

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
        banked = {u.name: choice[u.name] for u in self.bank.units}  # embedding units are not banked
        score = float(self.score(self.bank, banked))
        trial.set_user_attr("score", score)
        trial.set_user_attr("plan", json.dumps(plan.to_json()["layers"]))
        return score, float(nbytes)


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


def warm_starts(bank, space, job, config: StudyConfig, score=None) -> list[tuple[str, dict]]:
    """Knapsack choices on the fitted ``score`` at the job's budgets (or spread up to the limit), then the
    uniform schemes (those within the limit first, largest first)."""
    from aqsearch.strategies.knapsack import knapsack_choice

    emb = {u.name: FULL for u in space.units if u.choices[0] == FULL}
    out: list[tuple[str, dict]] = []
    low = bank.bytes(bank.space.extreme(smallest=True))
    n = config.warm_knapsack
    budgets = job.budgets if len(job.budgets) > 1 or n <= 1 else tuple(
        low + (job.limit - low) * k // n for k in range(n, 0, -1))
    for b in (budgets if n else ()):
        c = knapsack_choice(bank, b, score=score)
        if c is not None and all({**emb, **c} != p for _, p in out):
            out.append((f"knapsack {8 * b / bank.space.weights:.3f} bpw", {**emb, **c}))
    if config.warm_uniform:
        common = sorted(set.intersection(*(set(u.choices) for u in bank.units)),
                        key=lambda c: (bank.bytes(bank.space.uniform(c)) > job.limit, -bank.bytes(bank.space.uniform(c))))
        out += [(f"uniform {c}", {**emb, **bank.space.uniform(c)}) for c in common]
    return out


def held_info(storage: str, name: str) -> dict | None:
    """What an existing study ``name`` recorded of its job (``None``: no such study); a study aqsearch did not
    make is refused (one line)."""
    st = make_storage(storage)
    if name not in optuna.get_all_study_names(st):
        return None
    held = optuna.load_study(study_name=name, storage=st).user_attrs.get("aqsearch")
    if held is None:
        raise AqError(f"study {name!r} in the storage was not made by aqsearch; use another --study name")
    return held


def other_settings(name: str, diff: list[str]) -> AqError:
    """The one line for a study resumed with settings other than it was made with (``diff``: what differs)."""
    return AqError(f"study {name!r} in the storage was made with other settings ({', '.join(diff)} differ); "
                   "use another --study name, or the settings it was made with")


def check_resumable(job, storage: str, name: str, limit: int) -> None:
    """Before any work: a study of this name that exists must have been made for this job and budget."""
    held = held_info(storage, name)
    if held is None:
        return
    mine = json.loads(json.dumps(job.describe()))
    if held.get("job") != mine or held.get("budget_bytes") != limit:
        diff = [k for k in mine if (held.get("job") or {}).get(k) != mine[k]]
        raise other_settings(name, diff + (["budget"] if held.get("budget_bytes") != limit else []))


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
              limit: int | None = None, workers: int = 1, score=None) -> optuna.Study:
    """Create or continue a study over a built bank and run trials until its queue is empty. ``score``: the
    fitted :class:`~aqsearch.bank.score.Score` (default: unfitted, the composed sum of bank errors)."""
    from aqsearch.bank.score import Score

    score = score or Score()
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
        _queue(study, trials, warm_starts(bank, space, job, config, score))
    else:
        _queue(study, trials, [])
    handle = None
    if workers > 1:
        from functools import partial

        from aqsearch.parallel import start_workers, worker_slots

        spec = {"job": job, "storage": storage, "name": name, "config": config, "limit": limit, "score": score.to_json()}
        handle = start_workers(partial(_worker_init, spec), _worker_run, worker_slots(workers)[1:] or [""])
    obj = Objective(bank, space, limit, score)
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
    from aqsearch.bank.score import Score

    obj = Objective(bank, space, spec["limit"], Score.from_json(spec["score"]))
    drain(study, obj, spec["config"].heartbeat)
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ---- reading a study ------------------------------------------------------------------------------
def score_front(storage: str, name: str) -> list[dict]:
    """The score study's feasible front, fewest bytes first: predictions only (``"polished": false``)."""
    study = load_study(storage, name)
    return sorted(({"trial": t.number, "score": t.values[0], "bytes": int(t.values[1]), "kl_mean": None,
                    "warm_start": t.user_attrs.get("warm_start"), "polished": False} for t in study.best_trials),
                  key=lambda p: p["bytes"])


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
