"""Ctrl-C and SIGTERM during a run: a deferred Ctrl-C ends the step loop between two steps (the state whole, so it
can be checkpointed); under torchrun, SIGTERM (the launcher stopping the ranks) ends the run FAILED with the reason.
Signals reach the main thread only: elsewhere (a run in a worker thread) nothing is installed.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

from bench.runtime.dist import Dist


class Interrupt:
    """Ctrl-C (SIGINT) inside the step loop is deferred to the end of the current iteration, so a
    checkpoint never holds half a step; a second Ctrl-C, or one outside the loop, interrupts at once."""

    def __init__(self):
        self.deferring = False
        self.requested = False

    def _handler(self, signum, frame):
        if self.deferring and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class Interrupted(KeyboardInterrupt):
    """A deferred Ctrl-C, raised between steps: the state is whole and can be checkpointed."""


def stop_requested(interrupt: Interrupt, d: Dist, at_check: bool) -> bool:
    """A deferred Ctrl-C ends the loop between steps; all ranks must stop at the same step, so under
    torchrun they agree on it at logging steps only (no collective in the other steps)."""
    if not d.active:
        return interrupt.requested
    if not at_check:
        return False
    return bool(d.reduce(torch.tensor(int(interrupt.requested)), "max"))


class _Terminated(Exception):  # its name shows in the run's failure_reason tag
    """SIGTERM reached a rank: torchrun stops every rank this way when one of them fails or the job is stopped."""


@contextmanager
def sigterm_fails():
    """Under torchrun, turn SIGTERM into an exception, so the run ends FAILED with the reason (once: a
    second SIGTERM while the run is being closed is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated("SIGTERM: the launcher stopped this rank (another rank failed or exited, or the job was "
                          "stopped); resume from the last checkpoint")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def closing(d: Dist) -> None:
    """The run is being closed: under torchrun a SIGTERM (the launcher stopping the ranks after a failure)
    must not cut the closing short and leave the run RUNNING."""
    if d.active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
