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
