"""MLflow: where runs are stored, and the few calls the trainer makes (batched, by run id).

Embedded default: MLflow's SQLite store ``mlflow.db`` in BENCH_HOME (the working directory when
unset), artifacts in ``mlartifacts/`` beside it. Any MLflow tracking URI works instead
(``--tracking-uri`` or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
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
        raise BenchError(f"{HOME_ENV}={home} is a file, not a folder; point {HOME_ENV} at a folder (it is created when missing)")
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
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri)
    if path is not None and must_exist and not path.is_file():
        raise BenchError(f"the MLflow store {path} no longer exists; restore it, or run without it")
    if path is not None:
        check_sqlite_store(path, "--tracking-uri")
    # MLflow raises many types for a store it cannot reach
    with reraised(lambda err: f"cannot reach the MLflow tracking store {masked(uri)!r} ({scrubbed(first_line(err), uri)}); "
                              "check --tracking-uri", Exception):
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
    import logging

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
        raise BenchError(f"no MLflow experiment named {', '.join(missing)}; see `mlflow experiments search` or `bench ui`")
    return found


def git_commit() -> str:
    """The source's git commit (with '-dirty' when changed), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: who ran it, from what, at which git commit (when known)."""
    import getpass

    from mlflow.utils import mlflow_tags

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {mlflow_tags.MLFLOW_USER: user, mlflow_tags.MLFLOW_SOURCE_NAME: "elbo-bench",
            mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags["git_dirty"] = str(commit.endswith("-dirty")).lower()  # uncommitted changes to tracked files
    return tags


@contextmanager
def system_metrics(uri: str, run_id: str, resume: bool = False):
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, and per GPU
    utilisation and memory through NVML) for the run while the block runs, sampled every 10 s
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` changes it). Stopped before the run is closed."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with _quiet("mlflow.system_metrics"):  # its start and stop notices, at every run
        monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        try:
            yield monitor
        finally:
            monitor.finish()


@contextmanager
def _quiet(logger: str):
    """The library logger ``logger`` says only errors while the block runs."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "mlflow", "optuna", "torch-fidelity"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


# ------------------------------------------------------------------------- who owns a RUNNING run
HEARTBEAT_SECONDS = 60  # how often a live run refreshes its ``owner.heartbeat`` tag
STALE_AFTER_SECONDS = 15 * 60  # a run on another host silent this long is taken for dead


def _process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a reused pid apart; '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` runs and, where /proc tells, is the one that started at ``start``."""
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return bool(now) and (not start or now == start)
    try:
        os.kill(pid, 0)  # no /proc (macOS): existence only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str, link: bool = False) -> str:
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return ""


def _machine() -> dict[str, str]:
    """What tells this kernel and PID namespace apart from others of the same hostname (containers, a
    reboot): the boot id and the PID namespace; empty where /proc does not tell (macOS)."""
    return {"owner.boot": _read("/proc/sys/kernel/random/boot_id"), "owner.pidns": _read("/proc/self/ns/pid", link=True)}


def owner_tags() -> dict[str, str]:
    """Tags that let a later command tell whether this process, which owns a RUNNING run, is still alive."""
    pid = os.getpid()
    return {"owner.host": socket.gethostname(), "owner.pid": str(pid), "owner.start": _process_start(pid),
            **_machine(), "owner.heartbeat": str(int(time.time()))}


def owner_gone(tags: dict[str, str], now: float | None = None) -> str:
    """Why the process that owns a RUNNING run is known to be gone ('' while it may be alive).

    Where its pid means the same process as here (same host, boot and PID namespace) the pid and its start
    time decide; elsewhere (another host, or a container or boot of the same hostname) a heartbeat older
    than STALE_AFTER_SECONDS does. Owner tags without the boot and namespace (written by an older version)
    are judged by the host alone; a run without owner tags is never judged.
    """
    if "owner.pid" not in tags:
        return ""
    host, pid = tags.get("owner.host", ""), int(tags["owner.pid"])
    here = _machine()
    if host == socket.gethostname() and all(tags.get(k, mine) == mine for k, mine in here.items()):
        return f"its process {pid} on {host} is gone" if not _alive(pid, tags.get("owner.start", "")) else ""
    beat = float(tags.get("owner.heartbeat") or 0)
    silent = (now or time.time()) - beat
    if silent > STALE_AFTER_SECONDS:
        return f"no heartbeat from process {pid} on {host} for {silent / 60:.0f} min"
    return ""


def close_dead_runs(c, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED, with the reason as tag ``killed_reason``, every RUNNING run of these experiments
    whose owning process is gone (SIGKILL, a crashed study worker, a lost machine). Returns their ids."""
    from mlflow.entities import RunTag, ViewType

    closed = []
    runs = c.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ACTIVE_ONLY,
                         max_results=5000)
    for r in runs:
        if not owner_gone(r.data.tags):
            continue
        r = c.get_run(r.info.run_id)  # read again: a resume may have taken the run over since the search
        reason = owner_gone(r.data.tags) if r.info.status == "RUNNING" else ""
        if not reason:
            continue
        c.log_batch(r.info.run_id, tags=[RunTag("killed_reason", f"{reason}; found by a later command"),
                                         RunTag("killed_found_at", time.strftime("%Y-%m-%d %H:%M:%S"))])
        c.set_terminated(r.info.run_id, "KILLED")
        closed.append(r.info.run_id)
    return closed


@contextmanager
def every(seconds: float, action, name: str):
    """Call ``action()`` every ``seconds`` from a background thread while the block runs. A failing call
    is skipped (a store busy for a moment): the next one will do, so ``action`` must be a heartbeat."""
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            try:
                action()
            except Exception:  # noqa: BLE001, S110 - see the docstring
                pass

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def heartbeat(c, run_id: str, seconds: float = HEARTBEAT_SECONDS):
    """Refresh the run's ``owner.heartbeat`` tag every ``seconds`` while the ``with`` block runs."""
    return every(seconds, lambda: c.set_tag(run_id, "owner.heartbeat", str(int(time.time()))),
                 f"mlflow-heartbeat-{run_id[:8]}")


class RunLogger:
    """Batched logging into one MLflow run.

    A resumed run replays the steps between its last checkpoint and the interruption; ``skip_logged()``
    makes the logger drop what the run's history already holds, so each step is logged once.
    """

    def __init__(self, c, run_id: str, model_id: str | None = None):
        self.client, self.run_id = c, run_id
        self.model_id = model_id  # the run's LoggedModel, which the metrics logged from now on are linked to
        self._logged: dict[str, int] = {}  # metric key -> last step already in the run's history

    def skip_logged(self) -> None:
        """From now on, drop metrics (and images) at steps the run's history already holds."""
        # MLflow's own ``system/*`` metrics count their steps in samples (one per 10 s), not training steps:
        # taken for ours, their larger steps would make every later sample grid look logged already.
        keys = [k for k in self.client.get_run(self.run_id).data.metrics if not k.startswith("system/")]
        self._logged = {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys}

    def _new(self, key: str, step: int) -> bool:
        return step > self._logged.get(key, -1)

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step, model_id=self.model_id) for k, v in values.items() if self._new(k, step)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def dataset(self, images, name: str, context: str) -> None:
        """The training data as an MLflow dataset input (a digest of the pixels, not a copy)."""
        import mlflow.data
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource({"loader": f"bench.data.datasets.load_dataset({name!r}, split={context!r})"})
        ds = mlflow.data.from_numpy(images.numpy(), source=source, name=f"{name}-{context}")
        inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception:  # noqa: BLE001 - two runs registering the same dataset at once: the second finds it on a retry
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, datasets=inputs)

    def image(self, array, key: str, step: int) -> None:
        if self._logged and step <= max(self._logged.values()):  # logged with that step's metrics before
            return
        self.client.log_image(self.run_id, array, key=key, step=step)

    def figure(self, fig, path: str) -> None:
        from bench.tracking.plots import FIGURES

        with FIGURES:  # drawn by matplotlib, which is not thread-safe
            self.client.log_figure(self.run_id, fig, path)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def note(self, text: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``, shown as the run page's Description)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        self.tags({MLFLOW_RUN_NOTE: text})

    def note_section(self, heading: str, text: str) -> None:
        """Set the section ``heading`` of the run's description to ``text`` (replacing an earlier one)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        note = self.client.get_run(self.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
        mark = f"\n\n**{heading}**"
        self.note(note.split(mark)[0].rstrip() + f"{mark}: {text}")

    def model(self, net, example: tuple, step: int, metadata: dict | None = None, name: str = "model") -> str:
        """``net`` (a float32 CPU copy) as an MLflow 3 model of this run: a LoggedModel named ``name`` (the experiment's
        Models tab and the run page list it) with the run's params, linked to the metrics the run logged at ``step``.
        Returns its id: ``mlflow.pytorch.load_model("models:/<id>")`` gives a module called as ``net`` is.

        Saved as a ``torch.export`` program (MLflow's ``pt2`` format), traced on ``example`` (a batch of at least 2,
        so the batch size stays free): a graph and tensors, no pickled objects, which MLflow checks when it loads
        one with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` (a pickled model would run code when loaded)."""
        import copy

        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        from mlflow.types import Schema, TensorSpec

        module = copy.deepcopy(net).float().cpu().eval().to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            out = module(*example)

        def spec(x, name=None):
            return TensorSpec(np.dtype(str(x.dtype).removeprefix("torch.")), (-1, *x.shape[1:]), name)

        signature = ModelSignature(inputs=Schema([spec(example[0], "x_t"), spec(example[1], "t")]), outputs=Schema([spec(out)]))
        run = self.client.get_run(self.run_id)
        logged = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                 params=run.data.params)
        # mlflow.pytorch logs through the global tracking URI: this run's store while it logs
        with _use_tracking_uri(self.client.tracking_uri), _quiet("mlflow"):
            mlflow.pytorch.log_model(module, name=name, model_id=logged.model_id, run_id=self.run_id, step=step,
                                     serialization_format="pt2", input_example=example, signature=signature,
                                     metadata=metadata, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        return logged.model_id

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
