"""The progressive engine on a tiny random Llama: budget, journal, replay, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from aqsearch.cli import main
from aqsearch.config import Plan
from aqsearch.journal import Journal, replay
from aqsearch.weights import load_plan

ARGS = ["--calib-samples", "8", "--calib-seqlen", "32", "--steps", "10", "--eval-tokens", "128", "--seqlen", "32",
        "--gate", "mse=0.02", "--json"]


def progressive(tiny_dir, tmp, budget, name, extra=()):
    out, jr = tmp / f"{name}.json", tmp / f"{name}.jsonl"
    argv = ["progressive", "--model", str(tiny_dir), "--budget", budget, "--out", str(out), "--journal", str(jr), *ARGS, *extra]
    return argv, out, jr


@pytest.fixture(scope="module")
def first_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prog")
    argv, out, jr = progressive(tiny_dir, tmp, "4bpw", "a")
    assert main(argv) == 0
    return tmp, out, jr


def test_plan_meets_budget_and_every_decision_is_logged(first_run, tiny_dir):
    tmp, out, jr = first_run
    obj = json.loads(out.read_text())
    recs = list(Journal(jr).records())
    head = recs[0]
    assert head["type"] == "start" and obj["bytes"] <= head["budget_bytes"]
    tries = [r for r in recs if r["type"] == "try"]
    assert {r["decision"] for r in tries} >= {"pass", "fail"}
    assert all("plan_bytes" in r and "bytes" in r for r in tries)
    assert len([r for r in recs if r["type"] == "block"]) == 2 and recs[-1]["type"] == "final"
    plan, wfn = load_plan(out)
    assert plan == Plan.from_json(recs[-1]["plan"])


def test_replay_gives_the_same_plan(first_run, capsys):
    tmp, out, jr = first_run
    assert main(["replay", "--journal", str(jr), "--out", str(tmp / "replayed.json"), "--json"]) == 0
    a, b = json.loads(out.read_text()), json.loads((tmp / "replayed.json").read_text())
    assert a["layers"] == b["layers"]
    assert a.get("weights", {}).get("sha256") == b.get("weights", {}).get("sha256")


def test_kill_9_midway_then_resume_gives_the_same_plan(first_run, tiny_dir, tmp_path):
    tmp, out, _ = first_run
    argv, out2, jr2 = progressive(tiny_dir, tmp_path, "4bpw", "b")
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-m", "aqsearch", *argv], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first block is finished, then kill mid-run
        if jr2.exists() and any(r["type"] == "block" for r in Journal(jr2).records()):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    recs = list(Journal(jr2).records())
    assert recs[-1]["type"] != "final" and any(r["type"] == "block" for r in recs)
    assert main(argv) == 0
    resumed = [r for r in Journal(jr2).records() if r["type"] == "resume"]
    assert resumed and 0 in resumed[0]["blocks_done"]
    a, b = json.loads(out.read_text()), json.loads(out2.read_text())
    assert a["layers"] == b["layers"] and a.get("weights", {}).get("sha256") == b.get("weights", {}).get("sha256")


def smallest_plan_bytes() -> int:
    """Every decoder Linear of the tiny model at the engine's smallest scheme."""
    from aqsearch.config import QuantScheme
    from aqsearch.memory import smallest_bytes
    from aqsearch.models import decoder_layers
    from tinymodels import tiny_model

    return smallest_bytes(decoder_layers(tiny_model()), [QuantScheme(b, g) for b in (8, 4, 3, 2) for g in (32, 64, 128, 256)])


def test_budget_the_gates_cannot_meet_names_the_smallest_size(tiny_dir, tmp_path, capsys):
    # the smallest plan there is, with a block gate almost nothing passes: possible, but not within the gates
    argv, out, jr = progressive(tiny_dir, tmp_path, str(smallest_plan_bytes()), "c", ["--no-train", "--gate", "mse=1e-7"])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be met" in err and "gates allow no less than" in err and out.exists()
    # the journal of that run replays to its best plan, with a warning that it missed the budget
    assert main(["replay", "--journal", str(jr), "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aqsearch: warning:") and "missed its budget" in err[0]


def test_budget_below_the_smallest_plan_is_refused_at_once(tiny_dir, tmp_path, capsys):
    argv, out, jr = progressive(tiny_dir, tmp_path, str(smallest_plan_bytes() - 1), "d")
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest plan the engine can make" in err[0]
    assert f"{smallest_plan_bytes():,} B" in err[0]
    assert not jr.exists() and not out.exists() and time.time() - t0 < 30  # no block was started


@pytest.mark.parametrize("flag", ["--out", "--journal"])
def test_unwritable_output_is_found_before_any_work(tiny_dir, tmp_path, capsys, flag):
    argv, out, jr = progressive(tiny_dir, tmp_path, "4bpw", "e")
    argv[argv.index(flag) + 1] = "/proc/aqsearch-test/x"
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "cannot write" in err[0]
    assert not jr.exists() and not out.exists() and time.time() - t0 < 2  # refused before the model loads


@pytest.mark.parametrize("where", ["unwritable", "folder", "file"])
def test_replay_out_that_cannot_or_should_not_be_written(first_run, tmp_path, capsys, where):
    tmp, _, jr = first_run
    out = {"unwritable": "/proc/aqsearch-test/x.json", "folder": str(tmp_path), "file": str(tmp_path / "mine.json")}[where]
    if where == "file":
        (tmp_path / "mine.json").write_text("mine")
    assert main(["replay", "--journal", str(jr), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and {"unwritable": "cannot write", "folder": "is a folder", "file": "use --force"}[where] in err[0]
    if where == "file":
        assert (tmp_path / "mine.json").read_text() == "mine"


def test_journal_of_another_run_is_refused(first_run, tiny_dir, capsys):
    tmp, out, jr = first_run
    argv, _, _ = progressive(tiny_dir, tmp, "3bpw", "a", ["--force"])  # same journal, other budget
    assert main(argv) == 2
    assert "belongs to another run" in capsys.readouterr().err


def test_unfinished_journal_cannot_be_replayed(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"type": "start", "version": 1, "n_blocks": 3})
    with pytest.raises(Exception, match="unfinished"):
        replay(j)
