"""The Job: everything one run needs, resolved once at the entry point.

A :class:`Job` holds the model, its calibration / score / evaluation windows, the governed layers and
their units with the menu (the :class:`~aqsearch.space.Space`), and the budget **in bytes**. Everything
below it (the bank, the strategies, ``pick``, the polish) takes bytes; ``Budget.parse`` is called only
here and by the command line.

- ``calib``: the windows the bank and the polish train and judge on;
- ``score``: other windows of the calibration source, on which a study scores its trials;
- ``evaluation``: held-out text, never seen before the final numbers.

>>> # job = Job.resolve("smollm2-135m", "4.5bpw")          # model samples as data; about a minute on 2 cores
>>> # job.limit, job.space.weights, job.calib.windows.shape
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from aqsearch.bank.records import BankConfig
from aqsearch.config import Budget
from aqsearch.data import TokenSet, calib_eval_sets, check_sources
from aqsearch.errors import AqError
from aqsearch.memory import format_bytes
from aqsearch.models import LoadedModel, load_model
from aqsearch.space import Space, build_space
from aqsearch.training import TrainSettings

# The main job's menu (small settings: make run in minutes on 2 cores).
JOB_MENU = ("w8g128", "w4g64", "w4g128", "w3g64", "w2g64")


@dataclass(frozen=True)
class DataConfig:
    """Where the windows come from and how many: the part of a job a study records and checks."""

    calib: str | None = None  # text file / hf:NAME / None (model samples)
    evaluation: str | None = None
    split: float | None = None
    # 16 windows (12 train, 4 judge): with 8 the 6-step polish overfit and lost to round-to-nearest on
    # SmolLM2 (KL 0.413 against 0.359 on the score windows); 16 windows and 12 steps took the same pick
    # from 0.3016 to 0.2012 on held-out text (2 cores, 96 s of polish)
    calib_windows: int = 16
    calib_seqlen: int = 128
    eval_tokens: int = 2048
    seqlen: int = 256
    score_tokens: int | None = None  # tokens of the score windows (default: half of eval_tokens)

    @property
    def score_size(self) -> int:
        return self.eval_tokens // 2 if self.score_tokens is None else self.score_tokens

    def check(self) -> None:
        """Bad data options, refused before any work (one line each)."""
        check_sources(self.calib, self.evaluation)
        if self.split is not None and not 0 < self.split < 1:
            raise AqError(f"--split must be between 0 and 1, got {self.split:g}")
        if self.calib is not None and self.calib == self.evaluation and self.split is None:
            raise AqError("calibration and evaluation data are the same text; pass --split to divide it")
        if self.eval_tokens < self.seqlen:
            raise AqError(f"eval-tokens ({self.eval_tokens}) must be at least one window of seqlen {self.seqlen}")


@dataclass(frozen=True)
class Job:
    """Everything resolved once (see the module). Build it with :meth:`resolve`."""

    loaded: LoadedModel
    space: Space
    calib: TokenSet
    score: TokenSet
    evaluation: TokenSet
    limit: int  # bytes: the largest budget
    budgets: tuple[int, ...]  # bytes, ascending; (limit,) for one budget
    bank: BankConfig = BankConfig(menu=JOB_MENU, steps=0)
    polish: TrainSettings = TrainSettings(steps=12, batch=8)
    data: DataConfig = DataConfig()
    device: str = "cpu"
    seed: int = 0
    bank_storage: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def batch(self) -> int:
        """Windows a forward pass: 8 on a GPU, 1 on the CPU."""
        return 8 if self.device.startswith("cuda") else 1

    @classmethod
    def resolve(cls, model: str | LoadedModel, budget: str | Budget | Sequence[str | Budget], *,
                data: DataConfig = DataConfig(), bank: BankConfig = BankConfig(menu=JOB_MENU, steps=0),
                polish: TrainSettings = TrainSettings(steps=12, batch=8), device: str = "cpu", seed: int = 0,
                bank_storage: str | None = None, spread: int = 0) -> Job:
        """Parse and check everything, load the model (unless given loaded), make the windows.
        ``spread``: two budgets are a range, filled with ``spread`` budgets evenly spaced in bytes."""
        data.check()
        budgets = [Budget.parse(b) for b in (budget if isinstance(budget, (list, tuple)) else [budget])]
        if not budgets:
            raise AqError("no budget given")
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        space = build_space(loaded.model, bank.granularity, menu=bank.menu)
        limits = sorted({b.resolve(space.weights) for b in budgets})
        if spread > 2 and len(limits) == 2:
            lo, hi = limits
            limits = sorted({lo + (hi - lo) * k // (spread - 1) for k in range(spread)})
        smallest = space.bytes(space.extreme(smallest=True))
        if limits[0] < smallest:
            raise AqError(f"budget {format_bytes(limits[0])} ({limits[0]:,} B) is below the smallest plan of the menu: "
                          f"{format_bytes(smallest)} ({smallest:,} B, {8 * smallest / space.weights:.3f} bpw)")
        cal, score, ev = _windows(loaded, data)
        return cls(loaded, space, cal, score, ev, limits[-1], tuple(limits), bank, polish, data, device, seed,
                   bank_storage)

    def describe(self) -> dict:
        """What results depend on: a study made for another description is not resumed with this one."""
        return {"model": self.loaded.name, "fingerprint": self.loaded.fingerprint, "calib": self.calib.hash,
                "score": self.score.hash, "evaluation": self.evaluation.hash, "budgets": list(self.budgets),
                "bank": asdict(self.bank), "polish": asdict(self.polish), "data": asdict(self.data), "seed": self.seed}

    def new_bank(self, regressor=None, heartbeat: int = 30):
        """The bank of this job's model, calibration windows and bank settings."""
        from aqsearch.bank import Bank

        return Bank(self.loaded.model, self.loaded.fingerprint, self.calib, self.bank, self.bank_storage, regressor,
                    heartbeat, model_source=self.loaded.name)


def _windows(loaded: LoadedModel, d: DataConfig) -> tuple[TokenSet, TokenSet, TokenSet]:
    """(calibration, score, evaluation) windows, pairwise disjoint: the calibration source's text gives
    the first two (half each), the evaluation source the third; one text with ``split`` is cut there."""
    from aqsearch.data import source_ids

    if d.calib is not None and d.calib == d.evaluation:
        ids, desc = source_ids(d.calib, loaded, 0, d.seqlen, seed=0)
        cut = int(ids.numel() * d.split)
        c_ids, e_ids = ids[:cut], ids[cut:]
        half = c_ids.numel() // 2
        cal = TokenSet.from_ids(c_ids[:half], d.calib_seqlen, d.calib_windows, f"{desc}[:{d.split / 2:g}]", spread=True)
        score = TokenSet.from_ids(c_ids[half:], d.seqlen, d.score_size // d.seqlen,
                                  f"{desc}[{d.split / 2:g}:{d.split:g}]")
        ev = TokenSet.from_ids(e_ids, d.seqlen, d.eval_tokens // d.seqlen, f"{desc}[{d.split:g}:]")
        return cal, score, ev
    cal, score = calib_eval_sets(loaded, d.calib, d.calib, calib_windows=d.calib_windows, calib_seqlen=d.calib_seqlen,
                                 eval_tokens=d.score_size, seqlen=d.seqlen, split=0.5 if d.calib else None)
    _, ev = calib_eval_sets(loaded, d.calib, d.evaluation, eval_tokens=d.eval_tokens, seqlen=d.seqlen, eval_seed=2,
                            split=0.5 if d.evaluation is None and d.calib is not None else None)
    return cal, score, ev
