"""Shared fixtures: tiny random Llama-family models with a real (tiny, trained) BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinymodels import CORPUS, WIKI_TEST, WIKI_VALID, tiny_config, tiny_model, tiny_tokenizer  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests write caches to a temporary folder, except the real model's conversion (slow to redo)."""
    if "AQSEARCH_CACHE" not in os.environ:
        os.environ["AQSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable by ``aqsearch`` like any HF folder."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(CORPUS.replace(". ", ".\r\n"))
    return p


@pytest.fixture(scope="session")
def other_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text2") / "other.txt"
    p.write_text(("Layers that fail a gate keep more bits. The budget is met by the smaller groups. ") * 40)
    return p


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A PostgreSQL server on loopback for the test session (Debian's postgresql package)."""
    import glob
    import shutil
    import socket
    import subprocess

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    import tempfile
    from pathlib import Path

    bindir = bins[-1]
    d = Path(tempfile.mkdtemp(prefix="aqsearch-pg-"))  # not under pytest's 0700 folders: postgres must reach it
    data = d / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(d, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(d / "log"), "-w", "start", "-o",
                    f"-p {port} -k {d} -h 127.0.0.1"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """A model load fails the test: for refusals that must come before any model is read (a timer would
    let a tiny model through, and flake on a slow machine)."""
    import aqsearch.job
    import aqsearch.models

    calls = []

    def refuse(spec, *a, **k):
        calls.append(spec)
        raise AssertionError(f"the model {spec} was loaded before the refusal")

    monkeypatch.setattr(aqsearch.models, "load_model", refuse)
    monkeypatch.setattr(aqsearch.job, "load_model", refuse)
    return calls
