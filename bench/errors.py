"""The one exception type the suite raises for bad input.

The CLI turns a ``BenchError`` into a single line on stderr and a non-zero exit; library callers
catch it like any ``ValueError``.
"""


class BenchError(ValueError):
    """Bad input or an unavailable resource; the message says what was wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none (errors are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
