"""The polished front: what a user gets, beside the uniform hull that every front is judged against.

:func:`polished_front` runs, over a built bank, in one Optuna study (``name``; the score study beside it
is ``name + ":score"``):

1. **the uniform hull**: every uniform scheme of the menu (``hull="menu"``; ``"range"``: those around the
   budgets), polished exactly like a pick, measured on held-out text. Trials labelled ``uniform ...``.
2. **the score** (:mod:`aqsearch.bank.score`) fitted on every polished plan so far.
3. **the score study** (:func:`aqsearch.strategies.study.run_study`): the sampler moves plans along the
   score's front, warm-started by the knapsack on the fitted score at each budget.
4. **racing** (:mod:`aqsearch.strategies.racing`): the best-scored plans of each byte range climb the
   rungs in order of bytes; a plan that cannot beat a polished plan of no more bytes is PRUNED with its
   reason (optuna-dashboard shows it); the others are polished fully and COMPLETE with their held-out KL.
   After each one the score and the regressor are refitted and the score's rank correlation recorded.

In the study, a COMPLETE trial is a polished plan (values: held-out KL, bytes); nothing else is reported
as quality. :func:`front_points`, :func:`pick` and :func:`hull_points` read it back.

>>> staircase([(0.5, 100, "a"), (0.2, 200, "b")], 150)
0.5
>>> round(hull_line([(1.0, 100, "a"), (0.2, 300, "b")], 200), 3)
0.6
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution

from aqsearch.bank import score as scoring
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.storage import load_study, make_storage
from aqsearch.strategies.racing import PlanRegressor, Polisher, stop_reason
from aqsearch.strategies.study import StudyConfig, held_info, other_settings, run_study

DONE = optuna.trial.TrialState.COMPLETE
PRUNED = optuna.trial.TrialState.PRUNED
FIELDS = ("kl_p99", "kl_max", "top1", "ppl", "ppl_ref", "ppl_ratio", "bytes_total", "bpw", "tokens", "seconds")
METRICS = ["held-out KL after the polish (nats/token)", "bytes"]


@dataclass(frozen=True)
class FrontConfig:
    hull: str = "menu"  # "menu": every scheme of the menu; "range": those that bracket the budgets
    promote: int = 3  # plans a byte range sends to the race
    trials: int = 200  # trials of the score study (no model evaluation: milliseconds each)
    race: bool = True  # False: polish every promoted plan fully (the comparison racing is measured against)
    prefix: float = 1 / 3  # share of the blocks polished at rung 1
    by: str = "kind"  # the score's groups (aqsearch.bank.score.group_of)
    seed: int = 0


def log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)


def hull_schemes(space, menu, budgets, mode: str) -> list[str]:
    """The uniform schemes to polish, fewest bytes first: all of ``menu``, or (``range``) those within the
    largest budget, from the second largest that fits the smallest budget upward."""
    size = {s: space.bytes(space.uniform(s)) for s in menu}
    order = sorted(menu, key=size.get)
    if mode == "menu":
        return order
    if mode != "range":
        raise AqError(f"hull must be 'menu' or 'range', got {mode!r}")
    below = [s for s in order if size[s] <= budgets[0]]
    lo = size[below[-2]] if len(below) > 1 else 0
    return [s for s in order if lo <= size[s] <= budgets[-1]]


# ---- running --------------------------------------------------------------------------------------
class Front:
    """The front study of one job and bank, and the work that fills it (see the module)."""

    def __init__(self, job, bank, storage: str, name: str, workdir: str | Path, config: FrontConfig = FrontConfig()):
        self.job, self.bank, self.storage, self.name, self.config = job, bank, storage, name, config
        self.work = Path(workdir)
        self.study = _open(job, bank, storage, name, config)
        self.dists = {u.name: CategoricalDistribution(list(u.choices)) for u in bank.units}
        self.polisher = Polisher(job, self.work / "polished", config.prefix)
        self.reg = PlanRegressor()
        self.score = scoring.Score(by=config.by)
        self._refit()

    # trials of the front study
    def _trials(self, states=(DONE, PRUNED)):
        return self.study.get_trials(deepcopy=False, states=states)

    def _done(self, choice: dict):
        for t in self._trials():
            if t.params == choice:
                return t
        return None

    def polished(self) -> list[tuple[float, int, str]]:
        return [(t.values[0], int(t.values[1]), t.user_attrs.get("label", f"trial {t.number}")) for t in self._trials((DONE,))]

    def _refit(self) -> None:
        """Regressor and score refitted on every polished plan; the score's rank correlations recorded."""
        done = self._trials((DONE,))
        self.reg = PlanRegressor()
        for t in done:
            self.reg.add({k: v for k, v in t.user_attrs["rungs"].items() if k in ("0", "1")}, t.values[0])
        rows = [(scoring.features(self.bank, dict(t.params), self.config.by), t.values[0]) for t in done]
        self.score = scoring.fit(rows, self.config.by, history=self.score.history)
        raced = [t for t in done if not t.user_attrs.get("hull") and "score" in t.user_attrs]
        ahead = scoring.rank_correlation([t.user_attrs["score"] for t in raced], [t.values[0] for t in raced])
        last = self.score.history[-1] if self.score.history else {}
        fits = list(self.study.user_attrs.get("score_fits", [])) + [
            {"polished": len(rows), "leave_one_out": {k: last.get(k) for k in ("n", "spearman", "kendall")},
             "raced_score_vs_kl": ahead, "weights": last.get("weights", {})}]
        self.study.set_user_attr("score_fits", fits)

    def _run(self, choice: dict, label: str, attrs: dict, race: bool) -> optuna.trial.FrozenTrial:
        """One plan as a trial: raced (rungs 0 and 1, may stop) or polished fully."""
        old = self._done(choice)
        if old is not None:
            return old
        for t in self._trials((optuna.trial.TrialState.RUNNING,)):  # left by a crash: the journal keeps its blocks
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self.study.enqueue_trial(choice, user_attrs={"label": label, **attrs})
        trial = self.study.ask(self.dists)
        plan = self.bank.plan(choice)
        nbytes = self.bank.bytes(choice)
        tag = f"trial-{trial.number:04d}"
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [float(nbytes - self.job.limit)])
        trial.set_user_attr("bytes", nbytes)
        full = self.polisher.steps_full(plan)
        trial.set_user_attr("steps_full", full)
        rungs = {"0": self.polisher.rtn(plan)}
        # rungs as intermediate values (optuna-dashboard draws them; Trial.report refuses multi-objective)
        trial.storage.set_trial_intermediate_value(trial._trial_id, 0, rungs["0"])
        for r in ("0", "1") if race else ():
            spent = 0
            if r == "1":
                rungs["1"], spent = self.polisher.prefix(plan, tag)
                trial.storage.set_trial_intermediate_value(trial._trial_id, 1, rungs["1"])
            pred = self.reg.predict(rungs)
            trial.set_user_attr(f"prediction_{r}", pred)
            why = stop_reason(pred, nbytes, self.polished())
            if why:
                for k, v in (("rungs", rungs), ("steps", spent), ("stopped_because", f"rung {r}: {why}"),
                             ("polished", False)):
                    trial.set_user_attr(k, v)
                self.study.tell(trial, state=PRUNED)
                log(f"{label}: stopped at rung {r} ({why})")
                return trial.storage.get_trial(trial._trial_id)
        res = self.polisher.full(plan, tag, rungs["0"], measure_prefix=not race)
        m = res["measurement"]
        for k in FIELDS:
            trial.set_user_attr(k, m[k])
        trial.set_user_attr("rungs", {**rungs, **res["rungs"]})
        trial.set_user_attr("steps", res["steps"])
        trial.set_user_attr("artifact", res["artifact"])
        trial.set_user_attr("kept_polish", res["kept"])
        trial.set_user_attr("polished", True)
        self.study.tell(trial, [m["kl_mean"], float(nbytes)])
        log(f"{label}: {nbytes:,} B, held-out KL {m['kl_mean']:.4f} (polished)")
        self._refit()
        return trial.storage.get_trial(trial._trial_id)

    def hull(self) -> list:
        """Step 1: every uniform scheme of the hull, polished (rung 1 measured on the way: regressor points)."""
        schemes = hull_schemes(self.bank.space, self.bank.config.menu, self.job.budgets, self.config.hull)
        return [self._run(self.bank.space.uniform(s), f"uniform {s}", {"hull": True, "uniform": s}, race=False)
                for s in schemes]

    def search(self, trials: int | None = None):
        """Step 3: the score study (warm-started by the knapsack on the fitted score at every budget)."""
        cfg = StudyConfig(seed=self.config.seed, warm_knapsack=len(self.job.budgets))
        return run_study(self.job, self.bank, self.storage, self.name + ":score", trials or self.config.trials, cfg,
                         self.job.limit, score=self.score)

    def promoted(self, score_study) -> list[tuple[dict, str, float]]:
        """Step 4's entrants: per byte range (between consecutive budgets), the ``promote`` best-scored
        plans that are not uniform, fewest bytes first: ``(choice, label, score)``."""
        cands = {}
        for t in score_study.get_trials(deepcopy=False, states=(DONE,)):
            key = tuple(sorted(t.params.items()))
            if len(set(t.params.values())) > 1 and key not in cands:
                cands[key] = (dict(t.params), t.user_attrs.get("warm_start") or f"score trial {t.number}",
                              self.score(self.bank, t.params), self.bank.bytes(t.params))
        out, lo = [], 0
        for b in self.job.budgets:
            rng = sorted((c for c in cands.values() if lo < c[3] <= b), key=lambda c: c[2])[: self.config.promote]
            out += rng
            lo = b
        return [(c, lab, s) for c, lab, s, _ in sorted(out, key=lambda c: c[3])]

    def race(self, entrants, stop=None) -> list:
        """Step 4: each entrant raced (or, ``race=False``, polished fully), fewest bytes first; once ``stop()``
        is true (a deadline) the rest are left unraced: the trials of those raced."""
        out = []
        for c, lab, s in entrants:
            if stop is not None and stop():
                break
            out.append(self._run(c, lab, {"score": s, "hull": False}, self.config.race))
        return out

    def run(self) -> dict:
        self.hull()  # each polished plan refits the score: the search below uses the hull's fit
        entrants = self.promoted(self.search())
        self.race(entrants)
        return summary(self.storage, self.name)


def _open(job, bank, storage: str, name: str, config: FrontConfig) -> optuna.Study:
    """Create or load the front study; one made for another job or budget is refused (one line)."""
    info = {"model": job.loaded.name, "fingerprint": job.loaded.fingerprint, "budget_bytes": job.limit,
            "budgets": list(job.budgets), "weights": bank.space.weights, "units": len(bank.units),
            "job": job.describe(), "front": asdict(config), "bank": {"storage": bank.store.safe_url, "key": bank.key}}
    info = json.loads(json.dumps(info))
    held = held_info(storage, name)
    if held is not None:
        # trials and promote only add work: a study resumed with more of either goes on
        same = lambda d: {k: v for k, v in (d or {}).items() if k not in ("trials", "promote")}  # noqa: E731
        diff = [k for k in ("job", "budgets", "units") if held.get(k) != info[k]]
        diff += ["front"] if same(held.get("front")) != same(info["front"]) else []
        if diff:
            raise other_settings(name, diff)
    study = optuna.create_study(storage=make_storage(storage, None), study_name=name,
                                directions=["minimize", "minimize"], load_if_exists=True)
    if study.user_attrs.get("aqsearch") is None:
        study.set_metric_names(METRICS)
        study.set_user_attr("aqsearch", info)
    return study


def polished_front(job, bank, storage: str, name: str, workdir: str | Path, config: FrontConfig = FrontConfig()) -> dict:
    """Steps 1-4 of the module over a built bank; returns :func:`summary`."""
    return Front(job, bank, storage, name, workdir, config).run()


# ---- reading --------------------------------------------------------------------------------------
def _point(t) -> dict:
    a = t.user_attrs
    base = {"trial": t.number, "label": a.get("label"), "hull": bool(a.get("hull")), "steps": a.get("steps"),
            "steps_full": a.get("steps_full"), "score": a.get("score")}
    if t.state == DONE:
        return {**base, "polished": True, "kl_mean": t.values[0], "bytes": int(t.values[1]),
                **{k: a.get(k) for k in FIELDS}, "artifact": a.get("artifact")}
    return {**base, "polished": False, "kl_mean": None, "bytes": a.get("bytes"), "stopped_because": a.get("stopped_because"),
            "predicted_kl": a.get("prediction_1") or a.get("prediction_0")}


def front_study(storage: str, name: str):
    """The front study ``name``, loaded once for the readers below (one of another kind is refused)."""
    study = load_study(storage, name)
    if not study.user_attrs.get("aqsearch", {}).get("front"):
        raise AqError(f"study {name!r} holds no polished front (made by another aqsearch command or version)")
    return study


def front_points(storage: str, name: str) -> list[dict]:
    """The polished Pareto front (``"polished": true``), then the plans racing stopped (``false``, with a
    prediction, never a KL), fewest bytes first."""
    return points_of(front_study(storage, name))


def points_of(study) -> list[dict]:
    """:func:`front_points` of a loaded :func:`front_study`."""
    done = [t for t in study.get_trials(deepcopy=False, states=(DONE,))]
    front = [t for t in done if not any(u.values[0] <= t.values[0] and u.values[1] <= t.values[1] and u.values != t.values
                                        for u in done)]
    pts = [_point(t) for t in front] + [_point(t) for t in study.get_trials(deepcopy=False, states=(PRUNED,))]
    return sorted(pts, key=lambda p: (p["bytes"], not p["polished"]))


def hull_points(storage: str, name: str) -> list[tuple[float, int, str]]:
    """The polished uniform schemes: ``(kl, bytes, scheme)``, fewest bytes first."""
    return hull_of(front_study(storage, name))


def hull_of(study) -> list[tuple[float, int, str]]:
    """:func:`hull_points` of a loaded :func:`front_study`."""
    return sorted(((t.values[0], int(t.values[1]), t.user_attrs["uniform"])
                   for t in study.get_trials(deepcopy=False, states=(DONE,)) if t.user_attrs.get("hull")),
                  key=lambda p: p[1])


def staircase(hull: list[tuple[float, int, str]], nbytes: int) -> float | None:
    """The best polished uniform KL within ``nbytes`` (``None``: no uniform scheme fits)."""
    fits = [kl for kl, b, _ in hull if b <= nbytes]
    return min(fits) if fits else None


def lower_hull(hull: list[tuple[float, int, str]]) -> list[tuple[float, int, str]]:
    """The lower convex hull of the uniform points in the (bytes, KL) plane, fewest bytes first."""
    pts = sorted(hull, key=lambda p: (p[1], p[0]))
    out: list = []
    for p in pts:
        while len(out) >= 2:
            (k1, b1, _), (k2, b2, _) = out[-2], out[-1]
            if (k2 - k1) * (p[1] - b1) >= (p[0] - k1) * (b2 - b1):  # out[-1] above the chord: drop it
                out.pop()
            else:
                break
        if out and p[0] >= out[-1][0]:
            continue  # more bytes, no better: not on the lower-left hull
        out.append(p)
    return out


def hull_line(hull: list[tuple[float, int, str]], nbytes: int) -> float | None:
    """The lower hull's KL at ``nbytes`` (linear between its neighbouring points; ``None`` outside)."""
    h = lower_hull(hull)
    for (k1, b1, _), (k2, b2, _) in zip(h, h[1:]):
        if b1 <= nbytes <= b2:
            return k1 + (k2 - k1) * (nbytes - b1) / (b2 - b1)
    return h[-1][0] if h and nbytes >= h[-1][1] else None


def pick(storage: str, name: str, limit: int) -> dict:
    """The best *polished* plan within ``limit`` bytes (its point, with the artifact's path): no recompute."""
    study = front_study(storage, name)
    done = [t for t in study.get_trials(deepcopy=False, states=(DONE,))]
    if not done:
        raise AqError(f"study {name!r} has no polished plan yet")
    fits = [t for t in done if t.values[1] <= limit]
    if not fits:
        small = min(done, key=lambda t: t.values[1])
        raise AqError(f"budget {format_bytes(limit)} ({limit:,} B) is below the smallest polished plan: "
                      f"{format_bytes(int(small.values[1]))} ({int(small.values[1]):,} B, trial {small.number})")
    return _point(min(fits, key=lambda t: t.values[0]))


def best_uniform(storage: str, name: str, limit: int) -> dict | None:
    """The staircase at ``limit``: the best polished uniform scheme within it (its point), or ``None``."""
    study = front_study(storage, name)
    fits = [t for t in study.get_trials(deepcopy=False, states=(DONE,)) if t.user_attrs.get("hull") and t.values[1] <= limit]
    if not fits:
        return None
    t = min(fits, key=lambda t: t.values[0])
    return {"scheme": t.user_attrs["uniform"], **_point(t)}


def summary(storage: str, name: str) -> dict:
    """Front, hull, racing's steps, the score's correlations: what ``run``, ``search`` and the benchmark report."""
    study = front_study(storage, name)
    raced = [t for t in study.get_trials(deepcopy=False, states=(DONE, PRUNED)) if not t.user_attrs.get("hull")]
    spent = sum(t.user_attrs.get("steps") or 0 for t in raced)
    full = sum(t.user_attrs.get("steps_full") or 0 for t in raced)
    return {"study": name, "front": points_of(study),
            "hull": [{"scheme": s, "kl_mean": kl, "bytes": b} for kl, b, s in hull_of(study)],
            "racing": {"promoted": len(raced), "full_polishes": sum(t.state == DONE for t in raced),
                       "stopped": sum(t.state == PRUNED for t in raced), "steps": spent, "steps_if_all_full": full,
                       "steps_saved": full - spent},
            "score_fits": study.user_attrs.get("score_fits", [])}


def save_pick(point: dict, name: str, out) -> None:
    """The picked point's artifact (its sha256 checked as it loads) saved to ``out``, marked with its study and
    trial: what ``run`` and ``pick`` write."""
    from aqsearch.artifact import Artifact

    art = Artifact.load(point["artifact"])
    Artifact(art.plan, art.tensors, {**art.meta, "strategy": "study", "study": name, "trial": point["trial"]}).save(out)


def study_info(storage: str, name: str) -> dict:
    """What the front study recorded of its job (model, budgets, weights count)."""
    return dict(front_study(storage, name).user_attrs["aqsearch"])
