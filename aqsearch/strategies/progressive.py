"""The progressive engine: 8 -> 4 -> 3 -> 2 bits per block behind quality gates, under a budget, over the bank.

For block ``i`` in order (its units: the fused groups qkv, o, gate_up, down of a ``layer`` bank, or the
whole block of a ``block`` bank; all start in full precision):

1. **descend**: lower every unit still above ``b`` to ``w{b}g{group}`` for ``b`` in 8, 4, 3, 2, while the
   block gate passes and the budget still wants bytes from this block (it does while the block is
   above its fair share of what the budget leaves: ``(budget - bytes decided) * weights_i / weights_left``);
2. on a failed gate, **layer sensitivity**: rank the units by the error each adds at that scheme, lower the
   least sensitive ones while the gate passes, keep the most sensitive at their precision;
3. then **group-size adaptation**: the largest group that passes and still saves bytes;
4. else **roll back** to the block's last passing state.

A configuration's error (``delta``) is the sum of its units' bank errors (each the held-out error the unit
adds to its block alone; trained where the bank trained). After the sweep, a **rebalance** picks one
measured configuration per block for the least summed error within the whole budget (a multiple-choice
knapsack). Every try, block and rebalance is a line in the :class:`~aqsearch.strategies.journal.Journal`
with the numbers that decided it; the plan is built by :meth:`Bank.plan` and ``replay`` rebuilds it from
the journal alone. Weights come from polishing the plan afterwards (:mod:`aqsearch.polish`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from aqsearch.config import Gate, Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.strategies.journal import VERSION as JOURNAL_VERSION
from aqsearch.strategies.journal import Journal


@dataclass(frozen=True)
class ProgressiveConfig:
    ladder: tuple[int, ...] = (8, 4, 3, 2)
    group: int = 128
    groups: tuple[int, ...] = (256, 128, 64, 32)

    def menu(self) -> tuple[str, ...]:
        """Every scheme the engine may ask the bank for."""
        return tuple(str(QuantScheme(b, g)) for b in self.ladder for g in self.groups)


def _key(cfg: dict) -> tuple:
    """A configuration as a block menu's key (unit order does not matter)."""
    return tuple(sorted(cfg.items()))


def progressive(bank, limit: int, gate: Gate = Gate(), journal: Journal | None = None,
                config: ProgressiveConfig = ProgressiveConfig()) -> Plan:
    """The strategy: a plan within ``limit`` bytes (see the module)."""
    return Engine(bank, limit, gate, journal, config).run()


class Engine:
    """One progressive run over a built bank."""

    def __init__(self, bank, limit: int, gate: Gate, journal: Journal | None, config: ProgressiveConfig):
        missing = [s for s in config.menu() if s not in bank.units[0].choices]
        if missing:
            raise AqError(f"the progressive engine needs the schemes {', '.join(missing)} in the bank's menu")
        self.bank, self.limit, self.gate, self.journal, self.c = bank, limit, gate, journal, config
        self.blocks = sorted({u.block for u in bank.units})
        self.units = {i: [u for u in bank.units if u.block == i] for i in self.blocks}
        self.weights = {i: sum(u.weights for u in self.units[i]) for i in self.blocks}
        self.decided: dict[int, dict] = {}
        self.tries = 0

    # ---- numbers -----------------------------------------------------------------------------
    def delta(self, cfg: dict) -> float:
        return sum(self.bank.get(n, s).error for n, s in cfg.items() if s is not None)

    def nbytes(self, i: int, cfg: dict) -> int:
        return sum(self.bank.space.bytes_of_unit(u, cfg[u.name]) if cfg[u.name] else 2 * u.weights
                   for u in self.units[i])

    def share(self, i: int) -> float:
        done = sum(d["bytes"] for j, d in self.decided.items() if j < i)
        left = sum(self.weights[j] for j in self.blocks if j >= i)
        return (self.limit - done) * self.weights[i] / left

    def passes(self, d: float) -> bool:
        return self.gate.block_mse is None or d <= self.gate.block_mse

    def log(self, rec: dict) -> None:
        if self.journal is not None:
            self.journal.append(rec)

    def tried(self, i: int, phase: str, cfg: dict, menu: dict, decision: str = "", why: str = "") -> bool:
        """Measure ``cfg``, add it to the block's menu, journal it; whether it passes the gate."""
        d = self.delta(cfg)
        ok = self.passes(d)
        self.tries += 1
        menu[_key(cfg)] = {"config": dict(cfg), "delta": d, "bytes": self.nbytes(i, cfg)}
        self.log({"type": "try", "block": i, "phase": phase, "config": dict(cfg), "delta": d,
                  "bytes": self.nbytes(i, cfg), "decision": decision or ("pass" if ok else "fail"), "why": why})
        return ok

    # ---- one block ---------------------------------------------------------------------------
    def do_block(self, i: int) -> dict:
        c, names = self.c, [u.name for u in self.units[i]]
        state: dict = dict.fromkeys(names)
        frozen: set[str] = set()
        menu: dict = {}
        for bits in c.ladder:
            if self.nbytes(i, state) <= self.share(i):
                break
            active = [n for n in names if n not in frozen and (state[n] is None or QuantScheme.parse(state[n]).bits > bits)]
            if not active:
                break
            scheme = str(QuantScheme(bits, c.group))
            cand = {**state, **dict.fromkeys(active, scheme)}
            if self.tried(i, "descend", cand, menu):
                state = cand
                continue
            nxt = self._sensitivity(i, state, active, scheme, menu) or self._groups(i, state, active, bits, menu)
            if nxt is None:
                self.tried(i, "revert", state, menu, "revert", f"w{bits} failed every remedy; back to the last passing state")
                break
            state, frozen = nxt
        self._lookahead(i, state, menu)
        return {"type": "block", "block": i, "choice": state, "bytes": self.nbytes(i, state), "delta": self.delta(state),
                "menu": list(menu.values())}

    def _sensitivity(self, i, state, active, scheme, menu):
        if len(active) < 2:
            return None
        impact = {n: self.bank.get(n, scheme).error for n in active}
        mixed, lowered = dict(state), []
        for n in sorted(active, key=impact.get):
            cand = {**mixed, n: scheme}
            if not self.tried(i, "sensitivity", cand, menu):
                break
            mixed, lowered = cand, lowered + [n]
        if not lowered:
            return None
        keep = [n for n in active if n not in lowered]
        self.log({"type": "try", "block": i, "phase": "sensitivity", "config": mixed, "delta": self.delta(mixed),
                  "bytes": self.nbytes(i, mixed), "decision": "pass", "why": f"lowered {len(lowered)}; most sensitive kept: {', '.join(keep)}"})
        return mixed, set(keep)

    def _groups(self, i, state, active, bits, menu):
        for g in sorted(self.c.groups, reverse=True):
            cand = {**state, **dict.fromkeys(active, str(QuantScheme(bits, g)))}
            if g == self.c.group or self.nbytes(i, cand) >= self.nbytes(i, state):
                continue
            if self.tried(i, "group", cand, menu):
                return cand, set()
        return None

    def _lookahead(self, i: int, state: dict, menu: dict) -> None:
        """Neighbours a rebalance may move to: each ladder step at every group, uniform over the block."""
        for b in self.c.ladder:
            for g in self.c.groups:
                cand = dict.fromkeys(state, str(QuantScheme(b, g)))
                if _key(cand) not in menu:
                    self.tried(i, "lookahead", cand, menu, "measured")

    # ---- the whole run -----------------------------------------------------------------------
    def header(self) -> dict:
        return {"type": "start", "version": JOURNAL_VERSION, "bank": self.bank.key, "budget_bytes": self.limit,
                "gate": str(self.gate), "settings": asdict(self.c), "n_blocks": len(self.blocks),
                "units": [{"name": u.name, "layers": list(u.layers)} for u in self.bank.units]}

    def run(self) -> Plan:
        done = self._resume()
        for i in self.blocks:
            if i in done:
                self.decided[i] = done[i]
                continue
            self.decided[i] = self.do_block(i)
            self.log({**self.decided[i], "plan_bytes": sum(d["bytes"] for d in self.decided.values())})
        self._rebalance()
        choice = {n: s for i in self.blocks for n, s in self.decided[i]["choice"].items()}
        if any(s is None for s in choice.values()):
            raise AqError("the gates keep a unit in full precision, which no plan of the bank's menu can hold; "
                          "loosen --gate mse=")
        plan = self.bank.plan(choice)
        total = self.bank.bytes(choice)
        self.log({"type": "final", "plan": plan.to_json(), "bytes": total, "bpw": 8 * total / self.bank.space.weights,
                  "budget_bytes": self.limit, "meets_budget": total <= self.limit, "tries": self.tries})
        return plan

    def _rebalance(self) -> None:
        """One measured configuration per block, least summed error within the budget."""
        from aqsearch.strategies.knapsack import solve

        menus = [[e for e in self.decided[i]["menu"] if None not in e["config"].values()] for i in self.blocks]
        picks = solve([[(e["delta"], e["bytes"]) for e in m] for m in menus], self.limit)
        if picks is None:
            raise AqError(f"budget {format_bytes(self.limit)} ({self.limit:,} B) cannot be met by the configurations "
                          "the engine measured")
        for i, m, j in zip(self.blocks, menus, picks):
            e, d = m[j], self.decided[i]
            if e["config"] != d["choice"]:
                d.update(choice=e["config"], bytes=e["bytes"], delta=e["delta"])
                self.log({"type": "rebalance", "block": i, "choice": e["config"], "bytes": e["bytes"],
                          "delta": e["delta"], "decision": "lower" if e["bytes"] < d["bytes"] else "raise",
                          "why": f"least summed error within {self.limit:,} B"})

    def _resume(self) -> dict[int, dict]:
        if self.journal is None:
            return {}
        head = json.loads(json.dumps(self.header()))
        if not self.journal.exists():
            self.journal.append(head)
            return {}
        old = self.journal.header()
        if old is None:
            raise AqError(f"journal {self.journal.path} exists but is not a progressive journal")
        for k in ("bank", "budget_bytes", "gate", "settings", "n_blocks", "units"):
            if old.get(k) != head.get(k):
                raise AqError(f"journal {self.journal.path} belongs to another run ({k} differs); use a new journal")
        self.journal.truncate_torn_tail()
        done = {r["block"]: r for r in self.journal.records() if r["type"] == "block"}
        self.journal.append({"type": "resume", "blocks_done": sorted(done)})
        return done

