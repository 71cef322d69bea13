"""Studies across machines on PostgreSQL: the advisory locks (bench.runtime.locks.store_lock), MLflow's tables
created once by concurrent clients, eight `bench study` processes sharing one study through PostgreSQL
and a `bench server` MLflow server, and a worker killed mid-trial whose trial another worker retries.

Everything runs against a throwaway cluster on 127.0.0.1 (the ``postgres`` fixture, tests/postgres.py),
one fresh database per store; the tests skip where no PostgreSQL server programs are installed. Each
`bench study` process has its own BENCH_HOME, as on separate machines: they share only the two URLs.
Trials are tiny (digits, 4 optimiser steps of 16 images, T in {20, 40}).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from postgres import free_port

from bench.tracking import store as tracking

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "elbo-bench-studies"
TINY_TRIAL = ["--batch-size", "16", "--eval-images", "8", "--eval-calls", "3", "--sample-grid", "4",
              "--sample-steps", "10", "--fid-samples", "2", "--log-every", "2", "--no-log-model"]
DONE = {TrialState.COMPLETE, TrialState.PRUNED}
KILLED_STEPS = 150  # long enough a trial to be killed in the middle
HOLDER = """\
import json, os, sys, time
from bench.runtime.locks import store_lock
url, go, hold, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
open(out + ".ready", "w").close()
while not os.path.exists(go):  # everything is imported: all holders ask at the same moment
    time.sleep(0.01)
asked = time.time()
with store_lock(url, "x"):
    entered = time.time()
    open(out + ".held", "w").close()
    time.sleep(hold)
    left = time.time()
with open(out, "w") as f:
    json.dump({"asked": asked, "entered": entered, "left": left}, f)
"""
STORE_CLIENT = """\
import os, sys, time
from bench.tracking import store as tracking
url, go = sys.argv[1], sys.argv[2]
open(go + "." + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
c = tracking.client(url)
print(len(c.search_experiments()))
"""


def env(home: Path | None = None) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "BENCH_DATA_DIR"):
        e.pop(var, None)
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        e["BENCH_HOME"] = str(home)
    return e


def python(code: str, *args, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def bench(args: list, home: Path, log: Path) -> subprocess.Popen:
    """``bench <args>`` as a separate process with its own BENCH_HOME; stdout and stderr into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "bench", *map(str, args)], env=env(home), cwd=home,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def tail(log: Path, n: int = 4000) -> str:
    return f"--- {log.name}\n{log.read_text()[-n:]}"


def wait_all(procs: list[subprocess.Popen], deadline: float) -> None:
    """Wait for every process until ``deadline`` (monotonic); kill what is left then."""
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def wait_for(what: str, check, seconds: float, interval: float = 0.2, alive: subprocess.Popen | None = None):
    """Poll ``check()`` until it returns something truthy (returned); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:.0f} s")
        time.sleep(interval)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count, a listener does
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def study_table(postgres, url: str) -> list[tuple]:
    """(number, state) of every trial in the Optuna storage at ``url``, read with SQL (cheap to poll)."""
    try:
        return postgres.execute("SELECT number, state FROM trials ORDER BY number", url.rsplit("/", 1)[1])
    except Exception:  # noqa: BLE001 - the tables do not exist yet
        return []


# ----------------------------------------------------------------------------- store_lock
def test_store_lock_serialises_processes_on_postgresql(postgres, tmp_path):
    url = postgres.create_database()
    go, outs = tmp_path / "go", [tmp_path / f"holder{i}.json" for i in range(2)]
    procs = [python(HOLDER, url, go, 0.5, out, log=out.with_suffix(".log")) for out in outs]
    try:
        wait_for("both holders ready", lambda: all(Path(f"{o}.ready").exists() for o in outs), 60)
        go.touch()
        wait_all(procs, time.monotonic() + 60)
    finally:
        wait_all(procs, time.monotonic())
    for p, out in zip(procs, outs):
        assert p.returncode == 0, tail(out.with_suffix(".log"))
    first, second = sorted((json.loads(o.read_text()) for o in outs), key=lambda r: r["entered"])
    assert second["asked"] < first["left"]  # they did contend: the second asked while the first held it
    assert second["entered"] >= first["left"]  # and it waited until the first let go
    assert second["entered"] - second["asked"] > 0.3


def another_spelling(url: str) -> str:
    """The same database as ``url`` (postgresql://bench@127.0.0.1:PORT/DB) spelled otherwise: driver, a password
    (trust authentication ignores it), host alias and a query."""
    port_db = url.split("@127.0.0.1:", 1)[1]
    return f"postgresql+psycopg://bench:pw@LOCALHOST:{port_db}?connect_timeout=20"


@pytest.mark.parametrize("spelling", ["the same", "another"])
def test_a_killed_holder_releases_its_store_lock(postgres, tmp_path, spelling):
    """The waiter asks for the lock through the holder's URL, or through another spelling of the same database."""
    url = postgres.create_database()
    holder_out, waiter_out = tmp_path / "holder.json", tmp_path / "waiter.json"
    holder = python(HOLDER, url, tmp_path / "go-holder", 600, holder_out, log=tmp_path / "holder.log")
    waiter_url = url if spelling == "the same" else another_spelling(url)
    waiter = python(HOLDER, waiter_url, tmp_path / "go-waiter", 0, waiter_out, log=tmp_path / "waiter.log")
    try:
        (tmp_path / "go-holder").touch()
        wait_for("the holder holds the lock", lambda: Path(f"{holder_out}.held").exists(), 60, alive=holder)
        (tmp_path / "go-waiter").touch()  # only now: the waiter must not be the first to take it
        locks = "SELECT granted FROM pg_locks WHERE locktype = 'advisory' ORDER BY granted DESC"
        assert wait_for("the waiter blocks on the server", lambda: postgres.execute(locks) == [(True,), (False,)], 60,
                        alive=waiter)
        time.sleep(0.5)
        assert waiter.poll() is None and not waiter_out.exists()
        killed_at = time.time()
        holder.send_signal(signal.SIGKILL)
        waiter.wait(timeout=30)  # the server ends the dead session, and its lock with it
    finally:
        wait_all([holder, waiter], time.monotonic())
    assert holder.returncode == -signal.SIGKILL
    assert waiter.returncode == 0, tail(tmp_path / "waiter.log")
    assert json.loads(waiter_out.read_text())["entered"] >= killed_at
    assert postgres.execute(locks) == []


def test_a_grid_pair_claimed_by_another_session_is_busy_until_released(postgres):
    """`bench grid`'s claims on a PostgreSQL store: advisory locks, tried without waiting."""
    from dataclasses import replace

    from bench.runtime.locks import LockBusy
    from bench.training.config import make_config
    from bench.training.grid import claim

    pair = make_config(variant="simple", seed=0, tracking_uri=postgres.create_database())
    with claim(pair):  # one session holds it …
        with pytest.raises(LockBusy), claim(pair):  # … another is refused at once
            pass
        with claim(replace(pair, seed=1)):  # another pair is free
            pass
    with claim(pair):  # released
        pass


# ----------------------------------------------------------------------------- a password in the URL
SECRET = "s3cretpw"  # trust authentication: the server ignores it, so it can be any word
TINY_RUN = ["--T", "40", "--batch-size", "16", "--log-every", "2", "--eval-every", "0", "--checkpoint-every", "2",
            "--final-eval", "estimate", "--final-eval-images", "8", "--eval-calls", "3", "--sample-grid", "4",
            "--sample-steps", "10", "--fid-samples", "0", "--no-system-metrics", "--no-log-model", "--experiment", "pw"]


def run_bench(args: list, home: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], env={**env(home), **(extra_env or {})},
                          cwd=home, capture_output=True, text=True, timeout=300)


def test_a_password_in_the_tracking_uri_is_never_shown_or_stored_and_resume_asks_for_it(postgres, tmp_path):
    url = postgres.create_database()
    secret_url = url.replace("bench@", f"bench:{SECRET}@")
    shown = url.replace("bench@", "bench:***@")
    home = tmp_path / "home"
    done = run_bench(["run", "--tracking-uri", secret_url, "--steps", "4", *TINY_RUN], home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr and f"tracking store: {shown}" in done.stdout
    c = MlflowClient(url)
    [run] = c.search_runs([c.get_experiment_by_name("pw").experiment_id])
    assert run.data.params["config.tracking_uri"] == shown
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v]
    config_json = Path(c.download_artifacts(run.info.run_id, "config.json", str(tmp_path)))
    assert json.loads(config_json.read_text())["tracking_uri"] == shown
    [ckpt] = (home / "checkpoints").glob("*/last.pt")
    assert SECRET.encode() not in ckpt.read_bytes()
    # the checkpoint cannot connect by itself: the password is asked for, in one line, and nothing is changed
    refused = run_bench(["run", "--resume", ckpt, "--reopen", "--steps", "6"], home)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "recorded without its password" in refused.stderr
    assert c.get_run(run.info.run_id).info.status == "FINISHED"
    resumed = run_bench(["run", "--resume", ckpt, "--reopen", "--steps", "6", "--tracking-uri", secret_url], home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = run_bench(["run", "--resume", ckpt, "--reopen", "--steps", "8"], home, {"MLFLOW_TRACKING_URI": secret_url})
    assert again.returncode == 0, again.stderr[-3000:]
    assert SECRET not in resumed.stdout + resumed.stderr + again.stdout + again.stderr
    assert c.get_run(run.info.run_id).info.status == "FINISHED"
    assert max(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == 8


def cmdlines(root: int) -> list[str]:
    """The command lines of the descendants of ``root`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - tree
        tree |= frontier
    lines = []
    for pid in tree - {root}:
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return lines


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads command lines from /proc (Linux)")
@pytest.mark.parametrize("command, option", [("server", "--backend-store-uri"), ("ui", "--tracking-uri")])
def test_a_password_never_reaches_the_servers_command_line(postgres, tmp_path, command, option):
    url = postgres.create_database()
    secret_url = url.replace("bench@", f"bench:{SECRET}@")
    port, home = free_port(), tmp_path / "home"
    log = tmp_path / "server.log"
    extra = ["--no-browser"] if command == "ui" else ["--workers", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench", command, option, secret_url, "--port", str(port),
                                 *extra],
                                env=env(home), cwd=home, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        wait_for("the server answers", lambda: answers(f"http://127.0.0.1:{port}/health"), 120, alive=proc)
        lines = cmdlines(proc.pid)  # bench's own shows what it was given (MLFLOW_TRACKING_URI keeps it off there too)
        assert any(" mlflow server" in line or "uvicorn" in line for line in lines), lines
        assert not [line for line in lines if SECRET in line]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        wait_all([proc], time.monotonic() + 30)
    printed = log.read_text()
    assert SECRET not in printed and "bench:***@127.0.0.1" in printed, printed[-2000:]


# ----------------------------------------------------------------------------- MLflow's tables
def mlflow_tables(postgres, url: str) -> set[str]:
    rows = postgres.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", url.rsplit("/", 1)[1])
    return {r[0] for r in rows}


def test_mlflow_client_creates_its_tables_in_a_fresh_database(postgres):
    url = postgres.create_database()
    assert mlflow_tables(postgres, url) == set()
    c = tracking.client(url)
    assert {"experiments", "runs", "metrics", "params", "tags", "alembic_version"} <= mlflow_tables(postgres, url)
    assert [e.name for e in c.search_experiments()] == ["Default"]
    run = c.create_run(tracking.experiment_id(c, "pg"))
    c.log_metric(run.info.run_id, "bpd", 3.25, step=1)
    assert tracking.client(url).get_run(run.info.run_id).data.metrics == {"bpd": 3.25}


@pytest.mark.slow
def test_four_processes_create_mlflow_tables_at_once(postgres, tmp_path):
    reference, url = postgres.create_database(), postgres.create_database()
    tracking.client(reference)
    go = tmp_path / "go"
    procs = [python(STORE_CLIENT, url, go, log=tmp_path / f"client{i}.log") for i in range(4)]
    try:
        wait_for("4 clients ready", lambda: len(list(tmp_path.glob("go.*"))) == 4, 60)
        go.touch()
        wait_all(procs, time.monotonic() + 120)
    finally:
        wait_all(procs, time.monotonic())
    for i, p in enumerate(procs):
        assert p.returncode == 0, tail(tmp_path / f"client{i}.log")
        assert (tmp_path / f"client{i}.log").read_text().split()[-1] == "1"  # the Default experiment, once
    version = "SELECT version_num FROM alembic_version"
    assert postgres.execute(version, url.rsplit("/", 1)[1]) == postgres.execute(version, reference.rsplit("/", 1)[1])
    assert mlflow_tables(postgres, url) == mlflow_tables(postgres, reference)
    assert postgres.execute("SELECT name FROM experiments", url.rsplit("/", 1)[1]) == [("Default",)]


# ----------------------------------------------------------------------------- studies across processes
@pytest.fixture
def small_t_space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text("[params.T]\nchoices = [20, 40]\n")
    return path


def start_server(postgres, tmp_path) -> tuple[subprocess.Popen, int, Path]:
    """`bench server` on a fresh PostgreSQL database, artifacts in tmp_path; returns once /health answers."""
    port, log = free_port(), tmp_path / "server.log"
    proc = bench(["server", "--backend-store-uri", postgres.create_database("mlflow"), "--port", port,
                  "--artifacts-destination", tmp_path / "artifacts", "--workers", 2], tmp_path / "server-home", log)
    try:
        wait_for("the MLflow server answers /health", lambda: answers(f"http://127.0.0.1:{port}/health"), 90, 0.5,
                 alive=proc)
    except BaseException:
        stop(proc)
        print(tail(log))
        raise
    return proc, port, log


def stop(proc: subprocess.Popen, seconds: float = 40) -> int | None:
    """SIGTERM ``proc`` and wait for it: its exit status, or None when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        return None


def mlflow_runs(client, study: str) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "the studies' experiment was never created"
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("optuna.study") == study]


def check_runs(client, study, trials) -> tuple[object, list]:
    """One parent run FINISHED; one child run per trial, none RUNNING; returns (parent, children)."""
    runs = mlflow_runs(client, study.study_name)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(r.info.run_id, r.info.status) for r in parents]
    [parent] = parents
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # every other run of the study hangs under the parent
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in trials)
    by_id = {r.info.run_id: r for r in children}
    by_number = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in trials:
        if t.state in DONE:  # a killed worker's trial never got to record its run's id
            assert by_id[t.user_attrs["mlflow_run_id"]] is by_number[t.number]
        assert by_number[t.number].info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED"), t.number
    assert not [r.info.run_id for r in children if r.info.status == "RUNNING"]
    return parent, children


def counts(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.slow
def test_eight_processes_share_one_study_through_postgresql_and_bench_server(postgres, tmp_path, small_t_space):
    from mlflow.tracking import MlflowClient

    storage, name, n = postgres.create_database("optuna"), "pg8", 8
    server, port, server_log = start_server(postgres, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    logs = [tmp_path / f"worker{i}.log" for i in range(8)]
    args = ["study", "--workers", 1, "--study-name", name, "--storage", storage, "--tracking-uri", uri,
            "--trials", n, "--space", small_t_space, "--heartbeat", 5, "--exact-top", 1, "--steps", 4, *TINY_TRIAL]
    try:
        start = time.monotonic()
        procs = [bench(args, tmp_path / f"home{i}", log) for i, log in enumerate(logs)]  # as on 8 machines
        wait_all(procs, start + 420)
        wall = time.monotonic() - start
        codes = [p.returncode for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, f"exit codes {codes}\n" + tail(log) + "\n" + tail(server_log, 2000)

        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.trials
        assert sorted(t.number for t in trials) == list(range(n)), counts(trials)
        assert {t.state for t in trials} <= DONE, counts(trials)
        run_ids = [t.user_attrs.get("mlflow_run_id") for t in trials]
        assert None not in run_ids and len(set(run_ids)) == n
        parent, children = check_runs(MlflowClient(tracking_uri=uri), study, trials)
        statuses = {s: sum(r.info.status == s for r in children) for s in {r.info.status for r in children}}
        # finished once: one process recorded the study and closed its parent run, the others saw it done
        finisher = parent.data.tags.get("finished_by", "")
        assert study.user_attrs["finished"]["by"] == finisher and study.user_attrs["finished"]["trials"] == n
        assert sum(finisher.endswith(f":{p.pid}") for p in procs) == 1, finisher
        saw_done = [log for log in logs if "recorded it and closed its parent run" in log.read_text()]
        assert len(saw_done) == 7, [tail(log, 500) for log in logs]
        status = subprocess.run([sys.executable, "-m", "bench", "study", "--status", name, "--storage", storage],
                                env=env(tmp_path / "status-home"), capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        assert f"trials: {n} (" in status.stdout and "workers alive: 0" in status.stdout, status.stdout
        assert f"finished: by {finisher} at " in status.stdout, status.stdout
        print(f"\n8 processes, {n} trials: {counts(trials)}; MLflow: parent {parent.info.status}, "
              f"{len(children)} child runs {statuses}, finished by {finisher}; exit codes {codes}; wall {wall:.0f} s")
    finally:
        code = stop(server)
    assert code == 0, tail(server_log)
    assert wait_for(f"port {port} free after the server stopped", lambda: port_free(port), 15)


def running_trial_owner(postgres, storage: str, mlflow_db: str, study: str, pids: set[int]) -> tuple[int, int] | None:
    """(trial number, pid) of a RUNNING trial whose MLflow run is RUNNING in one of ``pids``, read from the
    two databases with SQL; None when there is none (yet)."""
    running = {n for n, state in study_table(postgres, storage) if state == "RUNNING"}
    if not running:
        return None
    try:
        rows = postgres.execute(
            "SELECT t.value, p.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'optuna.trial' "
            "JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'optuna.study' AND s.value = %s "
            "JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'owner.pid' WHERE r.status = 'RUNNING'",
            mlflow_db.rsplit("/", 1)[1], (study,))
    except Exception:  # noqa: BLE001 - MLflow's tables are not there yet
        return None
    for number, pid in rows:
        if int(number) in running and int(pid) in pids:
            return int(number), int(pid)
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_by_the_survivor(postgres, tmp_path, small_t_space):
    from mlflow.tracking import MlflowClient

    storage, mlflow_db, name, n = postgres.create_database("optuna_k"), postgres.create_database("mlflow_k"), "pgk", 4
    args = ["study", "--workers", 1, "--study-name", name, "--storage", storage, "--tracking-uri", mlflow_db,
            "--trials", n, "--space", small_t_space, "--heartbeat", 2, "--exact-top", 0,
            "--steps", KILLED_STEPS, *TINY_TRIAL]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [bench(args, tmp_path / f"home{i}", log) for i, log in enumerate(logs)]
    by_pid = {p.pid: (p, log) for p, log in zip(procs, logs)}
    try:
        number, pid = wait_for("a RUNNING trial with its MLflow run",
                               lambda: running_trial_owner(postgres, storage, mlflow_db, name, set(by_pid)), 180, 0.1)
        victim, _ = by_pid.pop(pid)
        victim.send_signal(signal.SIGKILL)
        [(survivor, survivor_log)] = by_pid.values()
        wait_all([victim, survivor], time.monotonic() + 300)
    finally:
        wait_all(procs, time.monotonic())
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, tail(survivor_log)

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials
    killed = trials[number]
    assert killed.state == TrialState.FAIL, counts(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]
    assert len(retries) == 1 and retries[0].state in DONE, counts(trials)
    assert retries[0].params == killed.params
    others = [t for t in trials if t.number != number]
    assert [t.state in DONE for t in others] == [True] * len(others), counts(trials)
    assert len(others) == n, f"{counts(trials)}: {n} finished trials besides the killed one"
    client = MlflowClient(tracking_uri=mlflow_db)
    runs = mlflow_runs(client, name)
    [dead] = [r for r in runs if r.data.tags.get("optuna.trial") == str(number)]
    # closed by the survivor
    assert dead.info.status == "KILLED" and dead.data.tags.get("killed_reason"), dead.data.tags
    check_runs(client, study, trials)
    print(f"\nkilled worker {pid} in trial {number}; trials {counts(trials)}; retry: trial {retries[0].number} "
          f"{retries[0].state.name}; killed trial's run {dead.info.status} ({dead.data.tags['killed_reason']})")
