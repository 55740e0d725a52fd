"""The Job: everything resolved once, bad data refused before any work, windows that never overlap."""

import pytest
import torch

from aqsearch.bank import BankConfig
from aqsearch.config import Budget
from aqsearch.errors import AqError
from aqsearch.job import DataConfig, Job
from aqsearch.models import load_model

SMALL = DataConfig(calib_windows=4, calib_seqlen=32, eval_tokens=128, seqlen=32)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir))


def test_budget_resolved_to_bytes_once(loaded):
    """Catches a budget resolved against other layers than the space's (bpw of the decoder Linears)."""
    job = Job.resolve(loaded, "4bpw", data=SMALL)
    assert job.limit == Budget.parse("4bpw").resolve(job.space.weights) == job.space.weights // 2
    assert job.budgets == (job.limit,)
    two = Job.resolve(loaded, ["3bpw", "5bpw"], data=SMALL)
    assert two.budgets == tuple(sorted(two.budgets)) and two.limit == two.budgets[-1]


def test_windows_are_disjoint(loaded, text_file):
    """Calibration, score and evaluation windows share no window (one text cut by --split, and model
    samples): catches a split that calibrates on the evaluation text."""
    for data in (SMALL, DataConfig(str(text_file), str(text_file), 0.5, 2, 16, 32, 16)):
        job = Job.resolve(loaded, "4bpw", data=data)
        sets = [job.calib.windows, job.score.windows, job.evaluation.windows]
        hashes = {job.calib.hash, job.score.hash, job.evaluation.hash}
        assert len(hashes) == 3
        if data.calib:  # one text: no token position may be in two sets
            assert "[:0.25]" in job.calib.source and "[0.5:]" in job.evaluation.source
        assert all(w.numel() for w in sets)


@pytest.mark.parametrize("data, needle", [
    (DataConfig("x.txt", "x.txt"), "data file not found"),
    (DataConfig(split=1.5), "between 0 and 1"),
    (DataConfig(eval_tokens=16, seqlen=32), "at least one window"),
])
def test_bad_data_refused_before_the_model_loads(data, needle, monkeypatch):
    """Catches a run that does its work first and complains about --split at the end."""
    import aqsearch.job as jobmod

    monkeypatch.setattr(jobmod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(AqError, match=needle):
        Job.resolve("no-such-model", "4bpw", data=data)


def test_same_text_without_split_refused(text_file):
    """Catches calibrating and evaluating on one text without a split."""
    with pytest.raises(AqError, match="pass --split"):
        DataConfig(str(text_file), str(text_file)).check()


def test_budget_below_the_menu_refused(loaded):
    """Catches a budget no plan of the menu can meet reaching the bank (it would build, then fail)."""
    with pytest.raises(AqError, match="below the smallest plan of the menu"):
        Job.resolve(loaded, "1KiB", data=SMALL)


def test_describe_changes_with_what_results_depend_on(loaded):
    """A study resumed with another seed, budget or windows must see another description."""
    a = Job.resolve(loaded, "4bpw", data=SMALL)
    assert a.describe() == Job.resolve(loaded, "4bpw", data=SMALL).describe()
    assert a.describe() != Job.resolve(loaded, "4bpw", data=SMALL, seed=1).describe()
    assert a.describe() != Job.resolve(loaded, "5bpw", data=SMALL).describe()
    assert a.describe() != Job.resolve(loaded, "4bpw", data=DataConfig(calib_windows=5, calib_seqlen=32,
                                                                         eval_tokens=128, seqlen=32)).describe()
    assert a.describe() != Job.resolve(loaded, "4bpw", data=SMALL, bank=BankConfig(steps=3)).describe()
    assert torch.equal(a.calib.windows, Job.resolve(loaded, "4bpw", data=SMALL).calib.windows)
