"""Outputs: nothing a user has is replaced without --force, an unwritable path is found before any work,
and what is written follows the umask."""

import json
import os
import stat

import pytest

from aqsearch.cli import main

DATA = ["--eval-tokens", "64", "--seqlen", "32"]
UNWRITABLE = "/proc/aqsearch-test/out"


def error_line(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("aqsearch: error:"), (rc, err)
    return lines[0]


def materialize(tiny_dir, out, *extra):
    return ["materialize", "--model", str(tiny_dir), "--scheme", "w4g32", "--out", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def study(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("out-study")
    url = f"sqlite:///{d}/s.db"
    from tinymodels import TINY_FRONT

    assert main(["search", "--model", str(tiny_dir), "--storage", url, "--study", "s", "--budget", "10bpw",
                 *TINY_FRONT]) == 0
    return url


def test_materialize_keeps_a_non_empty_folder(capsys, tiny_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert "use --force" in error_line(capsys, materialize(tiny_dir, out))
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert main(materialize(tiny_dir, out, "--force")) == 0
    assert (out / "model.safetensors").exists() and not (out / "thesis.tex").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old copy left


def test_materialize_keeps_a_file(capsys, tiny_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    assert "is a file, not a folder" in error_line(capsys, materialize(tiny_dir, notes))
    assert notes.read_text() == "notes"
    assert main(materialize(tiny_dir, notes, "--force")) == 0 and (notes / "model.safetensors").exists()


def test_materialize_into_an_empty_folder(tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(materialize(tiny_dir, tmp_path / "empty")) == 0


def test_unwritable_materialize_out_is_found_before_the_model_loads(capsys, tiny_dir, no_model_load):
    assert "cannot write" in error_line(capsys, materialize(tiny_dir, UNWRITABLE))
    assert not no_model_load


def test_pick_keeps_an_existing_plan(capsys, study, tmp_path):
    out = tmp_path / "plan.json"
    out.write_text("my plan")
    argv = ["pick", "--storage", study, "--study", "s", "--budget", "10bpw", "--out", str(out)]
    assert "plan.json exists (use --force" in error_line(capsys, argv)
    assert out.read_text() == "my plan"
    assert main([*argv, "--force"]) == 0 and json.loads(out.read_text())["version"] == 2


def test_front_keeps_an_existing_plot(capsys, study, tmp_path):
    plot = tmp_path / "front.png"
    plot.write_bytes(b"my picture")
    argv = ["front", "--storage", study, "--study", "s", "--plot", str(plot)]
    assert "--plot" in error_line(capsys, argv) and plot.read_bytes() == b"my picture"
    assert main([*argv, "--force"]) == 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_unwritable_search_storage_is_found_before_any_work(capsys, tiny_dir):
    line = error_line(capsys, ["search", "--model", str(tiny_dir), "--storage", f"sqlite:///{UNWRITABLE}.db", "--study",
                               "s", "--budget", "6bpw", *DATA])
    assert "--storage" in line and "cannot write" in line


def test_unwritable_run_workdir_is_found_before_any_work(capsys, tiny_dir):
    line = error_line(capsys, ["run", "--model", str(tiny_dir), "--workdir", UNWRITABLE, *DATA])
    assert "--workdir" in line and "cannot write" in line


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(study, tiny_dir, tmp_path, mask):
    old = os.umask(mask)
    try:
        assert main(materialize(tiny_dir, tmp_path / "m")) == 0
        assert main(["pick", "--storage", study, "--study", "s", "--budget", "10bpw", "--out", str(tmp_path / "p.json")]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "m") == 0o777 & ~mask
    for f in [tmp_path / "p.json", *(tmp_path / "m").iterdir()]:
        assert mode(f) == 0o666 & ~mask, f
