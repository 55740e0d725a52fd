"""What every command shares: the one-line error parser, option types, device and output helpers."""

from __future__ import annotations

import argparse
import json
import sys

from aqsearch.errors import AqError

BUDGET_HELP = "memory budget: bytes, 70MiB, 1.5GiB (binary: 2^20, 2^30 B), 70MB, 1.5GB (decimal: 10^6, 10^9 B) or 3.5bpw"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise AqError(f"{self.prog.split()[-1]}: {message}")


def _whole(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be {'positive' if least == 1 else 'zero or more'}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _whole(text, 1)


def nonneg_int(text: str) -> int:
    return _whole(text, 0)


def add_model(p: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="smollm2-135m (embedded), a Hugging Face id or folder, or a .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_data(p: argparse.ArgumentParser, eval_tokens: int = 4096, seqlen: int = 512) -> None:
    p.add_argument("--calib-data", default=None, help="text file or hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] (default: model samples)")
    p.add_argument("--eval-data", default=None, help="held-out text, same forms (default: model samples)")
    p.add_argument("--eval-tokens", type=positive_int, default=eval_tokens, help="held-out tokens to evaluate on")
    p.add_argument("--seqlen", type=positive_int, default=seqlen, help="evaluation window length")
    p.add_argument("--split", type=float, default=None, help="fraction of one text used for calibration when both are the same text")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per forward pass (default: 1 on CPU, 8 on GPU)")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AqError(f"device {name!r} asked for but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise AqError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    return name


def emit(args, obj: dict, table: str) -> None:
    if args.json:
        json.dump(obj, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table)


def format_table(rows: list[dict]) -> str:
    head = f"{'plan':<16}{'bpw':>7}{'bytes':>13}{'KL mean':>10}{'KL p99':>9}{'top-1':>8}{'ppl ratio':>11}{'s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<16}{r['bpw']:>7.3f}{r['bytes']:>13,}{r['kl_mean']:>10.4f}{r['kl_p99']:>9.3f}"
            f"{r['top1']:>8.3f}{r['ppl_ratio']:>11.4f}{r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def front_table(points: list[dict]) -> str:
    """Polished points with their held-out numbers; plans the racing stopped marked, with no KL."""
    head = f"{'trial':>6}{'bytes':>13}{'bpw':>7}{'KL mean':>10}{'KL p99':>9}{'ppl ratio':>11}{'top-1':>8}  plan"
    lines = [head, "-" * len(head)]
    for p in points:
        label = p.get("label") or p.get("warm_start") or ""
        if p.get("polished") and p.get("kl_mean") is not None:
            lines.append(f"{p['trial']:>6}{p['bytes']:>13,}{p.get('bpw') or 0:>7.3f}{p['kl_mean']:>10.4f}"
                         f"{p.get('kl_p99') or 0:>9.3f}{p.get('ppl_ratio') or 0:>11.4f}{p.get('top1') or 0:>8.3f}  {label}")
        else:
            why = p.get("stopped_because") or "score only"
            lines.append(f"{p['trial']:>6}{p['bytes'] or 0:>13,}{'-':>7}{'-':>10}{'-':>9}{'-':>11}{'-':>8}  "
                         f"{label} (not polished: {why})")
    return "\n".join(lines)


def hull_table(hull: list[dict]) -> str:
    head = f"{'scheme':>10}{'bytes':>13}{'KL mean':>10}"
    return "\n".join([head, "-" * len(head)] + [f"{h['scheme']:>10}{h['bytes']:>13,}{h['kl_mean']:>10.4f}" for h in hull])


def parse_budgets(text: str):
    """``B``, ``A:B`` (a range) or ``A,B,C`` (a list): the budgets, parsed once at the edge."""
    from aqsearch.config import Budget

    if ":" in text:
        a, b = text.split(":", 1)
        return [Budget.parse(a), Budget.parse(b)], True
    return [Budget.parse(t) for t in text.split(",") if t.strip()], False


def parse_budget(text: str):
    """The CLI parses budgets once, at the edge (the library takes bytes or a resolved Job)."""
    from aqsearch.config import Budget

    return Budget.parse(text)
