"""The machine's cores, shared by every elbo-bench process working on it at the same time.

Two processes that each run one OpenMP thread per core on the same cores were measured 100× slower
than one (the threads spin against each other). So every process that trains or evaluates registers
in a per-user folder of the temp directory (a lock file it holds while it lives; the kernel releases
the lock when the process dies, even by SIGKILL) and sets its torch threads to
cores ÷ (registered live processes). It looks again at every logging step, so a grid started beside a
study, study workers, or the ranks of a job split the cores between them, and a process that is left
alone grows back. A user's ``OMP_NUM_THREADS`` is their choice: such a process is counted by the
others but changes nothing of its own.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch

PENDING = ".pending"  # suffix of an entry while it is being registered (not yet counted)
ABANDONED_AFTER = 60  # seconds after which a pending entry is a killed process's


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def registry() -> Path:
    return Path(tempfile.gettempdir()) / f"elbo-bench-cores-{os.getuid()}"


class CoreShare:
    """``with CoreShare() as cores:`` registers this process for the block; ``cores.apply()`` sets its
    threads to its current share (and returns the count in effect)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else registry()
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> CoreShare:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # locked under a name no one counts, then renamed into place: an entry created where the others
        # look would be free of any lock for a moment, and taken for a dead process's and unlinked
        pending = self.folder / f".{name}{PENDING}"
        self._fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = self.folder / f"{name}.lock"
        os.rename(pending, self.path)
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def live(self) -> int:
        """Registered processes that are alive, this one included; entries of dead ones are removed."""
        count = 0
        for entry in self.folder.glob("*.lock"):
            if entry == self.path:
                count += 1
                continue
            try:
                fd = os.open(entry, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                entry.unlink(missing_ok=True)  # its holder is gone: an entry of ours, left by a killed process
            except BlockingIOError:
                count += 1
            finally:
                os.close(fd)
        self._remove_abandoned()
        return max(count, 1)

    def _remove_abandoned(self) -> None:
        """Remove the pending entries of processes killed while registering (between creating and renaming
        one: microseconds, so an entry still pending after ABANDONED_AFTER seconds is a dead process's)."""
        for entry in self.folder.glob(f".*{PENDING}"):
            try:
                if time.time() - entry.stat().st_mtime > ABANDONED_AFTER:
                    entry.unlink()
            except FileNotFoundError:  # another process removed it first
                continue

    def apply(self) -> int:
        """Take this process's share of the cores now (unless ``OMP_NUM_THREADS`` is set)."""
        if "OMP_NUM_THREADS" not in os.environ:
            want = max(1, cpu_count() // self.live())
            if want != torch.get_num_threads():
                torch.set_num_threads(want)
        return torch.get_num_threads()
