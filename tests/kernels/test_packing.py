"""Packing against the reference quantizer, and the byte count against aqsearch.memory."""

import pytest
import torch

from aqsearch.config import QuantScheme
from aqsearch.kernels import packing, reference
from aqsearch.memory import code_words, layer_bytes
from aqsearch.quantizers import dequantize, quantize

GROUPS = (32, 64, 128, 256, None)


def _qt(n, k, scheme, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.05, scheme)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("k", (576, 200))  # 200: a short last group at every g (and K % 32 != 0)
def test_round_trip_matches_reference_quantizer(bits, group, k):
    qt = _qt(24, k, QuantScheme(bits, group))
    packed = packing.pack(qt.codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (code_words(k, bits), 24)
    assert torch.equal(packing.unpack(packed, bits, k), qt.codes)
    # the reference dequantization of the packed layout is the quantizer's, to the bit
    w = reference.dequantize(packed, qt.scale.t().contiguous(), qt.zero.t().contiguous(), bits, group, k)
    assert torch.equal(w, dequantize(qt))
    w16 = reference.dequantize(packed, qt.scale.t().contiguous(), qt.zero.t().contiguous(), bits, group, k, torch.float16)
    assert torch.equal(w16, dequantize(qt, torch.float16))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_symmetric_reference_uses_middle_zero(bits):
    qt = _qt(16, 200, QuantScheme(bits, 64, sym=True))
    w = reference.dequantize(packing.pack(qt.codes, bits), qt.scale.t().contiguous(), None, bits, 64, 200)
    assert torch.equal(w, dequantize(qt))


def test_layout_lowest_bits_first_and_3bit_planes():
    codes = torch.arange(40, dtype=torch.uint8).remainder(8).reshape(1, 40)  # N=1, K=40, 3-bit
    p = packing.pack(codes, 3)
    assert p.shape == (3 + 2, 1)  # ceil(40/16) low-plane words + ceil(40/32) high-plane words
    assert int(p[0, 0]) & 3 == 0 and (int(p[0, 0]) >> 2) & 3 == 1  # codes 0, 1: low bits first
    assert (int(p[3, 0]) >> 4) & 1 == 1  # code 4 = 0b100: its high bit is bit 4 of the first 1-bit word
    c4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert int(packing.pack(c4, 4)[0, 0]) & 0xFFFFFFFF == 0xF7654321


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("zero", ("int", "fp16", "none"))
@pytest.mark.parametrize("nk", ((64, 576), (48, 1536), (40, 200), (1, 4096)))
def test_storage_bytes_equal_layer_bytes(bits, group, zero, nk):
    n, k = nk
    scheme = QuantScheme(bits, group, sym=zero == "none", fzero=zero == "fp16")
    g = packing.effective_group(group, k)
    groups = -(-k // g)
    qw = packing.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8), bits)
    scales = torch.rand(groups, n).half()  # the (groups, N) fp16 metadata a QuantLinear stores
    zeros = {"none": None, "fp16": torch.rand(groups, n).half(),
             "int": packing.pack_zeros(torch.randint(0, 1 << bits, (groups, n)), bits)}[zero]
    assert packing.storage_bytes(qw, scales, zeros) == layer_bytes(n, k, scheme)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("n", (576, 40, 1, 33))  # 40, 1, 33: the last zero word of a row is ragged
def test_integer_zeros_round_trip(bits, n):
    z = torch.randint(0, 1 << bits, (5, n), generator=torch.Generator().manual_seed(n))
    p = packing.pack_zeros(z, bits)
    assert p.dtype == torch.int32 and p.shape == (5, packing.zero_words(n, bits))
    assert torch.equal(packing.unpack_zeros(p, bits, n), z.to(torch.uint8))
    if n % 32 == 0:  # exactly b bits a zero
        assert p.numel() * 32 == 5 * n * bits


def test_integer_zeros_layout_and_errors():
    z = torch.tensor([[1, 2, 3, 0, 1]])  # one group row, N = 5, 2-bit: lowest bits first along N
    assert packing.pack_zeros(z, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6 | 1 << 8]]
    z3 = torch.tensor([[4] * 17])  # 3-bit: high bits in the 1-bit plane after ceil(17/16) = 2 low words
    p = packing.pack_zeros(z3, 3)
    assert p.shape == (1, 3) and p[0, :2].tolist() == [0, 0] and int(p[0, 2]) == (1 << 17) - 1
    with pytest.raises(ValueError):
        packing.pack_zeros(torch.tensor([[0.5]]), 4)  # not a whole number
    with pytest.raises(ValueError):
        packing.pack_zeros(torch.tensor([[16]]), 4)  # does not fit in 4 bits
    with pytest.raises(ValueError):
        packing.unpack_zeros(torch.zeros(1, 3, dtype=torch.int32), 4, 64)  # 64 4-bit zeros need 8 words


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 64, None))
def test_reference_reads_packed_integer_zeros(bits, group):
    k = 200  # a short last group
    qt = _qt(40, k, QuantScheme(bits, group))  # N = 40: ragged zero words
    packed, scales = packing.pack(qt.codes, bits), qt.scale.t().contiguous()
    zi = packing.pack_zeros(qt.zero.t(), bits)
    w = reference.dequantize(packed, scales, zi, bits, group, k)
    assert torch.equal(w, dequantize(qt))  # to the bit, as with the fp16 zeros
    assert torch.equal(w, reference.dequantize(packed, scales, qt.zero.t().contiguous(), bits, group, k))


def test_three_bits_are_three_bits():
    assert packing.code_words(4096, 3) * 32 == 3 * 4096


def test_code_words_formula_is_memory_formula():
    for k in range(1, 600, 7):
        for b in (2, 3, 4, 8):
            assert packing.code_words(k, b) == code_words(k, b)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        packing.pack(torch.full((2, 4), 4, dtype=torch.uint8), 2)  # a code does not fit in 2 bits
    with pytest.raises(ValueError):
        packing.pack(torch.zeros(2, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        packing.unpack(torch.zeros(3, 2, dtype=torch.int32), 4, 64)  # 64 4-bit codes need 8 words
