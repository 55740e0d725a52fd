"""Plan racing: polish promising plans at growing fidelities, stop those that cannot win.

A promoted plan climbs three rungs (EvoPress-style growing budgets; each rung costs more than the last):

- rung 0: the plan at round-to-nearest, KL on the score windows (one forward pass);
- rung 1: its first ``k`` blocks polished (the rest round-to-nearest), KL on the score windows; the
  polish journal keeps those blocks, so a plan that goes on pays for them once;
- full: every block polished, the artifact written, KL measured on the held-out evaluation windows.

After rungs 0 and 1 the :class:`PlanRegressor` (refitted on every fully polished plan's rungs; the uniform
hull gives its first points for free) predicts the full polish's held-out KL with a 90 % interval.
:func:`stop_reason`: a plan whose *optimistic* end is beaten by an already polished plan of no more bytes
stops there, and the reason is recorded.

>>> r = PlanRegressor()
>>> for a, b in [(0.5, 0.25), (1.0, 0.5), (2.0, 1.0), (4.0, 2.0)]:
...     r.add({"0": a, "1": a * 0.6}, b)
>>> round(r.predict({"0": 3.0})["mid"], 3)
1.5
>>> stop_reason({"lo": 0.3, "mid": 0.4, "hi": 0.5}, 100, [(0.2, 90, "uniform w4g64")])
'optimistic prediction 0.3 is beaten by uniform w4g64 (KL 0.2, 90 B <= 100 B)'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

Z90 = 1.645  # two-sided 90 % interval of a normal in log-KL


class PlanRegressor:
    """log(held-out KL after the full polish) from the rungs a plan reached (log KL on the score windows).

    With 4 or more finished plans: scikit-learn's ``BayesianRidge`` on the log rungs (its predictive
    standard deviation gives the interval). With fewer: the mean log offset from the last rung, with a
    wide spread (0.3 in log), so that early decisions are cautious."""

    PRIOR_STD = 0.3

    def __init__(self):
        self.rows: list[tuple[dict, float]] = []

    def add(self, rungs: Mapping[str, float], final: float) -> None:
        if final > 0 and all(v > 0 for v in rungs.values()):
            self.rows.append((dict(rungs), float(final)))

    def predict(self, rungs: Mapping[str, float]) -> dict:
        """``{"lo", "mid", "hi", "n", "rung"}`` for a plan that reached ``rungs`` (keys ``"0"``, ``"1"``)."""
        keys = sorted(rungs)
        x = np.log([rungs[k] for k in keys])
        rows = [(np.log([r[k] for k in keys]), math.log(y)) for r, y in self.rows if all(k in r for k in keys)]
        if len(rows) >= 4:
            from sklearn.linear_model import BayesianRidge

            X, y = np.array([r for r, _ in rows]), np.array([t for _, t in rows])
            m = BayesianRidge().fit(X, y)
            mid, std = m.predict(x[None, :], return_std=True)
            mid, std = float(mid[0]), max(float(std[0]), 0.02)
        elif rows:
            off = [t - r[-1] for r, t in rows]
            mid = float(x[-1] + np.mean(off))
            std = max(float(np.std(off)), self.PRIOR_STD)
        else:
            mid, std = float(x[-1]), 2 * self.PRIOR_STD
        return {"lo": math.exp(mid - Z90 * std), "mid": math.exp(mid), "hi": math.exp(mid + Z90 * std),
                "n": len(rows), "rung": keys[-1]}


def stop_reason(pred: Mapping[str, float], nbytes: int, polished: Sequence[tuple[float, int, str]]) -> str | None:
    """Why a plan of ``nbytes`` with prediction ``pred`` stops: the best polished plan ``(kl, bytes, label)``
    of no more bytes beats its optimistic end. ``None``: it goes on."""
    beaten = [p for p in polished if p[1] <= nbytes and p[0] < pred["lo"]]
    if not beaten:
        return None
    kl, b, label = min(beaten, key=lambda p: p[0])
    return f"optimistic prediction {pred['lo']:.4g} is beaten by {label} (KL {kl:.4g}, {b:,} B <= {nbytes:,} B)"


class Polisher:
    """Measures a plan at each rung for one job: round-to-nearest, a polished prefix, the full polish.

    Each plan polishes with its own journal (``folder/<tag>.journal.jsonl``), so rung 1's blocks are kept
    for the full polish, and a run stopped by a crash goes on where it was."""

    def __init__(self, job, folder: str | Path, prefix: float = 1 / 3):
        from aqsearch.models import decoder_blocks
        from aqsearch.quality import build_reference

        self.job, self.folder = job, Path(folder)
        m, bs, fp = job.loaded.model, job.batch, job.loaded.fingerprint
        self.sref = build_reference(m, job.score, batch_size=bs, cache_key=fp)
        self.eref = build_reference(m, job.evaluation, batch_size=bs, cache_key=fp)
        self.blocks = len(decoder_blocks(m))
        self.k = max(1, round(self.blocks * prefix))

    def rtn(self, plan) -> float:
        from aqsearch.quality import evaluate

        return evaluate(self.job.loaded.model, self.sref, plan, batch_size=self.job.batch).kl_mean

    def _journal(self, tag: str):
        from aqsearch.strategies.journal import Journal

        self.folder.mkdir(parents=True, exist_ok=True)
        return Journal(self.folder / f"{tag}.journal.jsonl")

    def _score_kl(self, plan, weights) -> float:
        from aqsearch.artifact import Artifact

        return Artifact(plan, dict(weights)).evaluate(self.job.loaded.model, self.sref, self.job.batch).kl_mean

    def prefix(self, plan, tag: str) -> tuple[float, int]:
        """Rung 1: the first ``k`` blocks polished: (KL on the score windows, steps it ran)."""
        from aqsearch.polish import polish

        w, st = polish(self.job.loaded.model, plan, self.job.calib, self.job.polish, journal=self._journal(tag),
                       upto=self.k, desc=f"rung 1 {tag}")
        return self._score_kl(plan, w), st["steps"]

    def keep(self, plan, weights, steps: int, rtn_kl: float, meta: dict | None = None):
        """The artifact of a polish: the polished weights where they score better than round-to-nearest on
        the score windows (few windows can overfit), else round-to-nearest. Returns (artifact, score KLs)."""
        import sys

        from aqsearch.artifact import Artifact
        from aqsearch.memory import plan_bytes
        from aqsearch.models import shapes_hash

        m = self.job.loaded.model
        kl_pol = self._score_kl(plan, weights)
        kept = kl_pol <= rtn_kl
        if not kept:
            print(f"aqsearch: the polish scored worse than round-to-nearest on the score windows (KL {kl_pol:.4g} > "
                  f"{rtn_kl:.4g}): the artifact keeps round-to-nearest weights", file=sys.stderr, flush=True)
        mem = plan_bytes(m, plan)
        score_kl = {"polished": kl_pol, "rtn": rtn_kl}
        art = Artifact(plan, weights if kept else {}, {**(meta or {}), "bytes": mem.bytes, "bpw": mem.bpw,
                                                       "model": self.job.loaded.name, "shapes": shapes_hash(m),
                                                       "polish": {"steps": steps, "kept": kept, "score_kl": score_kl}})
        return art, score_kl

    def full(self, plan, tag: str, rtn_kl: float, measure_prefix: bool = False) -> dict:
        """The full polish (kept as :meth:`keep` says), its artifact and held-out measurement.
        ``measure_prefix``: also measure rung 1 on the way (the hull's free points)."""
        from aqsearch.polish import polish

        seen: dict = {}

        def at_block(i, w):
            if measure_prefix and i == self.k - 1:
                seen["1"] = self._score_kl(plan, w)

        w, st = polish(self.job.loaded.model, plan, self.job.calib, self.job.polish, journal=self._journal(tag),
                       on_block=at_block, desc=f"polishing {tag}")
        art, score_kl = self.keep(plan, w, st["steps"], rtn_kl, {"label": tag})
        path = self.folder / f"{tag}.json"
        art.save(path)
        meas = art.evaluate(self.job.loaded.model, self.eref, self.job.batch)
        return {"measurement": meas.to_json(), "artifact": str(path.resolve()), "kept": art.meta["polish"]["kept"],
                "steps": st["steps"], "rungs": {"0": rtn_kl, **seen, "full": score_kl["polished"]},
                "seconds": st["seconds"]}

    def steps_full(self, plan) -> int:
        """Steps of a full polish of ``plan``: its blocks that quantize anything, times the polish's steps."""
        from aqsearch.models import BLOCK_LINEARS, layer_name

        return self.job.polish.steps * sum(
            any(plan.scheme_for(layer_name(i, s)) is not None for s in BLOCK_LINEARS) for i in range(self.blocks))
