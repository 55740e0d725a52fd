"""The polish: every block trained in order on the quantized prefix's outputs, from the model's weights."""

import pytest
import torch

from aqsearch.capture import Activations
from aqsearch.config import Plan, QuantScheme
from aqsearch.data import TokenSet
from aqsearch.models import BLOCK_LINEARS, decoder_blocks, load_model
from aqsearch.polish import polish
from aqsearch.quantizers import dequantize, fake_quantize
from aqsearch.training import TrainSettings, rel_error, train_block


@pytest.fixture(scope="module")
def setup(tiny_dir):
    g = torch.Generator().manual_seed(0)
    calib = TokenSet.from_ids(torch.randint(0, 320, (2000,), generator=g), 16, 8, "random ids")
    return load_model(str(tiny_dir)), calib


def by_hand(model, calib, ts, s, block0_weights):
    """Block 1 trained by hand on block 0's output with ``block0_weights`` (suffix -> weight)."""
    b0, b1 = decoder_blocks(model)[:2]
    acts = Activations.capture(model, calib.windows, batch=ts.batch)
    n = calib.windows.shape[0]
    held, train_idx = torch.arange(n - round(n * 0.25), n), torch.arange(n - round(n * 0.25))
    y0 = acts.run(b0, acts.x_fp)
    acts.advance(b0, block0_weights, y0)
    y1 = acts.run(b1, acts.x_fp)
    q, _ = train_block(b1, {sfx: s for sfx in BLOCK_LINEARS}, acts, y1, train_idx, held, ts,
                       floor=rel_error(acts, b1, {}, y1, held))
    return q


def test_block_1_trains_on_the_polished_block_0(setup):
    """Catches a polish that feeds each block the full-precision output (or block 0 at round-to-nearest)
    instead of the polished prefix's output: block 1's codes would differ from the hand-built reference."""
    loaded, calib = setup
    model, ts, s = loaded.model, TrainSettings(steps=10, batch=4), QuantScheme.parse("w2g32")
    q, _ = polish(model, Plan.uniform(s), calib, ts)
    w0 = {f"{sfx}.weight": dequantize(q[f"model.layers.0.{sfx}"]) for sfx in BLOCK_LINEARS}
    ref = by_hand(model, calib, ts, s, w0)
    for sfx in BLOCK_LINEARS:
        assert torch.equal(q[f"model.layers.1.{sfx}"].codes, ref[sfx].codes)
    fp = by_hand(model, calib, ts, s, {})  # the full-precision stream: other codes
    assert not all(torch.equal(q[f"model.layers.1.{x}"].codes, fp[x].codes) for x in BLOCK_LINEARS)


def test_polish_on_a_rtn_prefix_trains_each_block_on_round_to_nearest_inputs(setup):
    """``stream="rtn"``: block 1 trains on block 0 at round-to-nearest, whatever block 0's training gave
    (a polish that fed block 1 the trained block 0 gives other codes, and fails it)."""
    loaded, calib = setup
    model, ts, s = loaded.model, TrainSettings(steps=10, batch=4), QuantScheme.parse("w2g32")
    q_rtn, _ = polish(model, Plan.uniform(s), calib, ts, stream="rtn")
    b0 = decoder_blocks(model)[0]
    ref = by_hand(model, calib, ts, s, {f"{sfx}.weight": fake_quantize(b0.get_submodule(sfx).weight, s)
                                        for sfx in BLOCK_LINEARS})
    for sfx in BLOCK_LINEARS:
        assert torch.equal(q_rtn[f"model.layers.1.{sfx}"].codes, ref[sfx].codes)
        assert torch.equal(q_rtn[f"model.layers.1.{sfx}"].scale, ref[sfx].scale)
    with pytest.raises(ValueError, match="stream"):
        polish(model, Plan.uniform(s), calib, ts, stream="fp")


def test_polish_starts_from_the_models_own_weights_and_never_gets_worse(setup):
    """Step 0 of each block is round-to-nearest of the model's weights (``before``), and the best held-out
    checkpoint is kept (catches a polish that starts elsewhere or returns its last, worse step)."""
    loaded, calib = setup
    q, st = polish(loaded.model, Plan.uniform("w2g32"), calib, TrainSettings(steps=10, batch=4))
    assert all(b["after"] <= b["before"] + 1e-12 for b in st["blocks"])
    assert any(b["after"] < b["before"] for b in st["blocks"])
    assert set(q) == {f"model.layers.{i}.{sfx}" for i in range(2) for sfx in BLOCK_LINEARS}
