"""Progress of the long loops (training, the bound, sampling, the ODE likelihood, FID), one way for all of them.

On a terminal a tqdm bar, as ``bench study`` shows its trials. Off one (a log file, CI: stderr is not a
tty) no bar, whose every update would be kept, joined by carriage returns: a line when the phase starts, a
line at each quarter of it and one when it ends, each with the count, the time so far and the time left. A
pause (a training-time evaluation) is announced, and its time is left out of the rate, so the time left stays
what the loop itself still needs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

QUARTERS = 4  # off a terminal: a line at each quarter of a phase


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr is a tty): bars there, a few lines elsewhere."""
    return sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    """``42s``, ``7m38s``, ``1h02m``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plural(unit: str, n: int = 2) -> str:
    """``unit`` for a count of ``n``: ``1 batch``, ``2 batches``, ``3 images``."""
    return unit if n == 1 else unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def say(line: str, show: bool = True) -> None:
    """One line on stderr, above any bar that is showing (nothing when not ``show``)."""
    if show:
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()


class Progress:
    """A phase of ``total`` units (steps, images, batches): a bar on a terminal, else a few lines (module
    docstring); nothing when not ``show``. ``initial``: units already done (a resumed run)."""

    def __init__(self, total: int, desc: str, unit: str, show: bool = True, initial: int = 0):
        self.total, self.desc, self.unit, self.show = total, desc, unit, show
        self.n = self._start_n = initial
        self.postfix = ""
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) \
            if show and on_terminal() else None
        self._lines = show and self._bar is None
        self._started = time.monotonic()
        self._paused = 0.0  # seconds of pauses, left out of the rate
        self._pauses = 0
        self.pauses_left = 0  # pauses still to come (set by the loop): the time left counts them at their mean
        self._next = self._quarter_after(initial)
        self._closed = False
        if self._lines:
            done = f", from {initial}" if initial else ""
            say(f"{desc}: {total} {plural(unit, total)}{done}")

    def _quarter_after(self, n: int) -> int:
        """The next count at which a line is due: the first quarter mark above ``n``."""
        for q in range(1, QUARTERS):
            mark = -(-self.total * q // QUARTERS)
            if mark > n:
                return mark
        return self.total + 1  # only the end's line is left

    def _elapsed(self) -> float:
        return time.monotonic() - self._started - self._paused

    def _status(self) -> str:
        elapsed, done = self._elapsed(), self.n - self._start_n
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        left = ""
        if 0 < done and self.n < self.total:
            pauses = self.pauses_left * self._paused / self._pauses if self._pauses else 0.0
            left = f", about {format_duration(elapsed / done * (self.total - self.n) + pauses)} left"
        postfix = f"; {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {plural(self.unit, self.total)}{pct}, "
                f"{format_duration(elapsed)}{left}{postfix}")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and self._next <= self.n < self.total:
            say(self._status())
            self._next = self._quarter_after(self.n)

    def set_postfix(self, **values) -> None:
        """What the next line (or the bar) shows after the count, e.g. ``loss=0.0712``."""
        self.set_postfix_str(", ".join(f"{k} {v}" for k, v in values.items()))

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        """A line above the bar (or among the lines)."""
        say(line, self.show)

    @contextmanager
    def paused(self, line: str):
        """The phase waits on something else (``line`` says what): said, and its time left out of the rate
        and the time left, on the bar as in the lines."""
        self.write(line)
        start = time.monotonic()
        try:
            yield
        finally:
            self._paused += time.monotonic() - start
            self._pauses += 1
            if self._bar is not None:
                self._bar.unpause()  # tqdm's clock restarts: no rate or ETA from a frozen stretch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            elapsed, done = self._elapsed(), self.n - self._start_n
            rate = f" ({done / elapsed:.3g} {plural(self.unit)}/s)" if done and elapsed > 0 else ""
            paused = f", and {format_duration(self._paused)} paused" if self._pauses else ""
            ended = "done" if self.n >= self.total else f"stopped at {self.n}/{self.total}"
            postfix = f"; {self.postfix}" if self.postfix else ""
            say(f"{self.desc}: {ended}, {done} {plural(self.unit, done)} "
                f"in {format_duration(elapsed)}{rate}{paused}{postfix}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_of(items: Iterable, total: int, desc: str, unit: str, show: bool = True, weight=None) -> Iterator:
    """``items``, counted as a :class:`Progress` phase of ``total`` units; ``weight(item)``: the units one item
    is worth (default 1)."""
    with Progress(total, desc, unit, show) as p:
        for item in items:
            yield item
            p.update(1 if weight is None else weight(item))
