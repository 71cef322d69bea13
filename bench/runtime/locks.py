"""Inter-process locks: one beside a SQLite file or a run's checkpoints, an advisory lock in a server database.

Creating or migrating a store (MLflow's tables, Optuna's tables) and taking a study's next trial
must not interleave between processes; neither may two processes train one run. A lock file is
``flock``-ed, so the kernel releases it when its holder dies (SIGKILL included): a lock is never
left stale. Lock files are created by us and left in place (removing one races with a waiter).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from bench.errors import BenchError
from bench.runtime.urls import database_name


class LockBusy(BenchError):
    """A non-blocking lock is held by another live process (``holder``: the pid and host it wrote, if known)."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


@contextmanager
def file_lock(path: str | Path, blocking: bool = True, what: str = "") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing) for the ``with`` block.

    Non-blocking, a held lock raises :class:`LockBusy` naming the holder (the pid and host it wrote).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "another process"
            raise LockBusy(f"{what or path} is in use by {holder}; wait for it to finish or stop it", holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (MLflow's and SQLAlchemy's spelling), else None."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for ``name`` (PostgreSQL advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_ADVISORY = {  # dialect → (take, try to take, release): session-level locks the server drops when the connection dies
    "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
    "mysql": ("SELECT GET_LOCK(:k, -1)", "SELECT GET_LOCK(:k, 0)", "SELECT RELEASE_LOCK(:k)"),
}


@contextmanager
def _server_lock(url: str, name: str, blocking: bool = True) -> Iterator[None]:
    """An advisory lock named ``name`` in a PostgreSQL or MySQL/MariaDB database (:class:`LockBusy` when held
    elsewhere and not ``blocking``)."""
    from sqlalchemy import create_engine, text  # heavy: database stores only
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    take, attempt, release = _ADVISORY["postgresql" if engine.dialect.name == "postgresql" else "mysql"]
    key = _advisory_key(name) if engine.dialect.name == "postgresql" else f"elbo-bench-{_advisory_key(name):x}"[:64]
    try:
        with engine.connect() as conn:
            if blocking:
                conn.execute(text(take), {"k": key})
            elif not conn.execute(text(attempt), {"k": key}).scalar():
                raise LockBusy(f"{name} is in use by another process; wait for it to finish or stop it")
            try:
                yield
            finally:
                conn.execute(text(release), {"k": key})
    finally:
        engine.dispose()


def is_server_database(url: str) -> bool:
    """Whether ``url`` is a PostgreSQL or MySQL/MariaDB database (SQLAlchemy's spelling)."""
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mariadb")


def store_lock(url: str, purpose: str = "create", blocking: bool = True):
    """Serialise ``purpose`` (store creation, taking a trial) among all processes that use the store ``url``.

    SQLite: a file lock ``<database>.<purpose>.lock`` beside the file (``mlflow.db.create.lock``…).
    PostgreSQL and MySQL: an advisory lock in the database. Anything else (an MLflow server over
    HTTP, an in-memory SQLite) serialises on its own side: no lock is taken. Not ``blocking``, a lock
    held by another live process raises :class:`LockBusy`.
    """
    path = sqlite_path(url)
    if path is not None:
        return file_lock(path.with_name(f"{path.name}.{purpose}.lock"), blocking, what=f"the store {path}")
    if is_server_database(url):
        return _server_lock(url, advisory_name(url, purpose), blocking)
    return nullcontext()


def advisory_name(url: str, purpose: str) -> str:
    """The advisory lock's name for ``purpose`` in the database of ``url``: the database's name and the purpose
    only, so every spelling of the URL (user, password, driver, host alias, port, query) takes the same lock.
    The lock lives in that database (PostgreSQL's are per database; MySQL's per server, hence the name)."""
    return f"{database_name(url)}:{purpose}"
