"""The one exception type the suite raises for bad input, and the two ways it is raised over and over.

The CLI turns a ``BenchError`` into a single line on stderr and a non-zero exit; library callers
catch it like any ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager


class BenchError(ValueError):
    """Bad input or an unavailable resource; the message says what was wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none (errors are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_choice(what: str, value, choices: Collection[str], *, field: bool = False) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (named in the order given):
    ``unknown dataset 'x'; choose one of: cifar10, digits``, or for a setting (``field``)
    ``schedule must be one of linear, cosine, got 'x'``."""
    if value not in choices:
        if field:
            raise BenchError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
        raise BenchError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


@contextmanager
def reraised(describe: Callable[[Exception], str], *kinds: type[Exception], chain: bool = False) -> Iterator[None]:
    """Within the block, an exception of ``kinds`` becomes ``BenchError(describe(err))`` (chained to it only
    with ``chain``: a traceback then shows the cause); a BenchError raised there passes unchanged."""
    try:
        yield
    except BenchError:
        raise
    except kinds as err:
        raise BenchError(describe(err)) from (err if chain else None)
