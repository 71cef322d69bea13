"""Checkpoints: written atomically (temp file + rename), read back with a clear error when damaged.

A run's folder ``checkpoints/<run id>/`` is claimed by the one process training that run (a lock
file, released by the kernel when the process dies). A writer killed mid-save leaves its temp file
``.last.pt.<pid>.<random>.tmp``; whoever next claims a run folder removes such files from its own folder
and from every other run folder that no live process holds, so a run killed during its first save (which
nothing will resume) does not keep its half-written file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from bench.errors import BenchError, first_line
from bench.runtime.files import write_atomically
from bench.runtime.locks import LockBusy, file_lock
from bench.training.config import FIELD_NAMES

FORMAT = "elbo-bench-checkpoint-1"
REQUIRED = ("format", "config", "step", "model", "ema", "optimizer", "rng", "run_id", "tracking_uri")
# the temp names write_atomically gives a checkpoint
# (.last.pt.<pid>.<random>.tmp; before the pid: .last.pt.<random>.tmp)
OUR_TEMP = re.compile(r"\.[^/]+\.pt\.(\d+\.)?\w+\.tmp")
# how long a claim waits for a run folder's lock (another claimant's sweep holds it for an instant)
CLAIM_PATIENCE_S = 1.0


@contextmanager
def claim_run_dir(folder: str | Path, run_id: str) -> Iterator[Path]:
    """Hold the run's checkpoint folder for the ``with`` block: a second process training or resuming
    the same run is refused in one line. Temp files of writers that died mid-save are removed, here and
    in the other run folders beside it that no live process holds."""
    folder = Path(folder)
    with _patient_lock(folder / ".lock", f"run {run_id} (its checkpoints in {folder})"):
        _remove_temp_files(folder)  # ours now: any temp file in it is a dead writer's
        _sweep_unheld_run_dirs(folder.parent, skip=folder)
        yield folder


def _patient_lock(path: Path, what: str) -> ExitStack:
    """The lock ``path``, waiting at most ``CLAIM_PATIENCE_S`` for it (another claimant's sweep holds a free
    run folder's lock for an instant); then :class:`LockBusy` naming its holder."""
    deadline = time.monotonic() + CLAIM_PATIENCE_S
    while True:
        held = ExitStack()
        try:
            held.enter_context(file_lock(path, blocking=False, what=what))
            return held
        except LockBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _remove_temp_files(folder: Path) -> None:
    """Delete the checkpoint temp files (names matching ``OUR_TEMP``) in ``folder``; nothing else."""
    for path in folder.iterdir():
        if OUR_TEMP.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _sweep_unheld_run_dirs(root: Path, skip: Path) -> None:
    """Remove the temp files of every run folder under ``root`` whose lock no live process holds (its
    writer is gone); a folder in use is left alone."""
    for other in root.iterdir():
        if other == skip or not (other / ".lock").is_file():  # only run folders (claim_run_dir made the lock)
            continue
        try:
            with file_lock(other / ".lock", blocking=False):
                _remove_temp_files(other)
        except (LockBusy, OSError):
            continue


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` so that a reader sees either the old file or the whole new one.
    Call it while holding :func:`claim_run_dir` on the folder."""
    return write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        reason = first_line(err)[:200]
        raise BenchError(f"checkpoint {path} is damaged or not an elbo-bench checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED):
        raise BenchError(f"checkpoint {path} is not an elbo-bench checkpoint (expected format {FORMAT})")
    unknown = sorted(set(state["config"]) - set(FIELD_NAMES)) if isinstance(state["config"], dict) else ["(not a dict)"]
    if unknown:
        raise BenchError(f"checkpoint {path}: its config has unknown key(s) {', '.join(map(str, unknown))}; "
                         "it was written by another version of elbo-bench or altered, "
                         "so it cannot be read as a RunConfig")
    state["config"].setdefault("ema_warmup", False)  # written before the EMA's warm-up existed: its run had none
    return state
