"""The rollback log: append-only JSON lines, one decision a line, flushed and fsynced line by line.

Record types (field ``type``):

- ``start``: what the run is (model fingerprint, budget, gate, settings, data hashes, regressor);
- ``try``: one measured configuration of a block: ``phase`` (descend, sensitivity, group, train,
  lookahead, rebalance), ``config``, ``delta`` (normalised block error added), ``bytes`` of the block,
  ``plan_bytes`` of the whole plan as it stands, ``decision`` (pass, fail, revert, stop-early, skip,
  lower, raise) and ``why``;
- ``curve``: a training run's loss curve, with the regressor's prediction;
- ``block``: a finished block: its accepted config, trained-weight artifact (file + sha256) and its
  menu of measured configurations;
- ``rebalance``: a block's config changed after the sweep, to meet or to use the budget;
- ``polish``: a block trained at its final scheme (its curve, and its weights as an artifact);
- ``final``: the plan, its bytes and its held-out measurement.

A run killed at any point leaves a valid prefix (a torn last line is ignored). Started again with the
same journal, the engine keeps the finished blocks and redoes only the rest; ``replay`` rebuilds the
plan from the records alone.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "j.jsonl")
>>> j = Journal(p); j.append({"type": "start", "x": 1}); j.append({"type": "try", "decision": "pass"})
>>> [r["type"] for r in Journal(p).records()]
['start', 'try']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from aqsearch.config import Plan
from aqsearch.errors import AqError

VERSION = 1


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.artifacts = self.path.with_name(self.path.name + ".d")

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=_default) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return  # torn last line from a crash mid-write
                try:
                    rec = json.loads(line.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise AqError(f"journal {self.path} is corrupt at line {n} (not a JSON line)") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
                    raise AqError(f"journal {self.path} is corrupt at line {n} (a record is a JSON object with a type)")
                yield rec

    def header(self) -> dict[str, Any] | None:
        """The start record (``None`` for an empty journal); one of another version is refused."""
        for r in self.records():
            if r["type"] != "start":
                return None
            if r.get("version") != VERSION:
                raise AqError(f"journal {self.path} has version {r.get('version')!r}; this aqsearch reads version {VERSION}")
            return r
        return None

    def save_block_weights(self, name: str, block: int, tensors: dict) -> dict:
        """Write a block's trained tensors (in-block suffix -> QTensor) as ``<journal>.d/<name>.safetensors``;
        return the reference records carry: ``{file, sha256, layers}``."""
        from aqsearch.weights import save_qtensors

        path = self.artifacts / f"{name}.safetensors"
        from aqsearch.models import layer_name

        names = {layer_name(block, sfx): t for sfx, t in tensors.items()}
        sha = save_qtensors(path, names)
        return {"file": str(path.relative_to(self.path.parent)), "sha256": sha, "layers": sorted(names)}

    def load_block_weights(self, ref: dict | None) -> dict:
        """The tensors a reference names, keyed by in-block suffix (``mlp.up_proj``); {} for none."""
        from aqsearch.weights import load_qtensors

        if not ref:
            return {}
        full = load_qtensors(self.path.parent / ref["file"], ref["sha256"])
        return {k.split(".", 3)[-1]: v for k, v in full.items()}

    def truncate_torn_tail(self) -> None:
        """Drop a torn last line so that appending continues on a clean line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)


def _default(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


def replay(journal: Journal) -> tuple[Plan, dict[str, dict]]:
    """The plan the journal's decisions lead to (built by :func:`aqsearch.bank.build_plan` from the units
    its start record names), and the polished weights its ``polish`` records hold.

    Returns ``(plan, trained)`` where ``trained`` maps a layer name to ``{"file", "sha256"}``. A journal whose
    decisions do not lead to its ``final`` plan (edited by hand) is refused.
    """
    from aqsearch.bank.core import build_plan
    from aqsearch.space import Unit

    head = journal.header()
    if head is None:
        raise AqError(f"journal {journal.path} has no start record (empty or not a journal)")
    if not isinstance(head.get("n_blocks"), int) or not isinstance(head.get("units"), list):
        raise AqError(f"journal {journal.path}: its start record does not say which units the model has")
    blocks: dict[int, dict] = {}
    polished: dict[int, dict] = {}
    final = None
    for r in journal.records():
        t = r.get("type")
        if t == "block":
            blocks[r["block"]] = dict(r)
        elif t == "rebalance":
            blocks[r["block"]] = {**blocks[r["block"]], "choice": r["choice"]}
        elif t == "polish":
            polished[r["block"]] = r
        elif t == "final":
            final = r
    if len(blocks) < head["n_blocks"]:
        raise AqError(f"journal {journal.path} is unfinished: {len(blocks)} of {head['n_blocks']} blocks done; "
                      "run the same progressive command again to resume it")
    units = [Unit(u["name"], tuple(u["layers"]), (), 0, -1) for u in head["units"]]
    plan = build_plan(units, {n: s for i in sorted(blocks) for n, s in blocks[i]["choice"].items()})
    trained: dict[str, dict] = {}
    for i in sorted(polished):
        ref = polished[i].get("trained") or {}
        for name in ref.get("layers", []):
            trained[name] = {"file": ref["file"], "sha256": ref["sha256"]}
    if final is None:
        raise AqError(f"journal {journal.path} has no final record: the run stopped before its plan was chosen")
    if Plan.from_json(final["plan"]) != plan:
        raise AqError(f"journal {journal.path}: its decisions do not lead to its final plan (edited by hand?)")
    return plan, trained
