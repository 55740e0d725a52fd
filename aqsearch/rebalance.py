"""After the block sweep: meet the budget, then spend what it leaves, from each block's measured menu.

Every block record carries a menu: the configurations measured while it was processed, each with the
error it adds (``delta``) and its bytes. Over budget, the block whose next cheaper measured
configuration costs the least added error per byte saved is lowered (configurations that pass the gate
first); under budget, the one whose dearer configuration removes the most error per byte is raised,
while it fits. Each change is a ``rebalance`` line in the journal.

When even the cheapest measured configurations cannot meet the budget, the plan is left at them and
the result says by how much it misses (``meets_budget: false``) and the smallest size the gates allow.
"""

from __future__ import annotations

from aqsearch.config import QuantScheme
from aqsearch.memory import layer_bytes


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
    schemes = [QuantScheme(b, g) for b in eng.s.ladder for g in eng.s.groups]
    return sum(min(layer_bytes(l.out_features, l.in_features, s) for s in schemes) for l in eng.layers)


def rebalance(eng) -> None:
    limit = eng.limit
    while _total(eng) > limit:
        best = None
        for i, d in eng.decided.items():
            for e in d["menu"]:
                if e["bytes"] >= d["bytes"] or e["delta"] is None:
                    continue
                cost = (e["delta"] - d["delta"]) / (d["bytes"] - e["bytes"])
                key = (not eng.passes(e["delta"]), cost, i)
                if best is None or key < best[0]:
                    best = (key, i, e)
        if best is None:
            break
        (fails, cost, _), i, e = best
        _apply(eng, i, e, "lower", f"over budget by {_total(eng) - limit:,} B; {cost:.3g} error per byte saved"
               + ("; below the gate" if fails else ""))
    while True:
        slack, best = limit - _total(eng), None
        for i, d in eng.decided.items():
            for e in d["menu"]:
                extra = e["bytes"] - d["bytes"]
                if extra <= 0 or extra > slack or e["delta"] is None or e["delta"] >= d["delta"]:
                    continue
                gain = (d["delta"] - e["delta"]) / extra
                if best is None or (gain, -i) > best[0]:
                    best = ((gain, -i), i, e)
        if best is None:
            break
        (gain, _), i, e = best
        _apply(eng, i, e, "raise", f"{slack:,} B left; {gain:.3g} error removed per byte")
