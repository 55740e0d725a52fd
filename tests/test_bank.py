"""The candidate bank on a tiny model: reuse across runs and workers, racing, finishing on demand,
kill -9 during a build, the one plan builder and the knapsack over the bank."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from aqsearch.bank import Bank, BankSettings, _stale
from aqsearch.compose import compose, knapsack_choice
from aqsearch.bankbuild import build_bank, write_spec
from aqsearch.curves import CurveRegressor
from aqsearch.data import TokenSet
from aqsearch.memory import plan_bytes
from aqsearch.models import decoder_blocks, load_model
from aqsearch.training import Curve

# w2g32f has the codes (so the error) of w2g32 at the bytes of w3g256, which is far better: above the
# menu's lower hull, it is the candidate the race must stop
MENU = ("w4g64", "w3g32", "w3g256", "w2g32", "w2g32f", "w8g128")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return TokenSet.from_ids(torch.randint(0, 320, (2000,), generator=g), 16, 8, "random ids")


def settings(**kw):
    return BankSettings(**{"schemes": MENU, "steps": 10, "batch": 4, **kw})


@pytest.fixture(scope="module")
def full_bank(loaded, calib, tmp_path_factory):
    """Every candidate trained to the end (no racing), seed 1: its curves fit the racing regressor."""
    b = Bank(tmp_path_factory.mktemp("banks"), loaded.model, loaded.fingerprint, calib, settings(seed=1, race=False))
    b.build()
    return b


@pytest.fixture(scope="module")
def raced(full_bank, loaded, calib, tmp_path_factory):
    """A raced bank; its regressor is fitted on the full bank's curves of this model."""
    reg = CurveRegressor([Curve.from_json(c.curve) for c in full_bank.candidates()])
    bank = Bank(tmp_path_factory.mktemp("raced"), loaded.model, loaded.fingerprint, calib, settings(), reg)
    return bank, bank.build()


def test_racing_stops_dominated_candidates_and_finishes_them_on_demand(raced, loaded, calib):
    bank, st = raced
    tmp_path = bank.dir.parent
    stopped = [c for c in bank.candidates() if not c.finished]
    assert st["stopped"] == len(stopped) >= 1  # fails if the race never stops anything
    assert st["steps_saved"] == sum(c.steps_saved for c in stopped) > 0
    for c in stopped:
        assert c.weights is None and c.prediction and "dominated" in c.why and c.steps_run < 10
        assert not (bank.dir / f"{c.unit}.{c.scheme}.safetensors").exists()
    # the plan builder finishes a stopped candidate when a plan asks for it, never uses it half-trained
    c = stopped[0]
    choice = {u.name: "w4g64" for u in bank.units}
    choice[c.unit] = c.scheme
    plan, tensors = compose(bank, choice)
    done = bank.get(c.unit, c.scheme)
    assert done.finished and done.steps_saved == 0 and done.steps_run == 10 and "on demand" in done.why
    assert set(tensors) == {n for n in plan.resolve(n for u in bank.units for n in u.layers)}
    assert Bank(tmp_path, loaded.model, loaded.fingerprint, calib, settings()).get(c.unit, c.scheme).finished


def test_bank_reused_across_runs_and_workers(loaded, calib, tiny_dir, tmp_path):
    bank = Bank(tmp_path, loaded.model, loaded.fingerprint, calib, settings(schemes=("w4g64", "w2g64"), steps=4))
    st = build_bank(bank, str(tiny_dir), workers=2, show=False)  # two worker processes share the folder
    assert st["workers"] == 2 and st["candidates"] == st["of"] == 4
    files = {p.name: p.read_text() for p in bank.dir.glob("*.json") if p.name.startswith("model.")}
    again = Bank(tmp_path, loaded.model, loaded.fingerprint, calib, settings(schemes=("w4g64", "w2g64"), steps=4))
    assert build_bank(again, str(tiny_dir), show=False)["workers"] == 0  # nothing left to train
    # another menu over the same settings reuses the candidates it shares
    wider = Bank(tmp_path, loaded.model, loaded.fingerprint, calib, settings(schemes=("w4g64", "w3g64", "w2g64"), steps=4))
    assert wider.dir == bank.dir and sum(c is not None for c in map(lambda u: wider.get(u.name, "w4g64"), wider.units)) == 2
    assert {p.name: p.read_text() for p in bank.dir.glob("*.json") if p.name.startswith("model.")} == files


def test_kill_9_during_build_then_resume_loses_no_finished_candidate(loaded, calib, tiny_dir, tmp_path):
    s = settings(schemes=("w4g64", "w3g64", "w2g64"), steps=8, race=False)
    bank = Bank(tmp_path, loaded.model, loaded.fingerprint, calib, s)
    spec = write_spec(bank, str(tiny_dir), race=False, device="cpu")
    # This process holds the last block's claim, so the worker cannot finish the bank however fast it
    # trains: it builds the other blocks, then waits for that claim (the kill comes at a known state).
    last = bank._claim_path(len(decoder_blocks(loaded.model)) - 1)
    assert bank._claim(len(decoder_blocks(loaded.model)) - 1)
    p = subprocess.Popen([sys.executable, "-m", "aqsearch.bankbuild", str(spec)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(bank.dir.glob("model.*.json")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = {f.name: f.read_text() for f in bank.dir.glob("model.*.json")}
    assert before, "the worker finished no candidate before the kill"
    assert not bank.complete()
    # the claim is now a dead worker's (the killed pid on this host): it must be taken over, not waited on
    last.write_text(json.dumps({"host": socket.gethostname(), "pid": p.pid, "worker": "killed"}))
    assert _stale(last)
    again = Bank(tmp_path, loaded.model, loaded.fingerprint, calib, s)
    again.build()
    assert again.complete()
    for name, text in before.items():
        assert (bank.dir / name).read_text() == text  # kept, not trained again
        c = json.loads(text)
        assert (bank.dir / c["weights"]).exists()


def test_knapsack_over_the_bank_meets_the_budget(full_bank, loaded):
    sizes = [c.bytes for c in full_bank.menu(full_bank.units[0])]
    budget = sum(min(c.bytes for c in full_bank.menu(u)) for u in full_bank.units) + max(sizes) - min(sizes)
    choice = knapsack_choice(full_bank, budget, quantum=64)
    plan, tensors = compose(full_bank, choice)
    assert plan_bytes(loaded.model, plan).bytes <= budget and tensors
    assert knapsack_choice(full_bank, 10) is None


def test_polish_starts_from_the_bank_and_improves_the_plan(full_bank, loaded, calib):
    from aqsearch.polish import polish
    from aqsearch.training import TrainSettings, rel_error

    plan, tensors = compose(full_bank, {u.name: "w2g32" for u in full_bank.units})
    polished, st = polish(loaded.model, plan, calib, TrainSettings(steps=10, batch=4), init=tensors)
    assert set(polished) == set(tensors)
    blocks = st["blocks"]
    assert all(b["after"] <= b["before"] + 1e-12 for b in blocks) and any(b["after"] < b["before"] for b in blocks)
    # it started from the bank's weights: step 0 is (about) the bank's error on the quantized stream, far
    # below round-to-nearest from the full-precision weights
    assert blocks[0]["before"] < full_bank.get(full_bank.units[0].name, "w2g32").rtn_error


def test_polish_on_a_rtn_prefix_trains_each_block_on_round_to_nearest_inputs(loaded, calib):
    """``stream="rtn"``: block 1 trains on block 0 at round-to-nearest, whatever block 0's training gave.
    The reference is built by hand (capture, advance through a round-to-nearest block 0, train block 1); a
    polish that fed block 1 the trained block 0 (the default stream) gives other codes, and so fails it."""
    from aqsearch.capture import Activations
    from aqsearch.config import Plan
    from aqsearch.models import BLOCK_LINEARS
    from aqsearch.polish import polish
    from aqsearch.quantizers import QuantScheme, fake_quantize
    from aqsearch.training import TrainSettings, rel_error, train_block

    model, ts, s = loaded.model, TrainSettings(steps=10, batch=4), QuantScheme.parse("w2g32")
    q_rtn, _ = polish(model, Plan.uniform(s), calib, ts, stream="rtn")
    q_tr, _ = polish(model, Plan.uniform(s), calib, ts)
    b0, b1 = decoder_blocks(model)[:2]
    acts = Activations.capture(model, calib.windows, batch=ts.batch)
    n = calib.windows.shape[0]
    held, train_idx = torch.arange(n - round(n * 0.25), n), torch.arange(n - round(n * 0.25))
    y0 = acts.run(b0, acts.x_fp)
    acts.advance(b0, {f"{sfx}.weight": fake_quantize(b0.get_submodule(sfx).weight, s) for sfx in BLOCK_LINEARS}, y0)
    y1 = acts.run(b1, acts.x_fp)
    ref, _ = train_block(b1, {sfx: s for sfx in BLOCK_LINEARS}, acts, y1, train_idx, held, ts,
                         floor=rel_error(acts, b1, {}, y1, held))
    for sfx in BLOCK_LINEARS:
        assert torch.equal(q_rtn[f"model.layers.1.{sfx}"].codes, ref[sfx].codes)
        assert torch.equal(q_rtn[f"model.layers.1.{sfx}"].scale, ref[sfx].scale)
    # block 0 sees the same input either way; block 1 does not
    assert all(torch.equal(q_rtn[f"model.layers.0.{x}"].codes, q_tr[f"model.layers.0.{x}"].codes) for x in BLOCK_LINEARS)
    assert not all(torch.equal(q_rtn[f"model.layers.1.{x}"].codes, q_tr[f"model.layers.1.{x}"].codes)
                   for x in BLOCK_LINEARS)
    with pytest.raises(ValueError, match="stream"):
        polish(model, Plan.uniform(s), calib, ts, stream="fp")


def test_trial_needing_a_stopped_candidate_is_pruned_or_finishes_it(raced, loaded):
    import optuna

    from aqsearch.quality import build_reference
    from aqsearch.search import Objective, SearchSettings, build_space, with_menu

    bank, _ = raced
    bank._mem.clear()
    stopped = [c for c in bank.candidates() if not c.finished]
    if not stopped:
        pytest.skip("the racing test finished every stopped candidate")
    c = stopped[0]
    space = with_menu(build_space(loaded.model, "block"), MENU)
    g = torch.Generator().manual_seed(5)
    ref = build_reference(loaded.model, TokenSet.from_ids(torch.randint(0, 320, (64,), generator=g), 16, 4, "score"))
    obj = Objective(loaded, space, ref, 10**9, SearchSettings(granularity="block", train=True), 1, bank)
    params = {u.name: "w4g64" for u in space.units}
    params[c.unit] = c.scheme
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.0, 1.0], params={u.name: "w4g64" for u in space.units},
                                              distributions={u.name: optuna.distributions.CategoricalDistribution(
                                                  u.choices) for u in space.units}))
    study.enqueue_trial(params)
    study.optimize(obj, n_trials=1)
    t = study.trials[-1]
    assert t.state == optuna.trial.TrialState.PRUNED  # a finished trial of fewer bytes and KL 0 beats it
    assert t.user_attrs["predicted_kl_optimistic"] > 0 and "pruned_because" in t.user_attrs
    assert not bank.get(c.unit, c.scheme).finished  # pruning trained nothing
    fresh = optuna.create_study(directions=["minimize", "minimize"])
    fresh.enqueue_trial(params)
    fresh.optimize(obj, n_trials=1)
    assert fresh.trials[-1].state == optuna.trial.TrialState.COMPLETE
    assert bank.get(c.unit, c.scheme).finished  # nothing beat its prediction: the candidate was finished
