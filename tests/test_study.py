"""The score study on a tiny model: space, score front, warm starts on the fitted score, reproducibility,
crash and resume, workers, settings carried by the study. (The polished front: tests/test_front.py.)"""

import time
import warnings

import optuna
import pytest

from aqsearch.memory import plan_bytes
from aqsearch.bank import build_plan
from aqsearch.storage import load_study
from aqsearch.strategies.study import hypervolume
from aqsearch.space import FULL, build_space
from tinymodels import tiny_model

DATA = dict(calib_windows=4, calib_seqlen=32, eval_tokens=64, seqlen=32)


@pytest.fixture(scope="module")
def job_bank(tiny_dir):
    """A tiny job and its layer bank (round-to-nearest), shared by the score studies below."""
    from aqsearch.bank import BankConfig
    from aqsearch.job import DataConfig, Job

    job = Job.resolve(str(tiny_dir), "6bpw", data=DataConfig(**DATA), bank=BankConfig(menu=MENU, granularity="layer", steps=0))
    bank = job.new_bank()
    bank.build()
    return job, bank


MENU = ("w8g128", "w4g64", "w4g128", "w3g64", "w2g64")


def score_study(job_bank, storage, name, trials, **cfg):
    from aqsearch.strategies.study import StudyConfig, run_study

    job, bank = job_bank
    workers = cfg.pop("workers", 1)
    score = cfg.pop("score", None)
    return run_study(job, bank, storage, name, trials, StudyConfig(**cfg), workers=workers, score=score)


def test_space_bytes_are_exact():
    """Catches a space whose byte count differs from the one bytes function on the plan it builds."""
    import random

    m = tiny_model()
    for gran, emb in (("layer", False), ("block", False), ("layer", True)):
        sp = build_space(m, gran, embeddings=emb)
        rnd = random.Random(0)
        for _ in range(5):
            params = {u.name: rnd.choice(u.choices) for u in sp.units}
            assert sp.bytes(params) == plan_bytes(m, build_plan(sp.units, params), list(sp.layers)).bytes
    assert len(build_space(m, "block").units) == 2 and len(build_space(m, "layer", tie=False).units) == 14
    emb = build_space(m, "layer", embeddings=True).units[0]
    assert emb.name == "model.embed_tokens" and FULL in emb.choices


def test_hypervolume_hand_computed():
    # limit 100: points (kl=1, 50 B) and (kl=0.1, 100 B); reference (log10 10 = 1, x = 1)
    # area = (1.0 - 0.5) * (1 - 0) + 0 (second point at x=1 adds a zero-width strip)
    assert hypervolume([(1.0, 50), (0.1, 100)], 100) == pytest.approx(0.5)
    assert hypervolume([(1.0, 50), (0.1, 75)], 100) == pytest.approx(0.25 * 1 + 0.25 * 2)
    assert hypervolume([(1.0, 150)], 100) == 0.0


@pytest.fixture(scope="module")
def study(job_bank, tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{d}/s.db"
    score_study(job_bank, url, "s", 14)
    return url, d


def test_front_is_non_dominated_and_warm_started(study):
    """Catches a score front holding dominated points, predictions passed off as measurements, or a study
    without its uniform warm starts and stored fields."""
    from aqsearch.strategies.study import score_front

    url, d = study
    pts = score_front(url, "s")
    assert pts and all(p["polished"] is False and p["kl_mean"] is None for p in pts)
    for a in pts:
        assert not any(b["bytes"] <= a["bytes"] and b["score"] < a["score"] for b in pts if b is not a)
    st = load_study(url, "s")
    finished = st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == 14 and "predicted" in st.metric_names[0]
    assert any(t.user_attrs.get("warm_start", "").startswith("uniform") for t in finished)
    t = finished[0]
    assert {"score", "plan"} <= set(t.user_attrs) and t.system_attrs["constraints"]


def test_knapsack_on_the_fitted_score_starts_the_study(job_bank, tmp_path):
    """The warm starts are the knapsack on the *fitted* score at exactly each budget: a score that weighs
    4-bit errors 0 makes every knapsack start all 4-bit where it fits (catches starts solved on the
    composed sum, starts over their budgets, or repeats)."""
    from aqsearch.bank.score import Score

    job, bank = job_bank
    url = f"sqlite:///{tmp_path}/k.db"
    free4 = Score({"w2": 1.0, "w3": 1.0, "w4": 0.0, "w8": 1.0}, by="bits")
    st = score_study(job_bank, url, "k", 8, score=free4)
    info = st.user_attrs["aqsearch"]
    seeds = sorted((float(t.user_attrs["warm_start"].split()[1]), t) for t in st.trials
                   if t.user_attrs.get("warm_start", "").startswith("knapsack"))
    assert len(seeds) >= 2 and seeds[-1][0] == pytest.approx(8 * info["budget_bytes"] / info["weights"], abs=0.01)
    for bpw, t in seeds:  # each allocation fits the budget it was solved for (its label rounds to 0.01 bpw)
        assert t.values[1] <= (bpw + 0.005) / 8 * info["weights"] and t.system_attrs["constraints"][0] <= 0
    top = seeds[-1][1]  # 6 bpw: every unit fits 4 bits; the free 4-bit errors make the knapsack take them
    assert all(v.startswith("w4") for v in top.params.values())
    assert top.values[0] == pytest.approx(0.0)
    sizes = [t.values[1] for _, t in seeds]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_feasible_front_by_hand():
    """Catches a front that keeps infeasible or dominated trials (hand-made trials)."""
    from aqsearch.strategies.sampler import feasible_front, scheme_cost

    def t(kl, b, c):
        return optuna.trial.create_trial(values=[kl, b], system_attrs={"constraints": [c]})
    trials = [t(0.1, 100, 0), t(0.2, 90, 0), t(0.3, 95, 0), t(0.05, 200, 1), t(0.1, 100, 0)]
    assert [(x.values[0], x.values[1]) for x in feasible_front(trials)] == [(0.1, 100), (0.2, 90), (0.1, 100)]
    assert scheme_cost("w4g64") == 4.3125 and scheme_cost("w4g64f") == 4.5 and scheme_cost("w4g64s") == 4.25 and scheme_cost("fp16") == 16


def test_local_sampler_moves_a_few_units_from_the_front(job_bank, tmp_path):
    """Catches a sampler whose trials jump far from the front or repeat each other."""
    url = f"sqlite:///{tmp_path}/l.db"
    st = score_study(job_bank, url, "l", 40, sampler="local")
    done = st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 40
    sampled = [t for t in done if "warm_start" not in t.user_attrs]
    assert len(sampled) >= 20
    for t in sampled:  # at most three moves (a block, a protection: up to one block's or one kind's units)
        earlier = [e for e in done if e.number < t.number]
        assert min(sum(e.params[k] != v for k, v in t.params.items()) for e in earlier) <= 3 * 4
    keys = [tuple(sorted(t.params.items())) for t in sampled]
    assert len(set(keys)) == len(keys)  # no sampled trial repeats another


def test_same_seed_same_front(job_bank, tmp_path):
    """Catches nondeterminism: the same seed must give the same front."""
    from aqsearch.strategies.study import score_front

    fronts = []
    for k in range(2):
        url = f"sqlite:///{tmp_path}/r{k}.db"
        score_study(job_bank, url, "r", 20, seed=3)
        fronts.append([(p["trial"], p["bytes"], round(p["score"], 10)) for p in score_front(url, "r")])
    assert fronts[0] == fronts[1]


def test_trial_taken_but_never_beating_is_run_again(job_bank, tmp_path):
    """A worker killed between taking a trial and its first heartbeat: the restart still runs it."""
    url = f"sqlite:///{tmp_path}/o.db"
    score_study(job_bank, url, "o", 4, heartbeat=1)
    st = load_study(url, "o")
    params = st.trials[1].params
    st.enqueue_trial(params)
    orphan = st.ask()  # RUNNING, no heartbeat: what a kill -9 inside Optuna's ask() leaves
    orphan.set_constraint("memory", st.trials[1].system_attrs["constraints"][0])  # ... once the objective began
    assert st.trials[orphan.number].state == optuna.trial.TrialState.RUNNING
    time.sleep(2.5)  # past the grace period: the trial's heartbeat is stale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_study(job_bank, url, "o", 4, heartbeat=1)
    assert not [w for w in caught if "constraint value is ignored" in str(w.message)]  # the rerun sets it once
    st = load_study(url, "o")
    assert st.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in st.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == params and retried[0].values == st.trials[1].values
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_trials_is_the_total_the_study_reaches(job_bank, tmp_path, capsys):
    """trials=N on a study of fewer trials queues the difference; on one of more, says so and adds none."""
    url = f"sqlite:///{tmp_path}/g.db"
    score_study(job_bank, url, "g", 4)
    first = {t.number: t.values for t in load_study(url, "g").trials}
    capsys.readouterr()
    score_study(job_bank, url, "g", 7)
    st = load_study(url, "g")
    assert len(st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 7
    assert all(st.trials[n].values == v for n, v in first.items())  # the first four kept as they were
    assert "adding 3 to reach 7" in capsys.readouterr().err
    score_study(job_bank, url, "g", 5)
    err = capsys.readouterr().err
    assert "already holds 7 trials, more than --trials 5" in err and len(load_study(url, "g").trials) == 7


def test_two_workers_on_postgresql(job_bank, postgres_url):
    """Catches workers that duplicate or lose trials on a shared RDB storage."""
    st = score_study(job_bank, postgres_url, "pg", 20, workers=2, heartbeat=5)
    finished = st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == 20 and len({t.number for t in finished}) == 20
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_trial_value_is_the_fitted_score_of_its_own_choice(job_bank, tmp_path):
    """Each trial's value is the fitted score of the trial's own choice, weights and all (catches a
    composed sum left as the objective, or a score taken from another choice)."""
    from aqsearch.bank.score import Score

    job, bank = job_bank
    sc = Score({"w2": 3.0, "w3": 0.5, "w4": 2.0, "w8": 0.25}, by="bits")
    st = score_study(job_bank, f"sqlite:///{tmp_path}/t.db", "t", 10, score=sc)
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        want = sum(sc.weights["w" + s[1]] * bank.get(u, s).error for u, s in t.params.items())
        assert t.values[0] == pytest.approx(want) and t.user_attrs["score"] == pytest.approx(want)
    mixed = next(t for t in complete if len({s[:2] for s in t.params.values()}) > 1)
    assert mixed.values[0] != pytest.approx(sum(bank.get(u, s).error for u, s in mixed.params.items()))


@pytest.mark.parametrize("change", ["seed", "budget"])
def test_resuming_a_study_with_other_settings_is_refused(study, job_bank, tiny_dir, change):
    """Catches a study that mixes two scorings into one front (other windows, seed or budget)."""
    from aqsearch.errors import AqError
    from aqsearch.job import DataConfig, Job
    from aqsearch.strategies.study import check_resumable

    url, _ = study
    job, bank = job_bank
    other = Job.resolve(job.loaded, "5bpw" if change == "budget" else "6bpw", data=DataConfig(**DATA), bank=job.bank,
                        seed=5 if change == "seed" else 0)
    with pytest.raises(AqError, match="other settings"):
        check_resumable(other, url, "s", other.limit)


def test_run_study_with_two_workers_from_python(job_bank, tmp_path):
    """run_study(..., workers=2) called from Python: a second process takes trials (catches a worker that
    re-runs the command line, dies at once, and leaves the study to one process)."""
    st = score_study(job_bank, f"journal:///{tmp_path}/w.log", "w", 4, heartbeat=2, workers=2)
    done = st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 4 and len({t.number for t in done}) == 4
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_ctrl_c_during_a_trial_queues_it_again(job_bank, tmp_path, monkeypatch):
    """An interrupt inside a trial (the second warm start here): the trial ends failed, and the same
    parameters are queued again with their label, so the rerun values that plan (catches a rerun that
    queues a new sampled trial in its place)."""
    import aqsearch.strategies.study as study_mod

    url = f"sqlite:///{tmp_path}/c.db"
    real = study_mod.Objective.__call__
    calls = []

    def interrupt_second(self, trial):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, trial)

    monkeypatch.setattr(study_mod.Objective, "__call__", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        score_study(job_bank, url, "c", 5, warm_knapsack=0)
    st = load_study(url, "c")
    failed = [t for t in st.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    label = failed[0].user_attrs["warm_start"]
    monkeypatch.setattr(study_mod.Objective, "__call__", real)
    score_study(job_bank, url, "c", 5, warm_knapsack=0)
    st = load_study(url, "c")
    again = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("warm_start") == label]
    assert len(again) == 1 and again[0].params == failed[0].system_attrs["fixed_params"]
