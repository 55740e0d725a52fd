"""The rollback log: torn tails, corrupt lines, replay through the one plan builder."""

import pytest

from aqsearch.errors import AqError
from aqsearch.strategies.journal import Journal, replay


def test_journal_ignores_and_trims_a_torn_last_line(tmp_path):
    """Catches a journal that fails on (or keeps) a line torn by a crash, or hides a corrupt one."""
    j = Journal(tmp_path / "j.jsonl")
    j.append({"type": "start"})
    with open(j.path, "a") as f:
        f.write('{"type": "try", "blo')  # a crash mid-write
    assert [r["type"] for r in j.records()] == ["start"]
    j.truncate_torn_tail()
    j.append({"type": "try"})
    assert [r["type"] for r in j.records()] == ["start", "try"]
    with open(j.path, "a") as f:
        f.write("not json\n")
    with pytest.raises(AqError, match="corrupt at line 3"):
        list(j.records())


def test_replay_builds_the_plan_from_the_units_the_journal_names(tmp_path):
    """A hand-written journal: two units, a block record and a rebalance that changes one unit. Replay must
    give each unit's layers the rebalanced scheme (catches a replay that ignores rebalance records, or that
    skips the final plan check)."""
    from aqsearch.config import Plan

    j = Journal(tmp_path / "j.jsonl")
    units = [{"name": "model.layers.0.qkv", "layers": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]},
             {"name": "model.layers.0.down", "layers": ["model.layers.0.mlp.down_proj"]}]
    j.append({"type": "start", "version": 1, "n_blocks": 1, "units": units})
    j.append({"type": "block", "block": 0, "choice": {"model.layers.0.qkv": "w4g64", "model.layers.0.down": "w4g64"}})
    j.append({"type": "rebalance", "block": 0, "choice": {"model.layers.0.qkv": "w4g64", "model.layers.0.down": "w8g128"}})
    want = Plan.from_json({"version": 2, "layers": {"model.layers.0.self_attn.q_proj": "w4g64",
                                                     "model.layers.0.self_attn.k_proj": "w4g64",
                                                     "model.layers.0.mlp.down_proj": "w8g128"}})
    j.append({"type": "final", "plan": want.to_json()})
    plan, trained = replay(j)
    assert plan == want and trained == {}
    j.append({"type": "final", "plan": Plan.uniform("w2g64").to_json()})  # a later, edited final record
    with pytest.raises(AqError, match="edited by hand"):
        replay(j)
