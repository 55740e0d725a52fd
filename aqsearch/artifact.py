"""The artifact: a frozen plan with its polished weights, the one format ``run``, ``pick`` and
``progressive`` write and that ``eval``, ``materialize``, ``generate`` and ``export`` read.

On disk: the plan JSON (``{"version", "layers", "bytes", "bpw", "measurement", "polished", "weights"}``)
and, when it has weights, ``<plan>.weights.safetensors`` beside it (codes, scales, zeros per layer;
``weights`` names the file and its sha256, which every read checks). A plan-only artifact (``polished:
false``, no weights) is evaluated and materialized at round-to-nearest. :meth:`Artifact.load` is the one
reader: it refuses weights without a sha256, a hash mismatch, and tensors whose scheme is not the one the
plan gives their layer.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "plan.json")
>>> Artifact(Plan.uniform("w4g64"), {}, {"bytes": 1, "bpw": 4.3}).save(p)
>>> Artifact.load(p).plan == Plan.uniform("w4g64")
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.quantizers import QTensor


def weights_path(out: str | Path) -> Path:
    """Where a plan's weights go: beside it, ``plan.json`` -> ``plan.weights.safetensors``."""
    return Path(out).with_suffix(".weights.safetensors")


def check_plan_out(out: str, force: bool) -> None:
    """Both files :meth:`Artifact.save` may write: writable, and not replacing anything unless ``force``."""
    from aqsearch.io import check_output

    check_output(out, "--out", force)
    check_output(weights_path(out), "--out (its weights file)", force)


@dataclass(frozen=True)
class Artifact:
    """A plan, its polished weights (``{}``: plan only, round-to-nearest) and what was measured of it."""

    plan: Plan
    tensors: Mapping[str, QTensor] = field(default_factory=dict)
    meta: Mapping = field(default_factory=dict)

    @property
    def polished(self) -> bool:
        return bool(self.tensors)

    def save(self, out: str | Path) -> None:
        """Plan JSON plus, when there are weights, the weights file beside it (both atomic)."""
        from aqsearch.weights import save_qtensors

        extra = {k: v for k, v in self.meta.items() if k not in ("version", "layers", "weights", "polished")}
        extra["polished"] = self.polished
        if self.tensors:
            wpath = weights_path(out)
            extra["weights"] = {"file": wpath.name, "sha256": save_qtensors(wpath, dict(self.tensors))}
        self.plan.save(str(out), extra)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        from aqsearch.weights import load_qtensors

        plan = Plan.load(str(path))
        obj = json.loads(Path(path).read_text())
        meta = {k: v for k, v in obj.items() if k not in ("version", "layers", "weights")}
        w = obj.get("weights")
        if w is None:
            return cls(plan, {}, meta)
        if not (isinstance(w, dict) and isinstance(w.get("file"), str) and isinstance(w.get("sha256"), str)):
            raise AqError(f"invalid plan {path}: 'weights' must be {{\"file\": NAME, \"sha256\": HEX}}, "
                          f"got {json.dumps(w)[:60]}")
        tensors = load_qtensors(Path(path).parent / w["file"], w["sha256"])
        for name, q in tensors.items():
            if plan.scheme_for(name) != q.scheme:
                raise AqError(f"invalid plan {path}: its weights hold {name} at {q.scheme}, but the plan gives it "
                              f"{plan.scheme_for(name)}")
        return cls(plan, tensors, meta)

    def weight_fn(self):
        """The weights :func:`aqsearch.apply.quantized` uses: polished where held, round-to-nearest elsewhere."""
        from aqsearch.apply import rtn_weight
        from aqsearch.weights import trained_weight_fn

        return trained_weight_fn(dict(self.tensors)) if self.tensors else rtn_weight

    def evaluate(self, model, ref, batch_size: int = 1):
        """Held-out measurement of this artifact against a reference (:func:`aqsearch.quality.evaluate`)."""
        from aqsearch.quality import evaluate

        return evaluate(model, ref, self.plan, weight_fn=self.weight_fn(), batch_size=batch_size)

    def materialize(self, model, out: str | Path, tokenizer=None, source: str | None = None) -> dict:
        """Packed low-bit weights put into ``model`` and saved to folder ``out`` (:mod:`aqsearch.materialize`);
        returns the folder's ``aqsearch.json``."""
        from aqsearch.materialize import materialize, save

        materialize(model, self.plan, qtensors=dict(self.tensors))
        return save(model, self.plan, out, tokenizer=tokenizer, source=source)


def read_artifact(path: str | Path) -> tuple[Plan, dict[str, QTensor]]:
    """A plan file and its weights (empty when it names none): :meth:`Artifact.load`."""
    a = Artifact.load(path)
    return a.plan, dict(a.tensors)


def load_plan(path: str | Path):
    """A plan file and the weights it uses: ``(plan, weight_fn)``."""
    a = Artifact.load(path)
    return a.plan, a.weight_fn()
