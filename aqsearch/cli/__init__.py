"""The ``aqsearch`` command. Contract: DESIGN.md. ``--json`` puts one JSON object on stdout and
nothing else; progress goes to stderr; bad input gives one line on stderr and exit status 2.

Each module of this package registers its commands (``register(sub) -> {name: handler}``) and keeps
its heavy imports inside the handlers. Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings

from aqsearch.cli.common import Parser
from aqsearch.errors import AqError

MODULES = ("eval", "run", "search", "progressive", "materialize", "export")
COMMANDS: dict = {}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="aqsearch", description="Fit a causal LM into a memory budget with the least loss of quality.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in MODULES:
        COMMANDS.update(importlib.import_module(f"aqsearch.cli.{name}").register(sub))
    return ap


def _join_dash_values(ap: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -3GiB`` -> ``--budget=-3GiB``: argparse would read the value as an unknown option,
    and the user should hear what is wrong with the value instead."""
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    takes_value = {o for sa in subs for sp in sa.choices.values() for a in sp._actions
                   if a.option_strings and a.nargs is None for o in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in takes_value:
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


# Packages of the optional extras (pyproject.toml): a command that needs one that is not installed says
# which extra to install, in one line, instead of an ImportError's traceback.
EXTRAS = {"optuna": "search", "optuna_dashboard": "search", "sklearn": "search", "pandas": "search",
          "matplotlib": "search", "plotly": "search", "triton": "kernels"}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line (Python's default format adds the source line: two lines)."""
    text = (str(message).strip().splitlines() or [category.__name__])[0]
    if text.startswith("aqsearch."):  # "aqsearch.kernels: ..." -> "aqsearch: warning: kernels: ..."
        text = text[len("aqsearch."):]
    elif not filename.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        text = f"{category.__name__}: {text}"  # another package's warning: say what kind it is
    return f"aqsearch: warning: {text}\n"


PLOTTING = ("front", "run")  # the commands that may import matplotlib


def _matplotlib_config() -> None:
    """Matplotlib writes a config folder (``~/.config/matplotlib``); where that cannot be written (an
    unwritable HOME) it makes a temporary one and says so in two lines. Give it one in the cache."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    d = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "matplotlib")
    try:
        os.makedirs(d, exist_ok=True)  # what matplotlib does on import (os.access would say yes to root anywhere)
        if os.access(d, os.W_OK):
            return
    except OSError:
        pass
    from aqsearch.io import cache_dir

    try:
        os.environ["MPLCONFIGDIR"] = str(cache_dir("matplotlib"))
    except AqError:
        pass  # an unusable cache is said in one line by whatever needs it


def main(argv: list[str] | None = None) -> int:
    from aqsearch.io import discard_empty_outputs, forget_new_outputs

    t0 = time.time()
    forget_new_outputs()
    try:
        # the format only: where warnings are recorded (a caller's catch_warnings, pytest) they still are
        fmt, warnings.formatwarning = warnings.formatwarning, _one_line_warning
        try:
            ap = build_parser()
            args = ap.parse_args(_join_dash_values(ap, list(sys.argv[1:] if argv is None else argv)))
            if args.command in PLOTTING:
                _matplotlib_config()
            return COMMANDS[args.command](args)
        finally:
            warnings.formatwarning = fmt
    except AqError as e:
        discard_empty_outputs()  # bad input leaves nothing behind: no empty --workdir, no storage without a study
        print(f"aqsearch: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise  # a module of aqsearch itself, or a required dependency: a bug or a broken install
        print(f"aqsearch: error: this command needs {top}: pip install 'aqsearch[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aqsearch: interrupted after {time.time() - t0:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
