"""The kernels of ``benchmarks/ceiling.py`` do the work they stand for: a ceiling measured by a reader that skips
words, or a GEMM that skips a K tile, would be a false floor under our kernels (issue 21's verdicts lean on it)."""

import os
import sys

import numpy as np
import pytest
import torch

from conftest import DEVICE

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from ceiling import _mm, _read  # noqa: E402


@pytest.mark.parametrize("reduce", (False, True), ids=("partials", "split-K epilogue"))
def test_reader_reads_every_word(reduce):
    """Three K-slices (the last one short) of a ``[100, 256]`` word matrix: each partial row is the XOR of its
    slice's rows (numpy), and through our split-K epilogue the sum of those partials, with the counter re-armed
    for the next launch (a second launch gives the same). Catches a reader that skips rows, stops a slice early
    or reads another slice's rows, and an epilogue that drops a partial."""
    r, n, bn, br, rows_per = 100, 256, 128, 16, 48
    split = -(-r // rows_per)
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-2**31, 2**31 - 1, (r, n), dtype=torch.int32, generator=gen).to(DEVICE)
    parts = [np.bitwise_xor.reduce(w[i * rows_per:(i + 1) * rows_per].cpu().numpy(), axis=0) for i in range(split)]
    if not reduce:
        out = torch.zeros(split, n, dtype=torch.int32, device=DEVICE)
        _read[(n // bn, split)](w, out, n, r, rows_per, out, out, BN=bn, BR=br, STAGES=1)
        assert np.array_equal(out.cpu().numpy(), np.stack(parts))
        return
    ws = torch.empty(split, n, dtype=torch.float32, device=DEVICE)
    lock = torch.zeros(n // bn, dtype=torch.int32, device=DEVICE)
    want = sum(p.astype(np.float32).astype(np.float64) for p in parts)
    for _ in range(2):
        red = torch.full((1, n), float("nan"), dtype=torch.float32, device=DEVICE)
        _read[(n // bn, split)](w, red, n, r, rows_per, ws, lock, BN=bn, BR=br, STAGES=1, REDUCE=True)
        np.testing.assert_allclose(red.cpu().numpy()[0], want, rtol=0, atol=1024.0)  # fp32 sums of ~2**31
        assert int(lock.sum()) == 0


def test_triton_fp16_gemm_is_the_product():
    """``_mm`` over a 4-tile K loop and a grid of 2 x 4 tiles equals torch's fp32 product of the same fp16
    operands (W given as ``[N, K]``, the GEMM is ``x @ W^T``). Catches a skipped K tile, a transposed operand,
    tiles written to the wrong place."""
    m, n, k = 64, 128, 128
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).half().to(DEVICE)
    w = torch.randn(n, k, generator=gen).half().to(DEVICE)
    c = torch.empty(m, n, dtype=torch.float16, device=DEVICE)
    _mm[(2 * 4,)](x, w, c, m, n, k, BM=32, BN=32, BK=32, GROUP_M=8, STAGES=1)
    ref = x.float() @ w.float().t()
    torch.testing.assert_close(c.float(), ref, rtol=2e-3, atol=2e-2)
