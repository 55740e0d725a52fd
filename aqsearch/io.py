"""Files: the user cache folder, atomic writes, output checks, content hashes.

Nothing is half-written: every writer goes to a temporary file in the same folder, then renames; the
renamed file or folder gets the permissions the umask gives a new one (``mkstemp`` would leave 0600).
Nothing is lost: :func:`check_output` refuses an existing non-empty output unless asked to replace it,
and finds an unwritable one before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_dir(*parts: str) -> Path:
    """``$AQSEARCH_CACHE``, else ``$XDG_CACHE_HOME/aqsearch``, else ``~/.cache/aqsearch``."""
    root = os.environ.get("AQSEARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aqsearch"
    )
    p = Path(root, *parts)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not os.access(p, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        from aqsearch.errors import AqError

        raise AqError(f"cache folder {p} cannot be used ({e.strerror or e}): set AQSEARCH_CACHE to a writable "
                      "folder") from None
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_output(path: str | os.PathLike, flag: str = "--out", force: bool = False, folder: bool = False,
                 keep: bool = False) -> Path:
    """Refuse, before any work, an output the command could not write or should not replace.

    - an existing non-empty file or folder is refused unless ``force`` (``keep``: it is expected and
      appended to or reused, as a journal or a study's database is);
    - a folder where a file is written is refused either way; a file where a folder is written, unless
      ``force``;
    - the folder it goes into must take a new file: one is created there and removed (missing parent
      folders are created for it and removed again).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); open(os.path.join(d, "plan.json"), "w").write("{}")
    2
    >>> check_output(os.path.join(d, "new.json")).name
    'new.json'
    >>> check_output(os.path.join(d, "plan.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    aqsearch.errors.AqError: --out: ... exists (use --force to replace it)
    """
    from aqsearch.errors import AqError

    path = Path(path)
    if str(path) in ("", "."):
        raise AqError(f"{flag}: an empty path")
    made, parent = [], path.absolute().parent  # the folders to make, innermost first
    while not _exists(parent):
        made.append(parent)
        parent = parent.parent
    if not _exists(path):
        _NEW.append((path.absolute(), made[::-1]))
    else:
        if path.is_dir() and not folder:
            raise AqError(f"{flag}: {path} is a folder, not a file")
        if folder and not path.is_dir() and not force:
            raise AqError(f"{flag}: {path} is a file, not a folder (use --force to replace it)")
        nonempty = any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0
        if nonempty and not (force or keep):
            raise AqError(f"{flag}: {path} exists" + (" and is not empty" if path.is_dir() else "")
                          + " (use --force to replace it)")
        if not os.access(path, os.W_OK):
            raise AqError(f"{flag}: {path} is not writable")
    try:
        for d in reversed(made):
            d.mkdir()
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.absolute().parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AqError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
    return path


# Outputs that did not exist when a command checked them: (path, its missing folders, outermost first).
_NEW: list[tuple[Path, list[Path]]] = []


def forget_new_outputs() -> None:
    """Start a command with no outputs recorded (:func:`discard_empty_outputs`)."""
    _NEW.clear()


def discard_empty_outputs() -> list[Path]:
    """After a command failed on bad input: remove what it created among the outputs :func:`check_output`
    found missing, where the failure left it holding nothing (an empty folder, an empty file, a storage
    database without a study), and the folders made for them if empty. Nothing that holds a result is
    touched. Returns what was removed."""
    gone = []
    for path, missing in reversed(_NEW):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
                gone.append(path)
            elif path.is_file() and not path.is_symlink() and _holds_nothing(path):
                path.unlink()
                gone.append(path)
        for d in reversed(missing):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
                gone.append(d)
    _NEW.clear()
    return gone


def _holds_nothing(path: Path) -> bool:
    """An empty file, or a SQLite database (an Optuna storage) that holds no study."""
    if path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            return False
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return "studies" not in tables or db.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0
        finally:
            db.close()
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.
    (Whether ``path`` may be replaced is the caller's to decide first: :func:`check_output`.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        mask = _umask()  # some writers (safetensors) create 0600 files whatever the umask
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        if _exists(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hash of a file's bytes (or of its first ``limit`` bytes plus its size, for big files)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        remaining = size if limit is None else min(limit, size)
        while remaining > 0:
            chunk = f.read(min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    h.update(str(size).encode())
    return h.hexdigest()
