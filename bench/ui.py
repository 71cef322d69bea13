"""``bench ui``: the MLflow UI (``mlflow server``) on the configured store, stopped cleanly on Ctrl-C.

The server runs under a watchdog (``_ui_guard.py``) that stops it and every worker it started when
``bench ui`` goes away, even by SIGKILL, so no orphaned server keeps the port and the store open.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from bench import tracking
from bench.errors import BenchError

GUARD = Path(__file__).with_name("_ui_guard.py")
STOP_WAIT_S = 20  # longer than the guard's own grace for the server, so the guard finishes its stop first


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: localhost, 127.0.0.0/8 or ::1 (an unknown name counts as not)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warn_if_exposed(host: str) -> None:
    """The MLflow UI has no authentication: anyone who can reach the port can read and change every run."""
    if not is_loopback(host):
        click.echo(f"warning: --host {host} exposes the MLflow UI beyond this machine, and it has no "
                   "authentication: anyone who reaches the port can read, change and delete runs", err=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(tracking_uri: str | None, host: str, port: int, experiment: str | None = None, open_browser: bool = False) -> None:
    """Run the server in its own session, under the guard, until it exits or Ctrl-C / SIGTERM arrives."""
    _warn_if_exposed(host)
    if not 0 < port < 65536:
        raise BenchError(f"--port must be between 1 and 65535, got {port}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.client(uri)  # the store answers (and a fresh SQLite store gets its tables) before the server starts
    if not _port_free(host, port):
        raise BenchError(f"port {port} on {host} is in use; choose another with --port")
    cmd = [sys.executable, str(GUARD), str(os.getpid()), "--",
           sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    stop = {"now": False}

    def on_term(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, on_term)
    click.echo(f"MLflow UI for {uri}: http://{host}:{port}  (Ctrl-C stops it)")
    try:
        while proc.poll() is None and not stop["now"]:
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
    if proc.returncode not in (0, -signal.SIGTERM, None) and not stop["now"]:
        raise BenchError(f"the MLflow server exited with status {proc.returncode}")


def serve_dashboard(storage: str | None, host: str, port: int, open_browser: bool = False) -> None:
    """optuna-dashboard on the studies' storage (not written yet)."""
    raise BenchError("bench dashboard is not available yet")
