"""Block-by-block activations of calibration windows, for gates and block training.

Two streams run through the decoder side by side:

- the full-precision stream: ``x_fp[i]`` enters block ``i`` of the unquantized model, and
  ``x_fp[i + 1] = block_i(x_fp[i])`` is the target block ``i`` is trained towards;
- the quantized stream: ``x_q[i]`` enters block ``i`` as produced by the already-quantized blocks
  ``0 .. i-1``; the quantized block ``i`` is fed ``x_q[i]``.

Only the current block's tensors are held: ``[windows, seqlen, hidden]`` fp32 each (three of them),
on the GPU while they fit under ``device_bytes``, else in CPU memory, else (beyond ``cpu_bytes``) in
memory-mapped files in the cache folder. :attr:`Activations.report` says where they went and how much.

Block offload (models that do not fit one GPU, or should not sit on it whole): the model stays on the
host; ``Activations.capture(..., device=, dtype=)`` keeps the streams on ``device`` and
:func:`blocks_on` moves each block there (in ``dtype``) only for its turn, so the device never holds
more than one block's weights.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
>>> acts = Activations.capture(m, torch.randint(0, 128, (3, 16)))
>>> tuple(acts.x_fp.shape)
(3, 16, 64)
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from aqsearch.io import cache_dir
from aqsearch.models import decoder_blocks


class _Stop(Exception):
    pass


def _storage(shape: tuple[int, ...], device: torch.device, device_bytes: int, cpu_bytes: int, used: dict) -> torch.Tensor:
    n = int(np.prod(shape)) * 4
    if device.type == "cuda" and used.get("device", 0) + n <= device_bytes:
        used["device"] = used.get("device", 0) + n
        return torch.empty(shape, dtype=torch.float32, device=device)
    if used.get("cpu", 0) + n <= cpu_bytes:
        used["cpu"] = used.get("cpu", 0) + n
        return torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")
    used["disk"] = used.get("disk", 0) + n
    f = tempfile.NamedTemporaryFile(dir=cache_dir("activations"), suffix=".f32", delete=True)
    arr = np.memmap(f, dtype=np.float32, mode="w+", shape=shape)
    t = torch.from_numpy(arr)
    t._aq_file = f  # keep the file open as long as the tensor lives
    return t


@dataclass
class Activations:
    """The two streams at the current block; :meth:`advance` moves both to the next block."""

    x_fp: torch.Tensor  # [W, L, d] input of the current block, full-precision model
    x_q: torch.Tensor  # [W, L, d] input of the current block, quantized model so far
    kwargs: dict[str, Any]  # what the model passes every block besides the hidden states (batch 1)
    device: torch.device
    batch: int = 8
    block: int = 0
    used: dict = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module, windows: torch.Tensor, batch: int = 8, device_bytes: int = 16 << 30,
                cpu_bytes: int = 8 << 30, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Activations:
        """Embed ``windows[W, L]`` and stop at block 0, keeping its inputs and keyword arguments.

        ``device`` (block offload): the embedding runs where the model lies; the streams and the keyword
        arguments (floating ones in ``dtype``, when given) go to ``device``, where the blocks will run."""
        blocks = decoder_blocks(model)
        src = next(model.parameters()).device
        dev = src if device is None else torch.device(device)
        w, l = windows.shape
        d = model.config.hidden_size
        used: dict = {}
        x = _storage((w, l, d), dev, device_bytes, cpu_bytes, used)
        kw: dict[str, Any] = {}

        def hook(_mod, args, kwargs):
            kw.update(kwargs)
            kw["_hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for i in range(w):
                    try:
                        model(input_ids=windows[i : i + 1].to(src), use_cache=False)
                    except _Stop:
                        pass
                    x[i] = kw.pop("_hidden")[0].float().to(x.device)
        finally:
            h.remove()
        kw.pop("hidden_states", None)
        for k in ("past_key_values", "cache", "past_key_value"):
            kw.pop(k, None)
        kw["use_cache"] = False
        if device is not None:
            kw = {k: _moved(v, dev, dtype) for k, v in kw.items()}
        xq = _storage((w, l, d), dev, device_bytes, cpu_bytes, used)
        xq.copy_(x)
        return cls(x, xq, kw, dev, batch, 0, used)

    @property
    def n(self) -> int:
        return self.x_fp.shape[0]

    def report(self) -> dict[str, int]:
        """Bytes of activation storage by place: device, cpu, disk."""
        return {k: int(v) for k, v in self.used.items()}

    def batches(self, idx: torch.Tensor | None = None):
        """Index tensors of at most ``batch`` windows (all windows, or those in ``idx``)."""
        idx = torch.arange(self.n) if idx is None else idx
        for s in range(0, len(idx), self.batch):
            yield idx[s : s + self.batch]

    def load(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t[idx].to(self.device, non_blocking=True)

    def run(self, block: nn.Module, x: torch.Tensor, idx: torch.Tensor | None = None, out: torch.Tensor | None = None,
            weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``block`` (with ``weights`` swapped in) over windows of ``x``, no grad; into ``out`` or a new tensor."""
        idx = torch.arange(self.n) if idx is None else idx
        res = out if out is not None else torch.empty((len(idx),) + tuple(x.shape[1:]), device=self.device)
        with torch.no_grad():
            pos = 0
            for b in self.batches(idx):
                y = block_forward(block, self.load(x, b), self.kwargs, weights)
                if out is not None:
                    out[b] = y.to(out.device)
                else:
                    res[pos : pos + len(b)] = y
                pos += len(b)
        return res

    def advance(self, block: nn.Module, weights: dict[str, torch.Tensor], y_fp: torch.Tensor | None = None) -> None:
        """Move both streams through the current block: full precision, and with the decided ``weights``.

        ``y_fp`` (the full-precision outputs, if already computed) saves one pass.
        """
        if y_fp is not None:
            self.x_fp.copy_(y_fp.to(self.x_fp.device))
        else:
            self.run(block, self.x_fp, out=self.x_fp)
        self.run(block, self.x_q, out=self.x_q, weights=weights)
        self.block += 1


def _moved(v: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """A keyword argument on ``device``: tensors (floating ones in ``dtype``), and tuples of them (RoPE's cos, sin)."""
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
    if isinstance(v, tuple):
        return tuple(_moved(x, device, dtype) for x in v)
    return v


@contextlib.contextmanager
def offloaded(module: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None = None):
    """``module`` on ``device`` (floating tensors in ``dtype``) inside; after (even on error) it holds its own
    host tensors again, exactly as before: nothing is copied back, and changes made there are dropped.
    The move crosses the bus in the host dtype (a bf16 copy: half of fp32's bytes) and casts on the device.
    ``device=None``: nothing moves."""
    if device is None or next(module.parameters(), None) is None:
        yield module
        return
    params = [(p, p.data) for p in module.parameters()]
    bufs = [(m, k, b) for m in module.modules() for k, b in m._buffers.items() if b is not None]
    module.to(device=device)
    if dtype is not None:
        module.to(dtype=dtype)
    try:
        yield module
    finally:
        for p, d in params:
            p.data = d
        for m, k, b in bufs:
            m._buffers[k] = b


def blocks_on(blocks, device: torch.device | str | None, dtype: torch.dtype | None = None):
    """``(i, block)`` for each block, the block on ``device`` (in ``dtype``) until the next one is asked for:
    at most one block's weights on the device at a time (block offload). ``device=None``: nothing moves.

    >>> from torch import nn
    >>> blocks = nn.ModuleList([nn.Linear(2, 2).bfloat16() for _ in range(3)])
    >>> [(i, b.weight.dtype, sum(x.weight.dtype == torch.float32 for x in blocks))
    ...  for i, b in blocks_on(blocks, "cpu", torch.float32)][1]
    (1, torch.float32, 1)
    >>> {b.weight.dtype for b in blocks}
    {torch.bfloat16}
    """
    for i, blk in enumerate(blocks):
        with offloaded(blk, device, dtype):
            yield i, blk


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any],
                  weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One decoder block on ``x[B, L, d]`` with the captured keyword arguments (batch 1, broadcast).

    ``weights`` maps in-block parameter names (``mlp.up_proj.weight``) to tensors used in place of
    the block's own, without touching the module (``torch.func.functional_call``).
    """
    if weights:
        out = torch.func.functional_call(block, weights, (x,), kwargs, strict=False)
    else:
        out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def progress(total: int, desc: str, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
