"""The reference quantizer against hand-worked examples and derived error bounds."""

import pytest
import torch

from aqsearch.config import QuantScheme, all_schemes
from aqsearch.quantizers import dequantize, fake_quantize, n_groups, quantize


def test_hand_example_asymmetric_2bit():
    # lo=-1, hi=2 -> s=(2-(-1))/3=1, z=round(1)=1; q=round(w/s)+z, 0.5 rounds half-to-even to 0.
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = quantize(w, QuantScheme(2, None))
    assert q.codes.tolist() == [[0, 1, 1, 3]]
    assert q.scale.tolist() == [[1.0]] and q.zero.tolist() == [[1.0]]
    assert dequantize(q).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_hand_example_symmetric_4bit():
    # s = max|w| / (2^3 - 1) = 1, z = 8: codes 1, 12 (3.5 -> 4, half-to-even), 15.
    w = torch.tensor([[-7.0, 3.5, 7.0]])
    q = quantize(w, QuantScheme(4, None, sym=True))
    assert q.codes.tolist() == [[1, 12, 15]]
    assert dequantize(q).tolist() == [[-7.0, 4.0, 7.0]]


def test_all_positive_group_includes_zero():
    # lo is clamped to 0 so that an integer zero exists: s = 3/3, z = 0.
    q = quantize(torch.tensor([[1.0, 2.0, 3.0]]), QuantScheme(2, None))
    assert q.zero.tolist() == [[0.0]] and q.codes.tolist() == [[1, 2, 3]]


def test_all_zero_group_is_exact():
    w = torch.zeros(2, 64)
    assert torch.equal(fake_quantize(w, QuantScheme(4, 32)), w)


def test_short_last_group_hand():
    # K=80, g=32: groups [0,32), [32,64), [64,80); the last has 16 elements and its own range.
    w = torch.zeros(1, 80)
    w[0, 64:80] = torch.linspace(-3.0, 12.0, 16)  # range 15 -> 4-bit scale 1.0 exactly
    w[0, :64] = torch.linspace(-0.5, 0.5, 64)
    q = quantize(w, QuantScheme(4, 32))
    assert n_groups(80, QuantScheme(4, 32)) == 3 and q.scale.shape == (1, 3)
    assert q.scale[0, 2].item() == 1.0 and q.zero[0, 2].item() == 3.0
    assert torch.equal(dequantize(q)[0, 64:], w[0, 64:])  # on-grid values come back exactly


@pytest.mark.parametrize("scheme", [str(s) for s in all_schemes()] + ["w4g64s", "w3g128s", "w2g32s", "w8", "w4"])
def test_codes_in_range_and_error_bound(scheme):
    s = QuantScheme.parse(scheme)
    torch.manual_seed(0)
    w = torch.randn(16, 200) * torch.rand(16, 1) * 3  # K=200: every group size leaves a short last group
    q = quantize(w, s)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= s.qmax
    assert q.scale.dtype == torch.float16 and q.scale.shape == (16, n_groups(200, s))
    d = dequantize(q)
    assert torch.equal(d, fake_quantize(w, s))  # one-pass and two-step paths agree to the bit
    # Derived bound: rounding costs s/2; the fp16 scale may shrink the grid by qmax * s * 2^-11.
    g = 200 if s.group is None else s.group
    step = q.scale.float().repeat_interleave(g, dim=1)[:, :200]
    slack = 0.5 + s.qmax * 2.0**-11
    assert torch.all((w - d).abs() <= step * slack + 1e-7)


def test_on_grid_roundtrip():
    # Weights built from known codes, scale and zero come back with the same codes.
    torch.manual_seed(1)
    s = QuantScheme(3, 64)
    codes = torch.randint(0, 8, (4, 128))
    codes[:, ::64] = 0
    codes[:, 1::64] = 7  # every group spans the full code range
    z = torch.randint(1, 7, (4, 2)).float()
    sc = torch.tensor([0.5, 0.25, 0.125, 1.0]).repeat(2, 1).T
    w = (codes.float() - z.repeat_interleave(64, 1)) * sc.repeat_interleave(64, 1)
    q = quantize(w, s)
    assert torch.equal(q.codes.long(), codes)
    assert torch.equal(dequantize(q), w)


def test_fake_quantize_is_differentiable_in_offsets_and_clips():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    s = QuantScheme(2, 32)
    v = torch.zeros(8, 64, requires_grad=True)
    lo = torch.ones(8, 2, requires_grad=True)
    hi = torch.ones(8, 2, requires_grad=True)
    out = fake_quantize(w, s, v, lo, hi)
    assert torch.equal(out.detach(), fake_quantize(w, s))  # v = 0, clips = 1: plain RTN
    ((out - w) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0


def test_offsets_move_codes():
    w = torch.tensor([[0.0, 0.9, 2.0, 3.0]])
    s = QuantScheme(2, None)
    base = quantize(w, s).codes
    moved = quantize(w, s, v=torch.tensor([[0.0, -0.45, 0.0, 0.0]])).codes
    assert base.tolist() == [[0, 1, 2, 3]] and moved.tolist() == [[0, 0, 2, 3]]


def test_fp16_zero_quantizes_like_the_integer_zero():
    """``w4g64f`` stores the zero in fp16 (4.5 bpw) but computes the same integer zero as ``w4g64``:
    the codes and values are identical, only the bytes differ."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02 + 0.01
    qf, qi = quantize(w, QuantScheme(4, 64, fzero=True)), quantize(w, QuantScheme(4, 64))
    assert torch.equal(qf.codes, qi.codes) and torch.equal(qf.zero, qi.zero) and torch.equal(qi.zero, qi.zero.round())
    assert torch.equal(dequantize(qf), fake_quantize(w, QuantScheme(4, 64, fzero=True)))
