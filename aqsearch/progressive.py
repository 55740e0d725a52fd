"""The progressive engine: 8 -> 4 -> 3 -> 2 bits per block behind quality gates, under a budget.

For block ``i`` (units: the fused groups qkv, o, gate_up, down; all start in full precision):

1. **descend**: lower every unit still above ``b`` to ``w{b}g{group}`` for ``b`` in 8, 4, 3, 2, while the
   block gate passes and the budget still wants bytes from this block (it does while the block is
   above its fair share of what the budget leaves: ``(budget - bytes decided) * weights_i / weights_left``);
2. on a failed gate, **layer sensitivity**: lower one unit at a time, rank by the error each adds,
   lower the least sensitive ones while the gate passes, keep the most sensitive at their precision;
3. then **group-size adaptation**: the largest group that passes and still saves bytes;
4. then **block training** (SignRound, :mod:`aqsearch.training`), stopped early by the learning-curve
   regressor when even an optimistic prediction misses the gate;
5. else **roll back** to the block's last passing state.

The block gate is the error a block's quantization adds: ``delta = E(block_q(x_q)) - E(block(x_q))``
with ``E`` the mean per-token relative squared error against the full-precision stream's output, on
held-out calibration windows. After the sweep, a **rebalance** meets the budget (lowering where the
measured error per byte saved is smallest) or spends what is left (raising where it buys the most),
and the plan is evaluated end to end on held-out text against the end-to-end gate.

Every try is a line in the :class:`~aqsearch.journal.Journal`; a run started again with the same
journal resumes after its last finished block and ends with the same plan.
"""

from __future__ import annotations

import dataclasses

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from aqsearch.capture import Activations
from aqsearch.config import Budget, Gate, Plan, QuantScheme
from aqsearch.curves import CurveRegressor, early_stopper
from aqsearch.data import TokenSet
from aqsearch.errors import AqError
from aqsearch.journal import VERSION as JOURNAL_VERSION
from aqsearch.journal import Journal
from aqsearch.memory import format_bytes, layer_bytes
from aqsearch.models import FUSED, LoadedModel, decoder_blocks, decoder_layers
from aqsearch.quantizers import QTensor, dequantize, fake_quantize
from aqsearch.training import Curve, TrainSettings, rel_error, train_block

UNITS = ("qkv", "o", "gate_up", "down")
SUFFIXES = {u: [s for s, f in FUSED.items() if f == u] for u in UNITS}


@dataclass(frozen=True)
class Settings:
    calib_windows: int = 32
    calib_seqlen: int = 256
    heldout: float = 0.25  # fraction of calibration windows that judge gates and training
    steps: int = 40
    batch: int = 8
    ladder: tuple[int, ...] = (8, 4, 3, 2)
    group: int = 128
    groups: tuple[int, ...] = (256, 128, 64, 32)
    train: bool = True
    early_stop: bool = True
    polish: bool = True  # after the sweep, train every quantized block at its final scheme
    min_gain: float = 0.1  # a polish run that cannot gain this fraction of its error stops early
    seed: int = 0


Config = dict  # unit -> scheme string or None (full precision)


def _cfg_key(cfg: Config) -> str:
    return ",".join(f"{u}={cfg[u]}" for u in UNITS)


class Engine:
    """One progressive run. ``run()`` returns the result dict (also journaled as ``final``)."""

    def __init__(self, loaded: LoadedModel, budget: Budget | str, gate: Gate, settings: Settings,
                 journal: Journal, calib: TokenSet, evalset: TokenSet | None, regressor: CurveRegressor | None,
                 eval_batch: int = 1):
        self.loaded, self.model = loaded, loaded.model
        self.gate, self.s, self.journal = gate, settings, journal
        self.calib, self.evalset, self.reg, self.eval_batch = calib, evalset, regressor, eval_batch
        self.blocks = decoder_blocks(self.model)
        self.layers = decoder_layers(self.model)
        self.n_weights = sum(l.numel for l in self.layers)
        self.budget = Budget.parse(budget)
        self.limit = self.budget.resolve(self.n_weights)
        from aqsearch.rebalance import absolute_floor

        floor = absolute_floor(self)  # every layer at the smallest scheme: no run can end below it
        if self.limit < floor:
            raise AqError(f"budget {format_bytes(self.limit)} ({self.limit:,} B) is below the smallest plan the engine "
                          f"can make: {format_bytes(floor)} ({floor:,} B, {8 * floor / self.n_weights:.3f} bpw, the "
                          f"smallest scheme everywhere)")
        self.block_weights = [sum(l.numel for l in self.layers if l.block == i) for i in range(len(self.blocks))]
        self.shapes = {(l.block, l.suffix): (l.out_features, l.in_features) for l in self.layers}
        self.decided: dict[int, dict] = {}
        self.steps_run = self.steps_full = 0
        self.tries = 0
        self.t0 = time.time()
        self._trained_cache: dict[str, dict[str, QTensor]] = {}
        self._attempt = 0

    # ---- bytes -------------------------------------------------------------------------------
    def block_bytes(self, i: int, cfg: Config) -> int:
        return sum(layer_bytes(*self.shapes[(i, sfx)], None if cfg[u] is None else QuantScheme.parse(cfg[u]))
                   for u in UNITS for sfx in SUFFIXES[u])

    def plan_bytes(self, i: int | None = None, cfg: Config | None = None) -> int:
        """Bytes of the plan as it stands: decided blocks, block ``i`` at ``cfg``, the rest unquantized."""
        total = 0
        for j in range(len(self.blocks)):
            if j in self.decided:
                total += self.decided[j]["bytes"]
            elif j == i:
                total += self.block_bytes(j, cfg)
            else:
                total += self.block_bytes(j, dict.fromkeys(UNITS))
        return total

    def share(self, i: int) -> float:
        done = sum(d["bytes"] for j, d in self.decided.items() if j < i)
        left = sum(self.block_weights[i:])
        return (self.limit - done) * self.block_weights[i] / left

    # ---- measuring ---------------------------------------------------------------------------
    def _weights(self, i: int, cfg: Config, trained: dict[str, QTensor] | None) -> dict[str, torch.Tensor]:
        blk = self.blocks[i]
        out = {}
        for u in UNITS:
            if cfg[u] is None:
                continue
            s = QuantScheme.parse(cfg[u])
            for sfx in SUFFIXES[u]:
                w = blk.get_submodule(sfx).weight
                q = (trained or {}).get(sfx)
                key = (sfx, cfg[u])
                if q is not None and q.scheme == s:
                    out[f"{sfx}.weight"] = dequantize(q).to(w.device, w.dtype)
                else:
                    if key not in self._rtn:
                        self._rtn[key] = fake_quantize(w, s)
                    out[f"{sfx}.weight"] = self._rtn[key]
        return out

    def measure(self, i: int, cfg: Config, trained=None) -> float:
        err = rel_error(self.acts, self.blocks[i], self._weights(i, cfg, trained), self.y_fp, self.held)
        return err - self.floor

    def passes(self, delta: float) -> bool:
        return self.gate.block_mse is None or delta <= self.gate.block_mse

    def log_try(self, i, phase, cfg, delta, decision, why="", **extra) -> None:
        self.tries += 1
        rec = {"type": "try", "block": i, "phase": phase, "config": dict(cfg), "delta": delta,
               "bytes": self.block_bytes(i, cfg), "plan_bytes": self.plan_bytes(i, cfg), "decision": decision,
               "why": why, "seconds": round(time.time() - self.t0, 3), **extra}
        self.journal.append(rec)
        if delta is not None:
            key = _cfg_key(cfg)
            prev = self.menu.get(key)
            trained = extra.get("trained_ref")
            if prev is None or (trained and delta < prev["delta"]):
                self.menu[key] = {"config": dict(cfg), "delta": delta, "bytes": rec["bytes"], "trained": trained}

    # ---- one block ---------------------------------------------------------------------------
    def train(self, i: int, cfg: Config, phase_why: str) -> tuple[dict[str, QTensor] | None, float | None, dict | None]:
        schemes = {sfx: QuantScheme.parse(cfg[u]) for u in UNITS if cfg[u] is not None for sfx in SUFFIXES[u]}
        goal = self.floor + (self.gate.block_mse or float("inf"))
        preds: list = []
        stop = early_stopper(self.reg if self.s.early_stop else None, goal, preds)
        ts = TrainSettings(steps=self.s.steps, batch=self.s.batch, seed=self.s.seed)
        q, curve = train_block(self.blocks[i], schemes, self.acts, self.y_fp, self.train_idx, self.held, ts,
                               floor=self.floor, should_stop=stop, tag=phase_why)
        self.steps_run += curve.steps_run
        self.steps_full += self.s.steps
        self.journal.append({"type": "curve", "block": i, "config": dict(cfg), "curve": curve.to_json(),
                             "prediction": preds[-1] if preds else None})
        if self.reg is not None and curve.stopped is None:
            self.reg.refit([curve])
        ref = self._save_trained(i, q)
        return q, curve.best - self.floor, ref if curve.stopped is None else {**ref, "stopped": curve.stopped}

    def _save_trained(self, i: int, q: dict[str, QTensor]) -> dict:
        # Named by block and attempt: a resumed run redoing a block writes the same names again.
        self._attempt += 1
        ref = self.journal.save_block_weights(f"block{i:03d}-{self._attempt}", i, q)
        self._trained_cache[ref["file"]] = q
        return ref

    def trained_of(self, ref: dict | None) -> dict[str, QTensor] | None:
        if not ref:
            return None
        if ref["file"] not in self._trained_cache:
            self._trained_cache[ref["file"]] = self.journal.load_block_weights(ref)
        return self._trained_cache[ref["file"]]

    def do_block(self, i: int) -> dict:
        s = self.s
        state: Config = dict.fromkeys(UNITS)
        trained_ref = None
        frozen: set[str] = set()
        self.log_try(i, "start", state, 0.0, "pass", "full precision")
        for bits in s.ladder:
            bb = self.block_bytes(i, state)
            if bb <= self.share(i):
                self.log_try(i, "descend", state, None, "skip", f"budget met: block {bb:,} B <= share {self.share(i):,.0f} B")
                break
            active = [u for u in UNITS if u not in frozen and (state[u] is None or QuantScheme.parse(state[u]).bits > bits)]
            if not active:
                break
            scheme = str(QuantScheme(bits, s.group))
            cand = {**state, **dict.fromkeys(active, scheme)}
            d = self.measure(i, cand)
            if self.passes(d):
                self.log_try(i, "descend", cand, d, "pass")
                state, trained_ref = cand, None
                continue
            self.log_try(i, "descend", cand, d, "fail", f"delta {d:.3g} > {self.gate.block_mse:g}")
            # 2. layer sensitivity
            if len(active) > 1:
                impact = {}
                for u in active:
                    c = {**state, u: scheme}
                    impact[u] = self.measure(i, c)
                    self.log_try(i, "sensitivity", c, impact[u], "pass" if self.passes(impact[u]) else "fail")
                mixed, lowered = dict(state), []
                for u in sorted(active, key=impact.get):
                    c = {**mixed, u: scheme}
                    dd = impact[u] if not lowered else self.measure(i, c)
                    if not self.passes(dd):
                        self.log_try(i, "sensitivity", c, dd, "fail", f"{u} kept at {state[u] or 'fp16'}")
                        break
                    mixed, lowered = c, lowered + [u]
                    if len(lowered) > 1:
                        self.log_try(i, "sensitivity", c, dd, "pass")
                if lowered:
                    keep = [u for u in active if u not in lowered]
                    frozen |= set(keep)
                    self.log_try(i, "sensitivity", mixed, self.measure(i, mixed), "pass",
                                 f"lowered {'+'.join(lowered)}; most sensitive kept: {'+'.join(keep)}")
                    state, trained_ref = mixed, None
                    continue
            # 3. group-size adaptation: the largest group that passes and still saves bytes
            found = None
            for g in sorted(s.groups, reverse=True):
                c = {**state, **dict.fromkeys(active, str(QuantScheme(bits, g)))}
                if g == s.group or self.block_bytes(i, c) >= bb:
                    continue
                dd = self.measure(i, c)
                ok = self.passes(dd)
                self.log_try(i, "group", c, dd, "pass" if ok else "fail")
                if ok:
                    found = c
                    break
            if found is not None:
                state, trained_ref = found, None
                continue
            # 4. block training
            if s.train:
                q, dd, ref = self.train(i, cand, f"block {i} at {scheme}")
                stopped = ref.pop("stopped", None)
                if stopped:
                    self.log_try(i, "train", cand, None, "stop-early", stopped)
                elif self.passes(dd):
                    self.log_try(i, "train", cand, dd, "pass", trained_ref=ref)
                    state, trained_ref = cand, ref
                    continue
                else:
                    self.log_try(i, "train", cand, dd, "fail", f"trained delta {dd:.3g} > {self.gate.block_mse:g}",
                                 trained_ref=ref)
            # 5. roll back
            self.log_try(i, "revert", state, self.measure(i, state, self.trained_of(trained_ref)), "revert",
                         f"w{bits} failed every remedy; back to the last passing state")
            break
        self.lookahead(i, state)
        accepted = self.menu.get(_cfg_key(state))
        return {"config": state, "trained": trained_ref, "delta": accepted["delta"] if accepted else 0.0}

    def lookahead(self, i: int, state: Config) -> None:
        """Measure the neighbours of the accepted state that a rebalance may move to: one ladder step
        lower, and the same bits with half and with twice the group size (finer groups are often the
        cheapest error to buy back with bytes left over)."""
        s, cands = self.s, []
        lower = [b for b in s.ladder if all(state[u] is None or QuantScheme.parse(state[u]).bits > b for u in UNITS)]
        if lower:
            cands.append(dict.fromkeys(UNITS, str(QuantScheme(lower[0], s.group))))
        for factor in (0.5, 2.0):
            c = {}
            for u in UNITS:
                q = None if state[u] is None else QuantScheme.parse(state[u])
                g = None if q is None or q.group is None else int(q.group * factor)
                c[u] = state[u] if g not in s.groups else str(dataclasses.replace(q, group=g))
            if c != state:
                cands.append(c)
        for c in cands:
            if _cfg_key(c) not in self.menu:
                self.log_try(i, "lookahead", c, self.measure(i, c), "measured")

    # ---- the whole run -----------------------------------------------------------------------
    def header(self) -> dict:
        return {"type": "start", "version": JOURNAL_VERSION, "model": self.loaded.name, "fingerprint": self.loaded.fingerprint,
                "budget": str(self.budget), "budget_bytes": self.limit, "gate": str(self.gate),
                "settings": asdict(self.s), "calib": self.calib.hash, "eval": self.evalset.hash if self.evalset else None,
                "n_blocks": len(self.blocks), "regressor": self._reg_id}

    def run(self) -> dict:
        self._reg_id = {"curves": self.reg.n_curves, "fingerprint": self.reg.fingerprint()} if self.reg else None
        head = self.header()
        done = self._resume(head)
        n = self.calib.windows.shape[0]
        n_held = max(1, round(n * self.s.heldout))
        self.held, self.train_idx = torch.arange(n - n_held, n), torch.arange(n - n_held)
        self.acts = Activations.capture(self.model, self.calib.windows, batch=self.s.batch)
        from aqsearch.capture import progress

        with progress(len(self.blocks), "progressive", unit="block") as bar:
            for i, blk in enumerate(self.blocks):
                self._rtn, self.menu, self._attempt = {}, {}, 0
                self.y_fp = self.acts.run(blk, self.acts.x_fp)
                if i in done:
                    rec = done[i]
                    self.decided[i] = rec
                else:
                    self.floor = rel_error(self.acts, blk, {}, self.y_fp, self.held)
                    res = self.do_block(i)
                    rec = {"type": "block", "block": i, "config": res["config"], "trained": res["trained"],
                           "bytes": self.block_bytes(i, res["config"]), "layers": self._layers(i, res["config"]),
                           "delta": res["delta"], "menu": list(self.menu.values()), "floor": self.floor}
                    self.decided[i] = rec
                    self.journal.append({**rec, "plan_bytes": self.plan_bytes()})
                self.acts.advance(blk, self._weights(i, rec["config"], self.trained_of(rec["trained"])), y_fp=self.y_fp)
                bar.update(1)
                bar.set_postfix_str(f"{format_bytes(self.plan_bytes())} / {format_bytes(self.limit)}")
        self.activation_bytes = self.acts.report()
        del self.acts, self.y_fp
        return self.finish()

    def _layers(self, i: int, cfg: Config) -> dict[str, str | None]:
        return {f"model.layers.{i}.{sfx}": cfg[u] for u in UNITS for sfx in SUFFIXES[u]}

    def _resume(self, head: dict) -> dict[int, dict]:
        if not self.journal.exists():
            self.journal.append(head)
            return {}
        old = self.journal.header()
        head = json.loads(json.dumps(head))  # as it reads back (tuples become lists)
        if old is None:
            raise AqError(f"journal {self.journal.path} exists but is not a progressive journal")
        for k in ("fingerprint", "budget_bytes", "gate", "settings", "calib", "eval", "n_blocks"):
            if old.get(k) != head.get(k):
                raise AqError(f"journal {self.journal.path} belongs to another run ({k} differs); use a new journal")
        self.journal.truncate_torn_tail()
        done, curves = {}, []
        for r in self.journal.records():
            if r["type"] == "block":
                done[r["block"]] = r
            elif r["type"] == "curve":
                curves.append(r)
        # The regressor must be the one the first run had at this point: its start state plus the curves of
        # the finished blocks, in order.
        if self.reg is not None and old.get("regressor") != head.get("regressor"):
            raise AqError(f"journal {self.journal.path} was written with another regressor; use a new journal")
        if self.reg is not None:
            self.reg.refit([Curve.from_json(c["curve"]) for c in curves if c["block"] in done])
        self.journal.append({"type": "resume", "blocks_done": sorted(done)})
        return done

    def finish(self) -> dict:
        from aqsearch.rebalance import rebalance

        rebalance(self)
        plan = Plan.from_layers({k: v for i in sorted(self.decided) for k, v in self.decided[i]["layers"].items()})
        total = sum(d["bytes"] for d in self.decided.values())
        self.polished = None
        if self.s.train and self.s.polish:
            from aqsearch.polish import polish

            ts = TrainSettings(steps=self.s.steps, batch=self.s.batch, seed=self.s.seed)
            self.polished, pst = polish(self.model, plan, self.calib, ts, self.s.heldout,
                                        self.reg if self.s.early_stop else None, self.s.min_gain, self.journal,
                                        desc="polishing blocks")
            self.steps_run += pst["steps"]
            self.steps_full += pst["steps_full"]
        result = {"plan": plan.to_json(), "bytes": total, "bpw": 8 * total / self.n_weights,
                  "budget_bytes": self.limit, "meets_budget": total <= self.limit,
                  "train_steps": self.steps_run, "train_steps_without_early_stop": self.steps_full,
                  "tries": self.tries, "seconds": time.time() - self.t0, "activation_bytes": self.activation_bytes,
                  **peak_memory(self.model)}
        if self.evalset is not None:
            from aqsearch.quality import build_reference, evaluate

            ref = build_reference(self.model, self.evalset, batch_size=self.eval_batch, cache_key=self.loaded.fingerprint)
            m = evaluate(self.model, ref, plan, self.layers, self.weight_fn(), batch_size=self.eval_batch)
            result["measurement"] = m.to_json()
            result["gate_failures"] = self.gate.check(m.to_json())
        self.journal.append({"type": "final", **result})
        return result

    def trained_tensors(self) -> dict[str, QTensor]:
        if self.polished is not None:
            return self.polished
        out = {}
        for i, d in self.decided.items():
            for sfx, q in (self.trained_of(d["trained"]) or {}).items():
                out[f"model.layers.{i}.{sfx}"] = q
        return out

    def weight_fn(self):
        from aqsearch.weights import trained_weight_fn

        return trained_weight_fn(self.trained_tensors())


def peak_memory(model) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)
