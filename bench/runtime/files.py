"""Files written atomically: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from bench.errors import BenchError


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``algorithm``: sha256, or md5 where a publisher gives only that), read in
    pieces, not whole into memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def write_atomically(path: str | Path, write) -> Path:
    """Create ``path`` (and its folder) through a temp file ``.<name>.<pid>.<random>.tmp`` beside it, flushed
    to disk and renamed into place, so a reader sees the old file or the whole new one. ``write(f)`` fills
    the binary file. A full disk (or quota) is refused in one line naming the path and the space left; the
    old file stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BenchError(f"cannot write {path}: {os.strerror(err.errno).lower()} ({_free_space(path.parent)} free "
                             f"there); free some space{' (the previous file is intact)' if path.exists() else ''}, "
                             "then resume") from None
        raise
    return path


def _free_space(folder: Path) -> str:
    """The space left to unprivileged writers on ``folder``'s file system, in words."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    unit = next((u for u, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if free >= size), "bytes")
    return f"{free:,} bytes" if unit == "bytes" else f"{free / dict(GB=1e9, MB=1e6, kB=1e3)[unit]:.1f} {unit}"
