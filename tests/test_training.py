"""Block capture, SignRound training, the learning-curve regressor, the weights file."""

import json
import math
import random

import pytest
import torch

from aqsearch.capture import Activations
from aqsearch.config import QuantScheme
from aqsearch.curves import CurveRegressor, early_stopper
from aqsearch.errors import AqError
from aqsearch.models import BLOCK_LINEARS, decoder_blocks
from aqsearch.quantizers import quantize
from aqsearch.training import BlockTraining, Curve, TrainSettings, rel_error, train_block
from aqsearch.weights import load_qtensors, save_qtensors
from tinymodels import tiny_model


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    ids = torch.randint(3, 320, (8, 24), generator=torch.Generator().manual_seed(0))
    return m, ids


def test_capture_matches_the_models_hidden_states(setup):
    m, ids = setup
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    for dev_b, cpu_b in ((16 << 30, 8 << 30), (0, 0)):  # in memory, and forced onto memory-mapped files
        acts = Activations.capture(m, ids, batch=3, device_bytes=dev_b, cpu_bytes=cpu_b)
        assert torch.allclose(acts.x_fp, hs[0], atol=1e-6)
        acts.advance(decoder_blocks(m)[0], {})
        assert torch.allclose(acts.x_fp, hs[1], atol=1e-5) and torch.allclose(acts.x_q, hs[1], atol=1e-5)
    assert acts.report() == {"disk": 2 * 8 * 24 * 64 * 4}


def _block_run(m, ids, **kw):
    acts = Activations.capture(m, ids, batch=4)
    blk = decoder_blocks(m)[0]
    y = acts.run(blk, acts.x_fp)
    schemes = {sfx: QuantScheme(2, 32) for sfx in BLOCK_LINEARS}
    return blk, acts, y, schemes


def test_training_lowers_held_out_error_and_keeps_the_best(setup):
    m, ids = setup
    blk, acts, y, schemes = _block_run(m, ids)
    q, curve = train_block(blk, schemes, acts, y, torch.arange(6), torch.arange(6, 8), TrainSettings(steps=30, batch=4))
    assert len(curve.points) >= 10 and curve.steps_run == 30 and curve.stopped is None
    assert curve.best < curve.initial  # training helps on held-out windows
    # the returned tensors are the best checkpoint: their held-out error is curve.best
    from aqsearch.quantizers import dequantize

    w = {f"{s}.weight": dequantize(t) for s, t in q.items()}
    assert rel_error(acts, blk, w, y, torch.arange(6, 8)) == pytest.approx(curve.best, rel=1e-5)


def test_paused_run_equals_uninterrupted_run(setup):
    m, ids = setup
    blk, acts, y, schemes = _block_run(m, ids)
    ts = TrainSettings(steps=20, batch=4)
    _, whole = train_block(blk, schemes, acts, y, torch.arange(6), torch.arange(6, 8), ts)
    r = BlockTraining(blk, schemes, acts, y, torch.arange(6), torch.arange(6, 8), ts)
    r.advance(4)
    assert r.step == 4 and not r.done
    r.advance()
    _, parts = r.finish()
    assert [p["heldout"] for p in parts.points] == [p["heldout"] for p in whole.points]


def test_stop_reason_ends_a_run(setup):
    m, ids = setup
    blk, acts, y, schemes = _block_run(m, ids)
    stop = lambda c: "enough" if c.steps_run >= 6 else None  # noqa: E731
    _, curve = train_block(blk, schemes, acts, y, torch.arange(6), torch.arange(6, 8), TrainSettings(steps=30, batch=4),
                           should_stop=stop)
    assert curve.stopped == "enough" and curve.steps_run < 30


def synthetic(rng, steps=40):
    """Curves of a known family: L(t) = L0 * (a + (1 - a) * exp(-t / tau)), a measured every 2 steps."""
    a, tau, l0 = rng.uniform(0.2, 0.8), rng.uniform(3, 12), rng.uniform(1e-3, 1e-1)
    pts = [{"step": t, "samples": t * 8, "train": 0.0, "heldout": l0 * (a + (1 - a) * math.exp(-t / tau))}
           for t in range(0, steps + 1, 2)]
    return Curve(block=rng.randrange(30), schemes={"mlp.up_proj": "w4g128"}, steps=steps, n_train=24, batch=8,
                 points=pts)


def test_regressor_predicts_unseen_curves_and_orders_quantiles():
    rng = random.Random(0)
    reg = CurveRegressor([synthetic(rng) for _ in range(150)])
    errs = []
    for _ in range(40):
        c = synthetic(rng)
        pred = reg.predict(c, 8)
        assert pred[0.1] <= pred[0.5] <= pred[0.9]
        errs.append(abs(pred[0.5] - c.best) / c.best)
    assert sorted(errs)[len(errs) // 2] < 0.1


def test_early_stopper_stops_hopeless_runs_only():
    """Goals close to each run's true final loss, on both sides: 30 % below it the run is hopeless, 10 %
    above it the run goes on. The final losses of these curves span two orders of magnitude, so a
    regressor that ignores the curve (a constant), or one that stops at the loss seen so far, fails."""
    rng = random.Random(1)
    reg = CurveRegressor([synthetic(rng) for _ in range(100)])
    for _ in range(12):
        c = synthetic(rng)
        prefix = Curve(**{**c.__dict__, "points": [p for p in c.points if p["step"] <= 8]})
        log = []
        assert early_stopper(reg, goal=c.best * 0.7, log=log)(prefix).startswith("hopeless")
        assert early_stopper(reg, goal=c.best * 1.1)(prefix) is None
        assert log and log[0]["goal"] == c.best * 0.7


def test_weights_file_round_trip_and_integrity(tmp_path):
    q = {"a": quantize(torch.randn(8, 64), QuantScheme(3, 32)), "b": quantize(torch.randn(4, 32), QuantScheme(4, 32, True))}
    sha = save_qtensors(tmp_path / "w.safetensors", q)
    back = load_qtensors(tmp_path / "w.safetensors", sha)
    assert all(torch.equal(back[k].codes, q[k].codes) and back[k].scheme == q[k].scheme for k in q)
    with pytest.raises(AqError, match="does not match"):
        load_qtensors(tmp_path / "w.safetensors", "0" * 64)
    assert json.loads(json.dumps(sha)) == sha


@pytest.mark.parametrize("schemes", [
    {sfx: "w4g64" for sfx in BLOCK_LINEARS},  # K = 64 and K = 160: two stacks
    {**{sfx: "w3g32" for sfx in BLOCK_LINEARS}, "self_attn.v_proj": "w2g64f", "mlp.up_proj": "w8g32s"},
])
def test_stacked_parameters_quantize_each_linear_as_the_reference_does(setup, schemes):
    """Linears sharing K and a scheme train as one stack; its weights and snapshot must be, to the bit,
    what the reference quantizer gives each Linear alone with the same offsets and clips."""
    from aqsearch.quantizers import dequantize, fake_quantize, n_groups
    from aqsearch.training import _Params

    m, _ = setup
    blk = decoder_blocks(m)[0]
    sch = {k: QuantScheme.parse(v) for k, v in schemes.items()}
    p = _Params(blk, sch)
    assert len(p.stacks) == len({(blk.get_submodule(k).weight.shape[1], s) for k, s in sch.items()})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every learned tensor somewhere off its start
        for t in p.tensors():
            t.copy_(torch.rand(t.shape, generator=g) - 0.5 if t.dim() == 3 else 0.6 + 0.4 * torch.rand(t.shape, generator=g))
    p.clamp()
    w, snap = p.weights(False), p.snapshot()
    for st in p.stacks:
        v = st.v.detach().reshape(st.v.shape[0], -1)[:, : st.k]
        for sfx, (a, b) in st.rows.items():
            s, lin = sch[sfx], blk.get_submodule(sfx).weight.detach()
            lo = st.lo[a:b].detach() if not s.sym else None
            ref = fake_quantize(lin, s, v[a:b], lo, st.hi[a:b].detach())
            assert st.lo.shape[1] == n_groups(lin.shape[1], s)
            assert torch.equal(w[f"{sfx}.weight"], ref)
            assert torch.equal(dequantize(snap[sfx]), ref) and snap[sfx].scheme == s


@pytest.mark.parametrize("scheme", ["w4g32s", "w2g32f"])
def test_symmetric_and_fp16_zero_schemes_train(setup, scheme):
    """A symmetric scheme has no min clip to learn (its gradient would not exist: the old trainer
    crashed); an fp16-zero scheme learns like the integer one."""
    m, ids = setup
    acts = Activations.capture(m, ids, batch=4)
    blk = decoder_blocks(m)[0]
    y = acts.run(blk, acts.x_fp)
    q, c = train_block(blk, {sfx: QuantScheme.parse(scheme) for sfx in BLOCK_LINEARS}, acts, y, torch.arange(6),
                       torch.arange(6, 8), TrainSettings(steps=12, batch=3, eval_points=4))
    assert c.steps_run == 12 and all(t.scheme == QuantScheme.parse(scheme) for t in q.values())
    assert c.points[-1]["heldout"] != c.initial  # the parameters moved
