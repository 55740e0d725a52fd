"""Where a bank's candidates live: an Optuna storage, used as the work queue.

A bank is an Optuna study named ``bank-<key>`` (``key``: the content hash of the model, the calibration
windows and the training settings). Each unit is one trial, enqueued with the unit's name; a worker
takes a queued trial (Optuna hands each queued trial to one worker), builds the unit's candidates and
stores their records (scores, curves; no weights) in the trial's user attributes, with a sha256 of
their canonical JSON that is checked on every read. With an RDB storage (SQLite on one host,
PostgreSQL across hosts) each running trial beats a heartbeat: a worker killed mid-unit leaves a trial
that turns stale, is marked failed and is queued again with the same unit, so nothing is lost and
nothing is built twice. This replaced claim files on a shared folder: hosts need no shared folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

from aqsearch.errors import AqError
from aqsearch.io import cache_dir, sha256_bytes


def default_storage() -> str:
    """A SQLite file in the user cache folder (one host; several processes)."""
    return f"sqlite:///{cache_dir('bank') / 'bank.db'}"


def records_hash(records: list[dict]) -> str:
    return sha256_bytes(json.dumps(records, sort_keys=True).encode())


class CandidateStore:
    """The candidates of one bank in one Optuna storage (see the module)."""

    def __init__(self, url: str, key: str, meta: dict, heartbeat: int = 30):
        import optuna

        from aqsearch.storage import make_storage, safe_url

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.safe_url, self.key, self.meta, self.heartbeat = url, safe_url(url), key, meta, heartbeat
        storage = make_storage(url, heartbeat)
        name = f"bank-{key}"
        with self._errors("open the bank"):
            # an existing bank is loaded without a write: a complete bank in a read-only storage is read as it is
            if name in optuna.get_all_study_names(storage):
                self.study = optuna.load_study(study_name=name, storage=storage)
            else:
                self.study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                                 load_if_exists=True)
            held = self.study.user_attrs.get("bank")
            if held is None:
                self.study.set_user_attr("bank", meta)
            elif json.loads(json.dumps(meta)) != held:
                raise AqError(f"bank {key} in {self.safe_url} was built with other settings than these")
        self._cache: dict[tuple[str, str], object] = {}
        self._units_done: set[str] = set()

    @contextlib.contextmanager
    def _errors(self, doing: str):
        """The storage's own failures as one line: a record that is not JSON (damaged), or a storage that
        cannot be written (a read-only file or folder) when the bank needs a write."""
        try:
            yield
        except AqError:
            raise
        except json.JSONDecodeError as e:  # Optuna parses every stored attribute as it reads a trial
            raise AqError(f"bank {self.key} in {self.safe_url}: a stored record is not valid JSON (damaged: {e}); "
                          "delete the bank to rebuild it") from None
        except Exception as e:
            why = _write_refused(e)
            if why is None:
                raise
            raise AqError(f"bank {self.key} in {self.safe_url} cannot be written ({why}) and must be, to {doing}: "
                          "make it writable, or set AQSEARCH_CACHE to a writable folder") from None

    # ---- reading -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read every finished unit's records (checked against their hash)."""
        import optuna

        from aqsearch.bank.records import Candidate

        with self._errors("read the bank"):
            trials = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in trials:
            unit = t.user_attrs.get("unit")
            if unit is None or unit in self._units_done or t.user_attrs.get("duplicate_of_finished"):
                continue
            recs = t.user_attrs.get("candidates")
            if not isinstance(recs, list) or t.user_attrs.get("sha256") != records_hash(recs):
                raise AqError(f"bank {self.key} in {self.safe_url}: the records of unit {unit} (trial {t.number}) do "
                              "not match their sha256 (edited or damaged); delete the bank to rebuild it")
            for r in recs:
                try:
                    c = Candidate(**r)
                except TypeError as e:
                    raise AqError(f"bank {self.key}: unit {unit} holds a malformed candidate ({e})") from None
                if c.unit != unit:
                    raise AqError(f"bank {self.key}: unit {unit} holds a candidate of {c.unit}")
                self._cache[(c.unit, c.scheme)] = c
            self._units_done.add(unit)

    def get(self, unit: str, scheme: str):
        if (unit, scheme) not in self._cache and unit not in self._units_done:
            self.refresh()
        return self._cache.get((unit, scheme))

    def done_units(self) -> set[str]:
        self.refresh()
        return set(self._units_done)

    # ---- the queue ---------------------------------------------------------------------------
    def ensure_queued(self, units: list[str]) -> None:
        """Queue every unit that is neither finished, queued nor running."""
        import optuna

        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
        with self._errors("queue the units it lacks"):
            held = {t.user_attrs.get("unit") for t in self.study.get_trials(deepcopy=False, states=live)}
            for u in units:
                if u not in held:
                    self.study.enqueue_trial({}, user_attrs={"unit": u})

    def work(self, build_unit, on_tick=None) -> None:
        """Take queued units until none is left, building each with ``build_unit(name) -> [records]``;
        then wait for units other workers hold (a dead worker's unit comes back to the queue)."""
        from aqsearch.storage import QueueEmpty, drain

        worker = f"{socket.gethostname()}-{os.getpid()}"

        def objective(trial) -> float:
            unit = trial.user_attrs.get("unit")
            if unit is None:
                trial.study.stop()
                raise QueueEmpty
            if unit in self.done_units():  # queued twice (two hosts started at once): already built
                trial.set_user_attr("duplicate_of_finished", True)
                return 1.0
            t0 = time.time()
            recs = [dict(r, worker=worker) for r in build_unit(unit)]
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("seconds", time.time() - t0)
            trial.set_user_attr("sha256", records_hash(recs))
            trial.set_user_attr("candidates", recs)
            return 0.0

        with self._errors("record the units it builds"):
            drain(self.study, objective, self.heartbeat, on_tick)


def _write_refused(e: BaseException) -> str | None:
    """The reason when ``e`` (or what caused it) is the database refusing a write, else ``None``."""
    seen = 0
    while e is not None and seen < 8:
        text = str(e).lower() if type(e).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "optuna") else ""
        for needle in ("attempt to write a readonly database", "read-only", "readonly database",
                       "unable to open database file", "permission denied"):
            if needle in text:
                return needle.replace("attempt to write a ", "")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)
