"""The fitted score (aqsearch.bank.score) against hand-made plans whose polished KL is known."""

from types import SimpleNamespace

import numpy as np
import pytest

from aqsearch.bank import score as scoring
from aqsearch.strategies.knapsack import knapsack_choice

KINDS = ("qkv", "o", "gate_up", "down")
SCHEMES = ("w4g64", "w3g64", "w2g64")


class FakeBank:
    """A bank of 3 blocks x 4 layer units with fixed per-candidate errors and bytes (no model)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.units = [SimpleNamespace(name=f"model.layers.{b}.{k}", choices=SCHEMES) for b in range(3) for k in KINDS]
        base = {"w4g64": 0.01, "w3g64": 0.05, "w2g64": 0.4}
        self._c = {(u.name, s): SimpleNamespace(unit=u.name, scheme=s, error=base[s] * rng.uniform(0.3, 3.0),
                                                bytes={"w4g64": 69, "w3g64": 53, "w2g64": 37}[s])
                   for u in self.units for s in SCHEMES}

    def get(self, unit, scheme):
        return self._c[(unit, scheme)]

    def menu(self, u):
        return [self._c[(u.name, s)] for s in u.choices]


TRUE = {"w4/qkv": 3.0, "w4/o": 1.0, "w4/gate_up": 2.0, "w4/down": 6.0, "w3/qkv": 0.5, "w3/o": 0.25, "w3/gate_up": 0.4,
        "w3/down": 1.5, "w2/qkv": 0.1, "w2/o": 0.3, "w2/gate_up": 0.2, "w2/down": 0.8}


def polished_kl(bank, choice):
    """What the polish 'measures' in this synthetic world: the per-group weights above times the errors."""
    return sum(TRUE[scoring.group_of(u, s)] * bank.get(u, s).error for u, s in choice.items())


def plans(bank, n, seed=1):
    rng = np.random.default_rng(seed)
    return [{u.name: SCHEMES[rng.integers(3)] for u in bank.units} for _ in range(n)]


def test_fit_recovers_known_group_weights():
    """From 40 synthetic plans and their polished KL, the fit recovers every group weight. Fitted against
    the composed KL (the bank's plain sum) instead, it would find weights near 1: the test fails then."""
    bank = FakeBank()
    rows = [(scoring.features(bank, c), polished_kl(bank, c)) for c in plans(bank, 40)]
    sc = scoring.fit(rows, ridge=0.0)
    for g, w in TRUE.items():
        assert sc.weights[g] == pytest.approx(w, rel=1e-3), g
    composed = scoring.fit([(f, sum(f.values())) for f, _ in rows], ridge=0.0)
    assert composed.weights["w4/down"] == pytest.approx(1.0, rel=1e-3)  # what a fit on composed KL finds


def test_one_weight_a_unit_and_bit_width_is_not_identifiable():
    """Why the score's groups are (bit width, kind of unit) and not (bit width, unit): every plan gives each
    unit exactly one scheme, so weights ``w[u, s] + c / e[u, s]`` and ``w[v, s] - c / e[v, s]`` predict every
    plan alike. The fit still reproduces the plans' KL (catches a fit that does not minimise its residuals)."""
    bank = FakeBank(3)
    cs = plans(bank, 80, seed=4)
    true = {scoring.group_of(u.name, s, "unit"): 0.2 + 0.05 * i for i, (u, s) in
            enumerate((u, s) for u in bank.units for s in SCHEMES)}
    y = [sum(true[scoring.group_of(u, s, "unit")] * bank.get(u, s).error for u, s in c.items()) for c in cs]
    rows = [(scoring.features(bank, c, "unit"), t) for c, t in zip(cs, y)]
    X = np.array([[f.get(g, 0.0) for g in sorted(true)] for f, _ in rows])
    assert np.linalg.matrix_rank(X) < len(true)
    sc = scoring.fit(rows, by="unit", ridge=0.0)
    assert [sc(bank, c) for c in cs] == pytest.approx(y, rel=1e-3)


def test_score_predicts_and_records_its_rank_correlation():
    """A fitted score ranks held-out synthetic plans as their polished KL does; each fit appends its
    leave-one-out Spearman and Kendall to the history (catches correlations left out or computed in-sample)."""
    bank = FakeBank()
    rows = [(scoring.features(bank, c), polished_kl(bank, c)) for c in plans(bank, 30)]
    sc = scoring.fit(rows[:10])
    sc = scoring.fit(rows, history=sc.history)
    assert len(sc.history) == 2 and sc.history[0]["n"] == 10 and sc.history[1]["n"] == 30
    assert sc.history[1]["spearman"] > 0.9 and sc.history[1]["kendall"] > 0.75
    test = plans(bank, 20, seed=9)
    rc = scoring.rank_correlation([sc(bank, c) for c in test], [polished_kl(bank, c) for c in test])
    assert rc["spearman"] > 0.95


def test_unfitted_group_takes_its_bit_width_weight():
    """A group no polished plan used takes its bit width's weight (a uniform hull of 4-bit schemes says
    nothing of 2-bit down projections)."""
    sc = scoring.Score({"w2": 0.5, "w2/o": 9.0, "w4": 2.0})
    assert sc.unit_cost("model.layers.0.down", "w2g64", 1.0) == 0.5
    assert sc.unit_cost("model.layers.0.o", "w2g64", 1.0) == 9.0
    assert sc.unit_cost("model.layers.0.o", "w3g64", 1.0) == 1.0  # nothing known of 3 bits: the default


def test_knapsack_minimises_the_fitted_score():
    """With the fitted score the knapsack chooses as the polished KL ranks (catches a knapsack that keeps
    minimising the composed sum)."""
    bank = FakeBank()
    rows = [(scoring.features(bank, c), polished_kl(bank, c)) for c in plans(bank, 40)]
    sc = scoring.fit(rows, ridge=0.0)
    limit = 12 * 53
    fitted = knapsack_choice(bank, limit, score=sc)
    composed = knapsack_choice(bank, limit)
    assert sum(bank.get(u, s).bytes for u, s in fitted.items()) <= limit
    assert polished_kl(bank, fitted) <= polished_kl(bank, composed)
    assert fitted != composed
