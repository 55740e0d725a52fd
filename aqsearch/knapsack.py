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

import numpy as np

from aqsearch.space import Space


def solve(options: list[list[tuple[float, int]]], budget: int, quantum: int = 4096) -> list[int] | None:
    """Multiple-choice knapsack: one ``(error, bytes)`` option per unit, least total error within
    ``budget`` bytes (sizes rounded up to ``quantum``, so the answer always fits). ``None`` if nothing fits."""
    cap = budget // quantum
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = []
    for opts in options:
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for j, (err, nbytes) in enumerate(opts):
            c = -(-nbytes // quantum)
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
        end -= -(-options[u][j][1] // quantum)
    return picks[::-1]


def knapsack_plan(space: Space, errors: dict[str, dict[str, float]], budget: int, quantum: int = 4096) -> dict[str, str] | None:
    """The space's point of least summed error within ``budget``, or ``None``."""
    units = [u for u in space.units if u.name in errors]
    options = [[(errors[u.name][c], space.bytes_of_unit(u, c)) for c in u.choices] for u in units]
    picks = solve(options, budget, quantum)
    if picks is None:
        return None
    return {u.name: u.choices[j] for u, j in zip(units, picks)}
