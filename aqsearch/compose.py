"""The one plan builder over the bank: a scheme per unit -> a plan and its trained tensors.

:func:`compose` is what the study, the knapsack starts and the main job build plans with;
:func:`knapsack_choice` is the least-error choice within a budget; :func:`stored_tensors` reads finished
candidates from a bank's folder alone (what ``pick`` needs, without the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aqsearch.bank import Bank
from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.quantizers import QTensor


def compose(bank: Bank, choice: dict[str, str], finish: bool = True) -> tuple[Plan, dict[str, QTensor]]:
    """The one plan builder: a scheme per unit -> (plan, trained tensors of its candidates).

    A stopped candidate is finished first (``finish=True``) or refused; never used half-trained.
    """
    layers: dict[str, str | None] = {}
    tensors: dict[str, QTensor] = {}
    for u in bank.units:
        s = choice.get(u.name)
        if s is None:
            raise AqError(f"the choice gives no scheme for unit {u.name}")
        c = bank.get(u.name, s)
        if c is None:
            raise AqError(f"candidate {u.name} {s} is not in the bank")
        if not c.finished:
            if not finish:
                raise AqError(f"candidate {u.name} {s} was stopped by the race")
            c = bank.finish(u.name, s)
        layers.update(dict.fromkeys(u.layers, s))
        tensors.update(bank.tensors(c))
    return Plan.from_layers(layers), tensors


def knapsack_choice(bank: Bank, budget: int, quantum: int | None = None) -> dict[str, str] | None:
    """Least summed error (trained where finished, median prediction where stopped) within ``budget``
    bytes (:func:`aqsearch.knapsack.solve`); ``None`` when nothing fits."""
    from aqsearch.knapsack import solve

    menus = [bank.menu(u) for u in bank.units]
    picks = solve([[(c.error, c.bytes) for c in m] for m in menus], budget, quantum)
    return None if picks is None else {u.name: m[j].scheme for u, m, j in zip(bank.units, menus, picks)}


def stored_tensors(bank_dir: str | os.PathLike, pairs) -> dict[str, QTensor]:
    """Trained tensors of finished candidates ``[(unit, scheme), ...]`` read from a bank's folder alone."""
    from aqsearch.weights import load_qtensors

    out: dict[str, QTensor] = {}
    for unit, scheme in pairs:
        p = Path(bank_dir) / f"{unit}.{scheme}.json"
        if not p.exists():
            raise AqError(f"bank {bank_dir} has no candidate {unit} {scheme}")
        c = json.loads(p.read_text())
        if c["status"] != "finished":
            raise AqError(f"bank candidate {unit} {scheme} was stopped by the race and never finished")
        if c.get("weights"):
            out.update(load_qtensors(Path(bank_dir) / c["weights"]))
    return out
