"""MLflow: where runs are stored, the client on that store, and its experiments.

Embedded default: MLflow's SQLite store ``mlflow.db`` in BENCH_HOME (the working directory when
unset), artifacts in ``mlartifacts/`` beside it. Any MLflow tracking URI works instead
(``--tracking-uri`` or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from bench.errors import BenchError, first_line, reraised
from bench.runtime.locks import sqlite_path, store_lock
from bench.runtime.urls import hides_secret, masked, scrubbed

HOME_ENV = "BENCH_HOME"
_CONNECT_TIMEOUT_S = 5  # a tracking server that does not accept a connection in this long is taken as absent
_READ_TIMEOUT_S = 120  # MLflow's own default: a busy server is waited for


def bench_home() -> Path:
    """Where the embedded store, checkpoints and caches live: $BENCH_HOME, else the working directory."""
    home = Path(os.environ.get(HOME_ENV) or Path.cwd()).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise BenchError(f"{HOME_ENV}={home} is a file, not a folder; "
                         f"point {HOME_ENV} at a folder (it is created when missing)")
    return home


def recorded_store(stored: str, given: str | None = None, what: str = "the checkpoint") -> str:
    """The real URI of the store that ``what`` recorded as ``stored`` (its password :func:`masked`, as every
    record holds it): ``given`` (--tracking-uri) when it is that store, else ``stored`` itself when nothing in it
    was masked, else $MLFLOW_TRACKING_URI when it is that store. The password is never read back from a record,
    so resuming a run on a store with a password needs the URI again; anything else is refused in one line."""
    if given and given != stored:
        if masked(given) != stored:
            raise BenchError(f"--tracking-uri {masked(given)} is not the store {what} belongs to ({stored}); "
                             "give that store's URI, or leave --tracking-uri out")
        return given
    if not hides_secret(stored):
        return stored
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and masked(env) == stored:
        return env
    raise BenchError(f"{what} belongs to the store {stored}, recorded without its password; give the URI with the "
                     "password as --tracking-uri (or in $MLFLOW_TRACKING_URI)")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else ``sqlite:///<BENCH_HOME>/mlflow.db``."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{bench_home() / 'mlflow.db'}"


@contextmanager
def _quick_http(uri: str):
    """Fail fast on a server that is not there, and wait on one that is there but busy.

    A TCP connect with a short timeout tells a missing server (refused, unroutable) in seconds; the API call
    after it then gets MLflow's usual read timeout without retries, so a loaded server that answers slowly
    (eight workers on two cores) is not taken for a missing one.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise BenchError(f"cannot reach the MLflow tracking store {masked(uri)!r} (nothing answers at "
                             f"{parts.hostname}:{port}: {err.strerror or err}); check --tracking-uri") from None
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(_READ_TIMEOUT_S)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_sqlite_store(path: Path, flag: str) -> None:
    """Refuse, in one line and before any library retries for minutes, a SQLite store we cannot create
    or write: a parent that is a file, a folder we may not write, a database file we may not open.
    """
    parent = path.parent
    with reraised(lambda err: f"cannot write the SQLite store {path} ({err.strerror or err}); "
                              f"give {flag} a path in a writable folder", OSError):
        parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not path.is_file():
                raise BenchError(f"{flag} {path} is not a file; give the path of a SQLite database file")
            with path.open("r+b"):
                pass
        else:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
            os.close(fd)
            os.unlink(probe)


def refuse_half_migrated(path: Path, upgrade: str | None = None) -> None:
    """Refuse a store whose schema upgrade died midway, saying how to recover (``upgrade``: the command that
    finishes the upgrade). Call under the store's lock: a scratch table seen then is no migration in flight."""
    leftovers = _half_migrated_tables(path)
    if leftovers:
        raise BenchError(
            f"the SQLite store {path} was left half-migrated (table {leftovers[0]} exists: a schema upgrade was "
            f"interrupted); back the file up, then run `sqlite3 {path} 'DROP TABLE {leftovers[0]}'` and "
            f"`{upgrade or f'mlflow db upgrade sqlite:///{path}'}` (or, if it holds nothing yet, delete it)")


def _half_migrated_tables(path: Path) -> list[str]:
    """Alembic's batch-migration scratch tables (``_alembic_tmp_*``), present only when an upgrade died midway."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as db:
            names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    except sqlite3.DatabaseError as err:
        raise BenchError(f"{path} is not a SQLite database ({err}); give another store path") from None
    return [n for n in names if n.startswith("_alembic_tmp_")]


def client(uri: str | None = None, must_exist: bool = False):
    """An MlflowClient on the resolved URI, checked to answer before anything is written.

    A new store's tables are created under an inter-process lock (:func:`bench.runtime.locks.store_lock`),
    so processes starting together on a fresh store neither fail nor leave it half-migrated.
    ``must_exist``: a SQLite store that is gone is refused instead of created empty (a checkpoint's store).
    """
    from mlflow.tracking import MlflowClient  # heavy: only commands that open a store pay for it

    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri)
    if path is not None and must_exist and not path.is_file():
        raise BenchError(f"the MLflow store {path} no longer exists; restore it, or run without it")
    if path is not None:
        check_sqlite_store(path, "--tracking-uri")
    # MLflow raises many types for a store it cannot reach
    with reraised(lambda err: f"cannot reach the MLflow tracking store {masked(uri)!r} "
                              f"({scrubbed(first_line(err), uri)}); check --tracking-uri", Exception):
        with _quick_http(uri), store_lock(uri):
            if path is not None:
                refuse_half_migrated(path)
            c = MlflowClient(tracking_uri=uri)
            c.search_experiments(max_results=1)
    return c


def quiet_mlflow() -> None:
    """MLflow's own notices stay out of the user's output: its INFO lines (database tables created or upgraded,
    alembic's migration steps) and the "View run … at" links it prints for a tracking server; its warnings and
    errors still show. $MLFLOW_LOGGING_LEVEL, when set, is the user's choice and stays. Call after MLflow is
    imported (its import sets its loggers' levels)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def experiment_id(c, name: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a local store) when missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:///"):
        location = (Path(c.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it in between: use theirs
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiments(c, names: list[str] | None = None) -> list:
    """The named experiments (all when None); an unknown name is refused in one line."""
    if not names:
        return c.search_experiments()
    found = [c.get_experiment_by_name(n) for n in names]
    missing = [n for n, e in zip(names, found) if e is None]
    if missing:
        raise BenchError(f"no MLflow experiment named {', '.join(missing)}; "
                         "see `mlflow experiments search` or `bench ui`")
    return found


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """The library logger ``name`` says only errors while the block runs."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
