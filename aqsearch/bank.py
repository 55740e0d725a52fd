"""The candidate bank: for every unit x scheme, its bytes, its round-to-nearest error, its trained weights.

A *unit* is a decoder block (granularity ``block``) or a fused group of one (``layer``: qkv, o,
gate_up, down; :data:`aqsearch.models.FUSED`). A :class:`Candidate` is one (unit, scheme): its exact
bytes (:func:`aqsearch.memory.layer_bytes`), its round-to-nearest error, and - trained on the
full-precision stream (input ``x_fp`` of its block, target the full-precision block output; the rest
of the block in full precision) by the one block trainer (:class:`aqsearch.training.BlockTraining`) -
its trained weights, learning curve and trained error. Errors are the held-out mean per-token
relative squared error the unit adds to its block's output (dimensionless).

**Racing.** Every candidate of a unit first trains its prefix (``TrainSettings.prefix`` of the steps,
on a sample of the windows). The learning-curve regressor (:mod:`aqsearch.curves`) predicts each
final error with an 80 % interval; a candidate *stops* when its optimistic (0.1-quantile) prediction
is dominated within its unit's menu: another candidate has no more bytes and a pessimistic
(0.9-quantile) prediction below it. A stopped candidate keeps its prediction and the steps it saved,
and no weights: :meth:`Bank.finish` trains it fully (same seed: the same weights as an unraced run)
when a strategy asks for it. Nothing half-trained is ever used.

**Storage.** ``<folder>/<key>/`` with ``key`` the content hash of (model fingerprint, calibration
windows, training settings); a candidate is ``<unit>.<scheme>.json`` (written last, atomically: the
commit marker) plus ``.safetensors`` weights. Reruns, workers, other hosts sharing the folder and
later studies read the same files. Building claims whole blocks (``claims/blockNNN``, exclusive
create; a claim of a dead process on this host, or one untouched for ``STALE_S``, is taken over), so a
``kill -9`` loses at most the candidate being trained. :mod:`aqsearch.bankbuild` runs one process per
visible GPU and shows their progress as one line.

>>> # tests/test_bank.py builds, races, reuses and resumes a bank on a tiny model
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aqsearch.capture import Activations
from aqsearch.config import QuantScheme
from aqsearch.curves import QUANTILES, CurveRegressor
from aqsearch.data import TokenSet
from aqsearch.errors import AqError
from aqsearch.io import atomic_path, sha256_bytes, write_json_atomic
from aqsearch.models import decoder_blocks
from aqsearch.quantizers import QTensor, fake_quantize
from aqsearch.space import Space, Unit, build_space
from aqsearch.training import BlockTraining, Curve, TrainSettings, rel_error

VERSION = 1
STALE_S = 900.0  # a claim untouched this long (seconds) is taken over (another host's dead worker)
# Block units, the whole bit range: 6-8 schemes fit the GPU pipeline in minutes (benchmarks/bank.py).
MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64")


@dataclass(frozen=True)
class BankSettings:
    """What a bank's candidates depend on besides the model and the calibration windows.

    ``steps=0`` makes a round-to-nearest bank (no training: trained error = RTN error, no weights).
    ``race`` and ``schemes`` are not part of the key: a finished candidate is the same either way.
    """

    schemes: tuple[str, ...] = MENU
    granularity: str = "block"
    steps: int = 200
    batch: int = 8
    heldout: float = 0.25  # fraction of the calibration windows that judge (never trained on)
    seed: int = 0
    race: bool = True
    rule: str = "hull"  # racing's domination rule: "hull" or "pareto" (see dominated)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(steps=max(self.steps, 1), batch=self.batch, seed=self.seed)

    def key_fields(self) -> dict:
        return {"granularity": self.granularity, "steps": self.steps, "batch": self.batch,
                "heldout": self.heldout, "seed": self.seed, "train": asdict(self.train_settings())}


@dataclass
class Candidate:
    """One (unit, scheme) of the bank. ``status``: ``finished`` (trained to the end, or RTN in a
    ``steps=0`` bank) or ``stopped`` (the race ended it after its prefix; no weights)."""

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
    steps_saved: int = 0  # steps the race saved (planned - run), 0 once finished
    why: str | None = None  # why it stopped (or that it was finished on demand)
    curve: dict | None = None
    seconds: float = 0.0
    weights: str | None = None  # weights file name (finished, trained)
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


def dominated(c: tuple[int, float], menu: list[tuple[int, float, int]], order: int, rule: str = "hull") -> bool:
    """Whether ``c = (bytes, optimistic error)`` is dominated within its unit's menu of
    ``(bytes, pessimistic error, order)`` entries.

    ``pareto``: another entry has no more bytes and a pessimistic error below c's optimistic one (equal
    bytes: the earlier entry wins, so two candidates never stop each other). ``hull``: also when the
    segment between two other entries, one with fewer bytes and one with more, passes below c's
    optimistic point: such a candidate lies above the menu's lower convex hull, where no
    error-per-byte trade-off (the knapsack's Lagrangian) ever picks it.

    >>> dominated((100, 0.5), [(90, 0.4, 1)], 0), dominated((100, 0.5), [(90, 0.6, 1)], 0)
    (True, False)
    >>> dominated((100, 0.5), [(80, 0.8, 1), (120, 0.1, 2)], 0), dominated((100, 0.5), [(80, 0.8, 1), (120, 0.1, 2)], 0, "pareto")
    (True, False)
    """
    b0, o0 = c
    others = [(b, p, o) for b, p, o in menu if o != order]
    if any(b < b0 or (b == b0 and o < order) for b, p, o in others if b <= b0 and p < o0):
        return True
    if rule == "pareto":
        return False
    for ba, pa, _ in others:
        for bd, pd, _ in others:
            if ba < b0 < bd and pa + (pd - pa) * (b0 - ba) / (bd - ba) < o0:
                return True
    return False


class FpStream:
    """The full-precision stream over the calibration windows: the input of every block, kept on the
    CPU once computed (``[W, L, d]`` fp32 a block), and the train / held-out split."""

    def __init__(self, model, calib: TokenSet, settings: BankSettings):
        self.model, self.s = model, settings
        self.blocks = decoder_blocks(model)
        n = calib.windows.shape[0]
        n_held = max(1, round(n * settings.heldout))
        if n - n_held < 1:
            raise AqError(f"{n} calibration windows leave none to train on after {n_held} held out")
        self.held, self.train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
        self._acts = Activations.capture(model, calib.windows, batch=settings.batch)
        self._x: list[torch.Tensor] = [self._acts.x_fp.cpu().clone()]

    def x(self, i: int) -> torch.Tensor:
        """Input of block ``i`` (``i = n_blocks``: the last block's output)."""
        while len(self._x) <= i:
            j = len(self._x) - 1
            a = self.acts(j)
            self._x.append(a.run(self.blocks[j], a.x_fp).cpu())
        return self._x[i]

    def acts(self, i: int) -> Activations:
        dev = self._acts.device
        x = self.x(i).to(dev)
        return Activations(x, x, self._acts.kwargs, dev, self.s.batch, i)

    def target(self, i: int) -> torch.Tensor:
        return self.x(i + 1).to(self._acts.device)


class Bank:
    """The candidates of one (model, calibration windows, settings), on disk under ``folder``."""

    def __init__(self, folder: str | os.PathLike, model, fingerprint: str, calib: TokenSet, settings: BankSettings,
                 regressor: CurveRegressor | None = None, worker: str = ""):
        self.model, self.calib, self.s, self.reg = model, calib, settings, regressor
        for sch in settings.schemes:
            QuantScheme.parse(sch)
        self.key = sha256_bytes(b"bank%d" % VERSION, fingerprint.encode(), calib.hash.encode(),
                                json.dumps(settings.key_fields(), sort_keys=True).encode())[:16]
        self.dir = Path(folder) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.space: Space = _restrict(build_space(model, settings.granularity), settings.schemes)
        self.units = [u for u in self.space.units if u.block >= 0]
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}"
        self._mem: dict[tuple[str, str], Candidate] = {}
        self._stream: FpStream | None = None
        self.events: list[str] = []  # what this process did, for a progress line
        write_json_atomic(self.dir / "bank.json", {"version": VERSION, "fingerprint": fingerprint,
                                                   "calib": calib.describe(), "settings": self.s.key_fields()})

    # ---- storage -----------------------------------------------------------------------------
    def _path(self, unit: str, scheme: str, ext: str = ".json") -> Path:
        return self.dir / f"{unit}.{scheme}{ext}"

    def get(self, unit: str, scheme: str) -> Candidate | None:
        """The stored candidate, or ``None`` when nobody has built it yet."""
        hit = self._mem.get((unit, scheme))
        if hit is None and (p := self._path(unit, scheme)).exists():
            hit = Candidate(**json.loads(p.read_text()))
            self._mem[(unit, scheme)] = hit
        return hit

    def put(self, c: Candidate, tensors: dict[str, QTensor] | None) -> None:
        """Write a candidate: its weights first, then its record (atomic rename: the commit)."""
        from aqsearch.weights import save_qtensors

        if tensors:
            f = self._path(c.unit, c.scheme, ".safetensors")
            save_qtensors(f, tensors)
            c.weights = f.name
        c.worker = self.worker
        write_json_atomic(self._path(c.unit, c.scheme), c.to_json())
        self._mem[(c.unit, c.scheme)] = c

    def tensors(self, c: Candidate) -> dict[str, QTensor]:
        """Trained tensors of a finished candidate, by full layer name ({} for a round-to-nearest bank)."""
        from aqsearch.weights import load_qtensors

        if not c.finished:
            raise AqError(f"candidate {c.unit} {c.scheme} was stopped by the race; finish it first (Bank.finish)")
        return load_qtensors(self.dir / c.weights) if c.weights else {}

    def candidates(self) -> list[Candidate]:
        return [c for u in self.units for s in u.choices if (c := self.get(u.name, s)) is not None]

    def menu(self, unit: Unit) -> list[Candidate]:
        return [c for s in unit.choices if (c := self.get(unit.name, s)) is not None]

    def complete(self) -> bool:
        return all(self.get(u.name, s) is not None for u in self.units for s in u.choices)

    def stats(self) -> dict:
        cs = self.candidates()
        full = len(cs) * self.s.steps
        saved = sum(c.steps_saved for c in cs)
        return {"candidates": len(cs), "of": sum(len(u.choices) for u in self.units),
                "stopped": sum(not c.finished for c in cs), "steps_run": full - saved, "steps_full": full,
                "steps_saved": saved, "saved_fraction": saved / full if full else 0.0,
                "train_seconds": sum(c.seconds for c in cs)}

    # ---- building ----------------------------------------------------------------------------
    def stream(self) -> FpStream:
        if self._stream is None:
            self._stream = FpStream(self.model, self.calib, self.s)
        return self._stream

    def build(self, on_event=None) -> dict:
        """Build every missing candidate in this process, block by block, claiming blocks so that
        other processes sharing the folder take the rest. Returns :meth:`stats`."""
        while True:
            waiting = False
            for i in range(len(decoder_blocks(self.model))):
                units = [u for u in self.units if u.block == i]
                if all(self.get(u.name, s) is not None for u in units for s in u.choices):
                    continue
                if not self._claim(i):
                    waiting = True
                    continue
                self._claimed = i
                try:
                    for u in units:
                        self.build_unit(u, on_event)
                finally:
                    self._release(i)
            if not waiting or self.complete():
                return self.stats()
            time.sleep(1.0)  # blocks held by live workers: wait for them (or for their claims to go stale)
            self._mem.clear()

    def build_unit(self, u: Unit, on_event=None) -> None:
        """Race the unit's missing candidates (prefixes, predictions, domination), finish the rest."""
        todo = [s for s in u.choices if self.get(u.name, s) is None]
        if not todo:
            return
        st = self.stream()
        acts, y = st.acts(u.block), st.target(u.block)
        ts = self.s.train_settings()
        pre = math.ceil(ts.prefix * ts.steps)
        runs: dict[str, tuple[BlockTraining, float, float]] = {}
        for s in todo:
            t0 = time.time()
            rtn = rel_error(acts, st.blocks[u.block], self._rtn_weights(u, s), y, st.held)
            if self.s.steps == 0:
                self.put(self._record(u, s, rtn, "finished", trained_error=rtn, seconds=time.time() - t0), None)
                self._event(on_event, f"{u.name} {s}: round-to-nearest")
                continue
            run = self._start(u, s, acts, y)
            if self.s.race:
                run.advance(pre)
            runs[s] = (run, rtn, time.time() - t0)
            self._event(on_event, f"{u.name} {s}: prefix")
        preds = {}
        if self.s.race and self.reg is not None and self.reg.models:
            for s, (run, _, _) in runs.items():
                p = self.reg.predict(run.curve, pre)
                preds[s] = {str(q): p[q] for q in QUANTILES}
            order = {s: j for j, s in enumerate(u.choices)}
            menu = [(c.bytes, c.pessimistic, order[c.scheme]) for c in self.menu(u)]
            menu += [(self.space.bytes_of_unit(u, s), preds[s]["0.9"], order[s]) for s in runs]
            for s in list(runs):
                if dominated((self.space.bytes_of_unit(u, s), preds[s]["0.1"]), menu, order[s], self.s.rule):
                    run, rtn, sec = runs.pop(s)
                    q, curve = run.finish()
                    why = (f"{self.s.rule}-dominated in its menu: optimistic final {preds[s]['0.1']:.4g} at "
                           f"{self.space.bytes_of_unit(u, s):,} B")
                    self.put(self._record(u, s, rtn, "stopped", prediction=preds[s], curve=curve, why=why,
                                          seconds=sec + curve.seconds), None)
                    self._event(on_event, f"{u.name} {s}: stopped")
        for s, (run, rtn, sec) in runs.items():
            t0 = time.time()
            run.advance()
            q, curve = run.finish()
            self.put(self._record(u, s, rtn, "finished", trained_error=curve.best, prediction=preds.get(s),
                                  curve=curve, seconds=sec + time.time() - t0), q and _named(u.block, q))
            self._event(on_event, f"{u.name} {s}: finished")

    def finish(self, unit: str, scheme: str) -> Candidate:
        """The candidate trained to the end: a stopped one is trained again from the start now (the same
        seed and windows as an unraced run) and stored as finished; the race's record is kept in ``why``."""
        c = self.get(unit, scheme)
        if c is None:
            raise AqError(f"candidate {unit} {scheme} is not in the bank yet (build it first)")
        if c.finished:
            return c
        u = next(x for x in self.units if x.name == unit)
        st = self.stream()
        acts, y = st.acts(u.block), st.target(u.block)
        t0 = time.time()
        run = self._start(u, scheme, acts, y)
        run.advance()
        q, curve = run.finish()
        done = self._record(u, scheme, c.rtn_error, "finished", trained_error=curve.best, prediction=c.prediction,
                            curve=curve, why=f"finished on demand after the race stopped it ({c.why})",
                            seconds=c.seconds + time.time() - t0)
        self.put(done, _named(u.block, q))
        return done

    def _start(self, u: Unit, scheme: str, acts: Activations, y: torch.Tensor) -> BlockTraining:
        st = self.stream()
        schemes = {n.split(".", 3)[-1]: QuantScheme.parse(scheme) for n in u.layers}
        return BlockTraining(st.blocks[u.block], schemes, acts, y, st.train_idx, st.held, self.s.train_settings(),
                             floor=0.0, tag=f"bank {u.name} {scheme}")

    def _rtn_weights(self, u: Unit, scheme: str) -> dict[str, torch.Tensor]:
        blk = self.stream().blocks[u.block]
        s = QuantScheme.parse(scheme)
        return {f"{n.split('.', 3)[-1]}.weight": fake_quantize(blk.get_submodule(n.split(".", 3)[-1]).weight, s)
                for n in u.layers}

    def _record(self, u: Unit, scheme: str, rtn: float, status: str, curve: Curve | None = None, **kw) -> Candidate:
        steps = self.s.steps
        run = curve.steps_run if curve is not None else 0
        return Candidate(u.name, u.block, scheme, list(u.layers), self.space.bytes_of_unit(u, scheme), rtn, status,
                         steps_run=run, steps_saved=0 if status == "finished" else steps - run,
                         curve=curve.to_json() if curve is not None else None, **kw)

    def _event(self, on_event, text: str) -> None:
        self.events.append(text)
        claim = self._claim_path(getattr(self, "_claimed", -1))
        if claim.exists():
            os.utime(claim)  # a live claim: other hosts see it fresh
        if on_event is not None:
            on_event(text)

    # ---- claims ------------------------------------------------------------------------------
    def _claim_path(self, i: int) -> Path:
        return self.dir / "claims" / f"block{i:03d}"

    def _claim(self, i: int) -> bool:
        p = self._claim_path(i)
        p.parent.mkdir(exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _stale(p):
                    return False
                p.unlink(missing_ok=True)  # a dead worker's claim
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "worker": self.worker}, f)
            return True
        return False

    def _release(self, i: int) -> None:
        self._claim_path(i).unlink(missing_ok=True)


def _stale(p: Path) -> bool:
    try:
        info = json.loads(p.read_text() or "{}")
        age = time.time() - p.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
            return False
        except (ProcessLookupError, KeyError, ValueError):
            return True
        except PermissionError:
            return False
    return age > STALE_S


def _named(block: int, q: dict[str, QTensor]) -> dict[str, QTensor]:
    return {f"model.layers.{block}.{sfx}": t for sfx, t in q.items()}


def _restrict(space: Space, schemes: tuple[str, ...]) -> Space:
    """The space's decoder units with the menu ``schemes`` (embedding units are not banked)."""
    from dataclasses import replace

    units = tuple(replace(u, choices=tuple(str(QuantScheme.parse(s)) for s in schemes)) for u in space.units if u.block >= 0)
    return replace(space, units=units, layers=tuple(l for l in space.layers if l.block >= 0))


__all__ = ["MENU", "Bank", "BankSettings", "Candidate", "FpStream", "dominated"]
