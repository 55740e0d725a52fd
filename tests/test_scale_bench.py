"""benchmarks/scale.py (issue 22; ``scale_estimate.py``, ``scale_shape.py``): its end-to-end arithmetic, and its
block offload, on a tiny shape on the CPU.

On the CPU the offload's "device" copy of a block is told apart from the host copy by its dtype (host bf16,
device fp32), which is what the script's ``Watch`` counts: the most block-parameter bytes resident at once."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import scale
    import scale_estimate
    import scale_shape
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

COSTS = {"blocks": 30, "capture_s": 3.0, "stream_block_s": 2.0,
         "candidate_s": {"w4g64": 20.0, "w2g32": 30.0}, "prefix_s": {"w4g64": 5.0, "w2g32": 6.0},
         "reference_s": 7.0, "trial_s": 4.0, "score_plan_s": 1e-5, "eval_windows": 8,
         "polish_block_fixed_s": 3.0, "polish_block_train_s": 25.0}


def test_estimate_is_the_hand_computation():
    """Four GPUs, then two hosts of four, by hand from the per-candidate, per-trial and per-polish-block costs.
    Catches: the stream divided among workers (each worker walks every block), blocks split fractionally
    instead of whole blocks per worker (30 blocks on 4 workers is 8 rounds, not 7.5), the race's stopped
    candidates charged in full (or not at all), the polish's fidelity or step fraction ignored, storage round
    trips charged on one host, and the final evaluation not scaled by its windows."""
    p = scale_estimate.Pipeline(trials=200, race_stop_fraction=0.5, race_plans=6, race_fidelity=0.2, top_plans=5, hull=8,
                       polish_step_fraction=0.5, final_eval_windows=16, rdb_op_s=0.25, rdb_ops_per_item=2)
    r = scale_estimate.estimate(COSTS, p, hosts=1, gpus=4)
    menu = (5 + 0.5 * 15) + (6 + 0.5 * 24)  # a candidate the race stops costs its prefix only
    assert r["bank_s"] == pytest.approx(3 + 30 * 2 + 8 * menu)
    assert r["study_s"] == pytest.approx(7 + 50 * 4)
    polish_full = 3 + 30 * (3 + 25 * 0.5)
    polish_low = 3 + 30 * (3 + 25 * 0.5 * 0.2)
    assert r["one_polish_s"] == pytest.approx(polish_full)
    assert r["race_s"] == pytest.approx(2 * (polish_low + 4))  # 6 plans on 4 workers: 2 rounds
    assert r["polish_s"] == pytest.approx(4 * (polish_full + 4 * 16 / 8))  # 13 polishes: 4 rounds
    assert r["total_s"] == pytest.approx(r["bank_s"] + r["study_s"] + r["race_s"] + r["polish_s"])
    assert r["racing_saved_s"] == pytest.approx(8 * (0.5 * 15 + 0.5 * 24) + 2 * (polish_full - polish_low))
    assert r["dominant"] == "polish"

    r2 = scale_estimate.estimate(COSTS, p, hosts=2, gpus=4)  # 8 workers, each item pays 2 round trips of 0.25 s
    assert r2["bank_s"] == pytest.approx(3 + 30 * 2 + 4 * (menu + 2 * 0.5))
    assert r2["study_s"] == pytest.approx(7 + 25 * (4 + 0.5))
    assert r2["polish_s"] == pytest.approx(2 * (polish_full + 8))
    scored = scale_estimate.estimate(COSTS, scale_estimate.Pipeline(trial_mode="score"), hosts=2, gpus=4)
    assert scored["study_s"] == pytest.approx(200 * 1e-5)  # one process scores from the bank: no storage traffic


def test_verdict_names_the_dominant_stage_and_how_much_of_it_must_go():
    """Catches a verdict that measures the excess against the total instead of the dominant stage, or that
    calls a pipeline over the hour "within"."""
    row = {"bank_s": 1000.0, "study_s": 200.0, "race_s": 400.0, "polish_s": 3000.0, "total_s": 4600.0,
           "dominant": "polish"}
    v = scale_estimate.verdict(row, 3600.0)
    assert not v["within"] and v["dominant"] == "polish" and v["over_s"] == pytest.approx(1000.0)
    assert v["dominant_must_lose"] == pytest.approx(1000 / 3000)
    assert v["dominant_speedup_needed"] == pytest.approx(3000 / 2000)
    assert scale_estimate.verdict(dict(row, total_s=3500.0), 3600.0)["within"]
    big = scale_estimate.verdict(dict(row, total_s=7000.0), 3600.0)
    assert big["dominant_must_lose"] > 1 and big["dominant_speedup_needed"] is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: the SmolLM2 family shrunk to 2 blocks, two schemes, a few steps (seconds on the CPU)."""
    from aqsearch.bench import read_results

    out = tmp_path_factory.mktemp("scale") / "scale.jsonl"
    rc = scale.main(["--small", "--shapes", "smollm2", "--blocks", "2", "--windows", "4", "--seqlen", "16",
                     "--steps", "5", "--extra-steps", "1", "--menu", "w4g64,w2g32", "--eval-windows", "1",
                     "--polish-blocks", "1", "--out", str(out)])
    assert rc == 0
    return {r["stage"]: r for r in read_results(out)}


def test_a_run_records_every_stage_and_its_estimate_is_recomputable(run):
    """The records hold what the estimate was computed from, so the README's numbers can be re-derived.
    Catches: a stage that writes no record, a candidate cost that is not its measured parts (extrapolated:
    init + prefix + extra steps scaled to the rest + finish; or the validated full run), an estimate computed
    from other numbers than those recorded."""
    assert set(run) == {"build", "stream", "bank", "study", "polish", "estimate"}
    e = run["estimate"]
    assert e["estimate"]["today"]["rows"][1] == scale_estimate.estimate(e["costs"], scale_estimate.VARIANTS["today"], 1, 4)
    for s, x in run["bank"]["schemes"].items():
        rest = 5 - x["prefix_steps"] - x["extra_steps"]
        extrap = x["prefix_s"] + x["extra_s"] * (1 + rest / x["extra_steps"]) + x["finish_s"]  # prefix_s: init + prefix
        assert x["candidate_s_extrapolated"] == pytest.approx(extrap)
        assert e["costs"]["candidate_s"][s] == (x["candidate_s_measured"] or x["candidate_s_extrapolated"])
        assert x["record_json_bytes"] > 500 and x["weights_bytes_packed"] < x["weights_bytes_unpacked"]
    assert run["bank"]["schemes"]["w4g64"]["candidate_s_measured"] is not None  # the validated scheme ran to the end
    assert run["bank"]["schemes"]["w4g64"]["steps_run"] == 5
    assert run["polish"]["blocks_polished"] == 1 and run["polish"]["steps"] == 5
    assert e["costs"]["polish_block_fixed_s"] + e["costs"]["polish_block_train_s"] == pytest.approx(
        run["polish"]["per_block_full_steps_s"])


def test_offload_keeps_one_block_resident_and_the_watch_sees_a_leak(run, monkeypatch):
    """Every stage ran with exactly one block's weights on the "device" at a time (the Watch saw one block,
    not zero: the blocks did visit the device). Then a broken offload (every block moved there and left) in the
    evaluation path: the Watch reports more than one block. Catches an offload that loads the whole model, and a
    Watch that cannot see it."""
    n_block = run["build"]["model"]["block_device_bytes"]
    for stage in ("bank", "study", "polish"):
        assert run[stage]["resident_block_bytes_max"] == n_block
    assert run["estimate"]["resident_blocks_max"] == 1.0

    import torch

    import aqsearch.capture

    def leaky(blocks, device, dtype=None):
        for i, blk in enumerate(blocks):
            blk.to(device, dtype)  # never moved back
            yield i, blk

    monkeypatch.setattr(aqsearch.capture, "blocks_on", leaky)
    args = argparse.Namespace(small=True, blocks=2, windows=4, seqlen=16, steps=5, batch=8, extra_steps=1,
                                    eval_windows=1, eval_seqlen=16, polish_blocks=1, polish_steps=5,
                                    menu=("w4g64",), validate="w4g64", device_bytes=1 << 30, reserve_s=0.0,
                                    deadline=math.inf, run="t", out="/dev/null")
    sh = scale_shape.Shape(args, "smollm2")
    sh.write = lambda stage, rec: None
    sh.build()
    sh.study()
    assert sh.watch.max_bytes >= 2 * n_block
    assert {p.dtype for p in sh.model.model.layers.parameters()} == {torch.float32}
