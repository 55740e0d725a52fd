"""``FrontMutationSampler`` held to Optuna's own sampler tests (``optuna.testing.pytest_samplers``).

The sampler is made for categorical spaces (one scheme per unit): its relative sampling moves units
along their choices, anything else falls back to random sampling. The shipped cases on categorical
parameters run as they are, the ones that call ``sample_relative`` on numerical spaces are left out.
The single-parameter categorical cases catch a trade move on a space of one unit (it needs two).
"""

import optuna
import pytest
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
)

from aqsearch.strategies.sampler import FrontMutationSampler


class _FrontMutation:
    @pytest.fixture
    def sampler(self):
        return lambda: FrontMutationSampler(seed=0)


class TestBasic(_FrontMutation, BasicSamplerTestCase):
    pass


class TestRelative(_FrontMutation, RelativeSamplerTestCase):
    test_sample_relative_numerical = None  # relative sampling is categorical only (see module docstring)
    test_sample_relative_mixed = None


class TestMultiObjective(_FrontMutation, MultiObjectiveSamplerTestCase):
    pass


@pytest.mark.parametrize("seed", range(5))
def test_one_unit_space_mutates_without_crashing(seed):
    """The search's shape: two objectives, one categorical unit, trials mutated from the front."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=FrontMutationSampler(seed=seed))
    cost = {"w8g32": 9.0, "w4g32": 5.0, "w3g64": 3.5, "w2g256": 2.1}

    def objective(t):
        c = t.suggest_categorical("model.layers.0", list(cost))
        return 1 / cost[c], cost[c]

    study.optimize(objective, n_trials=12)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_parents_come_from_the_feasible_front_only():
    """Catches a sampler that draws parents from every finished trial: with one front point (all units at
    "a") and one dominated trial (all at "c"), every child stays within a few moves of the front point."""
    from aqsearch.strategies.sampler import FrontMutationSampler

    names = [f"u{i:02d}" for i in range(20)]
    dist = {n: optuna.distributions.CategoricalDistribution(("w4g64", "w3g64", "w2g64")) for n in names}
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=FrontMutationSampler(seed=0))
    front = {n: "w4g64" for n in names}
    dominated = {n: "w2g64" for n in names}
    study.add_trial(optuna.trial.create_trial(values=[0.1, 100.0], params=front, distributions=dist,
                                              system_attrs={"constraints": [-1.0]}))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 200.0], params=dominated, distributions=dist,
                                              system_attrs={"constraints": [-1.0]}))
    for _ in range(40):
        t = study.ask(dist)
        assert sum(t.params[n] != "w4g64" for n in names) <= 6  # at most 3 moves of 2 units from the front
        study.tell(t, [1.0, 300.0])  # dominated too: the front stays one point


def test_each_move_changes_a_unit_a_pair_a_block_or_one_kind_only():
    """Each of the sampler's moves (step, trade, block, group, protect) changes one unit, two, the units of
    one block, or one kind of unit (or one end block): never the plan at large (catches a protection or a
    block move that raises everything, which makes every child a jump far from its parent)."""
    from aqsearch.models import split_unit
    from aqsearch.strategies.sampler import FrontMutationSampler

    names = [f"model.layers.{b}.{k}" for b in range(6) for k in ("qkv", "o", "gate_up", "down")]
    ladder = ["w2g64", "w2g32", "w3g64", "w3g32", "w4g64", "w4g32"]
    s = FrontMutationSampler(seed=1)
    kinds_moved = set()
    for _ in range(300):
        child = {n: "w3g64" for n in names}
        s._move(child, {n: ladder for n in names}, names)
        moved = [n for n in names if child[n] != "w3g64"]
        where = [split_unit(n) for n in moved]
        one_block = len({b for b, _ in where}) == 1
        one_kind = len({k for _, k in where}) == 1
        assert len(moved) <= 2 or one_block or one_kind, moved
        if len(moved) > 4:
            kinds_moved.add(where[0][1])
    assert kinds_moved  # the protections of a kind across blocks do happen
