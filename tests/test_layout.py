"""The checkout's own module names must not shadow installed packages.

Scripts under ``benchmarks/`` run with that folder first on ``sys.path``, and the test suite runs from the
repository root: a ``benchmarks/kernels.py`` or a top-level ``kernels/`` once hid Hugging Face's ``kernels``
package, which transformers imports, and every model load failed.
"""

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def own_names() -> dict[str, Path]:
    names = {}
    for folder in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
        for p in folder.iterdir():
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
                names[p.stem] = p
    return names


def test_no_module_of_the_checkout_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # import name -> distributions
    clashes = {name: str(p.relative_to(ROOT)) for name, p in own_names().items()
               if name in installed and name != "aqsearch"}
    assert not clashes, f"rename these, they hide installed packages: {clashes}"
