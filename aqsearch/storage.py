"""Where a study lives: Optuna storages from URLs, checked before any work, passwords kept out of messages.

SQLite (``sqlite:///study.db``: one process), any RDB URL (``postgresql://...``: several workers and
machines, with heartbeats: a trial whose worker died is marked failed and run again), or
``journal:///file`` (several processes on one host). Reading a study (``front``, ``pick``) never
creates a storage file; searching into one creates its folder.

>>> storage_file("sqlite:///runs/study.db").as_posix(), storage_file("postgresql://u:pw@db/x")
('runs/study.db', None)
>>> safe_url("postgresql://u:secret@db:5432/x")
'postgresql://u:***@db:5432/x'
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from aqsearch.errors import AqError
from aqsearch.io import check_output

if TYPE_CHECKING:
    import optuna


def storage_file(url: str):
    """The file a SQLite or journal storage URL names (``None`` for a server or an in-memory database)."""
    if url.startswith("journal://"):
        return Path(url[len("journal://"):])
    if url.startswith("sqlite://"):
        db = url[len("sqlite:///"):].split("?")[0] if url.startswith("sqlite:///") else ""
        return Path(db) if db and db != ":memory:" else None
    return None


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: nothing it could hide either
        return url


def make_storage(url: str, heartbeat: int | None = 30):
    """An Optuna storage for ``url``; RDB storages get heartbeats and retry failed trials (``heartbeat=None``:
    none, for studies driven by ask and tell, where the caller handles a crashed trial itself)."""
    import warnings

    import optuna  # here, not at the top: the CLI's other commands run without the search extra

    # heartbeats, set_constraint and objective names are marked experimental; they are what we need
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        storage_file(url).absolute().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    if not url.startswith(("sqlite://", "postgresql", "mysql")):
        raise AqError(f"unsupported storage {safe_url(url)!r}: use sqlite:///file.db, postgresql://..., or journal:///file")
    if storage_file(url) is not None:
        storage_file(url).absolute().parent.mkdir(parents=True, exist_ok=True)
    try:
        beats = {} if heartbeat is None else dict(
            heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        return optuna.storages.RDBStorage(
            url, **beats,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as e:  # the driver's message may repeat the URL: mask its password there too
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        from sqlalchemy.engine import make_url

        try:
            pw = make_url(url).password
        except Exception:
            pw = None
        if pw:
            msg = msg.replace(str(pw), "***")
        raise AqError(f"cannot open storage {safe_url(url)}: {msg.replace(url, safe_url(url))}") from None


def load_study(storage: str, name: str) -> optuna.Study:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage))
    except KeyError:
        raise AqError(f"no study named {name!r} in {safe_url(storage)}") from None


def check_storage(url: str, create: bool) -> None:
    """A file storage (SQLite, journal) must exist to be read, and be writable to be searched into;
    checked before any work, and reading never leaves an empty file behind."""
    path = storage_file(url)
    if path is None:
        return
    if create:
        check_output(path, "--storage", keep=True)
    elif not path.is_file():
        raise AqError(f"storage file not found: {path}")


class QueueEmpty(Exception):
    """Another worker took the last queued trial first; the trial made in its place ends as failed."""


def drain(study, objective, heartbeat: int, on_tick=None) -> None:
    """Run ``objective`` on queued trials until none is queued or running.

    While other workers hold running trials, wait: a dead worker's trial turns stale after the grace
    period, is failed and queued again (RDB storages, heartbeats), and this worker takes it.
    ``objective`` raises :class:`QueueEmpty` for a trial that was not queued (the queue ran dry).
    """
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled

    waiting, running = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING
    # Optuna logs an interrupted or failed trial with a 30-line traceback at WARNING; an interrupt is
    # answered by the CLI in one line, and a real failure still raises
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    started: list[int] = []

    def tracked(trial):
        started.append(trial.number)
        return objective(trial)

    def stop_when_queue_empty(study, trial):
        if on_tick is not None:
            on_tick()
        if not study.get_trials(deepcopy=False, states=(waiting,)):
            study.stop()

    deadline, seeded = None, set()
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial fails and is queued again
        if study.get_trials(deepcopy=False, states=(waiting,)):
            try:
                study.optimize(tracked, callbacks=[stop_when_queue_empty], catch=(QueueEmpty,))
            except KeyboardInterrupt:
                requeue_interrupted(study, started)
                raise
            deadline = None
            continue
        live = study.get_trials(deepcopy=False, states=(running,))
        if not live:
            return
        # running trials: another worker's, or a dead one's that turns stale after the grace period
        deadline = deadline or time.time() + 3 * heartbeat + 2
        if time.time() > deadline:
            # A worker killed between taking a trial (RUNNING) and its first heartbeat leaves a trial
            # Optuna never calls stale. Give each such trial one heartbeat: a live worker's goes on
            # beating, a dead one's turns stale after the grace period and is queued again.
            orphans = [t._trial_id for t in live if t._trial_id not in seeded]
            if not orphans or not is_heartbeat_enabled(study._storage):
                return
            for tid in orphans:
                study._storage.record_heartbeat(tid)
            seeded.update(orphans)
            deadline = None
            continue
        if on_tick is not None:
            on_tick()
        time.sleep(min(heartbeat, 2))


def requeue_interrupted(study, numbers: list[int]) -> None:
    """Queue again, with the same parameters and labels, the trials this process started that an
    interrupt (Ctrl-C) failed: a stopped study continues where it stopped."""
    import optuna

    for n in numbers:
        t = study.trials[n]
        if t.state != optuna.trial.TrialState.FAIL:
            continue
        fixed = t.system_attrs.get("fixed_params")
        if fixed is None:
            continue
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in t.user_attrs.items() if k in ("warm_start", "unit")})
