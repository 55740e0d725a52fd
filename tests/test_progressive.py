"""The progressive strategy (over a layer bank) on a tiny random Llama: budget, journal, replay, kill -9
during the polish and resume, refusals."""

import json
import signal
import subprocess
import sys
import time

import pytest

from aqsearch.cli import main
from aqsearch.config import Plan
from aqsearch.artifact import load_plan
from aqsearch.strategies.journal import Journal, replay

ARGS = ["--calib-samples", "8", "--calib-seqlen", "32", "--steps", "10", "--eval-tokens", "128", "--seqlen", "32",
        "--gate", "mse=0.02", "--json", "--no-train"]


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
    """Catches a plan over the budget, decisions missing from the journal, or an artifact whose plan is not the journal's final one."""
    tmp, out, jr = first_run
    obj = json.loads(out.read_text())
    recs = list(Journal(jr).records())
    head = recs[0]
    assert head["type"] == "start" and obj["bytes"] <= head["budget_bytes"]
    tries = [r for r in recs if r["type"] == "try"]
    assert {r["decision"] for r in tries} >= {"pass", "fail"}
    assert all("bytes" in r and "delta" in r for r in tries)
    blocks = [r for r in recs if r["type"] == "block"]
    assert len(blocks) == 2 and all("plan_bytes" in r and r["menu"] for r in blocks)
    final = [r for r in recs if r["type"] == "final"][-1]
    assert [r["type"] for r in recs].index("final") < [r["type"] for r in recs].index("polish")  # then polished
    plan, wfn = load_plan(out)
    assert plan == Plan.from_json(final["plan"])


def test_replay_gives_the_same_plan(first_run, capsys):
    """Catches a replay that rebuilds another plan (or other weights) than the run wrote."""
    tmp, out, jr = first_run
    assert main(["replay", "--journal", str(jr), "--out", str(tmp / "replayed.json"), "--json"]) == 0
    a, b = json.loads(out.read_text()), json.loads((tmp / "replayed.json").read_text())
    assert a["layers"] == b["layers"]
    if a.get("weights"):  # the polish was kept: the journal's polished blocks are the artifact's weights
        assert a["weights"]["sha256"] == b["weights"]["sha256"]


def test_replay_refuses_a_journal_whose_final_plan_was_edited(first_run, tmp_path, capsys):
    """Catches a replay that never compares its decisions with the final record (or drops that record)."""
    tmp, out, jr = first_run
    lines = jr.read_text().splitlines()
    k = max(i for i, l in enumerate(lines) if json.loads(l)["type"] == "final")
    rec = json.loads(lines[k])
    name = next(iter(rec["plan"]["layers"]))
    rec["plan"]["layers"][name] = "w8g32" if rec["plan"]["layers"][name] != "w8g32" else "w2g32"
    lines[k] = json.dumps(rec)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    assert main(["replay", "--journal", str(edited), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edited by hand" in err[0]


def test_kill_9_midway_then_resume_gives_the_same_plan(first_run, tiny_dir, tmp_path):
    """Catches a resume that trains polished blocks again, or ends with another plan."""
    tmp, out, _ = first_run
    argv, out2, jr2 = progressive(tiny_dir, tmp_path, "4bpw", "b")
    # The child dies by SIGKILL right after the journal holds block 0's polish record: the worst moment, and the
    # same one on every machine (polling the journal from here raced a fast polish that reached block 1 first).
    killer = ("import os, signal, sys\n"
              "from aqsearch.strategies.journal import Journal\n"
              "append = Journal.append\n"
              "def dying_append(self, record):\n"
              "    append(self, record)\n"
              "    if record.get('type') == 'polish':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "Journal.append = dying_append\n"
              "from aqsearch.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", killer, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL
    recs = list(Journal(jr2).records())
    assert not out2.exists() and [r["block"] for r in recs if r["type"] == "polish"] == [0]
    assert main(argv) == 0
    recs = list(Journal(jr2).records())
    resumed = [r for r in recs if r["type"] == "resume"]
    assert resumed and resumed[0]["blocks_done"] == [0, 1]
    assert [r["block"] for r in recs if r["type"] == "polish"] == [0, 1]  # block 0 kept, not trained again
    a, b = json.loads(out.read_text()), json.loads(out2.read_text())
    assert a["layers"] == b["layers"] and a.get("weights", {}).get("sha256") == b.get("weights", {}).get("sha256")


def smallest_plan_bytes() -> int:
    """Every decoder Linear of the tiny model at the engine's smallest scheme."""
    from aqsearch.config import QuantScheme
    from aqsearch.memory import smallest_bytes
    from aqsearch.models import decoder_layers
    from tinymodels import tiny_model

    return smallest_bytes(decoder_layers(tiny_model()), [QuantScheme(b, g) for b in (8, 4, 3, 2) for g in (32, 64, 128, 256)])


def test_a_gate_nothing_passes_rolls_back_and_the_rebalance_still_meets_the_budget(tiny_dir, tmp_path):
    """With a block gate no scheme passes, every descent fails and rolls back; the rebalance then picks,
    among what was measured, the least error within the budget (catches an engine that ends above it)."""
    argv, out, jr = progressive(tiny_dir, tmp_path, str(smallest_plan_bytes()), "c", ["--gate", "mse=1e-9"])
    assert main(argv) == 0
    recs = list(Journal(jr).records())
    assert any(r.get("decision") == "revert" for r in recs) and any(r["type"] == "rebalance" for r in recs)
    final = [r for r in recs if r["type"] == "final"][-1]
    assert final["meets_budget"] and final["bytes"] == smallest_plan_bytes()


def test_budget_below_the_smallest_plan_is_refused_at_once(tiny_dir, tmp_path, capsys):
    """Catches an impossible budget found only after the bank was built."""
    argv, out, jr = progressive(tiny_dir, tmp_path, str(smallest_plan_bytes() - 1), "d")
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest plan" in err[0]
    assert f"{smallest_plan_bytes():,} B" in err[0]
    assert not jr.exists() and not out.exists() and time.time() - t0 < 30  # no block was started


@pytest.mark.parametrize("flag", ["--out", "--journal"])
def test_unwritable_output_is_found_before_any_work(tiny_dir, tmp_path, capsys, flag, no_model_load):
    """Catches an output path checked only at the end of the run."""
    argv, out, jr = progressive(tiny_dir, tmp_path, "4bpw", "e")
    argv[argv.index(flag) + 1] = "/proc/aqsearch-test/x"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "cannot write" in err[0]
    assert not jr.exists() and not out.exists() and not no_model_load  # refused before the model loads


@pytest.mark.parametrize("where", ["unwritable", "folder", "file"])
def test_replay_out_that_cannot_or_should_not_be_written(first_run, tmp_path, capsys, where):
    """Catches replay writing over a file without --force, or into a folder."""
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
    """Catches a journal of another budget resumed as if it were this run's."""
    tmp, out, jr = first_run
    argv, _, _ = progressive(tiny_dir, tmp, "3bpw", "a", ["--force"])  # same journal, other budget
    assert main(argv) == 2
    assert "belongs to another run" in capsys.readouterr().err


def test_unfinished_journal_cannot_be_replayed(tmp_path):
    """Catches a replay that makes a plan from half a run."""
    j = Journal(tmp_path / "j.jsonl")
    j.append({"type": "start", "version": 1, "n_blocks": 3, "units": [{"name": "u", "layers": ["l"]}]})
    with pytest.raises(Exception, match="unfinished"):
        replay(j)
