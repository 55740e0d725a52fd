"""The knapsack baseline: each unit's error measured once for every scheme, then the allocation of least
total error within a budget by dynamic programming (as ExLlamaV2 and AutoRound's AutoScheme do).

A unit's error at a scheme is the held-out error it adds to its block when it alone is quantized,
on the full-precision stream (a :class:`aqsearch.bank.Candidate`: round-to-nearest or trained). Errors are assumed
to add up; the search exists because they do not quite.

>>> import numpy as np
>>> best = solve([[(1.0, 10), (0.2, 30)], [(0.5, 10), (0.1, 20)]], budget=40, quantum=1)
>>> best  # 0.2 + 0.5 = 0.7 in 40 B beats 1.0 + 0.1 = 1.1 in 30 B
[1, 0]
"""

from __future__ import annotations

import math

import numpy as np

from aqsearch.config import Plan
from aqsearch.errors import AqError

MAX_CELLS = 1 << 19  # capacity steps of the dynamic programme (a byte per unit and step for the choices)


def quantum_for(options: list[list[tuple[float, int]]], budget: int, max_cells: int = MAX_CELLS) -> int:
    """The programme's byte step: the gcd of every size (exact: no plan is lost to rounding, so a plan of
    exactly ``budget`` bytes, such as a uniform scheme at its own size, can be chosen), or the smallest
    multiple of it that keeps the capacity within ``max_cells`` steps."""
    g = 0
    for opts in options:
        for _, nbytes in opts:
            g = math.gcd(g, int(nbytes))
    g = max(g, 1)
    return g * max(1, -(-(max(budget, 0) // g) // max_cells))


def solve(options: list[list[tuple[float, int]]], budget: int, quantum: int | None = None) -> list[int] | None:
    """Multiple-choice knapsack: one ``(error, bytes)`` option per unit, least total error within
    ``budget`` bytes; ``None`` if nothing fits. Sizes are counted in steps of ``quantum`` (default
    :func:`quantum_for`: exact for a model's schemes); a step that does not divide every size rounds
    them to the nearest step, and a choice whose true bytes exceed the budget shrinks the capacity and
    runs again, so the answer always fits (at worst the smallest option of every unit)."""
    q = quantum or quantum_for(options, budget)
    steps = [[(int(nbytes) + q // 2) // q for _, nbytes in opts] for opts in options]
    exact = all(int(nbytes) % q == 0 for opts in options for _, nbytes in opts)
    cap = (budget + (0 if exact else len(options) * q // 2)) // q
    while cap >= 0:
        picks = _programme(options, steps, cap)
        if picks is None:
            break
        total = sum(options[u][j][1] for u, j in enumerate(picks))
        if total <= budget:
            return picks
        cap -= max(1, -(-(total - budget) // q))
    smallest = [min(range(len(o)), key=lambda j: o[j][1]) for o in options]
    return smallest if sum(o[j][1] for o, j in zip(options, smallest)) <= budget else None


def _programme(options, steps, cap: int) -> list[int] | None:
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = []
    dtype = np.int8 if max((len(o) for o in options), default=0) < 128 else np.int16
    for opts, sz in zip(options, steps):
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=dtype)
        for j, ((err, _), c) in enumerate(zip(opts, sz)):
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[: cap + 1 - c] + err
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        choice.append(arg)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    picks = []
    for u in range(len(options) - 1, -1, -1):
        j = int(choice[u][end])
        picks.append(j)
        end -= steps[u][j]
    return picks[::-1]



def knapsack(bank, limit: int, quantum: int | None = None, score=None) -> Plan | None:
    """The strategy: least summed bank error (trained where finished, the median prediction where the
    race stopped a candidate) within ``limit`` bytes, built by :meth:`Bank.plan`; ``None`` when nothing fits.
    ``score`` (:class:`aqsearch.bank.score.Score`): minimise the fitted score instead (each error weighed)."""
    choice = knapsack_choice(bank, limit, quantum, score)
    return None if choice is None else bank.plan(choice)


def knapsack_choice(bank, limit: int, quantum: int | None = None, score=None) -> dict[str, str] | None:
    """The choice (unit -> scheme) :func:`knapsack` builds its plan from."""
    cost = (lambda c: c.error) if score is None else (lambda c: score.unit_cost(c.unit, c.scheme, c.error))
    menus = [bank.menu(u) for u in bank.units]
    for u, m in zip(bank.units, menus):
        if not m:
            raise AqError(f"the bank holds no candidate of unit {u.name} yet (build it first)")
    picks = solve([[(cost(c), c.bytes) for c in m] for m in menus], limit, quantum)
    return None if picks is None else {u.name: m[j].scheme for u, m, j in zip(bank.units, menus, picks)}
