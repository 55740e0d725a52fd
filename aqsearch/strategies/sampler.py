"""A local-search sampler for plan spaces: every new trial is a front point with a few units moved.

Measured on SmolLM2 (210 layer units, README "Search"): TPE's and NSGA-II's sampled trials land far from
the front (one unit drawn at 2 bits is enough to ruin a plan), while the warm starts (knapsack
allocations, uniform schemes, progressive plans) are near it. This sampler takes a feasible Pareto
point of the finished trials (warm starts included) as the parent and applies one to three moves:

- *step*: one unit to the neighbouring scheme in its size order (a little more or less precision);
- *trade*: one unit a step up and another a step down, so that the plan stays near the same size;
- *block*: every unit of one block a step together (whole blocks as well as layer units);
- *group*: one unit to another group size at the same bits (group size as a lever of its own);
- *protect*: a cheap protection, a step up for every unit of a set: the first block, the last block, or
  one kind of unit in every block (``o``, ``down``, ``qkv``: v sits in the fused qkv).

A child that repeats an earlier trial is drawn again. Plain numpy random state, seeded: one worker
with one seed gives the same sequence of trials.

>>> # used through SearchSettings(sampler="local"); tests/test_search.py runs it on a tiny model
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.search_space import intersection_search_space

from aqsearch.config import QuantScheme
from aqsearch.models import split_unit

DONE = optuna.trial.TrialState.COMPLETE


def scheme_cost(choice: str) -> float:
    """Bits a weight of a scheme (``fp16``: 16), the order the moves step along."""
    q = _scheme(choice)
    return 16.0 if q is None else q.bpw


def feasible_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    ok = [t for t in trials if t.values is not None and all(c <= 0 for c in t.system_attrs.get("constraints", [0.0]))]
    return [t for t in ok if not any(all(o <= v for o, v in zip(u.values, t.values)) and u.values != t.values
                                     for u in ok)]


class FrontMutationSampler(optuna.samplers.BaseSampler):
    def __init__(self, seed: int = 0, max_moves: int = 3, tries: int = 20):
        self.rng = np.random.RandomState(seed)
        self.max_moves, self.tries = max_moves, tries
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self.rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict:
        done = study.get_trials(deepcopy=False, states=(DONE,))
        if not done:
            return {}
        return {k: d for k, d in intersection_search_space(done).items() if isinstance(d, CategoricalDistribution)}

    def sample_relative(self, study, trial, search_space: dict) -> dict:
        if not search_space:
            return {}
        done = study.get_trials(deepcopy=False, states=(DONE,))
        front = feasible_front(done)
        if not front:
            return {}
        seen = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False) if t.params}
        ladders = {k: sorted(d.choices, key=scheme_cost) for k, d in search_space.items()}
        names = sorted(ladders)
        child: dict = {}
        for _ in range(self.tries):
            parent = front[self.rng.randint(len(front))]
            child = {k: parent.params[k] for k in names}
            for _ in range(self.rng.randint(1, self.max_moves + 1)):
                self._move(child, ladders, names)
            if tuple(sorted(child.items())) not in seen:
                break
        return child

    def _move(self, child: dict, ladders: dict, names: list) -> None:
        r, d = self.rng.rand(), self.rng.choice((-1, 1))
        if len(names) < 2 or r < 0.3:
            self._step(child, ladders, names[self.rng.randint(len(names))], d)
        elif r < 0.55:  # a trade needs two units
            a, b = self.rng.choice(len(names), size=2, replace=False)
            self._step(child, ladders, names[a], 1)
            self._step(child, ladders, names[b], -1)
        elif r < 0.7:
            blocks = sorted({b for b, _ in map(split_unit, names) if b is not None})
            if blocks:
                pick = blocks[self.rng.randint(len(blocks))]
                for n in names:
                    if split_unit(n)[0] == pick:
                        self._step(child, ladders, n, d)
        elif r < 0.85:
            n = names[self.rng.randint(len(names))]
            bits = _bits(child[n])
            same = [c for c in ladders[n] if c != child[n] and bits is not None and _bits(c) == bits]
            if same:
                child[n] = same[self.rng.randint(len(same))]
        else:
            for n in self.protect_set(names):
                self._step(child, ladders, n, 1)

    def protect_set(self, names: list) -> list:
        """One of the cheap protections (see the module): the units it raises."""
        where = {n: split_unit(n) for n in names}
        blocks = sorted({b for b, _ in where.values() if b is not None})
        kinds = sorted({k for _, k in where.values() if k})
        sets = [[n for n in names if where[n][0] == blocks[0]], [n for n in names if where[n][0] == blocks[-1]]] if blocks else []
        sets += [[n for n in names if where[n][1] == k] for k in kinds if k in ("o", "down", "qkv")]
        sets += [[n for n in names if where[n][0] is None]]  # embeddings / LM head, when governed
        sets = [s for s in sets if s]
        return sets[self.rng.randint(len(sets))] if sets else []

    @staticmethod
    def _step(child: dict, ladders: dict, name: str, direction: int) -> None:
        ladder = ladders[name]
        j = ladder.index(child[name]) + direction
        if 0 <= j < len(ladder):
            child[name] = ladder[j]

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)


def _scheme(choice) -> QuantScheme | None:
    """The scheme of a choice (``None`` for ``fp16`` or anything that is not a scheme)."""
    try:
        return QuantScheme.parse(choice)
    except Exception:
        return None


def _bits(choice) -> int | None:
    q = _scheme(choice)
    return None if q is None else q.bits
