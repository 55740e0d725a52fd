"""The command-line contract: JSON on stdout only, one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from aqsearch.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--scheme", "w5g64"], "bits must be one of"),
    (["eval", "--scheme", "w4g48"], "group size must be one of"),
    (["eval", "--scheme", "w4g128x"], "unknown suffix 'x'"),
    (["eval", "--scheme", "w4g64sf"], "expected w{bits}g{group}"),
    (["materialize", "--scheme", "w4g64q", "--out", "never-written"], "unknown suffix 'q'"),
    (["eval", "--model", "/no/such/model.gguf", "--scheme", "w4g64"], "model file not found"),
    (["eval", "--model", "./no/such/dir", "--scheme", "w4g64"], "model path not found"),
    (["run", "--budget", "-3GiB"], "must be positive"),
    (["progressive", "--budget", "-3GiB", "--out", "p.json", "--journal", "j.jsonl"], "must be positive"),
    (["eval", "--eval-tokens", "-5"], "must be positive"),
    (["eval", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_one_line(capsys, argv, needle):
    """Catches bad input answered with a traceback or several lines."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aqsearch: error:") and needle in lines[0]


def test_bad_data_one_line(capsys, tiny_dir, tmp_path, text_file):
    """Catches bad data files answered with a traceback."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, out, err = run(capsys, "eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(empty))
    assert rc == 2 and "data file is empty" in err.strip().splitlines()[-1]
    rc, out, err = run(capsys, "eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(text_file),
                       "--eval-tokens", "100000", "--seqlen", "64")
    assert rc == 2 and "not enough" in err.strip().splitlines()[-1] and out == ""
    rc, out, err = run(capsys, "eval", "--model", str(tiny_dir), "--eval-data", str(text_file),
                       "--calib-data", str(text_file), "--seqlen", "32", "--eval-tokens", "64")
    assert rc == 2 and "same text" in err


def test_eval_json_on_stdout_only(capsys, tiny_dir, text_file, other_text_file):
    """Catches progress or logs written to stdout under --json."""
    rc, out, err = run(capsys, "eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(text_file),
                       "--calib-data", str(other_text_file), "--eval-tokens", "128", "--seqlen", "64", "--json")
    assert rc == 0
    obj = json.loads(out)
    for k in ("kl_mean", "kl_p99", "kl_max", "top1", "ppl", "ppl_ref", "ppl_ratio", "bytes", "bytes_total", "bpw",
              "tokens", "seconds"):
        assert k in obj
    assert obj["tokens"] == 2 * 63 and obj["kl_mean"] > 0 and obj["eval_data"]["hash"] == obj["data_hash"]


def test_run_marks_budget(capsys, tiny_dir, text_file):
    """Catches uniform rows marked as fitting a budget they exceed."""
    rc, out, err = run(capsys, "uniform", "--model", str(tiny_dir), "--eval-data", str(text_file), "--eval-tokens", "64",
                       "--seqlen", "32", "--schemes", "w8g32,w2g32", "--budget", "4bpw", "--json")
    obj = json.loads(out)
    assert rc == 0 and [r["fits"] for r in obj["results"]] == [False, True]
    assert obj["results"][0]["kl_mean"] < obj["results"][1]["kl_mean"]


def test_console_script_exit_status():
    """Catches the console script exiting 0 or printing on stdout after bad input."""
    p = subprocess.run([sys.executable, "-m", "aqsearch", "eval", "--scheme", "w4g128x"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1


def without_search_extra(*argv: str) -> subprocess.CompletedProcess:
    """``aqsearch ARGV`` in a process where the search extra (Optuna) is not installed."""
    code = "import sys; sys.modules['optuna'] = None; from aqsearch.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def test_commands_run_without_the_search_extra(tiny_dir, text_file, other_text_file, tmp_path):
    """eval needs no Optuna; search says in one line which extra it needs (it once failed on import for all)."""
    p = without_search_extra("eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(text_file),
                             "--calib-data", str(other_text_file), "--eval-tokens", "64", "--seqlen", "32", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kl_mean"] > 0
    p = without_search_extra("search", "--model", str(tiny_dir), "--storage", f"sqlite:///{tmp_path}/s.db",
                             "--study", "s", "--budget", "4bpw", "--trials", "2", "--calib-data", str(text_file))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "aqsearch: error: this command needs optuna: pip install 'aqsearch[search]'"


def test_main_job_end_to_end(capsys, tiny_dir, tmp_path):
    """The main job: bank -> hull -> score study -> racing -> pick -> artifact -> held-out numbers. Then the
    same study's ``pick`` (no recompute) and the run's own artifact score the same under ``eval``
    (catches a pick that writes another plan, or unpolished weights)."""
    from tinymodels import TINY_FRONT

    rc, out, err = run(capsys, "run", "--model", str(tiny_dir), "--budget", "5bpw", *TINY_FRONT,
                       "--workdir", str(tmp_path / "job"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["picked"]["bytes"] <= res["budget_bytes"] and res["picked"]["polished"]
    assert (tmp_path / "job" / "plan.json").exists() and (tmp_path / "job" / "front.png").exists()
    assert res["eval_data"]["source"] == "model-samples(seed=2)"  # not the text the search scored on
    assert res["uniform"]["polished"] and res["picked"]["kl_mean"] <= res["uniform"]["kl_mean"]
    assert res["bank"]["candidates"] == res["bank"]["of"] > 0
    rc, out, err = run(capsys, "pick", "--storage", res["storage"], "--study", res["study"], "--budget", "5bpw",
                       "--out", str(tmp_path / "p.json"), "--json")
    assert rc == 0 and json.loads(out)["trial"] == res["picked_trial"]
    kls = []
    for plan in (tmp_path / "job" / "plan.json", tmp_path / "p.json"):
        rc, out, err = run(capsys, "eval", "--model", str(tiny_dir), "--plan", str(plan), "--eval-tokens", "64",
                           "--seqlen", "32", "--json")
        assert rc == 0
        kls.append(json.loads(out)["kl_mean"])
    assert kls[1] == pytest.approx(kls[0], rel=1e-6)
    art = json.loads((tmp_path / "job" / "plan.json").read_text())
    assert json.loads((tmp_path / "p.json").read_text())["weights"]["sha256"] == art["weights"]["sha256"]
