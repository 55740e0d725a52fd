"""The multiple-choice knapsack (exact against brute force, exact byte steps) and the knapsack strategy."""

import itertools
import random

import pytest

from aqsearch.strategies.knapsack import solve


def test_knapsack_equals_brute_force():
    """Catches a knapsack that misses the least-error allocation (brute force over every choice)."""
    rng = random.Random(2)
    for _ in range(20):
        options = [[(rng.random(), rng.randrange(1, 9) * 100) for _ in range(3)] for _ in range(4)]
        budget = rng.randrange(4, 30) * 100
        picks = solve(options, budget, quantum=100)
        feasible = [sum(options[u][j][0] for u, j in enumerate(c)) for c in itertools.product(range(3), repeat=4)
                    if sum(options[u][j][1] for u, j in enumerate(c)) <= budget]
        if not feasible:
            assert picks is None
        else:
            assert sum(options[u][j][0] for u, j in enumerate(picks)) == pytest.approx(min(feasible))


def test_knapsack_default_step_is_exact_on_any_sizes():
    """Sizes that are not multiples of any round step: the default step (their gcd) loses no plan, and a
    coarse step that divides none still answers within the budget (never over it, never None if a plan fits)."""
    rng = random.Random(3)
    for _ in range(30):
        options = [[(rng.random(), rng.randrange(1000, 9000)) for _ in range(3)] for _ in range(4)]
        budget = rng.randrange(4000, 30000)
        combos = list(itertools.product(range(3), repeat=4))
        feasible = [sum(options[u][j][0] for u, j in enumerate(c)) for c in combos
                    if sum(options[u][j][1] for u, j in enumerate(c)) <= budget]
        picks, coarse = solve(options, budget), solve(options, budget, quantum=1000)
        if not feasible:
            assert picks is None and coarse is None
            continue
        assert sum(options[u][j][0] for u, j in enumerate(picks)) == pytest.approx(min(feasible))
        assert coarse is not None and sum(options[u][j][1] for u, j in enumerate(coarse)) <= budget


def test_knapsack_reaches_a_uniform_plan_at_exactly_its_bytes():
    """SmolLM2's block sizes at w4g64 / w3g64 / w2g64 (w4g64 + w2g64 = 2 x w3g64), errors convex, so uniform
    w3g64 is the best plan within its own bytes. A fixed 4096-byte step, rounding every block up, could not
    fit it and answered a worse mix (the study's warm start at the w3g64 size was worse than uniform)."""
    options = [[(0.0, 1_907_712), (0.3, 1_458_432), (1.0, 1_009_152)]] * 30
    assert solve(options, 30 * 1_458_432) == [1] * 30
    assert solve(options, 30 * 1_458_432 - 1) != [1] * 30
