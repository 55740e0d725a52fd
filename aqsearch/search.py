"""The Optuna study: per-unit schemes, held-out KL against bytes, a memory budget as a constraint.

This module and its sampler (:mod:`aqsearch.sampler`) are the only ones that import optuna. A trial
picks one scheme per unit of the :class:`~aqsearch.space.Space`, is scored on held-out windows (KL mean,
with perplexity ratio, top-1 and KL p99 stored beside it) and counts its exact bytes; ``bytes - budget``
is its constraint (``Trial.set_constraint``, mirrored into the ``constraints`` system attribute that
optuna-dashboard reads). With ``train=True`` a trial composes trained candidates of the bank
(:mod:`aqsearch.bank`, built and raced before the first trial) and costs one held-out evaluation; no
training happens inside a trial, except that a trial needing a candidate the race stopped is first
judged by the regressor's optimistic prediction (its measured KL with that unit at round-to-nearest,
scaled by the units' optimistic over round-to-nearest errors) and pruned when a finished trial of no
more bytes beats it (``optuna.TrialPruned``; the prediction is in its user attributes, so
optuna-dashboard shows it); otherwise the candidate is finished and the trial scored.

Storage: SQLite by default (one process); any RDB URL (PostgreSQL) for several workers and machines;
``journal:///path`` for several processes on one host. RDB storages get heartbeats: a trial whose
worker died is marked failed and run again with the same parameters. ``trials`` is the number of trials
the study should hold: a fresh study queues that many, one that holds fewer queues the difference, one
stopped midway goes on with its queue; workers take queued trials one at a time until none is left.

>>> # see README "Search" for a runnable example; tests/test_search.py runs studies on a tiny model
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import warnings

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled

from aqsearch.apply import WeightCache
from aqsearch.config import Budget, Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.quality import Measurement, build_reference, evaluate
from aqsearch.space import FULL, Space, build_space
from aqsearch.storage import load_study, make_storage, safe_url, storage_file  # noqa: F401 (re-exported)
from aqsearch.weights import trained_weight_fn

# heartbeats, set_constraint and objective names are marked experimental; they are what we need
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

METRICS = ["KL mean (nats/token)", "bytes"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING


class QueueEmpty(Exception):
    """Another worker took the last queued trial first; the trial made in its place ends as failed."""


@dataclass(frozen=True)
class SearchSettings:
    granularity: str = "layer"
    tie: bool = True
    embeddings: bool = False
    kernel_only: bool = False
    sym: bool = False
    sampler: str = "local"  # moves around the front (aqsearch.sampler); or "tpe", "nsga2"
    population: int = 30  # NSGA-II's generation size
    seed: int = 0
    eval_tokens: int = 4096
    seqlen: int = 512
    calib_windows: int = 16
    calib_seqlen: int = 256
    train: bool = False
    steps: int = 40
    prune: bool = True
    warm_uniform: bool = True
    warm_knapsack: int = 4  # knapsack allocations enqueued first, at this many budgets up to the limit
    unit_cache: bool = True  # the bank in the user cache folder, shared by workers, runs and studies
    schemes: tuple[str, ...] | None = None  # the menu of every decoder unit (None: every scheme)
    race: bool = True  # race the bank's candidates with the regressor
    warm_budgets: tuple[int, ...] = ()  # knapsack starts at exactly these byte budgets (else spread evenly)


def make_sampler(s: SearchSettings):
    if s.sampler == "tpe":
        # multivariate + group TPE. On SmolLM2's 210 layer units its samples stayed far from the front on
        # the CPU (README "Search"); "local" moves a few units of a front point instead.
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, n_startup_trials=10)
    if s.sampler == "local":
        from aqsearch.sampler import FrontMutationSampler

        return FrontMutationSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population)
    raise AqError(f"unknown sampler {s.sampler!r}: use tpe, nsga2 or local")


class Objective:
    """Scores trials; holds the model, the held-out reference, the weight cache and the bank."""

    def __init__(self, loaded, space: Space, ref, limit: int, settings: SearchSettings, batch: int, bank=None):
        self.loaded, self.space, self.ref, self.limit, self.s = loaded, space, ref, limit, settings
        self.batch, self.bank = batch, bank
        self.weights = WeightCache()

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        if "fixed_params" not in trial.storage.get_trial_system_attrs(trial._trial_id):
            trial.study.stop()
            raise QueueEmpty
        params = {u.name: trial.suggest_categorical(u.name, list(u.choices)) for u in self.space.units}
        plan = self.space.plan(params)
        nbytes = self.space.bytes(params)
        # a trial run again after its worker died carries the constraint its first run set (the same
        # parameters, so the same value): setting it again would only make Optuna warn
        if "constraints:memory" not in trial.storage.get_trial_system_attrs(trial._trial_id):
            trial.set_constraint("memory", float(nbytes - self.limit))
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [float(nbytes - self.limit)])
        if self.bank is not None:
            m = self.scored_from_bank(trial, params, plan, nbytes)
        else:
            m = evaluate(self.loaded.model, self.ref, plan, list(self.space.layers), self.weights, self.batch)
        for k in ("kl_p99", "kl_max", "top1", "ppl", "ppl_ref", "ppl_ratio", "bytes_total", "bpw"):
            trial.set_user_attr(k, getattr(m, k))
        trial.set_user_attr("plan", json.dumps(plan.to_json()["layers"]))
        return m.kl_mean, float(nbytes)

    def _eval(self, plan: Plan, tensors: dict) -> Measurement:
        return evaluate(self.loaded.model, self.ref, plan, list(self.space.layers), trained_weight_fn(tensors), self.batch)

    def scored_from_bank(self, trial, params: dict, plan: Plan, nbytes: int) -> Measurement:
        """One held-out evaluation of the bank's candidates (a stopped one judged first, see the module)."""
        bank = self.bank
        cands = [bank.get(u.name, params[u.name]) for u in bank.units]
        trial.set_user_attr("bank_candidates", [[c.unit, c.scheme] for c in cands])
        stopped = [c for c in cands if not c.finished]
        if stopped:
            trial.set_user_attr("stopped_candidates", [[c.unit, c.scheme] for c in stopped])
            tensors = {}
            for c in cands:
                if c.finished:
                    tensors.update(bank.tensors(c))
            m_mix = self._eval(plan, tensors)  # stopped units at round-to-nearest
            known = sum(c.trained_error for c in cands if c.finished)
            denom = known + sum(c.rtn_error for c in stopped)
            kl_opt = m_mix.kl_mean * (known + sum(c.optimistic for c in stopped)) / denom if denom > 0 else m_mix.kl_mean
            trial.set_user_attr("predicted_kl_optimistic", kl_opt)
            trial.set_user_attr("rtn_mix_kl_mean", m_mix.kl_mean)
            beaten_by = [t.number for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                         if t.values and t.values[1] <= nbytes and t.values[0] <= kl_opt]
            if self.s.prune and beaten_by:
                trial.set_user_attr("pruned_because", f"optimistic KL {kl_opt:.4g} (regressor) is dominated by "
                                                      f"trial {beaten_by[0]}")
                raise optuna.TrialPruned(f"dominated by trial {beaten_by[0]}")
            trial.set_user_attr("finished_candidates", [[c.unit, c.scheme] for c in stopped])
        from aqsearch.compose import compose

        _, tensors = compose(bank, {u.name: params[u.name] for u in bank.units})  # finishes stopped ones
        trial.set_user_attr("trained_units", [[c.unit, c.scheme] for c in cands])
        return self._eval(plan, tensors)


def _queue(study: optuna.Study, trials: int, warm: list[tuple[str, dict]]) -> None:
    """Make ``trials`` the number of trials the study holds (finished, running or queued; failed ones
    are run again, so they do not count): a fresh study gets the warm starts first, then blank trials
    (the sampler's); one that holds fewer gets blank trials for the difference; one that holds more
    keeps them, and says so."""
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


def warm_starts(space: Space, plans: list[str], earlier: list[optuna.trial.FrozenTrial], uniform: bool,
                limit: int | None = None) -> list[tuple[str, dict]]:
    """Uniform schemes (those within ``limit`` first, largest first: a short study still holds the best
    uniform scheme that fits), then the plans given, then an earlier study's trials."""
    out = []
    if uniform:
        common = set.intersection(*(set(u.choices) for u in space.units)) - {FULL}
        size = {c: space.bytes({u.name: c for u in space.units}) for c in common}
        for c in sorted(common, key=lambda c: (limit is not None and size[c] > limit, -size[c])):
            out.append((f"uniform {c}", {u.name: c for u in space.units}))
    for p in plans:
        out.append((f"plan {os.path.basename(p)}", space.params_of(Plan.load(p))))
    for t in earlier:
        if set(t.params) == {u.name for u in space.units}:
            out.append((f"earlier trial {t.number}", dict(t.params)))
    return out


def knapsack_starts(space: Space, bank, limit: int, n: int, budgets: tuple[int, ...] = ()) -> list[tuple[str, dict]]:
    """The knapsack allocation over the bank's errors (:func:`aqsearch.bank.knapsack_choice`) at exactly
    ``budgets`` (bytes), else at ``n`` budgets spread evenly from just above the space's smallest size to
    ``limit``: the baseline the search has to beat, so its starting point."""
    from aqsearch.compose import knapsack_choice

    low = space.bytes(space.extreme(smallest=True))
    if not budgets:
        budgets = tuple(low + (limit - low) * k // n for k in range(n, 0, -1)) if n > 0 else ()
    out = []
    for b in budgets:
        params = knapsack_choice(bank, b)
        if params is not None and all(params != p for _, p in out):
            out.append((f"knapsack {8 * b / space.weights:.3f} bpw", params))
    return out


def run_study(loaded, budget: str | Budget, trials: int, storage: str, study_name: str, settings: SearchSettings,
              calib: str | None = None, device: str = "cpu", warm_plans: list[str] = (), warm_study: str | None = None,
              workers: int = 1, worker: bool = False, argv: list[str] | None = None, heartbeat: int = 30,
              regressor=None, bank=None, score=None) -> optuna.Study:
    """Create or continue a study and run trials until its queue is empty. See the module docstring.

    ``bank`` (a :class:`aqsearch.bank.Bank` over this space's units) and ``score`` (the windows trials
    are scored on) replace the ones made from ``calib``."""
    from aqsearch.data import calib_eval_sets

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = build_space(loaded.model, settings.granularity, settings.tie, settings.embeddings,
                        settings.kernel_only, settings.sym)
    if settings.schemes:
        space = with_menu(space, settings.schemes)
    if settings.train and not settings.tie:
        raise AqError("a trained search needs tied units (the bank trains fused groups or blocks); drop --untie")
    limit = Budget.parse(budget).resolve(space.weights)
    smallest = space.bytes(space.extreme(smallest=True))
    if limit < smallest:
        raise AqError(f"budget {format_bytes(limit)} ({limit:,} B) is below the smallest model this space allows: "
                      f"{format_bytes(smallest)} ({smallest:,} B, {8 * smallest / space.weights:.3f} bpw)")
    if workers > 1 and storage.startswith("sqlite"):
        raise AqError("several workers need a storage that takes parallel writers: postgresql://... or journal:///file")
    st = make_storage(storage, heartbeat)
    study = optuna.create_study(storage=st, sampler=make_sampler(settings), study_name=study_name,
                                directions=["minimize", "minimize"], load_if_exists=True)
    if not worker:
        study.set_metric_names(METRICS)  # the names optuna-dashboard shows
        study.set_user_attr("aqsearch", {"model": loaded.name, "fingerprint": loaded.fingerprint,
                                         "budget_bytes": limit, "weights": space.weights,
                                         "settings": asdict(settings), "units": len(space.units)})
    fresh = not worker and not [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    # the same split of the calibration text for every worker: the first part builds the bank (and
    # the knapsack's unit errors), the rest scores
    n_cal = settings.calib_windows if settings.train or (fresh and settings.warm_knapsack) else 0
    if bank is not None:
        n_cal = 0
    cal, ev = calib_eval_sets(loaded, calib, calib, calib_windows=n_cal, calib_seqlen=settings.calib_seqlen,
                              eval_tokens=settings.eval_tokens, seqlen=settings.seqlen,
                              split=0.5 if calib else None)
    ev = score or ev
    if bank is None and n_cal:
        bank = study_bank(loaded, space, cal, settings, regressor)
    if bank is not None and not worker:
        from aqsearch.bankbuild import build_bank

        build_bank(bank, loaded.name)
        study.set_user_attr("bank", str(bank.dir))
    if fresh:
        earlier = load_study(storage, warm_study).get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if warm_study else []
        warm = knapsack_starts(space, bank, limit, settings.warm_knapsack, settings.warm_budgets) if bank is not None else []
        _queue(study, trials, warm + warm_starts(space, list(warm_plans), earlier, settings.warm_uniform, limit))
    elif not worker:
        _queue(study, trials, [])
    if not settings.train:
        bank = None  # a trial only scores round-to-nearest
    procs = []
    if workers > 1 and not worker:
        for k in range(1, workers):
            env = dict(os.environ, AQSEARCH_WORKER=str(k))
            procs.append(subprocess.Popen([sys.executable, "-m", "aqsearch", *(argv or []), "--worker"], env=env))
    batch = 8 if device.startswith("cuda") else 1
    ref = build_reference(loaded.model, ev, batch_size=batch, cache_key=loaded.fingerprint)
    obj = Objective(loaded, space, ref, limit, settings, batch, bank)

    def stop_when_queue_empty(study, _trial):
        if not study.get_trials(deepcopy=False, states=(WAITING,)):
            study.stop()

    from aqsearch.capture import progress

    done = lambda: len(study.get_trials(deepcopy=False, states=FINISHED))  # noqa: E731
    with progress(trials, f"search {study_name}", unit="trial") as bar:

        def tick(study, trial):
            bar.n = min(done(), trials)
            bar.refresh()

        tick(study, None)
        deadline = None
        seeded: set[int] = set()
        while True:
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial fails and is queued again
            if study.get_trials(deepcopy=False, states=(WAITING,)):
                study.optimize(obj, callbacks=[tick, stop_when_queue_empty], catch=(QueueEmpty,))
                deadline = None
                continue
            running = study.get_trials(deepcopy=False, states=(RUNNING,))
            if not running:
                break
            # running trials: another worker's, or a dead one's that turns stale after the grace period
            deadline = deadline or time.time() + 3 * heartbeat + 2
            if time.time() > deadline:
                # A worker killed between taking a trial (RUNNING) and its first heartbeat leaves a trial
                # Optuna never calls stale. Give each such trial one heartbeat: a live worker's goes on
                # beating, a dead one's turns stale after the grace period and is queued again.
                orphans = [t._trial_id for t in running if t._trial_id not in seeded]
                if not orphans or not is_heartbeat_enabled(study._storage):
                    break
                for tid in orphans:
                    study._storage.record_heartbeat(tid)
                seeded.update(orphans)
                deadline = None
                continue
            time.sleep(min(heartbeat, 5))
    for p in procs:
        p.wait()
    return study


def with_menu(space: Space, schemes) -> Space:
    """``space`` with ``schemes`` as the choices of its decoder units (embedding units keep theirs)."""
    from dataclasses import replace

    menu = tuple(str(QuantScheme.parse(x)) for x in schemes)
    return replace(space, units=tuple(replace(u, choices=menu) if u.block >= 0 and u.name != "lm_head" else u
                                      for u in space.units))


def study_bank(loaded, space: Space, calib, settings: SearchSettings, regressor=None):
    """The bank a study's trials compose: its decoder units and menu, ``settings.steps`` steps (0 when
    the study does not train: round-to-nearest errors for the knapsack only)."""
    from aqsearch.bank import Bank, BankSettings
    from aqsearch.io import cache_dir

    menu = next(u.choices for u in space.units if u.block >= 0 and u.name != "lm_head")
    bs = BankSettings(schemes=tuple(menu), granularity=space.granularity, steps=settings.steps if settings.train else 0,
                      batch=8, seed=settings.seed, race=settings.race)
    folder = cache_dir("bank") if settings.unit_cache else cache_dir("bank-" + str(os.getpid()))
    return Bank(folder, loaded.model, loaded.fingerprint, calib, bs, regressor if settings.train else None)


def study_names(storage: str) -> list[str]:
    return optuna.get_all_study_names(make_storage(storage))


# ---- reading a study ------------------------------------------------------------------------------
def pareto_front(storage: str, study_name: str) -> list[dict]:
    """The feasible Pareto front, fewest bytes first: one dict per trial with its evaluation fields."""
    study = load_study(storage, study_name)
    pts = []
    for t in study.best_trials:
        a = t.user_attrs
        pts.append({"trial": t.number, "kl_mean": t.values[0], "bytes": int(t.values[1]),
                    **{k: a.get(k) for k in ("kl_p99", "kl_max", "top1", "ppl", "ppl_ref", "ppl_ratio", "bytes_total", "bpw")},
                    "warm_start": a.get("warm_start"), "trained": bool(a.get("trained_units"))})
    return sorted(pts, key=lambda p: p["bytes"])


def pick(storage: str, study_name: str, budget: str | Budget) -> tuple[Plan, dict, dict]:
    """The front's lowest-KL plan within ``budget``: (plan, its point, its trained weights or {})."""
    study = load_study(storage, study_name)
    info = study.user_attrs.get("aqsearch")
    if not info:
        raise AqError(f"study {study_name!r} was not made by aqsearch search (it records no model size)")
    limit = Budget.parse(budget).resolve(info["weights"])
    front = pareto_front(storage, study_name)
    if not front:
        raise AqError(f"study {study_name!r} has no finished feasible trial yet")
    fits = [p for p in front if p["bytes"] <= limit]
    if not fits:
        raise AqError(f"budget {format_bytes(limit)} ({limit:,} B) is below the smallest plan on the front: "
                      f"{format_bytes(front[0]['bytes'])} ({front[0]['bytes']:,} B, trial {front[0]['trial']})")
    best = min(fits, key=lambda p: p["kl_mean"])
    t = study.trials[best["trial"]]
    plan = Plan.from_layers(json.loads(t.user_attrs["plan"]))
    tensors = {}
    if t.user_attrs.get("trained_units"):
        from aqsearch.compose import stored_tensors

        if "bank" not in study.user_attrs:
            raise AqError(f"trial {t.number} was trained, but study {study_name!r} names no bank")
        tensors = stored_tensors(study.user_attrs["bank"], t.user_attrs["trained_units"])
    return plan, best, tensors


def hypervolume(points: list[tuple[float, float]], limit: int, kl_ref: float = 10.0) -> float:
    """Area dominated by ``(kl, bytes)`` points in the plane (log10 KL, bytes / limit), up to the
    reference (log10 kl_ref, 1). Infeasible points and points worse than ``kl_ref`` add nothing."""
    pts = sorted((b / limit, math.log10(max(k, 1e-12))) for k, b in points if b <= limit and k < kl_ref)
    ref_y, area, best_y = math.log10(kl_ref), 0.0, math.log10(kl_ref)
    xs = [p[0] for p in pts] + [1.0]
    for (x, y), x_next in zip(pts, xs[1:]):
        best_y = min(best_y, y)
        area += (x_next - x) * (ref_y - best_y)
    return area


def hypervolume_history(storage: str, study_name: str) -> list[float]:
    study = load_study(storage, study_name)
    limit = study.user_attrs["aqsearch"]["budget_bytes"]
    out, pts = [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE:
            pts.append((t.values[0], t.values[1]))
        if t.state in FINISHED:
            out.append(hypervolume(pts, limit))
    return out
