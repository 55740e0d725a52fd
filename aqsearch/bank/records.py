"""What a bank is made of: its settings (:class:`BankConfig`) and its records (:class:`Candidate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from aqsearch.config import QuantScheme
from aqsearch.training import TrainSettings

# Block units, the whole bit range: 6-8 schemes fit the GPU pipeline in minutes (benchmarks/bank.py).
MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64")


@dataclass(frozen=True)
class BankConfig:
    """What a bank's candidates depend on besides the model and the calibration windows.

    ``steps=0`` makes a round-to-nearest bank (no training: trained error = RTN error). ``race`` is not
    part of the key (a finished candidate is the same either way); the menu is (a unit's record holds
    its whole menu).
    """

    menu: tuple[str, ...] = MENU
    granularity: str = "block"
    steps: int = 200
    batch: int = 8
    heldout: float = 0.25  # fraction of the calibration windows that judge (never trained on)
    seed: int = 0
    race: bool = True
    rule: str = "hull"  # racing's domination rule: "hull" or "pareto" (aqsearch.bank.race.dominated)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(steps=max(self.steps, 1), batch=self.batch, seed=self.seed)

    def key_fields(self) -> dict:
        return {"menu": [str(QuantScheme.parse(s)) for s in self.menu], "granularity": self.granularity, "steps": self.steps, "batch": self.batch,
                "heldout": self.heldout, "seed": self.seed, "train": asdict(self.train_settings())}


@dataclass
class Candidate:
    """One (unit, scheme) of the bank. ``status``: ``finished`` (trained to the end, or RTN in a
    ``steps=0`` bank) or ``stopped`` (the race ended it after its prefix; its error is predicted)."""

    unit: str
    block: int
    scheme: str
    layers: list[str]  # full layer names the unit holds
    bytes: int  # stored bytes of its layers at ``scheme``
    rtn_error: float  # held-out error added at round-to-nearest
    status: str
    trained_error: float | None = None  # best held-out error of the full run (finished only)
    prediction: dict | None = None  # {"0.1", "0.5", "0.9"}: predicted final error at the decision
    steps_run: int = 0
    steps_saved: int = 0  # steps the race saved (planned - run)
    why: str | None = None  # why it stopped
    curve: dict | None = None
    seconds: float = 0.0
    worker: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def error(self) -> float:
        """Best estimate of its trained error: measured when finished, else the median prediction."""
        return self.trained_error if self.finished else float(self.prediction["0.5"])

    @property
    def optimistic(self) -> float:
        return self.trained_error if self.finished else float(self.prediction["0.1"])

    @property
    def pessimistic(self) -> float:
        return self.trained_error if self.finished else float(self.prediction["0.9"])

    def to_json(self) -> dict:
        return asdict(self)
