"""Building a :class:`~aqsearch.bank.Bank` with one process per visible GPU, and one progress line.

:func:`build_bank` starts ``K`` worker processes (``K`` = visible GPUs, or what the caller asks; on
the CPU one process unless asked), each with ``CUDA_VISIBLE_DEVICES`` set to its own GPU. Every worker
loads the model, reads the calibration windows the parent saved in the bank folder (so all of them,
and any host joining through the same folder, hash the same windows), and builds blocks it claims
(:meth:`Bank.build`). Workers write what they are doing to ``<bank>/workers/<id>.json``; the parent
draws one line from those and from the candidate files:

    bank 37/240 (12 stopped, 31% of steps saved) | w0 model.layers.5 w3g64 | w1 model.layers.6 w2g32

Another host joins with ``python -m aqsearch.bankbuild <bank folder>/<key>/spec.json`` (the spec
names the model; the host needs the same model source).

>>> # tests/test_bank.py: two CPU workers share one bank; kill -9 and resume
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from aqsearch.bank import Bank, BankSettings
from aqsearch.errors import AqError
from aqsearch.io import atomic_path, write_json_atomic


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def write_spec(bank: Bank, model_source: str, race: bool, device: str) -> Path:
    """The worker spec (``spec.json``) and the calibration windows (``windows.pt``) in the bank folder."""
    win = bank.dir / "windows.pt"
    if not win.exists():
        with atomic_path(win) as tmp:
            torch.save({"windows": bank.calib.windows, "source": bank.calib.source, "hash": bank.calib.hash}, tmp)
    spec = {"model": model_source, "folder": str(bank.dir.parent), "windows": str(win), "device": device,
            "settings": asdict(bank.s), "regressor": race}
    write_json_atomic(bank.dir / "spec.json", spec)
    return bank.dir / "spec.json"


def build_bank(bank: Bank, model_source: str, workers: int | None = None, show: bool = True) -> dict:
    """Build every missing candidate of ``bank``: in this process when one CPU worker suffices, else in
    ``workers`` processes (default: one per visible GPU). Returns the bank's statistics and seconds."""
    t0 = time.time()
    gpus = visible_gpus()
    workers = workers or max(1, gpus)
    if bank.complete():
        return {**bank.stats(), "seconds": 0.0, "workers": 0}
    if workers == 1 and gpus <= 1:
        bar = _Line(bank, show)
        bank.build(on_event=lambda text: bar.draw({"w0": text}))
        bar.close()
        return {**bank.stats(), "seconds": time.time() - t0, "workers": 1}
    device = "cuda" if gpus else "cpu"
    spec = write_spec(bank, model_source, bank.reg is not None, device)
    logs = bank.dir / "logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for k in range(workers):
        env = dict(os.environ, AQSEARCH_WORKER_ID=f"w{k}")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
        elif device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        err = open(logs / f"w{k}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "aqsearch.bankbuild", str(spec)], env=env,
                                       stdout=err, stderr=subprocess.STDOUT), err, k))
    bar = _Line(bank, show)
    try:
        while any(p.poll() is None for p, _, _ in procs):
            bar.draw(_worker_status(bank))
            time.sleep(1.0)
    finally:
        for p, f, _ in procs:
            if p.poll() is None:
                p.kill()
            f.close()
        bar.close()
    bad = [(k, p.returncode) for p, _, k in procs if p.returncode != 0]
    if bad:
        k, rc = bad[0]
        tail = (logs / f"w{k}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise AqError(f"bank worker w{k} exited with status {rc}: {tail[0]}")
    bank._mem.clear()
    if not bank.complete():
        raise AqError(f"bank {bank.dir} is incomplete after its workers ended")
    return {**bank.stats(), "seconds": time.time() - t0, "workers": workers}


def _worker_status(bank: Bank) -> dict[str, str]:
    out = {}
    for f in sorted((bank.dir / "workers").glob("*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if time.time() - st.get("time", 0) < 3600:
            out[st["worker"]] = st["doing"]
    return out


class _Line:
    """One progress line on stderr for all workers (a tqdm bar whose postfix names what each does)."""

    def __init__(self, bank: Bank, show: bool):
        from aqsearch.capture import progress

        self.bank = bank
        total = sum(len(u.choices) for u in bank.units)
        self.bar = progress(total, "bank", unit="cand") if show else None

    def draw(self, doing: dict[str, str]) -> None:
        if self.bar is None:
            return
        self.bank._mem.clear()
        st = self.bank.stats()
        self.bar.n = st["candidates"]
        who = " | ".join(f"{w} {d}" for w, d in sorted(doing.items()))
        self.bar.set_postfix_str(f"{st['stopped']} stopped, {100 * st['saved_fraction']:.0f}% steps saved | {who}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def worker_main(spec_path: str) -> int:
    """One worker: load the model and windows a spec names, build claimed blocks until none is left."""
    from aqsearch.curves import default_regressor
    from aqsearch.data import TokenSet
    from aqsearch.models import load_model

    spec = json.loads(Path(spec_path).read_text())
    s = spec["settings"]
    settings = BankSettings(**{**s, "schemes": tuple(s["schemes"])})
    device = spec["device"] if spec["device"] == "cpu" or torch.cuda.is_available() else "cpu"
    loaded = load_model(spec["model"], device=device)
    w = torch.load(spec["windows"])
    calib = TokenSet(w["windows"], w["source"], w["hash"])
    wid = os.environ.get("AQSEARCH_WORKER_ID", f"pid{os.getpid()}")
    bank = Bank(spec["folder"], loaded.model, loaded.fingerprint, calib, settings,
                default_regressor() if spec["regressor"] else None, worker=wid)
    if Path(spec_path).resolve().parent != bank.dir.resolve():
        raise AqError(f"spec {spec_path} does not match this model or these windows (bank {bank.key})")
    status = bank.dir / "workers" / f"{wid}.json"
    status.parent.mkdir(exist_ok=True)

    def on_event(text: str) -> None:
        write_json_atomic(status, {"worker": wid, "doing": text, "time": time.time()})

    on_event("starting")
    bank.build(on_event=on_event)
    on_event("done")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
