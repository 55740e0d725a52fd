"""Plan racing: the regressor's intervals, the stop rule, and a real race on a tiny model."""

import math

import optuna
import pytest

from aqsearch.strategies.racing import PlanRegressor, stop_reason


def test_regressor_learns_the_offset_and_narrows_with_data():
    """Rows where the full polish halves rung 1's KL: the prediction lands on it and its interval holds the
    truth and narrows as rows arrive; with no rows the interval is wide (catches an interval that never
    shrinks, or a regressor that ignores its rows)."""
    r = PlanRegressor()
    empty = r.predict({"0": 1.0, "1": 0.8})
    assert empty["lo"] < 0.8 / 2 and empty["hi"] > 0.8 * 2 and empty["n"] == 0
    widths = []
    for i, x in enumerate([0.3, 0.5, 0.7, 1.1, 1.6, 2.2, 3.0, 0.9]):
        r.add({"0": 2 * x, "1": x}, 0.5 * x * (1 + 0.01 * (-1) ** i))
        p = r.predict({"0": 1.6, "1": 0.8})
        widths.append(math.log(p["hi"] / p["lo"]))
        assert p["lo"] <= 0.4 * 1.02 and p["hi"] >= 0.4 * 0.98
    assert widths[-1] < widths[0] / 3
    assert r.predict({"0": 1.6, "1": 0.8})["mid"] == pytest.approx(0.4, rel=0.03)


def test_stop_rule_uses_the_optimistic_end_and_no_more_bytes():
    """A plan stops only when its *optimistic* end is beaten by a polished plan of no more bytes (catches a
    rule on the median or the pessimistic end, or one that lets bigger plans stop smaller ones)."""
    pred = {"lo": 0.30, "mid": 0.40, "hi": 0.55}
    assert stop_reason(pred, 1000, [(0.35, 900, "a")]) is None  # beats the median, not the optimistic end
    assert stop_reason(pred, 1000, [(0.25, 1001, "big")]) is None  # more bytes: no verdict
    why = stop_reason(pred, 1000, [(0.35, 900, "a"), (0.25, 1000, "uniform w3g64")])
    assert why and "uniform w3g64" in why and "0.25" in why


@pytest.fixture(scope="module")
def front(tiny_dir, tmp_path_factory):
    """A front study on the tiny model with its hull (two uniform schemes) polished."""
    from aqsearch.bank import BankConfig
    from aqsearch.job import DataConfig, Job
    from aqsearch.strategies.front import Front, FrontConfig
    from aqsearch.training import TrainSettings

    d = tmp_path_factory.mktemp("race")
    job = Job.resolve(str(tiny_dir), ["3bpw", "6bpw"], data=DataConfig(calib_windows=8, calib_seqlen=32, eval_tokens=64, seqlen=32),
                      bank=BankConfig(menu=("w8g128", "w4g64", "w2g64"), granularity="layer", steps=0),
                      polish=TrainSettings(steps=3, batch=4))
    bank = job.new_bank()
    bank.build()
    f = Front(job, bank, f"sqlite:///{d}/f.db", "f", d, FrontConfig(hull="menu"))
    f.hull()
    return f


class Stub:
    """A regressor with a fixed prediction: the race's verdict is known in advance."""

    def __init__(self, lo):
        self.lo = lo

    def predict(self, rungs):
        return {"lo": self.lo, "mid": 2 * self.lo, "hi": 4 * self.lo, "n": 0, "rung": max(rungs)}


def test_a_beaten_plan_stops_and_a_promising_one_is_polished(front, monkeypatch):
    """With predictions fixed by a stub: a plan whose optimistic KL (1e3) is beaten by the polished w2g64
    stops at rung 0, PRUNED, its reason in the trial (optuna-dashboard shows user attributes), no polish
    step spent; a plan predicted at 1e-9 climbs every rung and is polished, COMPLETE with its held-out KL
    (catches racing that never stops, or always stops)."""
    import aqsearch.polish

    units = front.bank.units
    mixed = {u.name: ("w4g64" if i % 2 else "w2g64") for i, u in enumerate(units)}
    mixed2 = {u.name: ("w2g64" if i % 2 else "w4g64") for i, u in enumerate(units)}
    calls = []
    real = aqsearch.polish.polish
    monkeypatch.setattr(aqsearch.polish, "polish", lambda *a, **k: calls.append(k.get("upto")) or real(*a, **k))
    monkeypatch.setattr(front, "_refit", lambda: None)
    front.reg = Stub(1e3)
    t = front._run(mixed, "beaten", {"score": 1.0}, race=True)
    assert t.state == optuna.trial.TrialState.PRUNED and calls == []
    assert t.user_attrs["stopped_because"].startswith("rung 0:") and "uniform w2g64" in t.user_attrs["stopped_because"]
    assert t.user_attrs["steps"] == 0 and t.user_attrs["polished"] is False and t.values is None
    front.reg = Stub(1e-9)
    t2 = front._run(mixed2, "promising", {"score": 1.0}, race=True)
    assert t2.state == optuna.trial.TrialState.COMPLETE and t2.user_attrs["polished"] is True
    assert calls == [front.polisher.k, None]  # rung 1 (a prefix of blocks), then the full polish going on from it
    assert set(t2.user_attrs["rungs"]) >= {"0", "1", "full"} and t2.values[0] > 0
    assert t2.user_attrs["steps"] == t2.user_attrs["steps_full"]  # rung 1's blocks counted once
    # a trial run again (the same plan) is not repeated
    assert front._run(mixed2, "promising", {}, race=True).number == t2.number


def test_front_points_never_report_a_stopped_plan_as_quality(front):
    from aqsearch.strategies.front import front_points

    pts = front_points(front.storage, front.name)
    assert any(not p["polished"] for p in pts) and any(p["polished"] for p in pts)
    for p in pts:
        if p["polished"]:
            assert p["kl_mean"] > 0 and p["artifact"]
        else:
            assert p["kl_mean"] is None and p["stopped_because"] and p["bytes"] > 0
