"""Bytes against hand counts."""

import pytest

from aqsearch.config import Budget, Plan, QuantScheme
from aqsearch.memory import code_words, layer_bytes, plan_bytes, smallest_bytes
from aqsearch.models import decoder_layers
from aqsearch.quantizers import n_groups
from tinymodels import tiny_model

# SmolLM2-135M decoder Linears (out, in), per block: q, k, v, o, gate, up, down; 30 blocks.
SMOL_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def test_576_wide_layer_at_g128_has_5_groups():
    assert n_groups(576, QuantScheme(4, 128)) == 5  # 4 full groups and one of 64


def test_layer_bytes_hand_count():
    # 576x576 at w4g128: codes 576*576*4/8 = 165888; 5 groups a row: fp16 scales 576*5*2 = 5760,
    # 4-bit zeros packed along N: 5 group rows * 576*4/8 = 1440.
    assert layer_bytes(576, 576, QuantScheme(4, 128)) == 165_888 + 5_760 + 1_440
    # the same with fp16 zeros (w4g128f): 576 rows * 5 groups * (2+2) = 11520.
    assert layer_bytes(576, 576, QuantScheme(4, 128, fzero=True)) == 165_888 + 11_520
    # 3-bit zeros as two planes along N: N=40 -> ceil(40/16) + ceil(40/32) = 5 words a group row; the
    # padding past 40 * 3 bits (5 * 32 - 120 = 40 bits a row) is stored and counted.
    assert layer_bytes(40, 64, QuantScheme(3, 32)) == 40 * 64 * 3 // 8 + 40 * 2 * 2 + 2 * 5 * 4
    # 3-bit symmetric g64, 1536x576: codes 1536*576*3/8 = 331776; metadata 1536 * 9 * 2 = 27648.
    assert layer_bytes(1536, 576, QuantScheme(3, 64, sym=True)) == 331_776 + 27_648
    # unquantized: fp16
    assert layer_bytes(10, 20, None) == 400


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_code_words_equal_bits_when_aligned(bits):
    for k in (64, 576, 1536, 4096):
        assert code_words(k, bits) * 4 * 8 == k * bits


@pytest.mark.parametrize("scheme,total,bpw", [
    ("w4g64", 57_231_360, 4.3125), ("w3g32", 47_692_800, 3.59375), ("w3g64", 43_752_960, 3.296875),
    ("w2g32", 34_007_040, 2.5625), ("w2g64", 30_274_560, 2.28125),  # integer zeros: b bits a group
    ("w4g64f", 59_719_680, 4.5), ("w4g64s", 56_401_920, 4.25),  # fp16 zero; symmetric
])
def test_smollm2_decoder_bytes(scheme, total, bpw):
    got = 30 * sum(layer_bytes(n, k, QuantScheme.parse(scheme)) for n, k in SMOL_BLOCK)
    weights = 30 * sum(n * k for n, k in SMOL_BLOCK)
    assert got == total and 8 * got / weights == bpw == QuantScheme.parse(scheme).bpw


def test_plan_bytes_on_a_model_matches_hand_sum():
    m = tiny_model()  # hidden 64, intermediate 160, 2 blocks, vocab 320, tied embeddings
    layers = decoder_layers(m)
    plan = Plan.from_layers({"re:.*mlp.*": "w2g32", "_default": "w8g64"})
    rep = plan_bytes(m, plan)
    hand = 0
    for l in layers:
        s = QuantScheme(2, 32) if "mlp" in l.name else QuantScheme(8, 64)
        groups = -(-l.in_features // s.group)  # fp16 scales + b-bit zeros (every N here is a multiple of 32)
        hand += l.out_features * l.in_features * s.bits // 8 + l.out_features * groups * (16 + s.bits) // 8
    assert rep.bytes == hand
    others = 320 * 64 + 2 * 2 * 64 + 64  # tied embedding once, two norms a block, final norm
    assert rep.bytes_total == hand + 2 * others
    assert rep.bpw == pytest.approx(8 * hand / sum(l.numel for l in layers))
    assert plan_bytes(m, None).bytes == 2 * sum(l.numel for l in layers)


def test_budget_and_smallest():
    layers = decoder_layers(tiny_model())
    n = sum(l.numel for l in layers)
    assert Budget.parse("4bpw").resolve(n) == n // 2
    assert Budget.parse("100KiB").resolve(n) == 100 * 2**10  # below the 16 bpw bound (172,032 B)
    assert smallest_bytes(layers, [QuantScheme(2, 256), QuantScheme(4, 64)]) == sum(
        layer_bytes(l.out_features, l.in_features, QuantScheme(2, 256)) for l in layers)
