"""How long Optuna's storage takes per trial on PostgreSQL, with 1, 8 and 32 processes sharing one study.

Each of N processes (forked after the imports, so they start together and share the imported code)
opens its own storage, waits at a barrier, then for ``--seconds`` takes a trial, draws a point of the
study's schedule space (studies.space.suggest: 4 parameters), and reports a value at once. Two paths:

- ``optuna``: ``study.ask()``, the suggestions, ``study.tell(trial, value)`` on a plain RDBStorage;
- ``worker``: what a `bench study` worker does per trial besides training, through its own functions:
  ``studies.study._next_trial`` (the advisory lock ``bench.runtime.locks.store_lock(url, "trial")``, failing stale
  trials, counting the study's trials, ``study.ask()``), the suggestions, one heartbeat, and ``tell``, on
  the storage ``studies.study._storage`` builds (heartbeats on, stale trials retried).

"take" is everything up to the trial's first heartbeat (ask or _next_trial, then the suggestions);
"tell" is reporting the value. Latencies are wall-clock per call in each process, percentiles over all
calls of all processes; trials/s counts every process's told trials over the timed window. Every
configuration runs on a fresh database (or, with --url, as a new study), so the study's size (the
worker path reads all its trials) grows only within the window: the last column gives the count.

    OMP_NUM_THREADS=1 python benchmarks/storage_latency.py                # throwaway local PostgreSQL
    python benchmarks/storage_latency.py --url postgresql://USER@HOST/DB --processes 1,8 --seconds 20

Without --url it starts a throwaway cluster (tests/postgres.py: fsync and synchronous commit off, which
flatters write latency) and removes it at the end. Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway cluster lives with the tests that also use it

from postgres import throwaway_cluster  # noqa: E402

from studies import study as study_mod  # noqa: E402
from studies.space import DEFAULT_SPACE, suggest  # noqa: E402

PATHS = ("optuna", "worker")
WARMUP_TRIALS = 3  # per process, before the timed window (they count in the study's size)


def _open(path: str, url: str, name: str):
    """The study as the path opens it: a plain storage, or the one a `bench study` worker builds."""
    warnings.simplefilter("ignore")  # heartbeats are "experimental"; _next_trial's heartbeat note
    if path == "optuna":
        return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url),
                                 sampler=optuna.samplers.RandomSampler(seed=os.getpid())), None
    sc = study_mod.StudyConfig(storage=url, trials=10**9, heartbeat=60)  # never full: no waiting at the end
    return optuna.load_study(study_name=name, storage=study_mod._storage(sc),
                             sampler=optuna.samplers.RandomSampler(seed=os.getpid())), sc


def _process(path: str, url: str, name: str, barrier, seconds: float, results) -> None:
    """One process: open the study, wait for the others, take and tell trials for ``seconds``."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study, sc = _open(path, url, name)
    for _ in range(WARMUP_TRIALS):  # first calls compile SQLAlchemy's statements: not what a running study pays
        trial = study.ask() if sc is None else study_mod._next_trial(study, sc)
        suggest(trial, DEFAULT_SPACE)
        study.tell(trial, 0.0)
    take, tell = [], []
    barrier.wait()
    end = time.perf_counter() + seconds
    rng = np.random.default_rng(os.getpid())
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        trial = study.ask() if sc is None else study_mod._next_trial(study, sc)
        suggest(trial, DEFAULT_SPACE)
        if sc is not None:
            study._storage.record_heartbeat(trial._trial_id)
        t1 = time.perf_counter()
        study.tell(trial, float(rng.random()), skip_if_finished=sc is not None)
        t2 = time.perf_counter()
        take.append(t1 - t0)
        tell.append(t2 - t1)
    results.put((take, tell))


def _connections(url: str) -> int:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT count(*) FROM pg_stat_activity "
                                                "WHERE datname = current_database() "
                                                "AND pid <> pg_backend_pid()")).scalar_one()
    finally:
        engine.dispose()


def measure(path: str, url: str, name: str, processes: int, seconds: float) -> dict:
    """Run ``processes`` processes on a new study ``name`` at ``url``; latencies (ms) and throughput."""
    # no pooled connection may stay open across the fork: a child would share (and close) its socket
    optuna.create_study(study_name=name, storage=optuna.storages.RDBStorage(
        url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool}))
    ctx = multiprocessing.get_context("fork")  # after the imports: all start at once, the code pages shared
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(path, url, name, barrier, seconds, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    time.sleep(seconds / 2)
    connections = _connections(url)
    take, tell = [], []
    for _ in procs:
        a, b = results.get(timeout=seconds + 300)
        take += a
        tell += b
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"a measuring process exited with {p.exitcode}")
    trial = [a + b for a, b in zip(take, tell)]
    ms = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
    trials = len(optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False))
    return {"path": path, "processes": processes, "told": len(trial), "per_s": len(trial) / seconds,
            "take_p50": ms(take, 50), "tell_p50": ms(tell, 50), "p50": ms(trial, 50), "p95": ms(trial, 95),
            "p99": ms(trial, 99), "mean": 1000 * statistics.fmean(trial), "connections": connections,
            "study_trials": trials}


def table(rows: list[dict]) -> str:
    lines = ["| path | processes | trial p50 (ms) | p95 (ms) | p99 (ms) | take p50 (ms) | tell p50 (ms) | "
             "trials/s | connections | trials in study |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['processes']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                     f"{r['take_p50']:.1f} | {r['tell_p50']:.1f} | {r['per_s']:.0f} | {r['connections']} | "
                     f"{r['study_trials']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="PostgreSQL database to use (default: a throwaway local cluster)")
    ap.add_argument("--processes", default="1,8,32", help="comma-separated process counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed window per configuration")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.processes.split(",")]
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS):
        raise SystemExit(f"error: --paths takes {', '.join(PATHS)}, got {args.paths}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cluster = nullcontext() if args.url else throwaway_cluster(max_connections=max(100, 4 * max(counts) + 20))
    stamp = time.strftime("%Y%m%d%H%M%S")
    rows = []
    with cluster as pg:
        if pg is not None:
            [(version,)] = pg.execute("SHOW server_version")
            print(f"throwaway PostgreSQL {version} on 127.0.0.1 (fsync off, synchronous_commit off); "
                  f"{os.cpu_count()} CPU cores shared by server and clients", flush=True)
        for path in paths:
            for n in counts:
                name = f"latency-{path}-{n}-{stamp}"
                url = args.url or pg.create_database(name.replace("-", "_"))
                rows.append(measure(path, url, name, n, args.seconds))
                r = rows[-1]
                print(f"{path} x{n}: {r['told']} trials, p50 {r['p50']:.1f} ms, {r['per_s']:.0f} trials/s", flush=True)
    print(f"\n{args.seconds:g} s per configuration; latencies per trial, all processes pooled\n")
    print(table(rows))


if __name__ == "__main__":
    main()
