"""``QuantLinear``: an ``nn.Linear`` stand-in holding packed low-bit weights.

Buffers (what ``state_dict`` and the checkpoint hold, exactly the bytes ``aqsearch.memory`` counts):

- ``qweight``: int32 ``(code_words(K, bits), N)``, codes packed along K (``aqsearch.kernels.packing``)
- ``scales``: fp16 ``(G, N)``, ``G = ceil(K / g)``
- ``zeros``: integer zeros packed along N, int32 ``(G, zero_words(N, bits))`` (the default scheme,
  ``aqsearch.kernels.pack_zeros``); fp16 ``(G, N)`` for ``f`` schemes; absent when symmetric
- ``bias``: ``[N]`` in the model dtype, or absent

The forward pass runs the Triton kernels on CUDA and the pure-torch reference elsewhere (which
dequantizes; on the CPU it keeps the dequantized weight to stay usable, see ``cache_weight``).

>>> import torch
>>> lin = torch.nn.Linear(64, 32, bias=False)
>>> q = QuantLinear.from_linear(lin, QuantScheme.parse("w4g32"), dtype=torch.float32)
>>> q
QuantLinear(in_features=64, out_features=32, scheme=w4g32, bias=False)
>>> q.storage_bytes() == layer_bytes(32, 64, QuantScheme.parse("w4g32"))
True
>>> bool((q(torch.randn(3, 64)) - lin(torch.randn(3, 64))).abs().max() < 100)
True
"""

from __future__ import annotations

import torch
from torch import nn

from aqsearch import kernels
from aqsearch.config import QuantScheme
from aqsearch.memory import layer_bytes  # noqa: F401  (doctest)
from aqsearch.quantizers import QTensor, n_groups, quantize


class QuantLinear(nn.Module):
    """Packed ``W[N, K]`` with group-wise fp16 scales (and zeros); ``y = x @ W^T + b``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        g = n_groups(in_features, scheme)
        words = kernels.code_words(in_features, scheme.bits)
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(g, out_features, dtype=torch.float16, device=device))
        fmt = scheme.zero_format
        zeros = (None if fmt == "none" else
                 torch.zeros(g, out_features, dtype=torch.float16, device=device) if fmt == "fp16" else
                 torch.zeros(g, kernels.zero_words(out_features, scheme.bits), dtype=torch.int32, device=device))
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend = "auto"  # "auto", "triton" or "torch"
        self.cache_weight = True  # reference backend on the CPU: keep the dequantized weight
        self._w: torch.Tensor | None = None

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Pack a reference-quantizer result (codes ``[N, K]``, scale/zero ``[N, G]``)."""
        n, k = qt.shape
        dev = qt.codes.device
        out = cls(k, n, qt.scheme, bias=bias is not None, dtype=dtype, device=dev)
        out.qweight.copy_(kernels.pack(qt.codes, qt.scheme.bits))
        out.scales.copy_(qt.scale.t())
        if qt.scheme.sym:
            if not torch.all(qt.zero == float(1 << (qt.scheme.bits - 1))):
                raise ValueError("symmetric QTensor with a zero other than 2**(bits-1)")
        elif qt.scheme.fzero:
            out.zeros.copy_(qt.zero.t())
        else:
            out.zeros.copy_(kernels.pack_zeros(qt.zero.t(), qt.scheme.bits))
        if bias is not None:
            out.bias.copy_(bias.detach().to(dtype))
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Round-to-nearest quantization of ``linear.weight`` (in fp32) with the reference quantizer."""
        qt = quantize(linear.weight.detach().float(), scheme)
        return cls.from_qtensor(qt, linear.bias, dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W[N, K]`` in ``dtype``; bit-identical to ``aqsearch.quantizers.dequantize`` of the same codes."""
        s = self.scheme
        return kernels.reference.dequantize(self.qweight, self.scales, self.zeros, s.bits, s.group, self.in_features, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight as stored (codes + scales + zeros); the bias is not counted."""
        return kernels.storage_bytes(self.qweight, self.scales, self.zeros)

    def _backend(self, x: torch.Tensor) -> str:
        return kernels.backend_for(x.device) if self.backend == "auto" else self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        if self._backend(x) == "torch" and self.cache_weight and not x.is_cuda:
            # The reference dequantizes on every call; on the CPU keep the result (weights x dtype).
            if self._w is None or self._w.dtype != x.dtype:
                kernels.note_fallback(x)  # says once that this is the slow reference path
                self._w = self.dequantize(x.dtype)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self._w, b)
        return kernels.linear(x, self.qweight, self.scales, self.zeros, s.bits, s.group, self.in_features,
                              self.bias, backend=self.backend)

    def _apply(self, fn, recurse=True):
        self._w = None  # device or dtype moves drop the cached weight
        out = super()._apply(fn, recurse)
        for name in ("scales", "zeros"):  # metadata stays fp16 through model.to(dtype): it is what is counted
            t = getattr(self, name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float16:
                setattr(self, name, t.half())
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._w = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}")
