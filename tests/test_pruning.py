"""The study's pruning rule (:class:`aqsearch.strategies.pruning.DominationPruner`), by hand."""

from aqsearch.strategies.pruning import DominationPruner


def test_prunes_on_the_optimistic_end_only():
    """Catches pruning that never happens, that always happens, or that judges the pessimistic end: the
    beaten trial's optimistic KL is only just beaten, and the pessimistic reading would prune a winner."""
    p = DominationPruner(min_finished=2, margin=1.0)
    done = [(0.2, 100, 1.0), (0.5, 50, 1.0)]  # KL/score ratios 0.2 and 0.5: optimistic = score * 0.2
    assert "beaten" in p.judge(score=1.1, nbytes=100, finished=done)  # 0.22 > 0.2 at 100 B
    assert p.judge(score=0.9, nbytes=100, finished=done) is None  # 0.18 < 0.2: it may win, evaluate it
    assert p.judge(score=1.1, nbytes=99, finished=done) is None  # the 0.2 trial has more bytes
    assert p.judge(score=9.0, nbytes=100, finished=done[:1]) is None  # too few finished trials to judge


def test_margin_keeps_near_misses():
    """With the default margin (0.9) a trial predicted 5 % worse than a finished one is still evaluated."""
    p = DominationPruner(min_finished=1)
    assert p.judge(score=1.05, nbytes=100, finished=[(1.0, 100, 1.0)]) is None
    assert p.judge(score=1.2, nbytes=100, finished=[(1.0, 100, 1.0)]) is not None
