"""The candidate bank on a tiny model: racing, reuse, workers, kill -9 (one host and two "hosts" on
PostgreSQL), hashes checked on read, disjoint windows, and the knapsack over the bank."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch

from aqsearch.bank import Bank, BankConfig, build_plan
from aqsearch.curves import CurveRegressor
from aqsearch.data import TokenSet
from aqsearch.errors import AqError
from aqsearch.memory import plan_bytes
from aqsearch.models import load_model
from aqsearch.strategies.knapsack import knapsack
from aqsearch.training import Curve

# w2g32f has the codes (so the error) of w2g32 at the bytes of w3g256, which is far better: above the
# menu's lower hull, it is the candidate the race must stop
MENU = ("w4g64", "w3g32", "w3g256", "w2g32", "w2g32f", "w8g128")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return TokenSet.from_ids(torch.randint(0, 320, (2000,), generator=g), 16, 8, "random ids")


def config(**kw):
    return BankConfig(**{"menu": MENU, "steps": 10, "batch": 4, **kw})


def sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'bank.db'}"


@pytest.fixture(scope="module")
def full_bank(loaded, calib, tmp_path_factory):
    """Every candidate trained to the end (no racing), seed 1: its curves fit the racing regressor."""
    b = Bank(loaded.model, loaded.fingerprint, calib, config(seed=1, race=False), sqlite(tmp_path_factory.mktemp("full")))
    b.build()
    return b


@pytest.fixture(scope="module")
def raced(full_bank, loaded, calib, tmp_path_factory):
    """A raced bank; its regressor is fitted on the full bank's curves of this model."""
    reg = CurveRegressor([Curve.from_json(c.curve) for c in full_bank.candidates()])
    bank = Bank(loaded.model, loaded.fingerprint, calib, config(), sqlite(tmp_path_factory.mktemp("raced")), reg)
    return bank, bank.build()


def unit_trials(bank) -> list:
    return [t for t in bank.store.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "unit" in t.user_attrs and not t.user_attrs.get("duplicate_of_finished")]


def test_racing_stops_dominated_candidates_and_scores_them_by_prediction(raced):
    """Catches a race that never stops (stopped == 0) and a stopped candidate scored as if trained."""
    bank, st = raced
    stopped = [c for c in bank.candidates() if not c.finished]
    assert st["stopped"] == len(stopped) >= 1
    assert st["steps_saved"] == sum(c.steps_saved for c in stopped) > 0
    for c in stopped:
        assert c.prediction and "dominated" in c.why and c.steps_run < 10 and c.trained_error is None
        assert c.error == float(c.prediction["0.5"]) and c.optimistic <= c.error <= c.pessimistic
    c = stopped[0]
    choice = {u.name: "w4g64" for u in bank.units}
    choice[c.unit] = c.scheme
    assert bank.score(choice) == pytest.approx(sum(bank.get(n, s).error for n, s in choice.items()))


def test_bank_plan_names_every_layer_of_every_unit(full_bank, loaded):
    """The one plan builder: a unit's scheme on each of its layers (catches a builder that drops units)."""
    choice = {u.name: ("w2g32" if u.block == 0 else "w8g128") for u in full_bank.units}
    plan = full_bank.plan(choice)
    for u in full_bank.units:
        for name in u.layers:
            assert str(plan.scheme_for(name)) == choice[u.name]
    assert plan == build_plan(full_bank.units, choice)
    assert plan_bytes(loaded.model, plan).bytes == full_bank.bytes(choice)
    with pytest.raises(AqError, match="no scheme for unit"):
        full_bank.plan({})


def test_two_worker_processes_build_one_bank_and_a_rerun_reuses_it(loaded, calib, tiny_dir, tmp_path):
    """Catches workers that build the same unit twice, or a rebuilt bank that trains again."""
    cfg = config(menu=("w4g64", "w2g64"), steps=4)
    bank = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path), model_source=str(tiny_dir))
    st = bank.build(workers=2)  # two CPU worker processes take units from the queue
    assert st["candidates"] == st["of"] == 4
    trials = unit_trials(bank)
    assert sorted(t.user_attrs["unit"] for t in trials) == sorted(u.name for u in bank.units)
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    again = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path), model_source=str(tiny_dir))
    again.build(workers=2)
    assert len(again.store.study.trials) == len(bank.store.study.trials)  # nothing queued or trained again


def test_held_out_windows_never_train(loaded, calib, tmp_path, monkeypatch):
    """Catches a bank that trains candidates on the windows that judge them."""
    import aqsearch.bank.build as build

    seen = []
    real = build.BlockTraining

    def spy(block, schemes, acts, y, train_idx, held, *a, **kw):
        seen.append((set(train_idx.tolist()), set(held.tolist())))
        return real(block, schemes, acts, y, train_idx, held, *a, **kw)

    monkeypatch.setattr(build, "BlockTraining", spy)
    Bank(loaded.model, loaded.fingerprint, calib, config(menu=("w4g64",), steps=2, race=False), sqlite(tmp_path)).build()
    assert seen and all(tr and he and not tr & he and tr | he == set(range(8)) for tr, he in seen)


def test_damaged_records_are_refused(loaded, calib, tmp_path):
    """Catches a bank that reads an edited or damaged candidate record without checking its hash."""
    cfg = config(menu=("w4g64",), steps=0)
    bank = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path))
    bank.build()
    import sqlite3

    t = unit_trials(bank)[0]
    recs = t.user_attrs["candidates"]
    recs[0]["rtn_error"] = 0.0
    with sqlite3.connect(tmp_path / "bank.db") as db:  # edited behind aqsearch's back
        n = db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'candidates'",
                       (json.dumps(recs), t._trial_id)).rowcount
    assert n == 1
    fresh = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path))
    with pytest.raises(AqError, match="sha256"):
        fresh.get(t.user_attrs["unit"], "w4g64")



def test_a_record_that_is_not_json_is_one_line(loaded, calib, tmp_path):
    """A record cut short in the storage (a full disk, a hand edit): one line naming the bank, not the
    JSONDecodeError that Optuna raises while it reads the trials."""
    cfg = config(menu=("w4g64",), steps=0)
    bank = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path))
    bank.build()
    import sqlite3

    t = unit_trials(bank)[0]
    with sqlite3.connect(tmp_path / "bank.db") as db:
        n = db.execute("UPDATE trial_user_attributes SET value_json = substr(value_json, 1, 40) WHERE trial_id = ? "
                       "AND key = 'candidates'", (t._trial_id,)).rowcount
    assert n == 1
    with pytest.raises(AqError, match=f"bank {bank.key} in .*not valid JSON"):
        Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path)).build()


def test_a_complete_bank_in_a_read_only_storage_is_read(loaded, calib, tmp_path, monkeypatch):
    """A finished bank needs no write: opened from a read-only file it gives its candidates (opening it
    used to write, and ended in Optuna's StorageInternalError)."""
    from tinymodels import read_only_sqlite

    cfg = config(menu=("w4g64", "w2g64"), steps=0)
    bank = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path))
    bank.build()
    want = {(c.unit, c.scheme): c.error for c in bank.candidates()}
    read_only_sqlite(tmp_path / "bank.db", monkeypatch)
    again = Bank(loaded.model, loaded.fingerprint, calib, cfg, sqlite(tmp_path))
    assert again.build()["candidates"] == len(want)
    assert {(c.unit, c.scheme): c.error for c in again.candidates()} == want


def test_an_unfinished_bank_in_a_read_only_storage_is_one_line(loaded, calib, tmp_path, monkeypatch):
    """A bank that still needs building, in a storage that cannot be written: one line, no traceback."""
    from tinymodels import read_only_sqlite

    Bank(loaded.model, loaded.fingerprint, calib, config(menu=("w4g64",), steps=0), sqlite(tmp_path)).build()
    read_only_sqlite(tmp_path / "bank.db", monkeypatch)
    with pytest.raises(AqError, match="cannot be written .*readonly database.* make it writable"):
        Bank(loaded.model, loaded.fingerprint, calib, config(menu=("w2g64",), steps=0), sqlite(tmp_path)).build()


WORKER = textwrap.dedent("""
    import os, signal, sys, torch
    from aqsearch.bank import Bank, BankConfig
    from aqsearch.bank.build import UnitBuilder
    from aqsearch.data import TokenSet
    from aqsearch.models import load_model
    if sys.argv[4:] == ["die"]:  # kill -9 as the second unit starts: one unit finished, one held (a known state)
        build_unit, calls = UnitBuilder.__call__, []
        def dying(self, name):
            calls.append(name)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return build_unit(self, name)
        UnitBuilder.__call__ = dying
    m = load_model(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    calib = TokenSet.from_ids(torch.randint(0, 320, (2000,), generator=g), 16, 8, "random ids")
    cfg = BankConfig(menu=("w4g64", "w3g64", "w2g64"), steps=int(sys.argv[3]), batch=4, race=False)
    Bank(m.model, m.fingerprint, calib, cfg, sys.argv[2], heartbeat=1).build()
""")


def check_complete_once(bank, before: dict):
    trials = unit_trials(bank)
    units = [t.user_attrs["unit"] for t in trials]
    assert sorted(units) == sorted(u.name for u in bank.units)  # nothing lost, nothing built twice
    for t in trials:
        if t.user_attrs["unit"] in before:
            assert t.user_attrs["sha256"] == before[t.user_attrs["unit"]]  # kept, not trained again
    assert any(t.state == optuna.trial.TrialState.FAIL for t in bank.store.study.get_trials(deepcopy=False))


@pytest.mark.parametrize("where", ["one host", "two hosts on PostgreSQL"])
def test_kill_9_mid_unit_then_another_worker_finishes(where, loaded, calib, tiny_dir, tmp_path, request):
    """A worker killed mid-unit: its unit turns stale (heartbeat), is queued again and finished by the
    next worker; finished units are kept. Catches a lost unit, a duplicated one, or a resume that hangs."""
    url = sqlite(tmp_path) if where == "one host" else request.getfixturevalue("postgres_url")
    steps = 12
    cfg = BankConfig(menu=("w4g64", "w3g64", "w2g64"), steps=steps, batch=4, race=False)
    if where != "one host":
        cfg = BankConfig(**{**cfg.__dict__, "seed": 7})  # a bank of its own in the shared server
        steps = None
    w = WORKER if steps else WORKER.replace("race=False)", "race=False, seed=7)")
    p = subprocess.run([sys.executable, "-c", w, str(tiny_dir), url, str(cfg.steps), "die"],
                       env=dict(os.environ, AQSEARCH_CACHE=str(tmp_path / "host-a")),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert p.returncode == -signal.SIGKILL
    probe = Bank(loaded.model, loaded.fingerprint, calib, cfg, url, heartbeat=1)
    before = {t.user_attrs["unit"]: t.user_attrs["sha256"] for t in unit_trials(probe)}
    assert len(before) == 1 < len(probe.units)
    q = subprocess.Popen([sys.executable, "-c", w, str(tiny_dir), url, str(cfg.steps)],
                         env=dict(os.environ, AQSEARCH_CACHE=str(tmp_path / "host-b")))
    assert q.wait(timeout=300) == 0
    check_complete_once(Bank(loaded.model, loaded.fingerprint, calib, cfg, url, heartbeat=1), before)


def test_knapsack_over_the_bank_meets_the_budget(full_bank, loaded):
    """Catches a knapsack whose plan exceeds the budget, or that invents a plan when nothing fits."""
    sizes = [c.bytes for c in full_bank.menu(full_bank.units[0])]
    budget = sum(min(c.bytes for c in full_bank.menu(u)) for u in full_bank.units) + max(sizes) - min(sizes)
    plan = knapsack(full_bank, budget, quantum=64)
    assert plan_bytes(loaded.model, plan).bytes <= budget
    assert knapsack(full_bank, 10) is None
