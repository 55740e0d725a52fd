"""The artifact: one reader that checks everything it reads back."""

import json
import shutil

import pytest
import torch

from aqsearch.artifact import Artifact
from aqsearch.config import Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.models import check_plan_fits, shapes_hash
from aqsearch.quantizers import quantize
from tinymodels import tiny_model

NAME = "model.layers.0.mlp.up_proj"


def art(scheme="w4g32", shape=(160, 64), seed=0) -> Artifact:
    torch.manual_seed(seed)
    return Artifact(Plan.uniform(scheme), {NAME: quantize(torch.randn(*shape), QuantScheme.parse(scheme))}, {"bytes": 1})


def test_round_trip(tmp_path):
    """Catches an artifact that does not read back what it saved."""
    a = art()
    a.save(tmp_path / "p.json")
    b = Artifact.load(tmp_path / "p.json")
    assert b.plan == a.plan and torch.equal(b.tensors[NAME].codes, a.tensors[NAME].codes) and b.polished
    assert json.loads((tmp_path / "p.json").read_text())["polished"] is True


def test_another_valid_weights_file_swapped_in_is_refused(tmp_path):
    """Catches a reader that skips the sha256 check: the other file is a valid weights file."""
    art(seed=0).save(tmp_path / "a.json")
    art(seed=1).save(tmp_path / "b.json")
    shutil.copy(tmp_path / "b.weights.safetensors", tmp_path / "a.weights.safetensors")
    with pytest.raises(AqError, match="sha256"):
        Artifact.load(tmp_path / "a.json")


def test_weights_without_a_sha256_are_refused(tmp_path):
    """Catches a reader that accepts ``weights`` without its hash (then uses damaged weights)."""
    art().save(tmp_path / "a.json")
    obj = json.loads((tmp_path / "a.json").read_text())
    del obj["weights"]["sha256"]
    (tmp_path / "a.json").write_text(json.dumps(obj))
    with pytest.raises(AqError, match="invalid plan"):
        Artifact.load(tmp_path / "a.json")


def test_weights_of_another_scheme_than_the_plan_are_refused(tmp_path):
    """Catches a reader that silently drops trained tensors whose scheme differs from the plan's."""
    art("w4g32").save(tmp_path / "a.json")
    obj = json.loads((tmp_path / "a.json").read_text())
    obj["layers"] = {"_default": "w2g32"}
    (tmp_path / "a.json").write_text(json.dumps(obj))
    with pytest.raises(AqError, match="gives it"):
        Artifact.load(tmp_path / "a.json")


def test_a_plan_made_for_another_model_is_refused():
    """Names that match but shapes that do not (a plan from another model): one line, not a traceback."""
    m = tiny_model()
    check_plan_fits(art(), m)  # the tiny model's up_proj is 160 x 64
    with pytest.raises(AqError, match="another model"):
        check_plan_fits(art(shape=(96, 64)), m)
    with pytest.raises(AqError, match="another model"):
        check_plan_fits(Artifact(Plan.uniform("w4g32"), {}, {"shapes": "0" * 16}), m)
    check_plan_fits(Artifact(Plan.uniform("w4g32"), {}, {"shapes": shapes_hash(m)}), m)
