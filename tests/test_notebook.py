"""notebooks/pareto.ipynb runs top to bottom on a study made here."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from aqsearch.cli import main

NB = Path(__file__).resolve().parents[1] / "notebooks" / "pareto.ipynb"


def test_pareto_notebook_executes(tiny_dir, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/nb.db"
    from tinymodels import TINY_FRONT

    assert main(["search", "--model", str(tiny_dir), "--storage", url, "--study", "nb", "--budget", "6bpw",
                 *TINY_FRONT]) == 0
    monkeypatch.setenv("AQSEARCH_STORAGE", url)
    monkeypatch.setenv("AQSEARCH_STUDY", "nb")
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.output_type == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "nb " in text and "trials; budget" in text and "(polished)" in text
