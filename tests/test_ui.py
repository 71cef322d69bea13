"""`bench ui` and `bench dashboard`: what the page shows in headless Chromium (the runs table with bpd, fid and
variant, not MLflow's GenAI view; the study), which experiment opens, one-line refusals, and clean stops: the
server dies with the command even when that is SIGKILLed, and a non-loopback --host warns."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import webbrowser
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from tools import CHROMIUM

import bench.serve.ui as ui
from bench.cli.main import cli
from bench.errors import BenchError
from bench.tracking import store as tracking

PROC = Path("/proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process from /proc, None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie serves nothing; its reaper is not ours


def _descendants(root: int) -> set[int]:
    """Every live process below ``root``, whatever session it moved to."""
    parents = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = st[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return {pid for pid in found if _alive(pid)}


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_health(proc: subprocess.Popen, port: int, seconds: float) -> None:
    _wait_until_answers(f"http://127.0.0.1:{port}/health", proc, seconds)


@pytest.mark.skipif(not (PROC / "self" / "stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_sigkill_of_bench_ui_takes_the_server_and_its_workers_down(tmp_path, store_template):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    env = {**os.environ, "BENCH_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = _free_port()
    bench = Path(sys.executable).with_name("bench")
    proc = subprocess.Popen([str(bench), "ui", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree: set[int] = set()
    try:
        _wait_for_health(proc, port, 120)
        tree = _descendants(proc.pid)
        assert tree, "bench ui started no server process"
        proc.kill()  # SIGKILL to bench ui alone: no cleanup of its own runs
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_answers(port) or any(_alive(p) for p in tree)):
            time.sleep(0.25)
        assert not _answers(port), f"port {port} still answers after bench ui was killed"
        assert not [p for p in tree if _alive(p)], "server processes outlived bench ui"
    finally:
        _kill_all(proc, tree)


@pytest.mark.skipif(not (PROC / "self" / "stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_sigkill_of_the_watchdog_takes_the_server_down_and_bench_ui_says_so(tmp_path, store_template):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    port = _free_port()
    bench = Path(sys.executable).with_name("bench")
    proc = subprocess.Popen([str(bench), "ui", "--port", str(port), "--no-browser"], env=_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: set[int] = set()
    try:
        _wait_for_health(proc, port, 120)
        tree = _descendants(proc.pid)
        [guard] = [p for p in tree if _stat(p) and _stat(p)[1] == proc.pid]
        assert "guard.py" in (PROC / str(guard) / "cmdline").read_text()
        os.kill(guard, signal.SIGKILL)  # the watchdog alone: it cannot stop the server itself
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_answers(port) or any(_alive(p) for p in tree - {guard})):
            time.sleep(0.1)
        assert not _answers(port), f"port {port} still answers 10 s after the watchdog was killed"
        assert not [p for p in tree if _alive(p)], "server processes outlived the watchdog"
        assert proc.wait(timeout=10) == 2
        err = proc.stderr.read().splitlines()  # the server's log lines, then bench ui's
        assert err[-1] == ("error: the watchdog of the MLflow server was killed by signal 9; "
                           "the MLflow server was stopped with it")
    finally:
        _kill_all(proc, tree)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.4.5.6", True), ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("example.org", False), ("", False)])
def test_is_loopback(host, loopback):
    assert ui.is_loopback(host) is loopback


@pytest.mark.parametrize("host, warns", [("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("127.0.0.1", False),
                                         ("localhost", False)])
def test_ui_warns_once_that_a_non_loopback_host_has_no_authentication(tmp_path, monkeypatch, host, warns):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    # The warning comes before anything is checked or started, so an invalid port shows it without serving.
    result = CliRunner().invoke(cli, ["ui", "--host", host, "--port", "0"])
    assert result.exit_code == 2 and "--port must be between 1 and 65535" in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "no authentication" in line]
    assert len(warnings) == (1 if warns else 0), result.stderr
    if warns:
        assert host in warnings[0]


# ------------------------------------------------------------------------- helpers: processes, pages
needs_chromium = pytest.mark.usefixtures("chromium")  # skips without it, fails under CI=true (tests/tools.py)
needs_proc = pytest.mark.skipif(not (PROC / "self" / "stat").exists(),
                                reason="reads the process tree from /proc (Linux)")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "BROWSER", "DISPLAY", "WAYLAND_DISPLAY")}
    return {**env, "BENCH_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def _spawn(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    bench = Path(sys.executable).with_name("bench")
    return subprocess.Popen([str(bench), *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)


def _printed_url(proc: subprocess.Popen, seconds: float = 60) -> str:
    """The address in the command's first stdout line ("<what>: URL  (Ctrl-C stops it)")."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    line = proc.stdout.readline() if ready else ""
    assert "(Ctrl-C stops it)" in line, f"no address printed (exit status {proc.poll()}): {line!r}"
    return line.split(": ", 1)[1].split()[0]


def _wait_until_answers(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"{url} did not answer (exit status {proc.poll()})")
        time.sleep(0.5)


def _ctrl_c_stops_everything(proc: subprocess.Popen, port: int) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) ends the command with status 0, and leaves neither a
    process of the server nor a listener on the port."""
    tree = _descendants(proc.pid)
    assert tree, "no server process was started"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 5  # the guard reaps the server before it exits; orphans of the server may lag
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    assert not [p for p in tree if _alive(p)], "server processes outlived the command"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))


def _kill_all(proc: subprocess.Popen, known: list[int] = ()) -> None:
    """SIGKILL ``proc``, its descendants and the ``known`` pids still alive (cleanup after a failed test)."""
    for pid in {*known, *_descendants(proc.pid), proc.pid}:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)


def _render(url: str, profile: Path) -> str:
    """The DOM of ``url`` once headless Chromium has run its scripts and their requests (a fresh profile:
    no remembered columns or views)."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,1000",
             "--virtual-time-budget=15000"]
    done = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.stdout, done.stderr[-2000:]
    return done.stdout


class _Page(HTMLParser):
    """A dumped DOM as text, and the ag-grid table in it: header text by column id, cell text by (row id,
    column id), and each row's index (MLflow's runs table names rows by run id, columns by e.g. metrics.`bpd`)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, dom: str):
        super().__init__()
        self.stack: list[tuple[str, str | None, str | None]] = []
        self.headers: dict[str, str] = {}
        self.cells: dict[str, dict[str, str]] = {}
        self.row_index: dict[str, int] = {}
        self.words: list[str] = []
        self.feed(dom)
        self.text = " ".join(self.words)
        self.headers = {k: v.strip() for k, v in self.headers.items()}
        self.cells = {r: {k: v.strip() for k, v in cols.items()} for r, cols in self.cells.items()}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        _, row, col = self.stack[-1] if self.stack else ("", None, None)
        row, col = a.get("row-id", row), a.get("col-id", col)
        if "row-id" in a and (a.get("row-index") or "").isdigit():
            self.row_index[a["row-id"]] = int(a["row-index"])
        if tag not in self.VOID:
            self.stack.append((tag, row, col))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        tag, row, col = self.stack[-1] if self.stack else ("", None, None)
        if tag in ("script", "style"):
            return
        self.words.extend(data.split())
        if col is not None:
            into = self.cells.setdefault(row, {}) if row else self.headers
            into[col] = into.get(col, "") + data


# ------------------------------------------------------------------------- bench ui: the runs table
def _bench_run(c, experiment_id: str, name: str, variant: str, metrics: dict[str, float], start_ms: int) -> str:
    """A finished run with the tags and params `bench run` gives its runs (and the metrics given)."""
    run = c.create_run(experiment_id, start_time=start_ms, run_name=name,
                       tags={"variant": variant, "dataset": "digits"})
    rid = run.info.run_id
    params = {"protocol.bpd": "x0-clipped", "config.variant": variant.split("[")[0], "config.steps": "30"}
    c.log_batch(rid, metrics=[Metric(k, v, start_ms + 1000, 30) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in params.items()])
    c.set_terminated(rid, end_time=start_ms + 60_000)
    return rid


def _store(tmp_path: Path, store_template: Path):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


@needs_chromium
@needs_proc
def test_ui_opens_the_runs_table_with_bpd_fid_and_variant_of_the_newest_experiment(tmp_path, store_template):
    c = _store(tmp_path, store_template)
    now = int(time.time() * 1000)
    older = tracking.experiment_id(c, "older-grid")
    old_run = _bench_run(c, older, "old-run", "simple[small]", {"bpd": 3.5}, now - 3_600_000)
    exp = tracking.experiment_id(c, "digits-runs")
    worse = _bench_run(c, exp, "simple-digits-seed0", "simple[small]",
                       {"bpd": 1.2345, "bpd_estimate": 1.25, "fid": 45.6}, now - 120_000)
    better = _bench_run(c, exp, "hybrid-digits-seed0", "hybrid", {"bpd": 1.1111, "bpd_estimate": 1.12, "fid": 38.2},
                        now - 60_000)
    c.create_experiment("created-last-but-empty")
    opened = tmp_path / "opened.txt"
    recorder = tmp_path / "record-browser"  # stands in for a graphical browser: notes the address it is given
    recorder.write_text(f"#!/bin/sh\necho \"$1\" >> {opened}\n")
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    port = _free_port()
    proc = _spawn(["ui", "--port", str(port)], _env(tmp_path, BROWSER=str(recorder)), tmp_path)
    try:
        url = _printed_url(proc)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?")
        _wait_until_answers(f"http://127.0.0.1:{port}/health", proc, 120)
        deadline = time.monotonic() + 10
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opened.exists() and opened.read_text().split() == [url]  # opened once, after the server answered

        page = _Page(_render(url, tmp_path / "chrome"))
        assert "Token Usage" not in page.text and "Observability" not in page.text, "MLflow's GenAI view opened"
        assert set(page.cells) == {worse, better}, page.text[:3000]  # this experiment's runs, and only those
        for col, title in [("metrics.`bpd`", "bpd"), ("metrics.`fid`", "fid"), ("tags.`variant`", "variant")]:
            assert page.headers.get(col) == title, page.headers
        # The name cell also holds the run's chart colour as hidden text ("#9e102c…"); the name ends it.
        assert page.cells[better]["attributes.`Run Name`"].endswith("hybrid-digits-seed0")
        assert page.cells[worse]["attributes.`Run Name`"].endswith("simple-digits-seed0")
        assert (page.cells[better]["tags.`variant`"] == "hybrid"
                and page.cells[worse]["tags.`variant`"] == "simple[small]")
        assert (page.cells[better]["metrics.`bpd`"].startswith("1.111")
                and page.cells[worse]["metrics.`bpd`"].startswith("1.234"))
        assert (page.cells[better]["metrics.`fid`"].startswith("38.2")
                and page.cells[worse]["metrics.`fid`"].startswith("45.6"))
        assert page.row_index[better] < page.row_index[worse]  # sorted by bpd, the lowest first
        assert old_run not in page.text
        _ctrl_c_stops_everything(proc, port)
    finally:
        _kill_all(proc)
    assert ui.VIEW_TAG in c.get_experiment(exp).tags  # the saved view went on the opened experiment only
    assert ui.VIEW_TAG not in c.get_experiment(older).tags


def test_ui_picks_the_named_experiment_else_the_environments_else_the_newest_run(tmp_path, store_template, monkeypatch):
    c = _store(tmp_path, store_template)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert ui.pick_experiment(c, None) is None  # only the empty Default: the experiments list opens
    assert ui.runs_page(c, None)[0] == "#/experiments"
    now = int(time.time() * 1000)
    a, b = tracking.experiment_id(c, "a"), tracking.experiment_id(c, "b")
    assert ui.pick_experiment(c, None).experiment_id == b  # no runs yet: the newest experiment, never Default
    _bench_run(c, a, "r1", "simple[small]", {"bpd": 2.0}, now)
    _bench_run(c, b, "r2", "simple[small]", {"bpd": 2.0}, now - 10_000)
    assert ui.pick_experiment(c, None).experiment_id == a  # the experiment of the newest run
    assert ui.pick_experiment(c, "b").experiment_id == b
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "b")
    assert ui.pick_experiment(c, None).experiment_id == b
    assert ui.pick_experiment(c, "a").experiment_id == a  # the option wins over the environment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nope")
    with pytest.raises(BenchError, match=r"\$MLFLOW_EXPERIMENT_NAME 'nope': no such experiment .*Default, a, b"):
        ui.pick_experiment(c, None)


def test_ui_refuses_an_unknown_experiment_in_one_line_listing_the_others(tmp_path, store_template, monkeypatch):
    c = _store(tmp_path, store_template)
    tracking.experiment_id(c, "grid-digits")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(cli, ["ui", "--experiment", "grid-digit", "--port", str(_free_port())])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --experiment 'grid-digit': no such experiment in sqlite:///{tmp_path}/mlflow.db; "
        "it has Default, grid-digits"]


def test_the_saved_view_goes_only_on_experiments_holding_bench_runs_and_is_never_replaced(tmp_path, monkeypatch,
                                                                                           store_template):
    c = _store(tmp_path, store_template)
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--variant", "simple", "--steps", "2", "--T", "20", "--fid-samples", "0",
                                      "--final-eval", "estimate", "--final-eval-images", "8", "--sample-steps", "5",
                                      "--no-log-model", "--experiment", "real"])
    assert result.exit_code == 0, result.output
    real = c.get_experiment_by_name("real")
    page, note = ui.runs_page(c, real)  # a run made by `bench run` is recognised as one
    assert note is None and page == (f"#/experiments/{real.experiment_id}/runs?workflowType=machine_learning"
                                     f"&viewStateShareKey={ui.VIEW_KEY}")
    view = json.loads(c.get_experiment(real.experiment_id).tags[ui.VIEW_TAG])
    state = json.loads(view["state"])
    assert view["name"] == ui.VIEW_KEY and state["selectedColumns"] == list(ui.VIEW_COLUMNS)
    assert state["selectedColumns"][1:5] == ["tags.`bpd_rounded`", "metrics.`bpd`", "metrics.`bpd_stderr`",
                                             "tags.`bpd_method`"]  # the bound as read, to every digit, its se, how got
    tags = c.search_runs([real.experiment_id])[0].data.tags
    assert re.fullmatch(r"\d+\.\d{4} ± \d\.\d{4} bits/dim \(estimate\)", tags["bpd_rounded"]), tags["bpd_rounded"]
    assert state["orderByKey"] == "metrics.`bpd`" and state["orderByAsc"] is True

    c.set_experiment_tag(real.experiment_id, ui.VIEW_TAG, "edited by its user")
    assert ui.runs_page(c, c.get_experiment(real.experiment_id))[0] == page
    assert c.get_experiment(real.experiment_id).tags[ui.VIEW_TAG] == "edited by its user"

    theirs = c.create_experiment("theirs")
    run = c.create_run(theirs, tags={"variant": "a/b test"})  # someone else's run, not a bench run
    c.log_metric(run.info.run_id, "accuracy", 0.9)
    page, note = ui.runs_page(c, c.get_experiment(theirs))
    assert page == f"#/experiments/{theirs}/runs?workflowType=machine_learning" and "holds no elbo-bench runs" in note
    assert ui.VIEW_TAG not in c.get_experiment(theirs).tags


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:5000"), ("0.0.0.0", "http://127.0.0.1:5000"),
                                       ("::", "http://[::1]:5000"), ("::1", "http://[::1]:5000"),
                                       ("[::1]", "http://[::1]:5000"), ("localhost", "http://localhost:5000")])
def test_the_printed_address_is_one_a_browser_here_can_open(host, url):
    assert ui.base_url(host, 5000) == url


def test_only_a_graphical_browser_is_started(monkeypatch):
    def returns(browser):
        monkeypatch.setattr(webbrowser, "get", lambda using=None: browser)

    returns(webbrowser.GenericBrowser("lynx"))  # a text browser would take over the terminal bench ui runs in
    assert ui.graphical_browser() is None
    returns(webbrowser.GenericBrowser(["/usr/bin/w3m", "%s"]))
    assert ui.graphical_browser() is None
    firefox = webbrowser.BackgroundBrowser("firefox")
    returns(firefox)
    assert ui.graphical_browser() is firefox

    def none(using=None):
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "get", none)
    assert ui.graphical_browser() is None


# ------------------------------------------------------------------------- bench dashboard
def _study(storage: str, name: str, trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.optimize(lambda t: t.suggest_float("beta_end", 0.01, 0.05) * 100, n_trials=trials)


def test_dashboard_opens_the_page_of_the_study_asked_about(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    storage = f"sqlite:///{home / 'optuna.db'}"
    for name in ("schedule-digits-bpd-simple", "schedule-digits-bpd-hybrid"):
        _study(storage, name, 1)
    served = []
    monkeypatch.setattr(ui, "_serve", lambda cmd, banner, url, *args, **kwargs: served.append(url))
    monkeypatch.setattr(ui, "_dashboard_command", lambda: "optuna-dashboard")
    port = _free_port()
    ok = CliRunner().invoke(cli, ["dashboard", "--port", str(port), "--study-name", "schedule-digits-bpd-hybrid"],
                            env={"BENCH_HOME": str(home)})
    assert ok.exit_code == 0, ok.output
    # as the dashboard numbers its pages
    study_id = optuna.storages.RDBStorage(storage).get_study_id_from_name("schedule-digits-bpd-hybrid")
    assert served == [f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"] and study_id == 2
    bad = CliRunner().invoke(cli, ["dashboard", "--port", str(port), "--study-name", "nope"],
                             env={"BENCH_HOME": str(home)})
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        f"error: --study-name 'nope': no such study in {storage}; it has schedule-digits-bpd-hybrid, "
        "schedule-digits-bpd-simple"], bad.stderr
    assert len(served) == 1


@needs_chromium
@needs_proc
def test_dashboard_shows_the_studies_and_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    _study(f"sqlite:///{home / 'optuna.db'}", "schedule-digits-bpd-simple", 3)  # where `bench study` keeps studies
    port = _free_port()
    proc = _spawn(["dashboard", "--port", str(port), "--no-browser"], _env(home), tmp_path)
    try:
        url = _printed_url(proc)
        assert url == f"http://127.0.0.1:{port}/dashboard/"
        _wait_until_answers(f"http://127.0.0.1:{port}/api/studies", proc, 60)
        page = _Page(_render(url, tmp_path / "chrome"))
        assert "1. schedule-digits-bpd-simple" in page.text and "Direction: MINIMIZE" in page.text, page.text[:2000]
        _ctrl_c_stops_everything(proc, port)
    finally:
        _kill_all(proc)


@pytest.mark.parametrize("storage, message", [
    ("sqlite:///{tmp}/missing/optuna.db", "error: no Optuna storage at {tmp}/missing/optuna.db (no such file); "
                                          "run `bench study` first, or give --storage URL"),
    ("sqlite:///{tmp}/mlflow.db", "error: sqlite:///{tmp}/mlflow.db is not an Optuna storage"),
    ("sqlite:///{tmp}/notes.db", "error: cannot open the Optuna storage sqlite:///{tmp}/notes.db: "),
    ("{tmp}/optuna.db", "error: --storage {tmp}/optuna.db: give an RDB URL such as sqlite:///{tmp}/optuna.db"),
    (None, "error: no Optuna storage at {tmp}/optuna.db (no such file)"),
])
def test_dashboard_refuses_what_is_not_an_optuna_storage_in_one_line_and_creates_nothing(
        tmp_path, store_template, monkeypatch, storage, message):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    (tmp_path / "notes.db").write_text("not a database\n")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = ["dashboard", "--port", str(_free_port())] + (["--storage", storage.format(tmp=tmp_path)] if storage else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
