"""Trained quantized weights on disk: ``{layer: QTensor}`` as safetensors, and plans that carry them.

Block training changes codes, scales and zeros; the plan (layer -> scheme) says nothing of that. A
plan written by the progressive engine therefore names a weights file beside it
(``"weights": {"file": "plan.weights.safetensors", "sha256": ...}``); :func:`weight_fn_for` turns it
into the weights :func:`aqsearch.apply.quantized` uses (round-to-nearest for every other layer).

>>> import torch, tempfile, os
>>> from aqsearch.quantizers import quantize
>>> from aqsearch.config import QuantScheme
>>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> sha = save_qtensors(p, {"l": quantize(torch.randn(4, 64), QuantScheme(4, 32))})
>>> load_qtensors(p)["l"].scheme
QuantScheme(bits=4, group=32, sym=False)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aqsearch.apply import WeightFn, rtn_weight
from aqsearch.config import QuantScheme
from aqsearch.errors import AqError
from aqsearch.io import atomic_path, sha256_file
from aqsearch.models import LayerInfo
from aqsearch.quantizers import QTensor, dequantize


def save_qtensors(path: str | Path, tensors: dict[str, QTensor]) -> str:
    """Write atomically; return the file's sha256."""
    from safetensors.torch import save_file

    flat, meta = {}, {}
    for name, q in sorted(tensors.items()):  # sorted: the file (and its sha256) depends on content only
        flat[f"{name}.codes"] = q.codes.contiguous().cpu()
        flat[f"{name}.scale"] = q.scale.contiguous().cpu()
        flat[f"{name}.zero"] = q.zero.contiguous().cpu()
        meta[name] = str(q.scheme)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(flat, tmp, metadata={"schemes": json.dumps(meta, sort_keys=True)})
    return sha256_file(path)


def load_qtensors(path: str | Path, sha256: str | None = None) -> dict[str, QTensor]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AqError(f"weights file not found: {path}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise AqError(f"weights file {path} does not match the sha256 its plan or journal records")
    from safetensors import SafetensorError

    out = {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["schemes"])
            for name, s in meta.items():
                out[name] = QTensor(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                    f.get_tensor(f"{name}.zero"), QuantScheme.parse(s))
    except (SafetensorError, KeyError, ValueError, AttributeError) as e:  # not a file save_qtensors wrote
        raise AqError(f"{path} is not a trained-weights file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return out


def trained_weight_fn(tensors: dict[str, QTensor]) -> WeightFn:
    """Dequantized trained weights where given (scheme must match), round-to-nearest elsewhere."""

    def fn(layer: LayerInfo, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        q = tensors.get(layer.name)
        if q is not None and q.scheme == scheme:
            return dequantize(q).to(w.device, w.dtype)
        return rtn_weight(layer, w, scheme)

    return fn

