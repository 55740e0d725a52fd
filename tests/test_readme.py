"""The README's tables are what benchmarks/report.py makes of benchmarks/results/*.jsonl."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_generated_from_the_results(tmp_path):
    # fails when a result is appended (or a table edited by hand) without `python benchmarks/report.py`
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # and the check sees a stale table: a copy of the checkout's README and results with one number changed
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text = (ROOT / "README.md").read_text()
    block = report._block(text, "compose_gap")
    assert block and "1.3310" in block
    edited = tmp_path / "README.md"
    edited.write_text(text.replace(block, block.replace("1.3310", "1.3311", 1)))
    old = report.README
    report.README = edited
    try:
        assert report.main(["--check"]) == 1
        assert report.main([]) == 0 and edited.read_text() == text  # regenerating restores it
    finally:
        report.README = old
