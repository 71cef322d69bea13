"""`bench ui`: the server dies with `bench ui` even when that is SIGKILLed, and a non-loopback --host warns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

import bench.ui as ui
from bench.cli import cli

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
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.read().decode().strip() == "OK":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"bench ui did not answer /health (exit status {proc.poll()})")
        time.sleep(0.5)


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
        for pid in [proc.pid, *tree]:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=10)


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
