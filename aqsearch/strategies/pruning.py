"""Pruning a trial before its evaluation: a named rule with one method.

Optuna's ``Trial.report`` / ``should_prune`` raise in multi-objective studies (FIELD-NOTES), so this is not
a ``BasePruner``: the study asks :meth:`DominationPruner.judge` and raises ``optuna.TrialPruned`` itself,
recording the reason in the trial (optuna-dashboard shows it).

The rule: a trial stops when its *optimistic* predicted KL is already beaten by a finished trial of no
more bytes. The prediction comes from the bank score (summed per-unit error), mapped to KL by the ratio
KL / score of the finished trials; the optimistic end takes the lowest ratio seen, times ``margin``.

>>> p = DominationPruner(min_finished=2)
>>> done = [(0.10, 100, 1.0), (0.30, 80, 2.0)]          # (KL, bytes, score) of finished trials
>>> p.judge(score=3.0, nbytes=120, finished=done)       # optimistic KL 3.0 * 0.1 * 0.9 = 0.27 > 0.10 at 100 B
'optimistic KL 0.27 (score 3 x lowest KL/score 0.1 x 0.9) is beaten by a finished trial: KL 0.1 at 100 B'
>>> p.judge(score=0.5, nbytes=120, finished=done) is None
True
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DominationPruner:
    min_finished: int = 4  # finished trials needed before anything is judged
    margin: float = 0.9  # the optimistic end: the lowest KL/score ratio seen, times this

    def judge(self, score: float, nbytes: int, finished: list[tuple[float, int, float]]) -> str | None:
        """Why a trial of bank score ``score`` and ``nbytes`` bytes should stop, or ``None`` to evaluate it.
        ``finished``: (KL, bytes, score) of the finished trials."""
        ratios = [k / s for k, b, s in finished if s > 0]
        if len(ratios) < self.min_finished:
            return None
        low = min(ratios)
        opt = score * low * self.margin
        beaten = [(k, b) for k, b, _ in finished if b <= nbytes and k < opt]
        if not beaten:
            return None
        k, b = min(beaten)
        return (f"optimistic KL {opt:.4g} (score {score:.4g} x lowest KL/score {low:.4g} x {self.margin:g}) is beaten "
                f"by a finished trial: KL {k:.4g} at {b:,} B")
