"""Building a bank: the full-precision stream, each unit's candidates raced, workers over GPUs and hosts.

A worker takes one unit at a time from the bank's queue (:mod:`aqsearch.bank.store`) and builds its
candidates (:func:`build_unit`): each candidate's round-to-nearest error, then - in a trained bank - the
prefix of its training run (``TrainSettings.prefix`` of the steps), the regressor's prediction with an
80 % interval, the race (:func:`aqsearch.bank.race.dominated`) and the full runs of the survivors. One
process per visible GPU (:mod:`aqsearch.parallel`); other hosts join by pointing at the same RDB
storage (``worker_main``). Nothing half-trained is used: a stopped candidate keeps its prediction.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch

from aqsearch.capture import Activations, progress
from aqsearch.config import QuantScheme
from aqsearch.errors import AqError
from aqsearch.models import decoder_blocks
from aqsearch.quantizers import fake_quantize
from aqsearch.training import BlockTraining, Curve, rel_error


class FpStream:
    """The full-precision stream over the calibration windows: the input of every block, kept on the
    CPU once computed (``[W, L, d]`` fp32 a block), and the train / held-out split."""

    def __init__(self, model, calib, config):
        self.model, self.config = model, config
        self.blocks = decoder_blocks(model)
        n = calib.windows.shape[0]
        n_held = max(1, round(n * config.heldout))
        if n - n_held < 1:
            raise AqError(f"{n} calibration windows leave none to train on after {n_held} held out")
        # held-out windows judge, the others train: disjoint by construction (tests/test_bank.py checks it)
        self.held, self.train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
        self._acts = Activations.capture(model, calib.windows, batch=config.batch)
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
        return Activations(x, x, self._acts.kwargs, dev, self.config.batch, i)

    def target(self, i: int) -> torch.Tensor:
        return self.x(i + 1).to(self._acts.device)


class UnitBuilder:
    """Builds the candidates of one unit at a time for ``bank`` (see the module)."""

    def __init__(self, bank):
        self.bank, self.config = bank, bank.config
        self._stream: FpStream | None = None

    def stream(self) -> FpStream:
        if self._stream is None:
            self._stream = FpStream(self.bank.model, self.bank.calib, self.config)
        return self._stream

    def __call__(self, name: str) -> list[dict]:
        u = next((x for x in self.bank.units if x.name == name), None)
        if u is None:
            raise AqError(f"the bank's queue names unit {name}, which this model does not have")
        st = self.stream()
        acts, y = st.acts(u.block), st.target(u.block)
        ts = self.config.train_settings()
        pre = math.ceil(ts.prefix * ts.steps)
        recs, runs = {}, {}
        for s in u.choices:
            t0 = time.time()
            rtn = rel_error(acts, st.blocks[u.block], self._rtn_weights(u, s), y, st.held)
            if self.config.steps == 0:
                recs[s] = self._record(u, s, rtn, "finished", trained_error=rtn, seconds=time.time() - t0)
                continue
            run = self._start(u, s, acts, y)
            if self.config.race:
                run.advance(pre)
            runs[s] = (run, rtn, time.time() - t0)
        preds = self._race(u, runs, pre, recs)
        for s, (run, rtn, sec) in runs.items():
            t0 = time.time()
            run.advance()
            _, curve = run.finish()
            recs[s] = self._record(u, s, rtn, "finished", trained_error=curve.best, prediction=preds.get(s),
                                   curve=curve, seconds=sec + time.time() - t0)
        return [recs[s] for s in u.choices]

    def _race(self, u, runs: dict, pre: int, recs: dict) -> dict:
        """Predict every prefix's final error; stop (record and drop from ``runs``) the dominated ones."""
        from aqsearch.bank.race import dominated

        reg = self.bank.reg
        if not (self.config.race and reg is not None and reg.models and runs):
            return {}
        preds = {s: {str(q): v for q, v in reg.predict(run.curve, pre).items()} for s, (run, _, _) in runs.items()}
        order = {s: j for j, s in enumerate(u.choices)}
        size = {s: self.bank.space.bytes_of_unit(u, s) for s in runs}
        menu = [(size[s], preds[s]["0.9"], order[s]) for s in runs]
        for s in list(runs):
            if dominated((size[s], preds[s]["0.1"]), menu, order[s], self.config.rule):
                run, rtn, sec = runs.pop(s)
                _, curve = run.finish()
                why = (f"{self.config.rule}-dominated in its menu: optimistic final {preds[s]['0.1']:.4g} at "
                       f"{size[s]:,} B")
                recs[s] = self._record(u, s, rtn, "stopped", prediction=preds[s], curve=curve, why=why,
                                       seconds=sec + curve.seconds)
        return preds

    def _start(self, u, scheme: str, acts: Activations, y: torch.Tensor) -> BlockTraining:
        st = self.stream()
        schemes = {n.split(".", 3)[-1]: QuantScheme.parse(scheme) for n in u.layers}
        return BlockTraining(st.blocks[u.block], schemes, acts, y, st.train_idx, st.held, self.config.train_settings(),
                             floor=0.0, tag=f"bank {u.name} {scheme}")

    def _rtn_weights(self, u, scheme: str) -> dict[str, torch.Tensor]:
        blk = self.stream().blocks[u.block]
        s = QuantScheme.parse(scheme)
        return {f"{n.split('.', 3)[-1]}.weight": fake_quantize(blk.get_submodule(n.split(".", 3)[-1]).weight, s)
                for n in u.layers}

    def _record(self, u, scheme: str, rtn: float, status: str, curve: Curve | None = None, **kw) -> dict:
        from aqsearch.bank.records import Candidate

        run = curve.steps_run if curve is not None else 0
        c = Candidate(u.name, u.block, scheme, list(u.layers), self.bank.space.bytes_of_unit(u, scheme), rtn, status,
                      steps_run=run, steps_saved=0 if status == "finished" else self.config.steps - run,
                      curve=curve.to_json() if curve is not None else None, **kw)
        return c.to_json()


def build(bank, workers=None, show: bool = True) -> None:
    """Build every missing candidate: in this process, or one worker process per visible GPU."""
    from aqsearch.parallel import worker_slots

    names = [u.name for u in bank.units]
    if len(bank.store.done_units()) == len(names):
        return
    bank.store.ensure_queued(names)
    slots = worker_slots(workers)
    with progress(len(names), f"bank {bank.key[:8]}", unit="unit") as bar:
        def tick():
            bar.n = len(bank.store.done_units())
            bar.refresh()

        if len(slots) <= 1:
            bank.store.work(UnitBuilder(bank), tick)
        else:
            _build_parallel(bank, slots, tick)
        tick()


def spec_of(bank, model_source: str) -> dict:
    """What a worker process needs to rebuild ``bank`` (the model is loaded again from its source)."""
    return {"model": model_source, "fingerprint": bank.fingerprint, "calib": bank.calib, "config": asdict(bank.config),
            "storage": bank.storage, "heartbeat": bank.store.heartbeat, "cls": type(bank)}


def _build_parallel(bank, slots: list[str], tick) -> None:
    from functools import partial

    from aqsearch.parallel import run_per_gpu

    source = getattr(bank, "model_source", None)
    if source is None:
        raise AqError("building a bank with several workers needs the model's source (Bank(..., model_source=...))")
    run_per_gpu(partial(_worker_init, spec_of(bank, source)), _worker_run, [None] * len(slots), gpus=slots,
                on_result=lambda i, r: tick())


def _worker_init(spec: dict):
    from aqsearch.bank.records import BankConfig
    from aqsearch.curves import default_regressor
    from aqsearch.models import load_model

    cfg = spec["config"]
    config = BankConfig(**{**cfg, "menu": tuple(cfg["menu"])})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(spec["model"], device=dev)
    if loaded.fingerprint != spec["fingerprint"]:
        raise AqError(f"model {spec['model']} loaded in a worker is not the one the bank was made for")
    return spec["cls"](loaded.model, loaded.fingerprint, spec["calib"], config, spec["storage"],
                default_regressor() if config.steps and config.race else None, spec["heartbeat"])


def _worker_run(bank, _job) -> int:
    bank.store.work(UnitBuilder(bank))
    return len(bank.store.done_units())
