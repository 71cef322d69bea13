"""The one exception type the suite raises for bad input.

The CLI turns a ``BenchError`` into a single line on stderr and a non-zero exit; library callers
catch it like any ``ValueError``.
"""


class BenchError(ValueError):
    """Bad input or an unavailable resource; the message says what was wrong and what to do."""
