"""What every benchmark record carries: the machine, the versions, the settings; and the JSON-lines writer.

>>> sorted(environment())[:3]
['cpu', 'cpu_count', 'gpu']
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Machine and library versions, for the record (imports torch; triton only if installed)."""
    import torch

    env: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("transformers", "triton", "optuna"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    env["machine"] = env["gpu"] or f"cpu x{env['cpu_count']}"
    return env


def append_result(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (with a timestamp and the environment) and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "env": environment(), **record}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(records: list[dict[str, Any]], key) -> list[dict[str, Any]]:
    """The last record of each ``key(record)``, in the order the keys first appear."""
    out: dict = {}
    for r in records:
        out[key(r)] = r
    return list(out.values())


def wikitext_setup(model: str, data_dir: str | os.PathLike, small: bool, steps: int | None = None,
                   polish_steps: int | None = None):
    """The diagnostics' common start (``benchmarks/compose_gap.py``, ``benchmarks/plan_rank.py``): the model on
    the GPU if there is one (TF32 off), calibration windows of WikiText-2 validation (128x2048; small: 16x128),
    the test set's reference (all of it in 2048-token windows; small: 8x256), and the steps (200 / 50 polish;
    small 20 / 5). Returns a namespace: loaded, calib, test, ref, device, bs, steps, pol, n_win, seqlen."""
    from types import SimpleNamespace

    import torch

    from aqsearch.data import calib_eval_sets
    from aqsearch.models import load_model
    from aqsearch.quality import build_reference

    n_win, seqlen = (16, 128) if small else (128, 2048)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    bs = 8 if device == "cuda" else 1
    loaded = load_model(model, device=device)
    data = Path(data_dir)
    calib, test = calib_eval_sets(loaded, str(data / "wikitext-2-valid.tokens.txt"), str(data / "wikitext-2-raw-test.txt"),
                                  calib_windows=n_win, calib_seqlen=seqlen, eval_tokens=8 * 256 if small else None,
                                  seqlen=256 if small else 2048)
    ref = build_reference(loaded.model, test, batch_size=bs)
    return SimpleNamespace(loaded=loaded, calib=calib, test=test, ref=ref, device=device, bs=bs, n_win=n_win,
                           seqlen=seqlen, steps=steps or (20 if small else 200),
                           pol=polish_steps or (5 if small else 50))
