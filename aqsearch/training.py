"""SignRound block training: learned rounding offsets and per-group clipping (DESIGN.md, FIELD-NOTES.md).

For every Linear of a block: an offset ``v[N, K]`` (starts at 0, moves at most ~0.5) added before
rounding, and clipping factors ``clip_lo, clip_hi [N, G]`` (start at 1, kept in [0, 1]) on each group's
min and max. Signed gradient steps with ``lr = 1/T`` decaying linearly to 0 minimise the MSE between
the quantized block fed the quantized stream (``x_q``) and the full-precision block's output (``y_fp``).

Losses are normalised per token, ``mean_t |y'_t - y_t|^2 / |y_t|^2``, so curves are comparable across
blocks. (Normalising by the whole output's energy is not: from block 12 on, SmolLM2's first position of
every window carries a massive activation, norm ~27,000 against a median of ~130, which would be
almost all of the energy.) Held-out windows (never trained on) judge the run; the parameters kept are those of the
best held-out checkpoint (step 0 = round-to-nearest included, so training never makes a block worse on
held-out data). Every run records its :class:`Curve`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from aqsearch.capture import Activations, block_forward
from aqsearch.config import QuantScheme
from aqsearch.quantizers import QTensor, fake_quantize_groups, group_stats, group_view, quantize


@dataclass
class Curve:
    """One training run: configuration and loss curve (normalised MSE)."""

    block: int
    schemes: dict[str, str]  # in-block layer suffix -> scheme
    steps: int  # planned steps T
    n_train: int  # training windows
    batch: int
    points: list[dict] = field(default_factory=list)  # {step, samples, train, heldout}
    stopped: str | None = None  # why it stopped early, if it did
    seconds: float = 0.0
    floor: float = 0.0  # held-out loss of the full-precision block on the quantized stream
    tag: str = ""

    @property
    def initial(self) -> float:
        return self.points[0]["heldout"]

    @property
    def best(self) -> float:
        return min(p["heldout"] for p in self.points)

    @property
    def steps_run(self) -> int:
        return self.points[-1]["step"] if self.points else 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Curve:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch: int = 8
    eval_points: int = 20  # held-out checks per run (first at step 0)
    seed: int = 0
    prefix: float = 0.2  # the first part of the run ...
    prefix_sample: float = 0.25  # ... trains on this fraction of the training windows only
    # bf16 autocast of the training passes on CUDA (the held-out checks that judge a run stay fp32);
    # the offsets move by signed steps, so the gradient's sign is all that bf16 has to get right
    amp: bool = True


def token_rel_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token relative squared error ``|out_t - y_t|^2 / |y_t|^2``, ``[B, L, d] -> [B, L]``."""
    return ((out - y) ** 2).sum(-1) / (y**2).sum(-1).clamp_min(1e-12)


def rel_error(acts: Activations, block, weights, y: torch.Tensor, idx: torch.Tensor) -> float:
    """Mean per-token relative squared error of ``block_weights(x_q)`` against ``y`` over windows ``idx``."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in acts.batches(idx):
            out = block_forward(block, acts.load(acts.x_q, b), acts.kwargs, weights)
            e = token_rel_error(out.float(), acts.load(y, b).float())
            total += float(e.double().sum())
            n += e.numel()
    return total / n


class _Stack:
    """Linears of one block that read the same width K and share a scheme, stacked along N.

    Rows quantize independently, so one pass over the stack equals one pass per Linear; the grouped
    weight ``wg [N, G, g]`` and its min/max do not change during a run and are computed once."""

    def __init__(self, block, suffixes: list[str], scheme: QuantScheme):
        ws = [block.get_submodule(sfx).weight.detach() for sfx in suffixes]
        self.scheme, self.dtype, self.k = scheme, ws[0].dtype, ws[0].shape[1]
        self.rows, a = {}, 0
        for sfx, w in zip(suffixes, ws):
            self.rows[sfx] = (a, a + w.shape[0])
            a += w.shape[0]
        self.w = torch.cat(ws).float()  # [N, K]
        self.wg = group_view(self.w, scheme)  # [N, G, g], the short last group padded
        self.stats = group_stats(self.wg, scheme)
        n, g = self.wg.shape[:2]
        self.v = torch.zeros_like(self.wg, requires_grad=True)  # rounding offsets (padding: never read)
        self.lo = torch.ones(n, g, device=self.w.device, requires_grad=True)  # clip factors
        self.hi = torch.ones(n, g, device=self.w.device, requires_grad=True)

    def weights(self) -> dict[str, torch.Tensor]:
        out = fake_quantize_groups(self.wg, self.scheme, self.v, self.lo, self.hi, self.stats)
        out = out.reshape(out.shape[0], -1)[:, : self.k].to(self.dtype)
        return {f"{sfx}.weight": out[a:b] for sfx, (a, b) in self.rows.items()}

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.hi] if self.scheme.sym else [self.v, self.lo, self.hi]  # symmetric: no min

    def snapshot(self) -> dict[str, QTensor]:
        v = self.v.detach().reshape(self.v.shape[0], -1)[:, : self.k]
        return {sfx: quantize(self.w[a:b], self.scheme, v[a:b], self.lo[a:b], self.hi[a:b])
                for sfx, (a, b) in self.rows.items()}


class _Params:
    """Learned parameters of one block's Linears: an offset ``v`` a weight, clip factors a group."""

    def __init__(self, block, schemes: dict[str, QuantScheme]):
        self.schemes = schemes
        by: dict[tuple, list[str]] = {}
        for suffix, s in schemes.items():
            by.setdefault((block.get_submodule(suffix).weight.shape[1], s), []).append(suffix)
        self.stacks = [_Stack(block, sfxs, s) for (_, s), sfxs in by.items()]

    def tensors(self) -> list[torch.Tensor]:
        return [t for st in self.stacks for t in st.params()]

    def weights(self, differentiable: bool = True) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            return {k: w for st in self.stacks for k, w in st.weights().items()}

    def snapshot(self) -> dict[str, QTensor]:
        return {k: q for st in self.stacks for k, q in st.snapshot().items()}

    @torch.no_grad()
    def clamp(self) -> None:
        for st in self.stacks:
            st.v.clamp_(-0.5, 0.5)
            st.lo.clamp_(0.0, 1.0)
            st.hi.clamp_(0.0, 1.0)


class BlockTraining:
    """One training run that can pause: ``advance(step)`` trains up to ``step``, ``finish()`` returns.

    ``should_stop(curve)`` is asked after every held-out check; a reason ends the run early. The first
    ``prefix`` of the steps draws batches from a small sample of the training windows only.
    """

    def __init__(self, block, schemes: dict[str, QuantScheme], acts: Activations, y_fp: torch.Tensor,
                 train_idx: torch.Tensor, held_idx: torch.Tensor, settings: TrainSettings, floor: float = 0.0,
                 should_stop: Callable[[Curve], str | None] | None = None, tag: str = ""):
        self.t0 = time.time()
        self.block, self.acts, self.y_fp, self.held, self.s = block, acts, y_fp, held_idx, settings
        self.should_stop = should_stop
        self.p = _Params(block, schemes)
        self.curve = Curve(acts.block, {k: str(v) for k, v in schemes.items()}, settings.steps, len(train_idx),
                           settings.batch, floor=floor, tag=tag)
        self.every = max(1, settings.steps // settings.eval_points)
        self.gen = torch.Generator().manual_seed(settings.seed * 1000 + acts.block)
        self.best: tuple[float, dict | None] = (float("inf"), None)
        self.params = self.p.tensors()
        self.shuffled = train_idx[torch.randperm(len(train_idx), generator=self.gen)]
        self.small = self.shuffled[: max(settings.batch, math.ceil(settings.prefix_sample * len(train_idx)))]
        self.prefix_end = math.ceil(settings.prefix * settings.steps)
        self.pool, self.order, self.pos = self.small, self.small, 0
        self.step, self.samples = 0, 0
        self.reason = self._check(float("nan"))

    def _check(self, train_loss: float) -> str | None:
        with torch.no_grad():
            loss = rel_error(self.acts, self.block, self.p.weights(False), self.y_fp, self.held)
        self.curve.points.append({"step": self.step, "samples": self.samples, "train": train_loss, "heldout": loss})
        if loss < self.best[0]:
            self.best = (loss, self.p.snapshot())
        return self.should_stop(self.curve) if self.should_stop is not None else None

    def _amp(self):
        if self.s.amp and self.acts.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def done(self) -> bool:
        return self.reason is not None or self.step >= self.s.steps

    def advance(self, until: int | None = None) -> None:
        """Train up to step ``until`` (default: the last step), or until stopped."""
        s, acts = self.s, self.acts
        until = s.steps if until is None else min(until, s.steps)
        lr0 = 1.0 / s.steps
        while not self.done and self.step < until:
            self.step += 1
            if self.step == self.prefix_end + 1:
                self.pool, self.pos = self.shuffled, len(self.order)  # the rest draws from every window
            if self.pos + s.batch > len(self.order):
                self.order, self.pos = self.pool[torch.randperm(len(self.pool), generator=self.gen)], 0
            b = self.order[self.pos : self.pos + s.batch]
            self.pos += len(b)
            y = acts.load(self.y_fp, b)
            weights = self.p.weights()
            with self._amp():
                out = block_forward(self.block, acts.load(acts.x_q, b), acts.kwargs, weights)
            loss = token_rel_error(out.float(), y).mean()
            grads = torch.autograd.grad(loss, self.params)
            lr = lr0 * (1.0 - (self.step - 1) / s.steps)  # linear decay to 0
            with torch.no_grad():  # one fused update of every tensor: t -= lr * sign(grad)
                torch._foreach_add_(self.params, torch._foreach_sign(grads), alpha=-lr)
            self.p.clamp()
            self.samples += len(b)
            if self.step % self.every == 0 or self.step == s.steps:
                self.reason = self._check(float(loss.detach()))

    def stop(self, reason: str) -> None:
        self.reason = reason

    def finish(self) -> tuple[dict[str, QTensor], Curve]:
        """The best held-out checkpoint as quantized tensors, and the curve."""
        self.curve.stopped = self.reason if self.step < self.s.steps else None
        self.curve.seconds = time.time() - self.t0
        return self.best[1], self.curve


def train_block(
    block,
    schemes: dict[str, QuantScheme],
    acts: Activations,
    y_fp: torch.Tensor,
    train_idx: torch.Tensor,
    held_idx: torch.Tensor,
    settings: TrainSettings,
    floor: float = 0.0,
    should_stop: Callable[[Curve], str | None] | None = None,
    tag: str = "",
) -> tuple[dict[str, QTensor], Curve]:
    """Train the quantization parameters of ``block``'s Linears named in ``schemes`` (suffix -> scheme)
    to the end or until ``should_stop`` gives a reason; see :class:`BlockTraining`."""
    run = BlockTraining(block, schemes, acts, y_fp, train_idx, held_idx, settings, floor, should_stop, tag)
    run.advance()
    return run.finish()
