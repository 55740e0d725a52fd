"""Train every block of a fixed plan, in order, each fed the outputs of the trained blocks before it.

The progressive engine decides the schemes; this pass then trains each quantized block at its final
scheme (block training is what separates a good low-bit model from round-to-nearest). A run whose
optimistic predicted final held-out loss is not at least ``min_gain`` below its starting loss stops at
the end of its prefix: 8-bit blocks, for instance, have nothing to gain. The same function trains
uniform plans, which is the baseline the engine is measured against.

``stream="rtn"`` feeds every block the outputs of a round-to-nearest prefix (at the plan's schemes) instead
of the trained blocks before it: each block's training then depends on no other block's training, which
is what a bank of independently trained candidates could use (``benchmarks/compose_gap.py``, row
``rtn_prefix``, measures it against the bank's full-precision stream and the trainer).

Each block's result goes to the journal (``polish`` records, weights in the journal's folder), so
that a resumed run keeps the blocks already trained.

``device`` (block offload, :func:`aqsearch.capture.blocks_on`): the model stays where it is (the host,
e.g. in bf16); the streams live on ``device`` and each block moves there (in ``dtype``, e.g. fp32) for its
turn only, then back; the trained tensors come back to the model's device. An 8B model then never sits
whole on a GPU.

>>> # see tests/test_polish.py for a runnable example on a tiny model
"""

from __future__ import annotations

import time

import torch

from aqsearch.capture import Activations, blocks_on, progress
from aqsearch.config import Plan
from aqsearch.curves import CurveRegressor, early_stopper
from aqsearch.data import TokenSet
from aqsearch.strategies.journal import Journal
from aqsearch.models import BLOCK_LINEARS, decoder_blocks, layer_name
from aqsearch.quantizers import QTensor, dequantize, fake_quantize
from aqsearch.training import Curve, TrainSettings, rel_error, train_block


def polish(
    model,
    plan: Plan,
    calib: TokenSet,
    settings: TrainSettings,
    heldout: float = 0.25,
    regressor: CurveRegressor | None = None,
    min_gain: float = 0.1,
    journal: Journal | None = None,
    desc: str = "training blocks",
    stream: str = "trained",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    upto: int | None = None,
    on_block=None,
) -> tuple[dict[str, QTensor], dict]:
    """Trained weights for every layer ``plan`` quantizes, and statistics (steps, seconds, deltas).
    ``device``/``dtype``: block offload (see the module docstring). ``upto``: train blocks ``< upto`` only
    (a low-fidelity polish; with a journal, a later call goes on from there). ``on_block(i, weights)``:
    called after block ``i`` with the weights trained so far (the plan racing measures a prefix there)."""
    if stream not in ("trained", "rtn"):
        raise ValueError(f"stream must be 'trained' or 'rtn', not {stream!r}")
    t0 = time.time()
    blocks = decoder_blocks(model)
    n = calib.windows.shape[0]
    n_held = max(1, round(n * heldout))
    held, train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
    done = {}
    if journal is not None:
        for r in journal.records():
            if r["type"] == "polish":
                done[r["block"]] = r
        if regressor is not None and done:
            regressor.refit([Curve.from_json(r["curve"]) for i, r in sorted(done.items()) if r.get("curve")])
    home = next(model.parameters()).device
    acts = Activations.capture(model, calib.windows, batch=settings.batch, device=device, dtype=dtype)
    out: dict[str, QTensor] = {}
    stats = {"steps": 0, "steps_full": 0, "blocks": [], "activations": acts.report()}
    run = blocks if upto is None else blocks[:upto]  # a prefix: the blocks after it are never moved or trained
    with progress(len(run), desc, unit="block") as bar:
        for i, blk in blocks_on(run, device, dtype):  # device None: the blocks stay where they are
            schemes = {sfx: s for sfx in BLOCK_LINEARS if (s := plan.scheme_for(layer_name(i, sfx))) is not None}
            y_fp = acts.run(blk, acts.x_fp)
            if i in done and (done[i].get("schemes") != {k: str(v) for k, v in schemes.items()}
                              or done[i].get("stream", "trained") != stream):
                del done[i]  # trained for other schemes (a rebalance changed the block since) or stream: again
            if i in done:
                q = journal.load_block_weights(done[i].get("trained"))
                stats["blocks"].append({k: done[i].get(k) for k in ("block", "before", "after", "steps", "stopped")})
                stats["steps"] += done[i]["steps"]
                stats["steps_full"] += done[i]["steps_full"]
            elif schemes:
                q, rec = _polish_block(i, blk, schemes, acts, y_fp, train_idx, held, settings, regressor, min_gain, stream)
                if journal is not None:
                    rec["trained"] = journal.save_block_weights(f"polish{i:03d}", i, q)
                    journal.append(rec)
                stats["steps"] += rec["steps"]
                stats["steps_full"] += settings.steps
                stats["blocks"].append({k: rec[k] for k in ("block", "before", "after", "steps", "stopped")})
            else:
                q = {}
            for sfx, t in q.items():
                out[layer_name(i, sfx)] = t if device is None else _moved(t, home)
            if stream == "rtn":
                weights = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, s) for sfx, s in schemes.items()}
            else:
                weights = {f"{sfx}.weight": dequantize(t).to(y_fp.device) for sfx, t in q.items()}
            acts.advance(blk, weights, y_fp=y_fp)
            bar.update(1)
            if on_block is not None:
                on_block(i, out)
    stats["seconds"] = time.time() - t0
    return out, stats


def _polish_block(i, blk, schemes, acts, y_fp, train_idx, held, settings, regressor, min_gain, stream):
    """Train one block from the model's own weights: (tensors, its journal record)."""
    floor = rel_error(acts, blk, {}, y_fp, held)
    # from the model's own weights: dequantized weights of an earlier quantization sit on the grid, where
    # rounding offsets |v| < 0.5 cannot move a code (FIELD-NOTES)
    rtn = {f"{sfx}.weight": fake_quantize(blk.get_submodule(sfx).weight, s) for sfx, s in schemes.items()}
    before = rel_error(acts, blk, rtn, y_fp, held)
    goal = floor + (1.0 - min_gain) * (before - floor)
    preds: list = []
    stop = early_stopper(regressor, goal, preds) if regressor is not None else None
    q, curve = train_block(blk, schemes, acts, y_fp, train_idx, held, settings, floor=floor, should_stop=stop,
                           tag=f"polish block {i}")
    if regressor is not None and curve.stopped is None:
        regressor.refit([curve])
    return q, {"type": "polish", "block": i, "schemes": {k: str(v) for k, v in schemes.items()}, "stream": stream,
               "before": before - floor, "after": curve.best - floor, "steps": curve.steps_run,
               "steps_full": settings.steps, "stopped": curve.stopped, "curve": curve.to_json(),
               "prediction": preds[-1] if preds else None}


def _moved(q: QTensor, device: torch.device) -> QTensor:
    return QTensor(q.codes.to(device), q.scale.to(device), q.zero.to(device), q.scheme)
