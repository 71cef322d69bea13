"""The workers of a study: each keeps itself in the study's register with a heartbeat while it works, so
``bench study --status`` and a stopping worker can tell who is alive, and a trial lost with its worker is told
from one that failed."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

from bench.tracking import liveness

WORKER_ATTR = "worker "  # study user attribute "worker HOST:PID" → {"beat": unix time, "every": seconds}


@contextmanager
def registered(study, every: int):
    """Keep this worker in the study's register (its heartbeat every ``every`` s) while the block runs,
    for ``bench study --status``; marked gone at the end."""
    key = f"{WORKER_ATTR}{socket.gethostname()}:{os.getpid()}"

    def beat(alive: bool = True) -> None:
        study._storage.set_study_user_attr(study._study_id, key, {"beat": time.time() if alive else 0, "every": every})

    beat()
    try:
        with liveness.every(every, beat, "study-worker-heartbeat"):
            yield
    finally:
        try:
            beat(alive=False)
        except Exception:  # noqa: BLE001, S110 - the storage may be what failed; its heartbeat then just ages out
            pass


def workers_alive(study, now: float | None = None) -> list[str]:
    """The workers (HOST:PID) whose heartbeat is fresher than twice its interval."""
    now = now or time.time()
    return sorted(k.removeprefix(WORKER_ATTR) for k, v in study.user_attrs.items()
                  if k.startswith(WORKER_ATTR) and isinstance(v, dict)
                  and now - v.get("beat", 0) < 2 * v.get("every", 60))


def lost_worker(t) -> bool:
    """Whether trial ``t`` failed because its worker stopped sending heartbeats (Optuna failed it as stale
    and queued a retry), not by an error, a divergence or an interrupt its worker recorded."""
    return t.state.name == "FAIL" and not ({"error", "diverged", "failure_reason"} & set(t.user_attrs))
