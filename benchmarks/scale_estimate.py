"""The 8B pipeline's end-to-end estimate (``benchmarks/scale.py``): wall seconds of bank, study, racing and
polish on hosts x GPUs, from the costs ``scale.py`` measures and the counts of a :class:`Pipeline`. Arithmetic
only: every parameter is in the record it writes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

try:
    from aqsearch.bank import MENU  # the bank's menu (the decision layer is being restructured)
except Exception:  # pragma: no cover
    MENU = ("w8g128", "w4g64", "w4g128", "w3g32", "w3g64", "w3g128", "w2g32", "w2g64")


@dataclass(frozen=True)
class Pipeline:
    """How many of each thing the end-to-end pipeline does (the estimate's inputs besides the measured costs)."""

    trials: int = 200  # study trials (benchmarks/bank.py --full)
    trial_mode: str = "evaluate"  # "evaluate": a trial is one held-out evaluation (today); "score": from bank scores
    race_stop_fraction: float = 0.0  # candidates the race stops after their prefix (0 measured at full settings)
    race_plans: int = 10  # plans raced at a low fidelity (issue 17)
    race_fidelity: float = 0.2  # their share of the polish's training steps
    top_plans: int = 5  # plans polished fully (benchmarks/bank.py's five sizes)
    hull: int = len(MENU)  # uniform schemes polished like a pick (the uniform hull)
    polish_step_fraction: float = 1.0  # polish steps / measured steps (1: 200 steps; 0.25: bank.py's 50)
    final_eval_windows: int = 140  # each polished plan evaluated on about the WikiText-2 test set (140 x 2048)
    rdb_op_s: float = 0.01  # one round trip to the study's PostgreSQL storage (not measured here)
    rdb_ops_per_item: int = 4  # round trips a candidate or trial takes (claim, heartbeat, result, read)


VARIANTS = {
    "today": Pipeline(),
    "lean": Pipeline(trial_mode="score", polish_step_fraction=0.25),
}
TARGET_S, TARGET_GPUS = 3600.0, 4
LAYOUTS = ((1, 1), (1, 4), (1, 8), (2, 4), (2, 8))  # (hosts, GPUs a host)


def estimate(c: dict, p: Pipeline, hosts: int, gpus: int) -> dict:
    """Wall seconds of each stage on ``hosts`` x ``gpus`` workers (one process a GPU), from measured costs ``c``:

    - bank: every worker walks the full-precision stream through all blocks (a worker claims whole blocks in
      order, and block i needs block i-1's output), then trains ``ceil(blocks / workers)`` blocks' menus; a
      candidate the race stops costs its prefix only;
    - study: each worker builds the reference once, then ``ceil(trials / workers)`` trials (or, scored from the
      bank, ``trials`` cheap scores);
    - race: ``ceil(race_plans / workers)`` rounds of a low-fidelity polish plus a held-out evaluation;
    - polish: ``ceil((top_plans + hull) / workers)`` rounds of a full polish plus the final evaluation;
    - across hosts, a candidate or a trial pays ``rdb_ops_per_item`` round trips to the shared storage (a study
      scored from the bank runs in one process: no storage traffic);
    - a final evaluation costs a trial scaled by its windows (an upper bound: the block transfers do not grow).
    """
    w = hosts * gpus
    blocks = c["blocks"]
    rdb = p.rdb_op_s * p.rdb_ops_per_item if hosts > 1 else 0.0
    cand = {s: c["prefix_s"][s] + (1.0 - p.race_stop_fraction) * (c["candidate_s"][s] - c["prefix_s"][s]) for s in c["candidate_s"]}
    per_block_menu = sum(cand.values()) + rdb * len(cand)
    bank = c["capture_s"] + blocks * c["stream_block_s"] + math.ceil(blocks / w) * per_block_menu
    saved = math.ceil(blocks / w) * sum(c["candidate_s"][s] - cand[s] for s in cand)
    if p.trial_mode == "evaluate":
        study = c["reference_s"] + math.ceil(p.trials / w) * (c["trial_s"] + rdb)
    else:
        study = p.trials * c["score_plan_s"]

    def polish_s(fidelity: float) -> float:
        train = c["polish_block_train_s"] * p.polish_step_fraction * fidelity
        return c["capture_s"] + blocks * (c["polish_block_fixed_s"] + train)

    final_eval = c["trial_s"] * p.final_eval_windows / c["eval_windows"]
    race = math.ceil(p.race_plans / w) * (polish_s(p.race_fidelity) + c["trial_s"]) if p.race_plans else 0.0
    race_saved = math.ceil(p.race_plans / w) * (polish_s(1.0) - polish_s(p.race_fidelity)) if p.race_plans else 0.0
    polish = math.ceil((p.top_plans + p.hull) / w) * (polish_s(1.0) + final_eval)
    stages = {"bank": bank, "study": study, "race": race, "polish": polish}
    total = sum(stages.values())
    return {"hosts": hosts, "gpus_per_host": gpus, "workers": w, **{f"{k}_s": v for k, v in stages.items()},
            "total_s": total, "racing_saved_s": saved + race_saved, "one_polish_s": polish_s(1.0),
            "dominant": max(stages, key=stages.get)}


def verdict(row: dict, target_s: float = TARGET_S) -> dict:
    """Within the target? If not, the dominant stage and how much of it must go for the total to fit."""
    over = row["total_s"] - target_s
    d = row["dominant"]
    out = {"target_s": target_s, "within": over <= 0, "dominant": d, "over_s": max(0.0, over)}
    if over > 0:
        t = row[f"{d}_s"]
        out["dominant_must_lose"] = over / t  # share of the dominant stage that must go (>= 1: not enough alone)
        out["dominant_speedup_needed"] = t / (t - over) if over < t else None
    return out


def estimate_record(c: dict) -> dict:
    out = {}
    for name, p in VARIANTS.items():
        rows = [estimate(c, p, h, g) for h, g in LAYOUTS]
        target = next(r for r in rows if r["hosts"] == 1 and r["gpus_per_host"] == TARGET_GPUS)
        out[name] = {"pipeline": asdict(p), "rows": rows, "verdict_4gpu": verdict(target)}
    return out
