"""``bench grid``'s memory: which (config, seed) pairs already have a result in the grid's experiment.

A grid that is interrupted (Ctrl-C, a lost machine) and started again trains only what is missing. A pair
counts as done when its experiment holds a run with the same full config (the flattened ``RunConfig`` that
every run logs as its ``config.*`` params; a field the run predates counts at its default) that ended
FINISHED, or FAILED because it diverged: divergence is a result the report counts. A KILLED, RUNNING or
crashed run is no result, so the pair is trained again.

Grids running at the same time on one store (two machines, or two terminals) share the work: a pair is
trained under its claim (:func:`claim`), which a live process holds while it trains it and which its death
frees, so a second grid leaves a claimed pair to its claimant and takes it over if that one dies first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bench.runtime.locks import file_lock, is_server_database, sqlite_path, store_lock
from bench.tracking import store as tracking
from bench.training.config import RunConfig, flatten


@dataclass(frozen=True)
class Recorded:
    """A run already in the experiment for one (config, seed) pair."""

    run_id: str
    status: str  # MLflow's: FINISHED, FAILED, KILLED, RUNNING
    diverged: bool  # FAILED because the loss diverged (tag ``diverged``), not because the process crashed
    reason: str  # tag failure_reason / killed_reason / stop_reason, '' when none

    @property
    def is_result(self) -> bool:
        return self.status == "FINISHED" or (self.status == "FAILED" and self.diverged)

    def describe(self) -> str:
        what = "diverged, recorded FAILED" if self.diverged else self.status
        return f"run {self.run_id} {what}" + (f" ({self.reason})" if self.reason else "")


def recorded_runs(configs: list[RunConfig]) -> list[Recorded | None]:
    """For each config, the run of its experiment that holds its result, else the latest run of the same
    config that holds none (KILLED, RUNNING, crashed), else None. Creates no store and no experiment."""
    found: list[Recorded | None] = [None] * len(configs)
    wanted: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        wanted.setdefault(_key(flatten(config)), []).append(i)
    defaults = flatten(RunConfig())
    by_store: dict[tuple, list[RunConfig]] = {}
    for config in configs:
        by_store.setdefault((config.tracking_uri, config.experiment), []).append(config)
    for uri, experiment in by_store:
        path = sqlite_path(tracking.resolve_tracking_uri(uri))
        if path is not None and not path.is_file():
            continue  # no store yet: nothing was recorded
        c = tracking.client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            continue
        for run in _all_runs(c, exp.experiment_id):  # newest first
            # a field added to RunConfig after the run was logged held its default then
            params = {**defaults, **{k: v for k, v in run.data.params.items() if k.startswith("config.")}}
            tags = run.data.tags
            rec = Recorded(run.info.run_id, run.info.status, tags.get("diverged") == "true",
                           tags.get("failure_reason") or tags.get("killed_reason") or tags.get("stop_reason") or "")
            for i in wanted.get(_key(params), []):
                if found[i] is None or (rec.is_result and not found[i].is_result):
                    found[i] = rec
    return found


def claim(config: RunConfig, wait: bool = False):
    """Hold ``config``'s (config, seed) pair for the ``with`` block, so that grids sharing its store train it once.

    Held by another live process, it raises :class:`bench.runtime.locks.LockBusy` (naming the holder), or with ``wait``
    waits until it is free: the holder finished, or died (a ``flock``, or a PostgreSQL/MySQL advisory lock,
    dies with its process). A SQLite store keeps the claims in a folder beside it (``mlflow.db.grid-claims``);
    with an MLflow server they are kept in BENCH_HOME, so only grids on the same machine see them.
    """
    uri = tracking.resolve_tracking_uri(config.tracking_uri)
    pair = hashlib.sha256(repr(_key(flatten(config))).encode()).hexdigest()[:16]
    if is_server_database(uri):
        return store_lock(uri, f"grid-{pair}", blocking=wait)
    store = sqlite_path(uri)
    folder = (store.with_name(f"{store.name}.grid-claims") if store is not None
              else tracking.bench_home() / "grid-claims")
    return file_lock(folder / f"{pair}.lock", blocking=wait, what=f"the grid's pair {config.default_run_name}")


def _key(params: dict[str, str]) -> tuple:
    return tuple(sorted(params.items()))


def _all_runs(c, experiment_id: str):
    token = None
    while True:
        page = c.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time DESC"],
                             page_token=token)
        yield from page
        token = page.token
        if not token:
            return
