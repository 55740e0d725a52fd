"""Regenerate the README's tables from benchmarks/results/*.jsonl.

    python benchmarks/report.py          # rewrites the blocks between <!-- table:NAME --> markers

Each table keeps, for every key (scheme, machine, settings), the newest record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from aqsearch.bench import read_results

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results"


def _latest(records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for r in records:
        out[key(r)] = r
    return list(out.values())


def uniform_table() -> str:
    recs = _latest(read_results(RESULTS / "uniform.jsonl"),
                   lambda r: (r["env"]["machine"], r["eval_windows"], r["seqlen"], r["scheme"]))
    lines = ["| machine | eval tokens | scheme | bpw | bytes | KL mean | KL p99 | top-1 | ppl ratio | ppl (fp) | s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(recs, key=lambda r: (r["env"]["machine"], r["tokens"], -r["bpw"], r["kl_mean"])):
        lines.append(f"| {r['env']['machine']} | {r['tokens']:,} | {r['scheme']} | {r['bpw']:.3f} | {r['bytes']:,} | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{r['ppl_ref']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"uniform": uniform_table}


def render(text: str) -> str:
    for name, fn in TABLES.items():
        pat = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main() -> None:
    README.write_text(render(README.read_text()))


if __name__ == "__main__":
    main()
