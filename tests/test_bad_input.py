"""Bad input never reaches the user as a traceback: one line on stderr, exit status 2, nothing on stdout.

One test per traceback a user met (issue 11), plus the inputs that used to be taken silently. Each
command is given input that is bad in exactly one way; a test fails if the command crashes, exits 0,
or says more than one line.
"""

import json

import pytest

from aqsearch.cli import main
from aqsearch.config import QuantScheme
from aqsearch.memory import layer_bytes
from aqsearch.models import decoder_layers
from tinymodels import tiny_model

DATA = ["--eval-tokens", "64", "--seqlen", "32"]
UNWRITABLE = "/proc/aqsearch-test/out"  # no one, root included, can create files under /proc


def one_line_error(capsys, argv, needle):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "", (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("aqsearch: error:") and needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def study(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-study")
    url = f"sqlite:///{d}/s.db"
    from tinymodels import TINY_FRONT

    assert main(["search", "--model", str(tiny_dir), "--storage", url, "--study", "s", "--budget", "6bpw",
                 *TINY_FRONT]) == 0
    return url


@pytest.fixture(scope="module")
def materialized(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-mat") / "m"
    assert main(["materialize", "--model", str(tiny_dir), "--scheme", "w4g32", "--out", str(out), "--device", "cpu"]) == 0
    return out


# ---- the tracebacks ---------------------------------------------------------------------------------
def test_eval_plan_whose_weights_is_not_a_reference(capsys, tiny_dir, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": 1, "layers": {"_default": "w4g32"}, "weights": "x"}))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--plan", str(p), *DATA], "'weights' must be")


def test_eval_plan_with_garbage_weights_file(capsys, tiny_dir, tmp_path):
    from aqsearch.io import sha256_file

    (tmp_path / "w.safetensors").write_bytes(bytes(range(256)) * 8)
    p = tmp_path / "p.json"
    sha = sha256_file(tmp_path / "w.safetensors")  # its hash matches: the content is what is wrong
    p.write_text(json.dumps({"version": 1, "layers": {"_default": "w4g32"}, "weights": {"file": "w.safetensors",
                                                                                         "sha256": sha}}))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--plan", str(p), *DATA], "not a trained-weights file")


def test_replay_of_a_binary_journal(capsys, tmp_path):
    (tmp_path / "j.jsonl").write_bytes(bytes(range(256)) * 8)
    one_line_error(capsys, ["replay", "--journal", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "p.json")],
                   "corrupt at line 1")


@pytest.mark.parametrize("cmd", ["front", "pick"])
def test_reading_a_journal_storage_in_a_missing_folder(capsys, tmp_path, cmd):
    extra = ["--budget", "4bpw", "--out", str(tmp_path / "p.json")] if cmd == "pick" else []
    one_line_error(capsys, [cmd, "--storage", f"journal:///{tmp_path}/missing_dir/x.log", "--study", "s", *extra],
                   "storage file not found")
    assert not (tmp_path / "missing_dir").exists()


@pytest.mark.parametrize("where", ["unwritable", "folder"])
def test_pick_out_unwritable_or_a_folder(capsys, study, tmp_path, where):
    out = UNWRITABLE if where == "unwritable" else str(tmp_path)
    one_line_error(capsys, ["pick", "--storage", study, "--study", "s", "--budget", "6bpw", "--out", out],
                   "cannot write" if where == "unwritable" else "is a folder")


def test_front_plot_in_an_unknown_format(capsys, study, tmp_path):
    one_line_error(capsys, ["front", "--storage", study, "--study", "s", "--plot", str(tmp_path / "front.xyz")],
                   "cannot write a .xyz image")
    assert not list(tmp_path.iterdir())


def test_materialize_out_unwritable(capsys, tiny_dir):
    one_line_error(capsys, ["materialize", "--model", str(tiny_dir), "--scheme", "w4g32", "--out", UNWRITABLE],
                   "cannot write")


def test_generate_with_an_empty_prompt(capsys, materialized):
    one_line_error(capsys, ["generate", str(materialized), "--prompt", "", "--device", "cpu"], "--prompt is empty")


def test_generate_on_a_truncated_checkpoint(capsys, materialized, tmp_path):
    import shutil

    bad = tmp_path / "m"
    shutil.copytree(materialized, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(4000)
    one_line_error(capsys, ["generate", str(bad), "--prompt", "the fox", "--device", "cpu"], "does not match the sha256")


# ---- inputs that were taken silently ----------------------------------------------------------------
def test_plan_naming_a_layer_the_model_lacks(capsys, tiny_dir, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": 1, "layers": {"model.layers.99.mlp.down_proj": "w4g32"}}))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--plan", str(p), *DATA], "model.layers.99.mlp.down_proj")
    one_line_error(capsys, ["materialize", "--model", str(tiny_dir), "--plan", str(p), "--out", str(tmp_path / "m")],
                   "does not have")
    assert not (tmp_path / "m").exists()


def test_plan_without_version(capsys, tiny_dir, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"layers": {"_default": "w4g32"}}))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--plan", str(p), *DATA], "'version'")


def test_empty_scheme(capsys, tiny_dir, tmp_path):
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "", *DATA], "invalid scheme ''")
    one_line_error(capsys, ["materialize", "--model", str(tiny_dir), "--scheme", "", "--out", str(tmp_path / "m")],
                   "invalid scheme ''")


def test_empty_scheme_list(capsys, tiny_dir):
    one_line_error(capsys, ["uniform", "--model", str(tiny_dir), "--schemes", " , ", *DATA], "names no scheme")


def test_journal_of_another_version(capsys, tmp_path):
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"type": "start", "version": 99, "n_blocks": 0}) + "\n")
    one_line_error(capsys, ["replay", "--journal", str(j), "--out", str(tmp_path / "p.json")], "version 99")


def test_binary_data_is_not_text(capsys, tiny_dir, tmp_path):
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 64)
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(tmp_path / "b.bin"),
                            *DATA], "not UTF-8 text")
    (tmp_path / "z.bin").write_bytes(b"text\x00\x00\x00" * 64)  # valid UTF-8, but NULs: not text either
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "w4g32", "--eval-data", str(tmp_path / "z.bin"),
                            *DATA], "NUL bytes")


@pytest.mark.parametrize("budget", ["1e99", "17bpw"])
def test_budget_beyond_the_model(capsys, tiny_dir, tmp_path, budget):
    one_line_error(capsys, ["search", "--model", str(tiny_dir), "--storage", f"sqlite:///{tmp_path}/s.db", "--study", "s",
                            "--budget", budget, *DATA], "full precision")


def test_decimal_megabytes_are_taken_as_decimal(capsys, tiny_dir):
    w8 = sum(layer_bytes(l.out_features, l.in_features, QuantScheme(8, 32)) for l in decoder_layers(tiny_model()))
    # 1 % below uniform w8g32 in decimal MB: too small for it; read as MiB it would be 4.9 % larger and fit
    text = f"{w8 * 0.99 / 10**6:.6f}MB"
    rc = main(["uniform", "--model", str(tiny_dir), "--schemes", "w8g32", "--budget", text, "--json", *DATA])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["budget_bytes"] == int(float(text[:-2]) * 10**6) and not obj["results"][0]["fits"]


def test_postgresql_error_hides_the_password(capsys, tiny_dir):
    line = one_line_error(capsys, ["search", "--model", str(tiny_dir), "--storage", "postgresql://u:s3cr3t@127.0.0.1:1/db",
                                   "--study", "s", "--budget", "6bpw", *DATA], "cannot open storage")
    assert "s3cr3t" not in line and "u:***@" in line


@pytest.mark.parametrize("cmd", ["front", "pick"])
def test_missing_study_leaves_no_file_behind(capsys, tmp_path, cmd):
    extra = ["--budget", "4bpw", "--out", str(tmp_path / "p.json")] if cmd == "pick" else []
    for url, f in ((f"sqlite:///{tmp_path}/s.db", "s.db"), (f"journal:///{tmp_path}/s.log", "s.log")):
        one_line_error(capsys, [cmd, "--storage", url, "--study", "s", *extra], "storage file not found")
        assert not (tmp_path / f).exists()


def test_cache_that_cannot_be_used_is_one_line(capsys, tiny_dir, tmp_path, monkeypatch):
    """AQSEARCH_CACHE pointing at a file (or a read-only folder): one line naming it, no traceback."""
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("AQSEARCH_CACHE", str(f))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "w4g32", *DATA], "cache folder")


def test_run_workdir_that_is_a_file(capsys, tiny_dir, tmp_path):
    """``run`` has no --force: the message must not suggest one."""
    f = tmp_path / "w"
    f.write_text("x")
    one_line_error(capsys, ["run", "--model", str(tiny_dir), "--workdir", str(f)], "is a file, not a folder")
    assert "--force" not in capsys.readouterr().err


def test_budget_under_one_byte(capsys, tiny_dir, tmp_path):
    one_line_error(capsys, ["run", "--model", str(tiny_dir), "--budget", "0.5B", "--workdir", str(tmp_path / "w")],
                   "less than one byte")
    assert not (tmp_path / "w").exists()


def test_damaged_materialized_folder_is_refused(capsys, tiny_dir, tmp_path):
    """A materialized folder whose weights were changed after it was written (zeroed codes): refused."""
    from aqsearch.cli import main

    out = tmp_path / "m"
    assert main(["materialize", "--model", str(tiny_dir), "--scheme", "w4g32", "--out", str(out)]) == 0
    capsys.readouterr()
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-64:] = bytes(64)
    (out / "model.safetensors").write_bytes(bytes(data))
    one_line_error(capsys, ["generate", str(out), "--prompt", "The"], "does not match the sha256")


# ---- faults of the environment and of stored state (issue 19's probe) ---------------------------------
def test_search_on_bad_input_leaves_no_storage_behind(capsys, tiny_dir, tmp_path):
    """The storage is opened early (to refuse one that cannot be); a later refusal removes the file and
    folder it created, since they hold no study."""
    db = tmp_path / "new" / "s.db"
    one_line_error(capsys, ["search", "--model", str(tiny_dir), "--storage", f"sqlite:///{db}", "--study", "s",
                            "--trials", "1", "--budget", "6bpw", "--calib-data", "/no/such/file", *DATA],
                   "data file not found")
    assert not (tmp_path / "new").exists()
    one_line_error(capsys, ["search", "--model", str(tiny_dir), "--storage", f"sqlite:///{db}", "--study", "s",
                            "--trials", "1", "--budget", "1bpw", *DATA], "below the smallest plan")
    assert not (tmp_path / "new").exists()


def test_run_on_a_damaged_bank_is_one_line_and_leaves_no_workdir(capsys, tiny_dir, tmp_path, monkeypatch):
    """A bank record cut short in its storage (a full disk, an edit): one line naming the bank, and the
    new --workdir the failed run made is not left behind empty."""
    import sqlite3

    monkeypatch.setenv("AQSEARCH_CACHE", str(tmp_path / "cache"))
    argv = ["run", "--model", str(tiny_dir), "--strategy", "knapsack", "--budget", "6bpw", *DATA]
    assert main([*argv, "--workdir", str(tmp_path / "w1")]) == 0
    capsys.readouterr()
    with sqlite3.connect(tmp_path / "cache" / "bank" / "bank.db") as db:
        assert db.execute("UPDATE trial_user_attributes SET value_json = substr(value_json, 1, 40) "
                          "WHERE key = 'candidates'").rowcount > 0
    one_line_error(capsys, [*argv, "--workdir", str(tmp_path / "w2")], "not valid JSON")
    assert not (tmp_path / "w2").exists()
    assert (tmp_path / "w1" / "plan.json").is_file()  # what an earlier run wrote is kept


def test_unwritable_home_is_one_line(capsys, tiny_dir, monkeypatch):
    """HOME that cannot be written and no AQSEARCH_CACHE: one line naming the cache folder (was 45 lines)."""
    monkeypatch.setenv("HOME", "/proc/aqsearch-home")  # no one, root included, can create it
    monkeypatch.delenv("AQSEARCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "w4g32", *DATA], "cache folder")


def test_unwritable_home_with_a_cache_plots_without_noise(study, tmp_path):
    """HOME that cannot be written, AQSEARCH_CACHE set: ``front --plot`` works without matplotlib's two
    lines about its config folder (it falls back to a temporary one and says so). A new process: matplotlib
    picks its folder when first imported."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME")}
    env.update(HOME="/proc/aqsearch-home", AQSEARCH_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "aqsearch", "front", "--storage", study, "--study", "s", "--plot",
                        str(tmp_path / "f.png"), "--json"], env=env, capture_output=True, text=True, timeout=300)
    # (a fresh font cache may add matplotlib's "building the font cache" line: that one is not the fault)
    assert r.returncode == 0 and "temporary cache directory" not in r.stderr and "mkdir" not in r.stderr, r.stderr
    assert (tmp_path / "f.png").stat().st_size > 0 and json.loads(r.stdout)["points"]


def test_read_only_cache_is_one_line(capsys, tiny_dir, tmp_path, monkeypatch):
    """AQSEARCH_CACHE a folder that cannot be written: one line naming it. (Root may write anywhere;
    os.access is made to answer for it as it does for any other user.)"""
    import os

    ro = tmp_path / "ro-cache"
    (ro / "models").mkdir(parents=True)
    for d in (ro / "models", ro):
        d.chmod(0o555)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **kw: False if mode & os.W_OK and str(p).startswith(str(ro))
                        else real(p, mode, *a, **kw))
    monkeypatch.setenv("AQSEARCH_CACHE", str(ro))
    one_line_error(capsys, ["eval", "--model", str(tiny_dir), "--scheme", "w4g32", *DATA], "cache folder")


def test_a_warning_is_one_line(capsys, materialized, monkeypatch):
    """``generate`` on the CPU says once that it runs the slow reference: one line (Python's default
    warning format adds the source line)."""
    import sys
    import warnings

    import aqsearch.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_WARNED", set())
    # printed to stderr as outside pytest (pytest records them instead): Python's own impl, in one line
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg)))
    assert main(["generate", str(materialized), "--prompt", "the fox", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert any(l.startswith("aqsearch: warning: kernels: ") and "pure-torch reference" in l for l in err), err
    assert all(l.startswith("aqsearch: ") for l in err), err
