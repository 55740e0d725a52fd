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
