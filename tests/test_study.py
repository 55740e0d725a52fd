"""The study strategy on a tiny model: space, front, pick, reproducibility, crash and resume, workers,
pruning, settings carried by the study."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import optuna
import pytest

from aqsearch.cli import main
from aqsearch.memory import plan_bytes
from aqsearch.models import load_model
from aqsearch.bank import build_plan
from aqsearch.storage import load_study
from aqsearch.strategies.study import hypervolume, pareto_front
from aqsearch.space import FULL, build_space
from tinymodels import tiny_model

BASE = ["--eval-tokens", "64", "--seqlen", "32", "--calib-samples", "4", "--calib-seqlen", "32", "--budget", "6bpw"]


def search_argv(tiny_dir, storage, study, trials, *extra):
    return ["search", "--model", str(tiny_dir), "--storage", storage, "--study", study, "--trials", str(trials),
            *BASE, *extra]


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
def study(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{d}/s.db"
    assert main(search_argv(tiny_dir, url, "s", 14, "--json")) == 0
    return url, d


def test_front_is_non_dominated_and_warm_started(study, capsys):
    """Catches a front holding dominated points, or a study without its uniform warm starts and stored fields."""
    url, d = study
    assert main(["front", "--storage", url, "--study", "s", "--plot", str(d / "front.png"), "--json"]) == 0
    pts = json.loads(capsys.readouterr().out)["points"]
    assert pts and (d / "front.png").stat().st_size > 1000
    for a in pts:
        assert not any(b["bytes"] <= a["bytes"] and b["kl_mean"] < a["kl_mean"] for b in pts if b is not a)
    st = load_study(url, "s")
    finished = st.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 14
    assert any(t.user_attrs.get("warm_start", "").startswith("uniform") for t in finished)
    t = finished[0]
    assert {"kl_p99", "top1", "ppl_ratio", "plan"} <= set(t.user_attrs) and t.system_attrs["constraints"]


def test_knapsack_allocations_start_the_study(study):
    """Catches knapsack starts that exceed their budgets, repeat, or come in another order."""
    url, _ = study
    st = load_study(url, "s")
    info = st.user_attrs["aqsearch"]
    seeds = sorted((float(t.user_attrs["warm_start"].split()[1]), t) for t in st.trials
                   if t.user_attrs.get("warm_start", "").startswith("knapsack"))
    assert len(seeds) >= 2 and seeds[-1][0] == pytest.approx(8 * info["budget_bytes"] / info["weights"], abs=0.01)
    assert [t.number for _, t in seeds] == sorted(t.number for _, t in seeds)[::-1]  # the largest budget first
    for bpw, t in seeds:  # each allocation fits the budget it was solved for (its label rounds to 0.01 bpw)
        assert t.values[1] <= (bpw + 0.005) / 8 * info["weights"] and t.system_attrs["constraints"][0] <= 0
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


def test_local_sampler_moves_a_few_units_from_the_front(tiny_dir, tmp_path):
    """Catches a sampler whose trials jump far from the front or repeat each other."""
    url = f"sqlite:///{tmp_path}/l.db"
    assert main(search_argv(tiny_dir, url, "l", 26, "--sampler", "local")) == 0
    st = load_study(url, "l")
    done = st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 26
    sampled = [t for t in done if "warm_start" not in t.user_attrs]
    assert len(sampled) >= 5
    for t in sampled:  # at most three moves of at most two units each, from an earlier finished trial
        earlier = [e for e in done if e.number < t.number]
        assert min(sum(e.params[k] != v for k, v in t.params.items()) for e in earlier) <= 6
    keys = [tuple(sorted(t.params.items())) for t in sampled]
    assert len(set(keys)) == len(keys)  # no sampled trial repeats another


def test_pick_by_budget(study, tmp_path, capsys):
    """Catches a pick over the budget or not the least KL within it, and a refusal that writes a file."""
    url, _ = study
    front = pareto_front(url, "s")
    mid = front[len(front) // 2]
    out = tmp_path / "p.json"
    assert main(["pick", "--storage", url, "--study", "s", "--budget", str(mid["bytes"]), "--out", str(out), "--json",
                 "--no-polish"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["polished"] is False and "plan only" in capsys.readouterr().err + "plan only"
    assert got["bytes"] <= mid["bytes"]
    assert got["kl_mean"] == min(p["kl_mean"] for p in front if p["bytes"] <= mid["bytes"])
    assert json.loads(out.read_text())["version"] == 2
    assert main(["pick", "--storage", url, "--study", "s", "--budget", "10", "--out", str(tmp_path / "q.json"),
                 "--no-polish"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest plan on the front" in err[0] and not (tmp_path / "q.json").exists()


def test_same_seed_same_front(tiny_dir, tmp_path):
    """Catches nondeterminism: the same seed must give the same front."""
    fronts = []
    for k in range(2):
        url = f"sqlite:///{tmp_path}/r{k}.db"
        assert main(search_argv(tiny_dir, url, "r", 12, "--seed", "3")) == 0
        fronts.append([(p["trial"], p["bytes"], round(p["kl_mean"], 10)) for p in pareto_front(url, "r")])
    assert fronts[0] == fronts[1]


def test_budget_below_smallest_model(tiny_dir, tmp_path, capsys):
    """Catches a budget below every plan reaching the study instead of one line."""
    argv = search_argv(tiny_dir, f"sqlite:///{tmp_path}/b.db", "b", 3)
    argv[argv.index("6bpw")] = "1KiB"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest plan" in err[0]


def test_kill_9_then_restart_completes(tiny_dir, tmp_path):
    """Catches a restart that loses finished trials or never reruns the killed one."""
    url = f"sqlite:///{tmp_path}/k.db"
    argv = search_argv(tiny_dir, url, "k", 16, "--heartbeat", "1")
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-m", "aqsearch", *argv], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    done = []
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            done = load_study(url, "k").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        except Exception:
            continue
        if len(done) >= 4:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = {t.number: t.values for t in load_study(url, "k").get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert 4 <= len(before) < 16
    time.sleep(2.5)  # past the grace period: the killed trial's heartbeat is stale
    assert main(argv) == 0
    st = load_study(url, "k")
    after = {t.number: t.values for t in st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in before.items())  # no finished trial lost
    finished = st.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 16
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_trial_taken_but_never_beating_is_run_again(tiny_dir, tmp_path):
    """A worker killed between taking a trial and its first heartbeat: the restart still runs it."""
    url = f"sqlite:///{tmp_path}/o.db"
    argv = search_argv(tiny_dir, url, "o", 4, "--heartbeat", "1")
    assert main(argv) == 0
    st = load_study(url, "o")
    params = st.trials[1].params
    st.enqueue_trial(params)
    orphan = st.ask()  # RUNNING, no heartbeat: what a kill -9 inside Optuna's ask() leaves
    orphan.set_constraint("memory", st.trials[1].system_attrs["constraints"][0])  # ... once the objective began
    assert st.trials[orphan.number].state == optuna.trial.TrialState.RUNNING
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [w for w in caught if "constraint value is ignored" in str(w.message)]  # the rerun sets it once
    st = load_study(url, "o")
    assert st.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in st.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == params and retried[0].values == st.trials[1].values
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_trials_is_the_total_the_study_reaches(tiny_dir, tmp_path, capsys):
    """--trials N on a study of fewer trials queues the difference; on one of more, says so and adds none."""
    url = f"sqlite:///{tmp_path}/g.db"
    assert main(search_argv(tiny_dir, url, "g", 4)) == 0
    first = {t.number: t.values for t in load_study(url, "g").trials}
    capsys.readouterr()
    assert main(search_argv(tiny_dir, url, "g", 7)) == 0
    st = load_study(url, "g")
    assert len(st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 7
    assert all(st.trials[n].values == v for n, v in first.items())  # the first four kept as they were
    assert "adding 3 to reach 7" in capsys.readouterr().err
    assert main(search_argv(tiny_dir, url, "g", 5)) == 0
    err = capsys.readouterr().err
    assert "already holds 7 trials, more than --trials 5" in err and len(load_study(url, "g").trials) == 7


def test_two_workers_on_postgresql(tiny_dir, postgres_url):
    """Catches workers that duplicate or lose trials on a shared RDB storage."""
    argv = search_argv(tiny_dir, postgres_url, "pg", 20, "--workers", "2", "--heartbeat", "5")
    assert main(argv) == 0
    st = load_study(postgres_url, "pg")
    finished = st.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 20
    assert len({t.number for t in finished}) == 20
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_trained_bank_scores_every_trial(tiny_dir, tmp_path):
    """A study over a trained bank records each trial's bank score (catches a score left out, or taken
    from another choice than the trial's)."""
    from aqsearch.bank import Bank, BankConfig

    url = f"sqlite:///{tmp_path}/t.db"
    assert main(search_argv(tiny_dir, url, "t", 8, "--train", "--steps", "6", "--granularity", "block",
                            "--kernel-schemes")) == 0
    st = load_study(url, "t")
    info = st.user_attrs["aqsearch"]["job"]
    assert st.user_attrs["bank"]["key"] and info["bank"]["steps"] == 6
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["score"] > 0 for t in complete)
    # the score is the sum of the bank's errors of the trial's own choice
    from aqsearch.job import DataConfig, Job

    m = load_model(str(tiny_dir))
    j = info
    job = Job.resolve(m, "6bpw", data=DataConfig(**j["data"]), bank=BankConfig(**{**j["bank"], "menu": tuple(j["bank"]["menu"])}))
    bank = Bank(m.model, m.fingerprint, job.calib, job.bank, job.bank_storage)
    t = complete[-1]
    assert t.user_attrs["score"] == pytest.approx(sum(bank.get(u, s).error for u, s in t.params.items()))


def test_pruned_trials_in_a_real_study_carry_their_reason(tiny_dir):
    """The study's objective asks the pruner before evaluating: with finished trials made by hand (KL 0 at
    few bytes and a tiny score), a trial of more bytes is pruned, with its reason in the trial; in a study without such a
    trial the same plan is evaluated. Catches an objective that never consults the pruner."""
    from aqsearch.bank import BankConfig
    from aqsearch.job import DataConfig, Job
    from aqsearch.strategies.pruning import DominationPruner
    from aqsearch.strategies.study import Objective

    job = Job.resolve(str(tiny_dir), "6bpw", data=DataConfig(calib_windows=4, calib_seqlen=32, eval_tokens=64, seqlen=32),
                      bank=BankConfig(menu=("w8g128", "w2g64"), steps=0))
    bank = job.new_bank()
    bank.build()
    obj = Objective(job, bank, bank.space, job.limit, DominationPruner(min_finished=2))
    dist = {u.name: optuna.distributions.CategoricalDistribution(u.choices) for u in bank.units}
    small = {u.name: "w2g64" for u in bank.units}
    big = {u.name: "w8g128" for u in bank.units}
    beaten = optuna.create_study(directions=["minimize", "minimize"])
    for _ in range(2):  # KL 1e-3 at the fewest bytes, for a tiny score: KL/score ratio 1e6
        beaten.add_trial(optuna.trial.create_trial(values=[1e-3, float(bank.bytes(small))], params=small,
                                                   distributions=dist, user_attrs={"score": 1e-9}))
    beaten.enqueue_trial(big)
    beaten.optimize(obj, n_trials=1)
    t = beaten.trials[-1]
    assert t.state == optuna.trial.TrialState.PRUNED and "beaten" in t.user_attrs["pruned_because"]
    fresh = optuna.create_study(directions=["minimize", "minimize"])
    fresh.enqueue_trial(big)
    fresh.optimize(obj, n_trials=1)
    assert fresh.trials[-1].state == optuna.trial.TrialState.COMPLETE and fresh.trials[-1].values[0] >= 0


@pytest.mark.parametrize("change", ["seed", "budget"])
def test_resuming_a_study_with_other_settings_is_refused(study, tiny_dir, capsys, change):
    """Catches a study that mixes two scorings into one front (other windows, seed or budget)."""
    url, _ = study
    argv = search_argv(tiny_dir, url, "s", 14)
    argv += ["--seed", "5"] if change == "seed" else []
    if change == "budget":
        argv[argv.index("6bpw")] = "5bpw"
    n = len(load_study(url, "s").trials)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
    assert len(load_study(url, "s").trials) == n


def test_run_study_with_two_workers_from_python(tiny_dir, tmp_path):
    """run_study(..., workers=2) called from Python: a second process takes trials (catches a worker that
    re-runs the command line, dies at once, and leaves the study to one process)."""
    from aqsearch.bank import BankConfig
    from aqsearch.job import DataConfig, Job
    from aqsearch.strategies.study import StudyConfig, run_study

    job = Job.resolve(str(tiny_dir), "6bpw", data=DataConfig(calib_windows=4, calib_seqlen=32, eval_tokens=64, seqlen=32),
                      bank=BankConfig(menu=("w8g128", "w4g64", "w2g64"), steps=0))
    bank = job.new_bank()
    bank.build()
    url = f"journal:///{tmp_path}/w.log"
    st = run_study(job, bank, url, "w", 4, StudyConfig(heartbeat=2), workers=2)
    done = st.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(done) == 4 and len({t.number for t in done}) == 4
    assert not st.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_ctrl_c_during_a_trial_queues_it_again(tiny_dir, tmp_path, monkeypatch, capsys):
    """An interrupt inside a trial (the warm start uniform w8g128 here): the trial ends failed, and the same
    parameters are queued again with their label, so the rerun evaluates that plan (catches a rerun that
    queues a new sampled trial in its place); the command says one line, exit 130."""
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
    assert main(search_argv(tiny_dir, url, "c", 5, "--warm-knapsack", "0")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aqsearch: interrupted") and not any("Traceback" in l for l in err)
    st = load_study(url, "c")
    failed = [t for t in st.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    label = failed[0].user_attrs["warm_start"]
    monkeypatch.setattr(study_mod.Objective, "__call__", real)
    assert main(search_argv(tiny_dir, url, "c", 5, "--warm-knapsack", "0")) == 0
    st = load_study(url, "c")
    again = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("warm_start") == label]
    assert len(again) == 1 and again[0].params == failed[0].system_attrs["fixed_params"]
