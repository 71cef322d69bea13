"""``bench ui``: the MLflow UI (``mlflow server``) on the configured store, stopped cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click

from bench import tracking
from bench.errors import BenchError


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(tracking_uri: str | None, host: str, port: int) -> None:
    """Run the server in its own process group until it exits or Ctrl-C / SIGTERM arrives."""
    if not 0 < port < 65536:
        raise BenchError(f"--port must be between 1 and 65535, got {port}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.client(uri)  # the store answers (and a fresh SQLite store gets its tables) before the server starts
    if not _port_free(host, port):
        raise BenchError(f"port {port} on {host} is in use; choose another with --port")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
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
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM, None) and not stop["now"]:
        raise BenchError(f"the MLflow server exited with status {proc.returncode}")
