"""The candidate bank: for every unit x scheme of the menu, its exact bytes and its scores.

A *unit* is a decoder block (granularity ``block``) or a fused group of one (``layer``: qkv, o,
gate_up, down). A :class:`Candidate` is one (unit, scheme): its exact bytes
(:func:`aqsearch.memory.layer_bytes`), its round-to-nearest error and - trained on the full-precision
stream by the one block trainer - its learning curve and trained error (or, when the race stopped it
after its prefix, the regressor's prediction). Errors are the held-out mean per-token relative squared
error the unit adds to its block's output (dimensionless).

The bank holds **scores, not weights**: final weights come only from polishing the chosen plan in
order, from the model's own weights (:mod:`aqsearch.polish`). That keeps a bank small at any model size.

:meth:`Bank.plan` is **the one plan builder** (:func:`build_plan`): the study's trials, the knapsack, the
progressive engine and ``journal.replay`` all turn a choice (unit -> scheme) into a :class:`Plan` through it.

Storage and building: :mod:`aqsearch.bank.store` (an Optuna storage used as the work queue: one trial a
unit, so workers on one host or many take units from it, with heartbeats) and :mod:`aqsearch.bank.build`.

>>> # tests/test_bank.py builds, races, reuses and resumes a bank on a tiny model
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from aqsearch.config import Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.io import sha256_bytes
from aqsearch.space import FULL, Space, Unit, build_space
from aqsearch.bank.records import MENU, BankConfig, Candidate  # noqa: F401 (re-exported)

VERSION = 2


def build_plan(units: Sequence[Unit], choice: Mapping[str, str | None]) -> Plan:
    """The one plan builder: a scheme (or ``fp16``/``None``: full precision) per unit -> a plan naming
    every layer of every unit exactly.

    >>> u = [Unit("model.layers.0", ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"), ("w4g64",), 8, 0)]
    >>> build_plan(u, {"model.layers.0": "w4g64"}).scheme_for("model.layers.0.mlp.down_proj")
    QuantScheme(bits=4, group=64, sym=False)
    """
    layers: dict[str, str | None] = {}
    for u in units:
        if u.name not in choice:
            raise AqError(f"the choice gives no scheme for unit {u.name}")
        c = choice[u.name]
        layers.update(dict.fromkeys(u.layers, None if c in (None, FULL) else str(QuantScheme.parse(c))))
    return Plan.from_layers(layers)


class Bank:
    """The candidates of one (model, calibration windows, config), kept in an Optuna storage.

    ``storage``: an Optuna storage URL (``sqlite:///...``, ``postgresql://...``); default a SQLite file in
    the user cache folder. Several processes, on one host or many (PostgreSQL), build one bank together.
    """

    def __init__(self, model, fingerprint: str, calib, config: BankConfig = BankConfig(), storage: str | None = None,
                 regressor=None, heartbeat: int = 30, model_source: str | None = None):
        from aqsearch.bank.store import CandidateStore, default_storage

        if config.granularity not in ("block", "layer"):
            raise AqError(f"granularity must be 'layer' or 'block', got {config.granularity!r}")
        self.model, self.calib, self.config, self.reg = model, calib, config, regressor
        self.space: Space = decoder_space(build_space(model, config.granularity, menu=config.menu))
        self.units = list(self.space.units)
        self.fingerprint, self.model_source = fingerprint, model_source  # source: for worker processes
        self.key = sha256_bytes(b"bank%d" % VERSION, fingerprint.encode(), calib.hash.encode(),
                                json.dumps(config.key_fields(), sort_keys=True).encode())[:16]
        meta = {"version": VERSION, "fingerprint": fingerprint, "calib": calib.describe(), "settings": config.key_fields()}
        self.storage = storage or default_storage()
        self.store = CandidateStore(self.storage, self.key, meta, heartbeat)

    # ---- plans -------------------------------------------------------------------------------
    def plan(self, choice: Mapping[str, str]) -> Plan:
        """The plan of a choice (unit -> scheme): :func:`build_plan` over this bank's units."""
        return build_plan(self.units, choice)

    def bytes(self, choice: Mapping[str, str]) -> int:
        return self.space.bytes(choice)

    def score(self, choice: Mapping[str, str]) -> float:
        """Summed per-unit error of a choice (trained where finished, the median prediction where stopped)."""
        return sum(self.get(u.name, choice[u.name]).error for u in self.units)

    # ---- candidates --------------------------------------------------------------------------
    def get(self, unit: str, scheme: str) -> Candidate | None:
        return self.store.get(unit, scheme)

    def menu(self, unit: Unit) -> list[Candidate]:
        return [c for s in unit.choices if (c := self.get(unit.name, s)) is not None]

    def candidates(self) -> list[Candidate]:
        return [c for u in self.units for c in self.menu(u)]

    def complete(self) -> bool:
        return all(self.get(u.name, s) is not None for u in self.units for s in u.choices)

    def stats(self) -> dict:
        cs = self.candidates()
        full = len(cs) * self.config.steps
        saved = sum(c.steps_saved for c in cs)
        return {"candidates": len(cs), "of": sum(len(u.choices) for u in self.units),
                "stopped": sum(not c.finished for c in cs), "steps_run": full - saved, "steps_full": full,
                "steps_saved": saved, "saved_fraction": saved / full if full else 0.0,
                "train_seconds": sum(c.seconds for c in cs), "storage": self.store.safe_url, "key": self.key}

    def build(self, workers=None, show: bool = True) -> dict:
        """Build every missing candidate (:func:`aqsearch.bank.build.build`); returns :meth:`stats`."""
        from aqsearch.bank.build import build

        build(self, workers, show)
        return self.stats()


def decoder_space(space: Space) -> Space:
    """The space's decoder units only (embedding units are not banked)."""
    from dataclasses import replace

    return replace(space, units=tuple(u for u in space.units if u.block >= 0 and u.choices[0] != FULL),
                   layers=tuple(l for l in space.layers if l.block >= 0 and l.fused != "head"))
