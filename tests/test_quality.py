"""Evaluation against a brute-force float64 computation on a tiny model."""

import copy
import math

import numpy as np
import pytest
import torch

from aqsearch.config import Plan
from aqsearch.data import TokenSet
from aqsearch.memory import plan_bytes
from aqsearch.models import decoder_layers
from aqsearch.quality import build_reference, evaluate
from aqsearch.quantizers import fake_quantize
from tinymodels import tiny_model


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (4 * 48,), generator=g)
    ts = TokenSet.from_ids(ids, 48, 4, "random")
    return m, ts


def test_identical_model_has_zero_kl(setup):
    m, ts = setup
    ref = build_reference(m, ts, batch_size=2)
    r = evaluate(m, ref, None, batch_size=2)
    assert r.kl_mean == 0.0 and r.kl_max == 0.0 and r.top1 == 1.0 and r.ppl_ratio == 1.0
    assert r.tokens == 4 * 47


def test_matches_brute_force_float64(setup):
    m, ts = setup
    plan = Plan.from_layers({"re:.*mlp.*": "w2g32", "_default": "w3g64s"})
    ref = build_reference(m, ts, batch_size=3)  # odd batch: last batch short
    r = evaluate(m, ref, plan, batch_size=3)

    full = copy.deepcopy(m).double()
    quant = copy.deepcopy(m).double()
    with torch.no_grad():
        for l in decoder_layers(quant):
            lin = quant.get_submodule(l.name)
            lin.weight.copy_(fake_quantize(m.get_submodule(l.name).weight, plan.scheme_for(l.name)).double())
    kls, agree, nll_q, nll_f = [], [], [], []
    with torch.no_grad():
        for w in ts.windows:
            pf = torch.softmax(full(w[None]).logits[0], -1)
            pq = torch.softmax(quant(w[None]).logits[0], -1)
            for t in range(ts.seqlen - 1):
                kls.append(sum(float(pf[t, v]) * math.log(float(pf[t, v]) / float(pq[t, v])) for v in range(pf.shape[1])))
                agree.append(int(pf[t].argmax() == pq[t].argmax()))
                nll_q.append(-math.log(float(pq[t, w[t + 1]])))
                nll_f.append(-math.log(float(pf[t, w[t + 1]])))
    kls = np.array(kls)
    assert r.kl_mean == pytest.approx(kls.mean(), rel=1e-4)
    assert r.kl_max == pytest.approx(kls.max(), rel=1e-4)
    assert r.kl_p99 == pytest.approx(np.percentile(kls, 99), rel=1e-4)
    assert r.top1 == pytest.approx(np.mean(agree), abs=1.5 / len(agree))  # near-ties may flip in fp32
    assert r.ppl == pytest.approx(math.exp(np.mean(nll_q)), rel=1e-5)
    assert r.ppl_ref == pytest.approx(math.exp(np.mean(nll_f)), rel=1e-5)
    assert r.bytes == plan_bytes(m, plan).bytes and r.kl_mean > 0.01


def test_weights_restored_after_evaluation(setup):
    m, ts = setup
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = build_reference(m, ts)
    evaluate(m, ref, Plan.uniform("w2g32"))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_reference_cache_and_memmap(setup, tmp_path):
    m, ts = setup
    a = build_reference(m, ts, cache_key="tiny")
    b = build_reference(m, ts, cache_key="tiny")  # from the cache file
    c = build_reference(m, ts, max_memory=1024)  # forced onto a memory-mapped file
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.nll, b.nll)
    assert torch.equal(a.hidden, c.hidden)
    r1, r2 = evaluate(m, a, Plan.uniform("w4g32")), evaluate(m, c, Plan.uniform("w4g32"))
    assert r1.kl_mean == r2.kl_mean
