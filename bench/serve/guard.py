"""A watchdog between ``bench ui`` (or ``bench dashboard``) and its server, so the server dies with the command.

``bench ui`` stops the server itself on Ctrl-C and SIGTERM, but a SIGKILL (or a crash) of ``bench ui``
runs no cleanup, and ``mlflow server`` plus the uvicorn workers it starts would keep serving (as would
optuna-dashboard). This script is started as ``python guard.py PARENT_PID [--pid-fd FD] -- COMMAND...``; it runs
COMMAND in a new session (writing its process group id to FD when given) and, when its parent dies (PR_SET_PDEATHSIG on
Linux; polling ``os.getppid()`` everywhere) or it is asked to stop (SIGTERM, SIGINT, SIGHUP), stops COMMAND's whole
process group.
Should the guard itself be killed (SIGKILL, which it cannot catch), ``bench ui`` stops COMMAND's group
in its place (it learnt the group's id through FD), and COMMAND gets SIGTERM from Linux as well
(PR_SET_PDEATHSIG, set in COMMAND's process before it starts; for when ``bench ui`` died too), which
``mlflow server`` passes on to its uvicorn workers and optuna-dashboard's wsgiref server obeys.

It runs as a plain script (not ``-m bench.serve.guard``): importing the ``bench`` package loads torch,
which would delay the server by seconds for nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2  # how soon a dead parent is noticed where PR_SET_PDEATHSIG is unavailable
GRACE_S = 10.0  # how long the server may take to exit on SIGTERM before its group is killed
PR_SET_PDEATHSIG = 1


def _signal_on_parent_death(signum: int) -> None:
    """Ask Linux to send ``signum`` when our parent dies, so the stop starts at once instead of at the next poll."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass


def _dies_with(guard: int):
    """For ``preexec_fn``: in the server's process, before it runs the command, ask Linux to send it SIGTERM
    when the guard (pid ``guard``) dies; a guard already gone by then (it died in between) ends it at once."""

    def arm() -> None:
        _signal_on_parent_death(signal.SIGTERM)
        if os.getppid() != guard:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _exited(pid: int) -> bool:
    """Whether the child exited, without reaping it: while it is an unreaped zombie its pid (and so its
    process group id) cannot be reused, so ``killpg`` on it can only reach processes it started."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(child: subprocess.Popen) -> None:
    """SIGTERM the server's group, give it GRACE_S, then SIGKILL whatever of the group is left (workers included)."""
    if not _exited(child.pid):
        _killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while not _exited(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    _killpg(child.pid, signal.SIGKILL)  # the leader is dead or unreaped, so the group id is still its own
    child.wait()


def main(argv: list[str]) -> int:
    """Run the command until it exits, our parent dies, or we are told to stop; 0 when stopped on purpose."""
    pid_fd = None
    if len(argv) > 3 and argv[1] == "--pid-fd" and argv[2].isdigit():
        pid_fd, argv = int(argv[2]), [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: guard.py PARENT_PID [--pid-fd FD] -- COMMAND...", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _frame: stop.append(s))
    _signal_on_parent_death(signal.SIGTERM)
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_dies_with(os.getpid()))
    if pid_fd is not None:
        with os.fdopen(pid_fd, "w") as report:
            report.write(f"{child.pid}\n")
    try:
        while not stop and os.getppid() == parent and not _exited(child.pid):
            time.sleep(POLL_S)
    finally:
        _stop_group(child)
    if stop or os.getppid() != parent:
        return 0
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
