"""The Optuna storage a study lives in: opened (tables created once, under a lock), or checked without creating
anything (``bench study --status``, ``bench dashboard``)."""

from __future__ import annotations

import sqlite3
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from bench.errors import BenchError, first_line, reraised
from bench.runtime.locks import sqlite_path, store_lock
from bench.runtime.urls import masked, scrubbed
from bench.tracking import store as tracking
from studies.config import StudyConfig

NAMES_SHOWN = 20  # studies listed when a name is unknown


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, in which a RUNNING trial that never had a heartbeat turns stale too.

    Optuna judges a trial by its heartbeat row alone, so a trial whose worker died (or failed) after taking
    it and before its first heartbeat, or one some tool asked for and left, stayed RUNNING for good and the
    workers waited on it forever. A worker records a trial's first heartbeat under the lock it takes the trial
    under; whoever looks for stale trials (under that lock too) and finds one without any gives it one, so
    unless its worker beats it is stale a grace period later, failed and retried like any other."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from sqlalchemy import text  # heavy: SQLAlchemy, as optuna loads it

        never = text("SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                     "WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL")
        with self.engine.connect() as conn:
            silent = [row[0] for row in conn.execute(never, {"study": study_id})]
        for trial_id in silent:
            self.record_heartbeat(trial_id)
        return super()._get_stale_trial_ids(study_id)


def open_storage(sc: StudyConfig):
    """The study's Optuna storage, its tables created under a lock the first time."""

    url = sc.storage_url()
    path = sqlite_path(url)
    if path is not None:
        tracking.check_sqlite_store(path, "--storage")
    try:  # optuna/sqlalchemy raise many kinds for a bad URL; the tables of a new storage are created once
        with reraised(lambda err: f"cannot open the Optuna storage {masked(url)!r}: {scrubbed(first_line(err), url)}",
                      Exception), warnings.catch_warnings(), store_lock(url):
            if path is not None:
                tracking.refuse_half_migrated(path, f"optuna storage upgrade --storage {url}")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # wait out a busy writer
            return _Storage(url, engine_kwargs=engine, heartbeat_interval=sc.heartbeat, grace_period=2 * sc.heartbeat,
                            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def check_optuna_storage(url: str, study_name: str | None = None) -> int | None:
    """Refuse, in one line, a storage that is not an existing Optuna RDB storage, without creating
    anything: SQLAlchemy would make an empty file out of a mistyped SQLite path. With ``study_name``, the
    study's id in the storage (what optuna-dashboard's page addresses hold), refusing a name it lacks."""
    if "://" not in url:
        raise BenchError(f"--storage {url}: give an RDB URL such as sqlite:///{url} or postgresql://HOST/DB")
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise BenchError(f"no Optuna storage at {path} (no such file); run `bench study` first, or give --storage URL")
    import sqlalchemy  # heavy: SQLAlchemy

    engine = None
    try:
        if path is not None:  # read-only: nothing is created or changed
            ro = f"{path.resolve().as_uri()}?mode=ro"
            engine = sqlalchemy.create_engine("sqlite://", creator=lambda: sqlite3.connect(ro, uri=True))
        else:
            engine = sqlalchemy.create_engine(url)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        studies = {}
        if study_name is not None and {"studies", "trials", "version_info"} <= tables:
            with engine.connect() as conn:
                studies = dict(conn.execute(sqlalchemy.text("SELECT study_name, study_id FROM studies")).all())
    except Exception as err:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer,
        # a file that is no database
        raise BenchError(f"cannot open the Optuna storage {masked(url)}: {first_line(err)}") from None
    finally:
        if engine is not None:
            engine.dispose()
    if not {"studies", "trials", "version_info"} <= tables:
        raise BenchError(f"{masked(url)} is not an Optuna storage (it has no studies/trials tables); "
                         "give --storage the URL that `bench study --storage` used")
    if study_name is None:
        return None
    if study_name not in studies:
        names = sorted(studies)
        listed = (", ".join(names[:NAMES_SHOWN])
                  + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""))
        raise BenchError(f"--study-name {study_name!r}: no such study in {masked(url)}; "
                         f"it has {listed or 'no studies'}")
    return int(studies[study_name])
