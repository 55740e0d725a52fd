"""The library's shape, checked on its source (ast, no import): no import cycle, the CLI imported by
nothing in the library, ``Budget.parse`` only at the edges, one plan builder, small modules and functions."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "aqsearch"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """aqsearch modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("aqsearch") and n in known:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (one representative each)."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a hand-made cycle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_inside_the_library():
    """Catches any import cycle (e.g. cli <-> cli_search, apply -> artifact -> weights -> apply), the
    edges from a package to its own submodules excepted (``aqsearch.bank`` re-exports ``aqsearch.bank.core``)."""
    g = graph()
    # a package's __init__ importing its own submodules is how packages re-export; a submodule importing
    # its parent package back would be a cycle, and stays one here
    g = {n: {m for m in e if not m.startswith(n + ".")} for n, e in g.items()}
    assert cycles(g) == []


def test_the_library_never_imports_the_cli():
    g = graph()
    bad = sorted(n for n, e in g.items() if not n.startswith(("aqsearch.cli", "aqsearch.__main__")) and any(m.startswith("aqsearch.cli") for m in e))
    assert bad == []


def test_budget_parse_only_in_the_job_and_the_cli():
    hits = sorted(str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if "Budget.parse" in p.read_text()
                  and p.name != "config.py")  # config.py defines it (its doctest calls it)
    assert all(h == "aqsearch/job.py" or h.startswith("aqsearch/cli/") for h in hits), hits


def test_one_function_builds_plans_from_choices():
    """``Plan.from_layers`` (a plan from exact layer names) is called, outside config.py, only by the one
    plan builder and by readers of stored plans (a study's trial, an artifact)."""
    calls = {}
    for p in PKG.rglob("*.py"):
        if p.name == "config.py":
            continue
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, ast.FunctionDef) and "Plan.from_layers(" in ast.unparse(fn):
                calls.setdefault(str(p.relative_to(PKG.parent)), []).append(fn.name)
    builders = {k: v for k, v in calls.items() if k != "aqsearch/materialize.py"}
    assert builders == {"aqsearch/bank/core.py": ["build_plan"]}, calls


def test_no_module_over_400_lines_no_function_over_80_outside_kernels():
    long_mods, long_fns = [], []
    for p in PKG.rglob("*.py"):
        if "kernels" in p.parts:
            continue
        text = p.read_text()
        if len(text.splitlines()) > 400:
            long_mods.append(str(p))
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > 80:
                long_fns.append(f"{p.name}:{fn.name}")
    assert long_mods == [] and long_fns == []


def test_decision_layer_modules_have_test_files():
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    for m in ("job", "bank", "study", "progressive", "knapsack", "polish", "artifact", "cli", "pipeline", "journal", "score",
              "racing", "front"):
        assert f"test_{m}" in tests, f"no tests/test_{m}.py"


def test_layer_names_are_spelled_in_one_place():
    hits = [str(p) for p in PKG.rglob("*.py") if re.search(r"f\"model\.layers\.\{", p.read_text())]
    assert [Path(h).name for h in hits] == ["models.py"], hits
