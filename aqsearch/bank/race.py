"""Racing inside a unit's menu: which candidates stop after their training prefix.

Every candidate of a unit first trains a prefix of its steps; the learning-curve regressor
(:mod:`aqsearch.curves`) predicts its final error with an 80 % interval; a candidate stops when its
optimistic prediction is dominated within the unit's menu (:func:`dominated`).
"""

from __future__ import annotations


def dominated(c: tuple[int, float], menu: list[tuple[int, float, int]], order: int, rule: str = "hull") -> bool:
    """Whether ``c = (bytes, optimistic error)`` is dominated within its unit's menu of
    ``(bytes, pessimistic error, order)`` entries.

    ``pareto``: another entry has no more bytes and a pessimistic error below c's optimistic one (equal
    bytes: the earlier entry wins, so two candidates never stop each other). ``hull``: also when the
    segment between two other entries, one with fewer bytes and one with more, passes below c's
    optimistic point: such a candidate lies above the menu's lower convex hull, where no
    error-per-byte trade-off (the knapsack's Lagrangian) ever picks it.

    >>> dominated((100, 0.5), [(90, 0.4, 1)], 0), dominated((100, 0.5), [(90, 0.6, 1)], 0)
    (True, False)
    >>> dominated((100, 0.5), [(80, 0.8, 1), (120, 0.1, 2)], 0), dominated((100, 0.5), [(80, 0.8, 1), (120, 0.1, 2)], 0, "pareto")
    (True, False)
    """
    b0, o0 = c
    others = [(b, p, o) for b, p, o in menu if o != order]
    if any(b < b0 or (b == b0 and o < order) for b, p, o in others if b <= b0 and p < o0):
        return True
    if rule == "pareto":
        return False
    for ba, pa, _ in others:
        for bd, pd, _ in others:
            if ba < b0 < bd and pa + (pd - pa) * (b0 - ba) / (bd - ba) < o0:
                return True
    return False
