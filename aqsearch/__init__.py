"""aqsearch: fit a causal LM into a memory budget with the least loss of quality.

The pipeline: a :class:`Job` (everything resolved once) -> a :class:`Bank` of scored candidates -> a
strategy (``knapsack``, ``progressive``, the polished front over a ``study``) returns a :class:`Plan` -> ``aqsearch.polish.polish`` -> an
:class:`Artifact`; :func:`run` does all of it (README, "Python").

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
    "Job": "aqsearch.job",
    "DataConfig": "aqsearch.job",
    "Bank": "aqsearch.bank",
    "BankConfig": "aqsearch.bank",
    "build_plan": "aqsearch.bank",
    "knapsack": "aqsearch.strategies.knapsack",
    "progressive": "aqsearch.strategies.progressive",
    "run_study": "aqsearch.strategies.study",
    "Score": "aqsearch.bank.score",
    "polished_front": "aqsearch.strategies.front",
    "FrontConfig": "aqsearch.strategies.front",
    "front_points": "aqsearch.strategies.front",
    "pick": "aqsearch.strategies.front",
    "Artifact": "aqsearch.artifact",
    "run": "aqsearch.pipeline",
    "finish": "aqsearch.pipeline",
    "TrainSettings": "aqsearch.training",
    "QuantLinear": "aqsearch.quantlinear",
    "materialize": "aqsearch.materialize",
    "generate": "aqsearch.materialize",
}

__all__ = ["AqError", "Budget", "Gate", "Plan", "QuantScheme", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aqsearch' has no attribute {name!r}")
