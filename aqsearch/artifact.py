"""The artifact: a plan with its trained weights, the one format that pick, the main job and the
progressive engine write and that ``eval``, ``materialize`` and ``generate`` read.

On disk: the plan JSON (``{"version", "layers", "bytes", "bpw", "measurement", "weights"}``) and,
when it has trained tensors, ``<plan>.weights.safetensors`` beside it (codes, scales, zeros per
layer; ``weights`` names the file and its sha256). :func:`read_artifact` is the one reader.

A plan governs the decoder's Linears (:func:`aqsearch.models.decoder_layers`); an exact entry naming
anything else (an embedding or the LM head from a search with ``--embeddings``) cannot be evaluated or
materialized, and :func:`check_governed` makes that an error instead of dropping it.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "plan.json")
>>> write_artifact(p, Plan.uniform("w4g64"), {}, {"bytes": 1, "bpw": 4.3})
>>> read_artifact(p)[0] == Plan.uniform("w4g64")
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.quantizers import QTensor


def weights_path(out: str | Path) -> Path:
    """Where a plan's trained weights go: beside it, ``plan.json`` -> ``plan.weights.safetensors``."""
    return Path(out).with_suffix(".weights.safetensors")


def check_plan_out(out: str, force: bool) -> None:
    """Both files :func:`write_artifact` may write: writable, and not replacing anything unless ``force``."""
    from aqsearch.io import check_output

    check_output(out, "--out", force)
    check_output(weights_path(out), "--out (its weights file)", force)


def write_artifact(out: str | Path, plan: Plan, tensors: dict[str, QTensor], meta: dict | None = None) -> None:
    """Plan JSON plus, when there are trained tensors, its weights file beside it (both atomic)."""
    from aqsearch.weights import save_qtensors

    extra = {k: v for k, v in (meta or {}).items() if k not in ("version", "layers", "weights")}
    if tensors:
        wpath = weights_path(out)
        extra["weights"] = {"file": wpath.name, "sha256": save_qtensors(wpath, tensors)}
    plan.save(str(out), extra)


def write_plan(out: str, res: dict, trained: dict, save_qtensors=None) -> None:
    """:func:`write_artifact` from a result dict (``plan`` JSON, ``bytes``, ``bpw``, ``measurement``)."""
    write_artifact(out, Plan.from_json(res["plan"]), trained,
                   {"bytes": res["bytes"], "bpw": res["bpw"], "measurement": res.get("measurement")})


def read_artifact(path: str | Path) -> tuple[Plan, dict[str, QTensor]]:
    """A plan file and its trained tensors (empty when it names no weights file)."""
    from aqsearch.weights import load_qtensors

    plan = Plan.load(str(path))
    w = json.loads(Path(path).read_text()).get("weights")
    if w is None:
        return plan, {}
    if not (isinstance(w, dict) and isinstance(w.get("file"), str) and isinstance(w.get("sha256", ""), str)):
        raise AqError(f"plan {path}: 'weights' must be {{\"file\": NAME, \"sha256\": HEX}}, got {json.dumps(w)[:60]}")
    return plan, load_qtensors(Path(path).parent / w["file"], w.get("sha256"))


def check_governed(plan: Plan | None, names: Iterable[str]) -> None:
    """Refuse a plan whose exact entries name layers outside ``names`` (the layers it can govern)."""
    if plan is None:
        return
    names = set(names)
    extra = [k for k, s in plan.entries if not k.startswith("re:") and k != "_default" and k not in names
             and s is not None]
    if extra:
        raise AqError(f"the plan quantizes {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which this "
                      "command cannot quantize (it governs the decoder's Linears only)")
