"""After the block sweep: the budget decides among the configurations each block measured.

Every block record carries a menu: the configurations measured while it was processed (the descent, the
sensitivity and group-size trials, trained ones, and the neighbours of its accepted state), each with
the error it adds (``delta``) and its bytes. The sweep decided block by block against a fair share of
the budget; the rebalance picks one menu entry per block for the least summed error within the whole
budget (a multiple-choice knapsack, :func:`aqsearch.knapsack.solve`). Each block it changes is a
``rebalance`` line in the journal.

When even the cheapest measured configurations cannot meet the budget, every block takes its cheapest
one and the result says by how much it misses (``meets_budget: false``) and the smallest size the gates
allow.
"""

from __future__ import annotations

from aqsearch.config import QuantScheme
from aqsearch.memory import smallest_bytes


def _apply(eng, i: int, entry: dict, decision: str, why: str) -> None:
    d = eng.decided[i]
    d.update(config=entry["config"], trained=entry.get("trained"), bytes=entry["bytes"], delta=entry["delta"],
             layers=eng._layers(i, entry["config"]))
    eng.journal.append({"type": "rebalance", "block": i, "config": entry["config"], "layers": d["layers"],
                        "trained": d["trained"], "bytes": entry["bytes"], "delta": entry["delta"],
                        "decision": decision, "why": why, "plan_bytes": eng.plan_bytes()})


def _total(eng) -> int:
    return sum(d["bytes"] for d in eng.decided.values())


def gated_floor(eng) -> int:
    """Fewest bytes with every block at its cheapest measured configuration that passes the gate."""
    out = 0
    for d in eng.decided.values():
        ok = [e["bytes"] for e in d["menu"] if e["delta"] is not None and eng.passes(e["delta"])]
        out += min(ok) if ok else d["bytes"]
    return out


def absolute_floor(eng) -> int:
    """Fewest bytes any plan over the engine's schemes can take."""
    return smallest_bytes(eng.layers, [QuantScheme(b, g) for b in eng.s.ladder for g in eng.s.groups])


def rebalance(eng) -> None:
    from aqsearch.knapsack import solve

    blocks = sorted(eng.decided)
    menus = [[e for e in eng.decided[i]["menu"] if e["delta"] is not None] for i in blocks]
    picks = solve([[(e["delta"], e["bytes"]) for e in m] for m in menus], eng.limit)  # always fits
    before = _total(eng)
    if picks is None:
        picks = [min(range(len(m)), key=lambda j: m[j]["bytes"]) for m in menus]
        why = "no measured configurations fit the budget: the cheapest of each block"
    else:
        why = f"least summed error within {eng.limit:,} B (the sweep left {before:,} B)"
    for i, m, j in zip(blocks, menus, picks):
        e, d = m[j], eng.decided[i]
        if e["config"] != d["config"] or e.get("trained") != d.get("trained"):
            _apply(eng, i, e, "lower" if e["bytes"] < d["bytes"] else "raise", why)
