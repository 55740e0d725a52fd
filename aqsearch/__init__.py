"""aqsearch: fit a causal LM into a memory budget with the least loss of quality.

>>> import aqsearch
>>> str(aqsearch.QuantScheme.parse("w4g64"))
'w4g64'

``import aqsearch`` loads neither triton nor CUDA: heavy modules load on first use.
"""

from __future__ import annotations

import importlib

from aqsearch.config import Budget, Gate, Plan, QuantScheme
from aqsearch.errors import AqError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "aqsearch.models",
    "decoder_layers": "aqsearch.models",
    "plan_bytes": "aqsearch.memory",
    "layer_bytes": "aqsearch.memory",
    "calib_eval_sets": "aqsearch.data",
    "TokenSet": "aqsearch.data",
    "build_reference": "aqsearch.quality",
    "evaluate": "aqsearch.quality",
    "Measurement": "aqsearch.quality",
    "quantize": "aqsearch.quantizers",
    "dequantize": "aqsearch.quantizers",
    "fake_quantize": "aqsearch.quantizers",
    "Engine": "aqsearch.progressive",
    "run_study": "aqsearch.search",
    "pareto_front": "aqsearch.search",
    "pick": "aqsearch.search",
    "QuantLinear": "aqsearch.quantlinear",
    "materialize": "aqsearch.materialize",
    "generate": "aqsearch.materialize",
}

__all__ = ["AqError", "Budget", "Gate", "Plan", "QuantScheme", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aqsearch' has no attribute {name!r}")
