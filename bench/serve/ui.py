"""``bench ui`` and ``bench dashboard``: the MLflow UI and optuna-dashboard, stopped cleanly on Ctrl-C.

Each server runs under a watchdog (``guard.py``) that stops it and every worker it started when
``bench ui`` / ``bench dashboard`` goes away, even by SIGKILL, so no orphaned server keeps the port and
the store open.

``bench ui`` opens the runs table of one experiment, not MLflow's landing page. MLflow 3.17 opens an
experiment in its GenAI view (traces, token usage) unless the page's ``workflowType`` is
``machine_learning``: the UI reads it from the URL (the "GenAI / Model training" switch sets it), and
ignores the experiment tag ``mlflow.experimentKind`` for this choice. The runs table shows only run
name, date, duration, source and models until columns are chosen; its chosen columns and sort live
in the browser, and a URL can carry them only as a saved view: an experiment tag
``mlflow.sharedViewState.<key>`` (what the UI's "Views → Save as new view" writes) opened with
``?viewStateShareKey=<key>``. ``bench ui`` writes that one tag, :data:`VIEW_KEY`, on an experiment
holding elbo-bench runs and nowhere else, and never replaces one already there.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path
from urllib.parse import urlencode

import click

from bench.errors import BenchError, first_line
from bench.runtime.urls import masked
from bench.tracking import store as tracking
from studies.config import StudyConfig
from studies.storage import check_optuna_storage

GUARD = Path(__file__).with_name("guard.py")
STOP_WAIT_S = 20  # longer than the guard's own grace for the server, so the guard finishes its stop first
READY_POLL_S = 0.5  # how often a starting server is asked whether it answers (to open the browser then)

VIEW_KEY = "elbo-bench"  # the saved view's id, in its tag name and in the URL
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# MLflow's column ids, in this order after the run name. The runs table prints a metric with all its digits and has no
# setting to round them: bpd_rounded, a tag bench.training writes beside the metric, shows it rounded with its Monte
# Carlo standard error and method; the metrics themselves (bpd, sortable; bpd_stderr, none for an exact bound) keep
# every digit.
VIEW_COLUMNS = ("tags.`variant`", "tags.`bpd_rounded`", "metrics.`bpd`", "metrics.`bpd_stderr`", "tags.`bpd_method`",
                "metrics.`bpd_estimate`", "metrics.`fid`", "params.`config.steps`", "tags.`dataset`")
VIEW_SORT = "metrics.`bpd`"  # ascending: the best bound first
ML_VIEW = {"workflowType": "machine_learning"}  # MLflow's "Model training" side, not GenAI
# A run `bench run` made: every run logs the protocol of its bpd as a param and its variant as a tag.
BENCH_RUNS = "params.`protocol.bpd` LIKE '%' AND tags.`variant` LIKE '%'"
TEXT_BROWSERS = {"www-browser", "links", "links2", "elinks", "lynx", "w3m", "browsh"}  # they take the terminal
NAMES_SHOWN = 20  # experiments listed when a name is unknown
# Store URIs go to the servers in their environment: `mlflow server` reads its --backend-store-uri and
# --artifacts-destination from these; optuna-dashboard, which takes its storage only as an argument, is
# started by DASHBOARD_MAIN, which puts the URL into its argument list inside the process.
BACKEND_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"
ARTIFACTS_DESTINATION_ENV = "MLFLOW_ARTIFACTS_DESTINATION"
DASHBOARD_STORAGE_ENV = "BENCH_DASHBOARD_STORAGE"
DASHBOARD_MAIN = ("import os, runpy, sys; script = sys.argv[1]; "
                  f"sys.argv = [script, os.environ.pop('{DASHBOARD_STORAGE_ENV}'), *sys.argv[2:]]; "
                  "runpy.run_path(script, run_name='__main__')")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: localhost, 127.0.0.0/8 or ::1 (an unknown name counts as not)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warn_if_exposed(host: str, what: str) -> None:
    """Neither server has authentication: anyone who can reach the port can read and change everything."""
    if not is_loopback(host):
        click.echo(f"warning: --host {host} exposes {what} beyond this machine, and it has no "
                   "authentication: anyone who reaches the port can read, change and delete runs", err=True)


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise BenchError(f"--port must be between 1 and 65535, got {port}")


def _check_port_free(host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise BenchError(f"--host {host} is not an address of this machine ({err.strerror}); "
                         "give an IP address") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            raise BenchError(f"port {port} on {host} is in use; choose another with --port") from None


def base_url(host: str, port: int) -> str:
    """The address a browser on this machine uses: a wildcard host is reached through loopback."""
    name = host.strip("[]")
    if name in ("", "0.0.0.0"):
        name = "127.0.0.1"
    elif name == "::":
        name = "::1"
    return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"


# ------------------------------------------------------------------------- which experiment, which page
def pick_experiment(c, name: str | None):
    """``name``, else $MLFLOW_EXPERIMENT_NAME, else the experiment of the newest run, else the newest
    experiment other than Default; None when there is no experiment to show. An unknown name is refused."""
    source = "--experiment"
    if not name and os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        name, source = os.environ["MLFLOW_EXPERIMENT_NAME"], "$MLFLOW_EXPERIMENT_NAME"
    active = c.search_experiments()
    if name:
        found = c.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "active":
            return found
        names = sorted(e.name for e in active)
        listed = (", ".join(names[:NAMES_SHOWN])
                  + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""))
        raise BenchError(f"{source} {name!r}: no such experiment in {masked(c.tracking_uri)}; "
                         f"it has {listed or 'no experiments'}")
    if not active:
        return None
    newest = c.search_runs([e.experiment_id for e in active], order_by=["attributes.start_time DESC"], max_results=1)
    if newest:
        return next(e for e in active if e.experiment_id == newest[0].info.experiment_id)
    others = [e for e in active if e.name != "Default"]
    return max(others, key=lambda e: e.creation_time or 0) if others else None


def saved_view() -> str:
    """The saved view of the runs table as MLflow's UI stores it in an experiment tag: an envelope whose
    ``state`` is the JSON of the search facets and the table's state (columns, sort)."""
    now = int(time.time() * 1000)
    state = {"orderByKey": VIEW_SORT, "orderByAsc": True, "selectedColumns": list(VIEW_COLUMNS),
             "columnOrder": ["attributes.`Run Name`", *VIEW_COLUMNS]}
    return json.dumps({"name": VIEW_KEY, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def holds_bench_runs(c, experiment_id: str) -> bool:
    """Whether the experiment holds runs that `bench run` (or grid, study) recorded."""
    return bool(c.search_runs([experiment_id], filter_string=BENCH_RUNS, max_results=1))


def runs_page(c, exp) -> tuple[str, str | None]:
    """The URL fragment of ``exp``'s runs table in the model-training view, and a note for the user
    (None when all is as intended). On an experiment holding elbo-bench runs the page opens the saved
    view :data:`VIEW_KEY` (columns variant, bpd_rounded, bpd, bpd_stderr, bpd_method, bpd_estimate, fid, steps,
    dataset; sorted by bpd),
    writing its tag when missing; other experiments are left untouched and open with MLflow's columns."""
    if exp is None:
        return "#/experiments", "note: the store holds no experiment yet; `bench run` records one"
    query = dict(ML_VIEW)
    note = None
    if VIEW_TAG in exp.tags:
        query["viewStateShareKey"] = VIEW_KEY
    elif holds_bench_runs(c, exp.experiment_id):
        try:
            c.set_experiment_tag(exp.experiment_id, VIEW_TAG, saved_view())
            query["viewStateShareKey"] = VIEW_KEY
        except Exception as err:  # noqa: BLE001 - a read-only store or server: the page opens without the saved columns
            note = (f"note: could not save the runs view on experiment {exp.name!r} ({first_line(err)}); "
                    "pick the bpd, fid and variant columns under Columns")
    else:
        note = (f"note: experiment {exp.name!r} holds no elbo-bench runs; it opens with MLflow's default columns "
                "(add metrics under Columns)")
    return f"#/experiments/{exp.experiment_id}/runs?{urlencode(query)}", note


# ------------------------------------------------------------------------- the browser
def graphical_browser() -> webbrowser.BaseBrowser | None:
    """The browser ``webbrowser`` would start, unless it is a text browser (lynx, w3m…), which would
    take over this terminal; None when there is none (a machine without a display has only those)."""
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return None
    name = str(getattr(browser, "name", "") or "").split()
    if name and Path(name[0]).name in TEXT_BROWSERS:
        return None
    return browser


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------- serving
def _serve(cmd: list[str], banner: str, url: str, ready_url: str, open_browser: bool, what: str,
           env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in its own session under the guard until it exits or Ctrl-C / SIGTERM arrives; print
    ``banner: url`` at once, and open ``url`` in a graphical browser once ``ready_url`` answers. ``env``:
    variables added to the server's environment (store URIs with passwords go there, never on its command
    line, which every user of the machine can read)."""
    browser = graphical_browser() if open_browser else None
    read_end, write_end = os.pipe()  # the guard writes the server's process group id here
    try:
        proc = subprocess.Popen([sys.executable, str(GUARD), str(os.getpid()), "--pid-fd", str(write_end), "--", *cmd],
                                start_new_session=True, env={**os.environ, **(env or {})}, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as report:
        server_group = report.readline().strip()  # '' when the guard ended before starting the server
    stop = {"now": False}

    def on_term(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, on_term)
    click.echo(f"{banner}: {url}  (Ctrl-C stops it)")
    if open_browser and browser is None:
        click.echo("note: no graphical browser here (no display, or only a text browser); "
                   "open the address above in one")
    next_probe = 0.0
    try:
        while proc.poll() is None and not stop["now"]:
            if browser is not None and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + READY_POLL_S
                if _answers(ready_url):  # opened before the server answers, the page would show an error
                    threading.Thread(target=browser.open, args=(url,), daemon=True).start()  # some launchers block
                    browser = None
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the guard, which stops the server and the workers it started
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode is not None and proc.returncode < 0 and server_group.isdigit():
        _stop_orphaned_group(int(server_group))  # the guard was killed before it could stop the server
        if proc.returncode != -signal.SIGTERM and not stop["now"]:
            raise BenchError(f"the watchdog of {what} was killed by signal {-proc.returncode}; "
                             f"{what} was stopped with it")
    if proc.returncode not in (0, -signal.SIGTERM, None) and not stop["now"]:
        raise BenchError(f"{what} exited with status {proc.returncode} (its messages are above)")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_orphaned_group(pgid: int) -> None:
    """SIGTERM the process group ``pgid`` (a server whose guard is gone), then SIGKILL what is left of it after
    STOP_WAIT_S. Its id cannot have been reused while any process of the group lives."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def serve(tracking_uri: str | None, host: str, port: int, experiment: str | None = None,
          open_browser: bool = False) -> None:
    """The MLflow UI on the store, opened on the runs table of ``experiment`` (see :func:`pick_experiment`)."""
    _warn_if_exposed(host, "the MLflow UI")
    _check_port(port)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)  # the store answers (and a fresh SQLite store gets its tables) before the server starts
    page, note = runs_page(c, pick_experiment(c, experiment))
    _check_port_free(host, port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    root = base_url(host, port)
    if note:
        click.echo(note)
    _serve(cmd, f"MLflow UI for {masked(uri)}", f"{root}/{page}", f"{root}/health", open_browser, "the MLflow server",
           env={BACKEND_STORE_ENV: uri})


# ------------------------------------------------------------------------- bench server
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql")


def serve_tracking(backend_store: str | None, artifacts: str | None, host: str, port: int, workers: int,
                   allowed_hosts: str | None = None) -> None:
    """An MLflow tracking server that study workers on other machines log to: runs in ``backend_store``
    (a database URI; default the embedded SQLite store), artifacts uploaded and downloaded through the
    server into ``artifacts`` (a folder or an object-store URI; default ``mlartifacts-served/`` in
    BENCH_HOME), so workers need no shared disk."""
    _warn_if_exposed(host, "the MLflow tracking server")
    _check_port(port)
    if workers < 1:
        raise BenchError(f"--workers must be >= 1, got {workers}")
    uri = backend_store or f"sqlite:///{tracking.bench_home() / 'mlflow.db'}"
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        raise BenchError(f"--backend-store-uri {masked(uri)}: give a database URI (postgresql://USER@HOST/DB, "
                         "sqlite:///PATH); the server is what workers reach over HTTP")
    tracking.client(uri)  # the database answers, and a fresh one gets its tables (under the store's lock)
    if artifacts is None:
        artifacts = (tracking.bench_home() / "mlartifacts-served").as_uri()
    elif "://" not in artifacts:
        artifacts = Path(artifacts).expanduser().resolve().as_uri()
    _check_port_free(host, port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--host", host, "--port", str(port),
           "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    root = base_url(host, port)
    click.echo(f"runs in {masked(uri)}; artifacts in {masked(artifacts)}, served through the server")
    click.echo("workers: bench study --tracking-uri "
               f"http://{socket.gethostname() if not is_loopback(host) else host}:{port} …")
    _serve(cmd, "MLflow tracking server", root, f"{root}/health", False, "the MLflow server",
           env={BACKEND_STORE_ENV: uri, ARTIFACTS_DESTINATION_ENV: artifacts})


# ------------------------------------------------------------------------- bench dashboard
def _dashboard_command() -> str:
    beside = Path(sys.executable).with_name("optuna-dashboard")
    found = str(beside) if beside.is_file() else shutil.which("optuna-dashboard")
    if found is None:
        raise BenchError("optuna-dashboard is not installed; install the package optuna-dashboard")
    return found


def default_storage() -> str:
    """The storage `bench study` uses when given no --storage."""
    return StudyConfig().storage_url()


def serve_dashboard(storage: str | None, host: str, port: int, open_browser: bool = False,
                    study_name: str | None = None) -> None:
    """optuna-dashboard on ``storage`` (default: the studies' storage, :func:`default_storage`), opened on the
    page of ``study_name`` when given (optuna-dashboard's ``/dashboard/studies/<study id>``), else its study list."""
    _warn_if_exposed(host, "optuna-dashboard")
    _check_port(port)
    url = storage or default_storage()
    study_id = check_optuna_storage(url, study_name)
    exe = _dashboard_command()
    _check_port_free(host, port)
    # wsgiref (threaded) is one process that SIGTERM ends at once; gunicorn, optuna-dashboard's "auto"
    # choice when installed, drains its workers for up to 30 s first. The storage URL reaches it through
    # the environment (DASHBOARD_MAIN), not its command line.
    cmd = [sys.executable, "-c", DASHBOARD_MAIN, exe, "--host", host, "--port", str(port), "--server", "wsgiref"]
    root = base_url(host, port)
    page = f"{root}/dashboard/studies/{study_id}" if study_id is not None else f"{root}/dashboard/"
    _serve(cmd, f"optuna-dashboard for {masked(url)}", page, f"{root}/api/studies", open_browser,
           "optuna-dashboard", env={DASHBOARD_STORAGE_ENV: url})
