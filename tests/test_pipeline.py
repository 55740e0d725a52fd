"""The pipeline: finish keeps the polish only where it helps; run with each strategy; the README's Python
example, executed as written on the real model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aqsearch.artifact import Artifact
from aqsearch.bank import BankConfig
from aqsearch.job import DataConfig, Job
from aqsearch.models import load_model
from aqsearch.pipeline import finish, run

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = DataConfig(calib_windows=4, calib_seqlen=32, eval_tokens=128, seqlen=32)


@pytest.fixture(scope="module")
def job(tiny_dir):
    return Job.resolve(load_model(str(tiny_dir)), "5bpw", data=SMALL, bank=BankConfig(menu=("w8g128", "w4g64", "w2g64"), steps=0))


def test_finish_keeps_round_to_nearest_when_the_polish_is_worse(job, monkeypatch, tmp_path):
    """Catches a finish that writes whatever the polish returned: polished weights made worse on purpose
    (codes shifted) must lose to round-to-nearest on the score windows, and the artifact is plan-only."""
    import aqsearch.pipeline as pipeline

    real = pipeline.polish

    def spoiled(*a, **kw):
        q, st = real(*a, **kw)
        for t in q.values():
            t.codes.copy_((t.codes.long() + 1).clamp(max=2 ** t.scheme.bits - 1).to(t.codes.dtype))
        return q, st

    bank = job.new_bank()
    bank.build()
    plan = bank.plan({u.name: "w2g64" for u in bank.units})
    monkeypatch.setattr(pipeline, "polish", spoiled)
    art, rep = finish(job, plan, tmp_path / "a.json")
    assert rep["polish"]["kept"] is False and not art.polished
    assert rep["polish"]["score_kl"]["polished"] > rep["polish"]["score_kl"]["rtn"]
    assert json.loads((tmp_path / "a.json").read_text())["polished"] is False
    monkeypatch.setattr(pipeline, "polish", real)
    art, rep = finish(job, plan, tmp_path / "b.json")
    assert Artifact.load(tmp_path / "b.json").polished == rep["polish"]["kept"]
    assert rep["picked"]["bytes"] <= job.limit


@pytest.mark.parametrize("strategy", ["knapsack", "study"])
def test_run_returns_a_plan_within_the_budget(job, strategy, tmp_path):
    """Catches a strategy whose pick exceeds the budget, or a uniform baseline that is not the largest menu scheme that fits."""
    res = run(job, strategy, workdir=tmp_path, trials=4)
    assert res["picked"]["bytes"] <= job.limit and (tmp_path / "plan.json").exists()
    assert res["uniform"]["scheme"] == "w4g64"  # the largest menu scheme within 5 bpw


@pytest.mark.real
def test_readme_python_example_runs_as_written(tmp_path):
    code = re.search(r"## Python\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "AQSEARCH_CACHE"}  # the converted model's user cache
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"B budget, KL \d+\.\d{4}", p.stdout)
    assert Artifact.load(tmp_path / "pick.json").polished
