"""Trained units for the search, cached per (unit, scheme) so that trials reuse each other's work.

A unit (a block, or a fused group of a block) is trained on the full-precision stream, with the rest of
its block in full precision: its trained weights then depend on nothing but (unit, scheme), so they
are exact to reuse in any trial, in memory and through files in the cache folder (shared by the
workers of a study and by later runs). Trials combine independently trained units, an approximation
the trial's end-to-end evaluation then measures.

Runs pause after their prefix (:class:`aqsearch.training.BlockTraining`): a trial first runs the
prefixes of all the units it lacks, asks the regressor for their final losses, and only then either
finishes them or gives up (see :func:`optimistic_kl`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aqsearch.capture import Activations
from aqsearch.config import QuantScheme
from aqsearch.curves import QUANTILES, CurveRegressor
from aqsearch.data import TokenSet
from aqsearch.io import cache_dir, sha256_bytes
from aqsearch.models import decoder_blocks
from aqsearch.quantizers import QTensor, fake_quantize
from aqsearch.training import BlockTraining, Curve, TrainSettings, rel_error
from aqsearch.weights import load_qtensors, save_qtensors


class UnitTrainer:
    """Full-precision stream of every block, and the trained-unit cache."""

    def __init__(self, model, calib: TokenSet, settings: TrainSettings, heldout: float = 0.25,
                 key: str = "", cache: bool = True):
        self.model, self.s = model, settings
        self.blocks = decoder_blocks(model)
        n = calib.windows.shape[0]
        n_held = max(1, round(n * heldout))
        self.held, self.train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
        acts = Activations.capture(model, calib.windows, batch=settings.batch)
        self.kwargs, self.device = acts.kwargs, acts.device
        # x[i]: input of block i on the full-precision stream, [W, L, d]; x[n] is the last block's output
        self.x = [acts.x_fp.clone()]
        for blk in self.blocks:
            acts.advance(blk, {})
            self.x.append(acts.x_fp.clone())
        self.mem: dict[tuple[str, str], dict[str, QTensor]] = {}
        self.rtn: dict[tuple[str, str], float] = {}
        self.trained_delta: dict[tuple[str, str], float] = {}
        self.folder: Path | None = None
        if cache:
            tag = sha256_bytes(key.encode(), calib.hash.encode(), repr(settings).encode(), str(heldout).encode())[:16]
            self.folder = cache_dir("units", tag)

    def acts(self, i: int) -> Activations:
        return Activations(self.x[i], self.x[i], self.kwargs, self.device, self.s.batch, i)

    def _schemes(self, block: int, suffixes, scheme: str) -> dict[str, QuantScheme]:
        return {sfx: QuantScheme.parse(scheme) for sfx in suffixes}

    def rtn_delta(self, block: int, suffixes: tuple[str, ...], unit: str, scheme: str) -> float:
        """Held-out error the unit adds to its block at round-to-nearest."""
        key = (unit, scheme)
        if key not in self.rtn:
            blk = self.blocks[block]
            w = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, s)
                 for sfx, s in self._schemes(block, suffixes, scheme).items()}
            self.rtn[key] = rel_error(self.acts(block), blk, w, self.x[block + 1], self.held)
        return self.rtn[key]

    def _file(self, unit: str, scheme: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{unit}.{scheme}.safetensors"

    def cached(self, unit: str, scheme: str) -> dict[str, QTensor] | None:
        key = (unit, scheme)
        if key in self.mem:
            return self.mem[key]
        f = self._file(unit, scheme)
        if f is not None and f.exists():
            self.mem[key] = load_qtensors(f)
            meta = f.with_suffix(".delta")
            if meta.exists():
                self.trained_delta[key] = float(meta.read_text())
            return self.mem[key]
        return None

    def start(self, block: int, suffixes: tuple[str, ...], unit: str, scheme: str) -> BlockTraining:
        acts = self.acts(block)
        return BlockTraining(self.blocks[block], self._schemes(block, suffixes, scheme), acts, self.x[block + 1],
                             self.train_idx, self.held, self.s, floor=0.0, tag=f"search {unit} {scheme}")

    def store(self, block: int, unit: str, scheme: str, q: dict[str, QTensor], curve: Curve) -> None:
        named = {f"model.layers.{block}.{sfx}": t for sfx, t in q.items()}
        key = (unit, scheme)
        self.mem[key] = named
        self.trained_delta[key] = curve.best
        f = self._file(unit, scheme)
        if f is not None:
            save_qtensors(f, named)
            f.with_suffix(".delta").write_text(repr(curve.best))


def optimistic_kl(kl_rtn: float, rtn: list[float], known: list[float], predicted: list[dict[float, float]]) -> float:
    """A lower bound on the trial's KL once its units are trained.

    The trial's KL scales with the summed block errors: ``kl_rtn * sum(trained) / sum(rtn)``, where
    units already trained count their measured error and the rest their optimistic (0.1-quantile)
    predicted final error.
    """
    total_rtn = sum(rtn)
    if total_rtn <= 0:
        return kl_rtn
    opt = sum(known) + sum(p[QUANTILES[0]] for p in predicted)
    return kl_rtn * opt / total_rtn


def prefix_steps(settings: TrainSettings) -> int:
    return math.ceil(settings.prefix * settings.steps)


__all__ = ["UnitTrainer", "optimistic_kl", "prefix_steps", "CurveRegressor"]
