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


def make_storage(url: str, heartbeat: int = 30):
    """An Optuna storage for ``url``; RDB storages get heartbeats and retry failed trials."""
    import optuna  # here, not at the top: the CLI's other commands run without the search extra

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        storage_file(url).absolute().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    if not url.startswith(("sqlite://", "postgresql", "mysql")):
        raise AqError(f"unsupported storage {safe_url(url)!r}: use sqlite:///file.db, postgresql://..., or journal:///file")
    if storage_file(url) is not None:
        storage_file(url).absolute().parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
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
