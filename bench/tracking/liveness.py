"""Who owns a RUNNING run, and whether it is still alive.

A process that owns a RUNNING run tags it with its host, pid, start time, boot id and PID namespace
(:func:`owner_tags`) and refreshes ``owner.heartbeat`` while it runs (:func:`heartbeat`); a later command
closes the runs whose owner is gone as KILLED (:func:`close_dead_runs`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

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
    return {"owner.boot": _read("/proc/sys/kernel/random/boot_id"),
            "owner.pidns": _read("/proc/self/ns/pid", link=True)}


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
    from mlflow.entities import RunTag, ViewType  # heavy: mlflow loads only where a store is open

    closed = []
    runs = c.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'",
                         run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
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
