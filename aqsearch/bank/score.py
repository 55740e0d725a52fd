"""The score: a cheap prediction of a plan's *polished* held-out KL from its bank candidates.

Composed bank errors misrank plans once they are polished (FIELD-NOTES: Spearman -0.03): the polish
recovers far more at some bit widths than at others. The score is therefore a weighted sum of per-unit
bank errors, with one weight per *group* (a bit width x a kind of unit: ``w3/down``, ``w4/qkv``,
``w2/block``...), fitted by non-negative least squares on **relative** residuals against the plans
polished so far (the uniform hull gives free calibration points; raced plans add more as they finish).
Each group's weight is shrunk toward its bit width's weight (fitted first over whole bit widths), so a
group that no polished plan has used yet takes its bit width's weight, and a bit width never seen takes
the median of the others.

Every fit records its rank correlation (Spearman and Kendall, :func:`rank_correlation`) with the polished
KL of the plans it was fitted on, as a prediction made *before* each plan's own KL was known
(leave-one-out), so the number is an honest one.

>>> import numpy as np
>>> X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
>>> np.round(fit_weights(X, X @ np.array([0.5, 2.0])), 6).tolist()
[0.5, 2.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from aqsearch.config import QuantScheme
from aqsearch.models import split_unit


def unit_kind(unit: str) -> str:
    """``model.layers.3.gate_up`` -> ``gate_up``; a block unit (``model.layers.3``) -> ``block``; others their
    last name (``lm_head``)."""
    block, kind = split_unit(unit)
    return kind or ("block" if block is not None else unit.rsplit(".", 1)[-1])


def group_of(unit: str, scheme: str, by: str = "kind") -> str:
    """The weight a (unit, scheme) error is multiplied by: ``w{bits}/{kind}`` (``by="kind"``), ``w{bits}``
    (``by="bits"``) or ``w{bits}/{unit}`` (``by="unit"``: one weight a unit and bit width)."""
    b = f"w{QuantScheme.parse(scheme).bits}"
    return b if by == "bits" else f"{b}/{unit_kind(unit) if by == 'kind' else unit}"


def fit_weights(X: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None, ridge: float = 0.0) -> np.ndarray:
    """Non-negative ``w`` minimising ``sum(((X w - y) / y)^2) + ridge * |w - prior|^2`` (NNLS on the
    stacked system). Relative residuals: a plan at KL 0.05 counts as much as one at 1.5."""
    from scipy.optimize import nnls

    X, y = np.asarray(X, float), np.asarray(y, float)
    A, b = X / y[:, None], np.ones(len(y))
    if ridge > 0 and prior is not None:
        A = np.vstack([A, math.sqrt(ridge) * np.eye(X.shape[1])])
        b = np.concatenate([b, math.sqrt(ridge) * np.asarray(prior, float)])
    return nnls(A, b, maxiter=50 * X.shape[1] + 100)[0]


def rank_correlation(pred: Sequence[float], actual: Sequence[float]) -> dict:
    """Spearman's rho and Kendall's tau of predictions against measurements (``None`` below 3 points)."""
    from scipy.stats import kendalltau, spearmanr

    if len(pred) < 3 or len(set(pred)) < 2 or len(set(actual)) < 2:
        return {"n": len(pred), "spearman": None, "kendall": None}
    return {"n": len(pred), "spearman": float(spearmanr(pred, actual)[0]), "kendall": float(kendalltau(pred, actual)[0])}


@dataclass(frozen=True)
class Score:
    """Group weights over per-unit errors. ``Score()`` (no fit yet) weighs every error 1: the composed sum."""

    weights: Mapping[str, float] = field(default_factory=dict)
    by: str = "kind"
    default: float = 1.0  # the weight of a group and bit width never fitted
    history: tuple = ()  # one dict a fit: n, spearman, kendall (leave-one-out), weights

    def weight(self, group: str) -> float:
        """A group's weight: fitted, else its bit width's, else the default."""
        return self.weights.get(group, self.weights.get(group.split("/")[0], self.default))

    def unit_cost(self, unit: str, scheme: str, error: float) -> float:
        return self.weight(group_of(unit, scheme, self.by)) * error

    def predict(self, feats: Mapping[str, float]) -> float:
        """The predicted polished KL of a plan's :func:`features`."""
        return sum(v * self.weight(g) for g, v in feats.items())

    def __call__(self, bank, choice: Mapping[str, str]) -> float:
        """The predicted polished KL of a choice (unit -> scheme) over ``bank``."""
        return self.predict(features(bank, choice, self.by))

    def to_json(self) -> dict:
        return {"weights": dict(self.weights), "by": self.by, "default": self.default, "history": list(self.history)}

    @classmethod
    def from_json(cls, d: Mapping) -> Score:
        return cls(dict(d["weights"]), d.get("by", "kind"), d.get("default", 1.0), tuple(d.get("history", ())))


def features(bank, choice: Mapping[str, str], by: str = "kind") -> dict[str, float]:
    """Summed bank error of a choice in each group (the score is their weighted sum)."""
    out: dict[str, float] = {}
    for u in bank.units:
        g = group_of(u.name, choice[u.name], by)
        out[g] = out.get(g, 0.0) + bank.get(u.name, choice[u.name]).error
    return out


def fit(rows: Sequence[tuple[Mapping[str, float], float]], by: str = "kind", ridge: float = 0.3,
        history: tuple = ()) -> Score:
    """The score fitted on ``rows`` = ``(features(...), polished KL)``: bit widths first, then groups
    shrunk toward their bit width (``ridge``). Appends this fit's leave-one-out rank correlation."""
    rows = [(f, y) for f, y in rows if y > 0]
    if not rows:
        return Score(by=by, history=history)
    loo = [(_fit(rows[:i] + rows[i + 1:], by, ridge).predict(f), y) for i, (f, y) in enumerate(rows)] if len(rows) > 2 else []
    rc = rank_correlation([p for p, _ in loo], [y for _, y in loo])
    sc = _fit(rows, by, ridge)
    return Score(sc.weights, by, sc.default, tuple(history) + ({**rc, "weights": dict(sc.weights)},))


def _fit(rows, by: str, ridge: float) -> Score:
    """Bit widths first, then (unless ``by="bits"``) groups shrunk toward their bit width; a bit width never
    seen takes the median of the fitted ones."""
    bits = sorted({g.split("/")[0] for f, _ in rows for g in f})
    Xb = np.array([[sum(v for g, v in f.items() if g.split("/")[0] == b) for b in bits] for f, _ in rows])
    y = np.array([y for _, y in rows])
    wb = {b: float(w) for b, w in zip(bits, fit_weights(Xb, y))}
    default = float(np.median(list(wb.values())))
    if by == "bits":
        return Score(wb, by, default)
    groups = sorted({g for f, _ in rows for g in f})
    X = np.array([[f.get(g, 0.0) for g in groups] for f, _ in rows])
    wg = fit_weights(X, y, np.array([wb[g.split("/")[0]] for g in groups]), ridge)
    return Score({**wb, **dict(zip(groups, map(float, wg)))}, by, default)
