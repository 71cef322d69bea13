"""``bench study``: Optuna studies over the noise schedule, each trial a ``bench run`` on a reduced budget.

Every trial goes through :func:`bench.training.run.train` (the same trainer and code path as ``bench run``),
nested in MLflow under one parent run per study. During the study a trial's bits/dim is the unbiased
estimator on the whole test split with the fixed evaluation seed; afterwards the best trials are
re-evaluated with the exact bound. Optuna keeps its own SQLite file beside the MLflow store.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import numpy as np
import optuna
import psutil
import torch
from mlflow.entities import RunTag
from optuna.trial import TrialState

from bench.errors import BenchError, first_line
from bench.runtime import dist as dist_mod
from bench.runtime.dist import SINGLE, Dist
from bench.runtime.locks import store_lock
from bench.runtime.urls import masked
from bench.tracking import liveness, provenance
from bench.tracking import store as tracking
from bench.tracking.logger import RunLogger
from bench.training.config import RunConfig
from bench.training.record import NoLog
from bench.training.run import StopRun, train
from studies.config import OBJECTIVES, SAMPLERS, StudyConfig, StudyResult, TrialDiverged
from studies.space import default_point, describe_space, suggest
from studies.storage import check_optuna_storage, open_storage
from studies.summary import Progress, describe_start, describe_status, exact_reevaluation, log_study
from studies.workers import lost_worker, registered, workers_alive
from variants import get_variant

__all__ = ["OBJECTIVES", "SAMPLERS", "StudyConfig", "StudyResult", "TrialDiverged", "lost_worker", "run_study",
           "study_status", "worker_devices", "workers_alive"]

# ------------------------------------------------------------------------- Optuna plumbing
def _sampler(sc: StudyConfig):
    """The study's sampler, re-seeded for every trial from (study seed, trial number): a study is
    reproducible from its seed, and processes sharing one never draw the same point from the same history."""
    make = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }[sc.sampler]
    return _TrialSeededSampler(make, sc.seed)


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class _TrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates trial n to ``make(seed=f(study seed, n))``. The samplers read everything else they
    need (the history, NSGA-II's generations) from the storage, so a fresh one per trial loses nothing."""

    def __init__(self, make, seed: int):
        self._make, self._seed = make, seed
        self._number, self._inner = None, None

    def _for(self, trial):
        if self._number != trial.number:
            self._number, self._inner = trial.number, self._make(seed=_trial_seed(self._seed, trial.number))
        return self._inner

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)


def _open_study(sc: StudyConfig, name: str):
    directions = ["minimize"] * len(OBJECTIVES[sc.objective])
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if len(directions) == 1 else optuna.pruners.NopPruner()
    storage = open_storage(sc)
    with store_lock(sc.storage_url(), "study"):  # two starters must not both create the study
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, directions=directions,
                                    sampler=_sampler(sc), pruner=pruner)
    if len(study.directions) != len(directions):
        raise BenchError(f"study {name!r} exists with {len(study.directions)} objective(s); "
                         f"--objective {sc.objective} needs {len(directions)}: choose another --study-name")
    if study.metric_names is None:  # so optuna-dashboard (`bench dashboard`) names the axes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES[sc.objective]))
    return study


def _trial_config(trial, sc: StudyConfig, name: str, variant: str, space) -> RunConfig:
    """The run config of ``trial``: the study's base config with the point the sampler suggests."""
    base = sc.base_config(variant)
    params = suggest(trial, space, base)
    if base.sample_steps > params.get("T", base.T):
        params["sample_steps"] = 0  # a smaller T than the sampler's default steps: sample with all T
    return replace(base, **params, run_name=f"{name}/trial-{trial.number}").validate()


def _objective(trial, sc: StudyConfig, name: str, variant: str, space, parent_run_id: str, d: Dist = SINGLE):
    """Train ``trial`` and return its objective value(s). Under torchrun every rank trains it (DDP); rank 0
    alone holds the trial (None elsewhere), draws its point and decides pruning, and shares both."""


    config = d.share(d.main_decides(lambda: _trial_config(trial, sc, name, variant, space)))
    single = len(OBJECTIVES[sc.objective]) == 1

    def on_eval(step: int, metrics: dict) -> None:
        why = None
        if d.main and single and sc.objective == "bpd":
            trial.report(metrics["bpd_estimate"], step)
            if trial.should_prune():
                why = (f"at step {step} by Optuna's {type(trial.study.pruner).__name__} "
                       f"(estimated bpd {metrics['bpd_estimate']:.4f} bits/dim)")
                trial.set_user_attr("pruned", why)  # what the study's trial line says
        why = d.share(why)
        if why:
            raise StopRun(f"pruned {why}")

    number = d.share(trial.number if d.main else None)
    result = train(config, progress=False, parent_run_id=parent_run_id, on_eval=on_eval,
                   tags={"optuna.study": name, "optuna.trial": number})
    if not d.main:
        return None
    trial.set_user_attr("mlflow_run_id", result.run_id)
    if result.status == "KILLED":
        raise optuna.TrialPruned(result.reason)
    if result.status == "FAILED":
        trial.set_user_attr("failure_reason", f"{result.reason} at step {result.step}")
        trial.set_user_attr("diverged", True)
        raise TrialDiverged(f"{result.reason} at step {result.step}")
    trial.set_user_attr("checkpoint", str(result.checkpoint))
    trial.set_user_attr("bpd_estimate", result.metrics["bpd"])
    if "bpd_stderr" in result.metrics:  # its Monte Carlo standard error, for the trial's line
        trial.set_user_attr("bpd_stderr", result.metrics["bpd_stderr"])
    tags = tracking.client(config.tracking_uri).get_run(result.run_id).data.tags
    if tags.get("bpd_images"):  # the test images the estimate used, which the exact re-evaluation uses too
        trial.set_user_attr("bpd_images", int(tags["bpd_images"]))
    if "fid" in result.metrics:  # what the FID was measured with, for the study's lines and summary
        trial.set_user_attr("fid_samples", config.fid_samples)
        trial.set_user_attr("fid_extractor", tags.get("fid_extractor"))
    values = []
    for key in OBJECTIVES[sc.objective]:
        if key not in result.metrics:
            trial.set_user_attr("failure_reason", f"{key} was not computed (see the run's tags)")
            raise TrialDiverged(f"{key} was not computed for trial {trial.number}")
        values.append(result.metrics[key])
    return values[0] if single else tuple(values)


WAIT = "wait"  # _next_trial's answer while the study is full but trials still run elsewhere


def _next_trial(study, sc: StudyConfig):
    """The next trial to run (a queued one first: the default schedule, a stale trial's retry); WAIT
    while the study holds ``sc.trials`` trials (retries included) but some still run, in this or another
    process or machine (a dead worker's trial turns stale and comes back queued); None once every trial
    has finished. Taken under the storage's lock, so concurrent workers neither take one queued trial
    twice nor overshoot the count."""
    with store_lock(sc.storage_url(), "trial"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        optuna.storages.fail_stale_trials(study)  # a dead worker's RUNNING trial → FAIL, and re-queued
        trials = [t for t in study.get_trials(deepcopy=False) if not lost_worker(t)]  # their retries count instead
        if len(trials) < sc.trials or any(t.state == TrialState.WAITING for t in trials):
            trial = study.ask()
            study._storage.record_heartbeat(trial._trial_id)  # still under the lock: no one sees it without one
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            return trial
        # a running trial either finishes or, its worker dead, turns stale (see _Storage) and comes back queued
        return WAIT if any(t.state == TrialState.RUNNING for t in trials) else None


def _heartbeat(study, trial, seconds: int):
    """Record the trial's heartbeat now and every ``seconds`` while it runs, so other workers see it alive."""
    storage, trial_id = study._storage, trial._trial_id  # Optuna's heartbeat API lives on the storage
    storage.record_heartbeat(trial_id)
    return liveness.every(seconds, lambda: storage.record_heartbeat(trial_id), f"heartbeat-trial-{trial.number}")


def _work(sc: StudyConfig, name: str, variant: str, space, parent_run_id: str, d: Dist = SINGLE) -> None:
    """One worker: take trials from the shared study until it holds ``sc.trials`` trials and all of them
    have finished, wherever they ran (or until ``sc.timeout``). Under torchrun the ranks are one worker:
    rank 0 takes the trials and tells the study; every rank trains each trial."""
    study = _open_study(sc, name) if d.main else None
    client = tracking.client(sc.tracking_uri) if d.main else None
    experiments = [tracking.experiment_id(client, sc.experiment)] if d.main else []
    deadline = None if sc.timeout is None else time.monotonic() + sc.timeout
    with registered(study, sc.heartbeat) if d.main else nullcontext():
        while True:
            trial = plan = None
            if d.main:
                late = deadline is not None and time.monotonic() >= deadline
                trial = None if late else _next_trial(study, sc)
                _close_stale_runs(client, experiments, study, name)
                plan = "stop" if trial is None else "wait" if isinstance(trial, str) else "run"
            plan = d.share(plan)
            if plan == "stop":
                return
            if plan == "wait":
                time.sleep(min(5.0, sc.heartbeat))
                continue
            _run_trial(study, trial, sc, name, variant, space, parent_run_id, d)


def _run_trial(study, trial, sc: StudyConfig, name: str, variant: str, space, parent_run_id: str,
               d: Dist = SINGLE) -> None:
    """Train one trial under its heartbeat and tell the study how it ended (rank 0)."""
    if not d.main:  # trains its share; rank 0 records the outcome
        _objective(None, sc, name, variant, space, parent_run_id, d)
        return
    state, values = TrialState.COMPLETE, None
    with _heartbeat(study, trial, sc.heartbeat):
        try:
            values = _objective(trial, sc, name, variant, space, parent_run_id, d)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrialDiverged:
            state = TrialState.FAIL
        except BaseException as err:
            _note_error(trial, err)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    # skip_if_finished: another worker may have failed this trial as stale (a heartbeat starved by load)
    study.tell(trial, values, state=state, skip_if_finished=True)


def _close_stale_runs(client, experiments: list[str], study, name: str) -> None:
    """Mark KILLED the MLflow runs of trials Optuna failed as stale (their worker died or was cut off, on
    any machine), and of any run whose process on this machine is gone."""
    liveness.close_dead_runs(client, experiments)
    stale = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if lost_worker(t)}
    if not stale:
        return
    # the study's name is compared here, not in the filter: MLflow's filter syntax cannot quote every name (o'hara)
    running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for r in running:
        number = r.data.tags.get("optuna.trial")
        if r.data.tags.get("optuna.study") == name and number is not None and number.isdigit() and int(number) in stale:
            client.log_batch(r.info.run_id,
                             tags=[RunTag("killed_reason", "its study worker stopped sending heartbeats "
                                                           "(killed, crashed or cut off); the trial is retried")])
            client.set_terminated(r.info.run_id, "KILLED")


def _note_error(trial, err: BaseException) -> None:
    """Keep why a trial stopped on an error or an interrupt (user attribute ``error``) for the study's lines."""
    why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {first_line(err)}"
    try:
        trial.set_user_attr("error", why[:500])
    except Exception:  # noqa: BLE001, S110 - the storage itself may be what failed; the error is raised anyway
        pass


def _worker_main(sc, name, variant, space, parent_run_id) -> None:  # a spawned process's entry point
    _work(sc, name, variant, space, parent_run_id)


def worker_devices(device: str, workers: int, gpus: int) -> list[str]:
    """The device of each of ``workers`` worker processes: with ``auto`` or ``cuda`` on a machine with
    several GPUs, worker i trains on GPU i mod ``gpus``; otherwise every worker uses ``device``."""
    if device in ("auto", "cuda") and gpus > 1:
        return [f"cuda:{i % gpus}" for i in range(workers)]
    return [device] * workers


def _run_workers(sc: StudyConfig, name: str, variant: str, space, parent_run_id: str) -> None:
    """``sc.workers`` workers on the study: this process alone, or spawned processes waited for."""
    if sc.workers == 1:
        _work(sc, name, variant, space, parent_run_id)
        return

    ctx = multiprocessing.get_context("spawn")
    devices = worker_devices(sc.run_overrides.get("device", "auto"), sc.workers, torch.cuda.device_count())
    procs = [ctx.Process(target=_worker_main, args=(replace(sc, run_overrides={**sc.run_overrides, "device": dev}),
                                                    name, variant, space, parent_run_id)) for dev in devices]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise BenchError(f"{len(bad)} study worker(s) exited with status {bad}; the study is kept in its storage")


# ------------------------------------------------------------------------- the study
def _parent_run(client, study, sc: StudyConfig, name: str, variant: str, space) -> str:
    """The study's MLflow parent run id. The first starter, under the storage's lock, creates it and
    enqueues the default schedule as the first trial; a concurrent or later starter finds both done."""
    with store_lock(sc.storage_url(), "study"):
        existing = study.user_attrs.get("mlflow_parent_run_id")
        if existing is not None:
            client.update_run(existing, status="RUNNING")
            return existing
        exp = tracking.experiment_id(client, sc.experiment)
        # no owner tags: the parent belongs to the study, which whoever finishes it closes (see _finish)
        run_id = client.create_run(exp, run_name=name, tags={"optuna.study": name, "study.variant": variant,
                                                             "study.dataset": sc.dataset,
                                                             **provenance.source_tags()}).info.run_id
        RunLogger(client, run_id).params({
            "study.name": name, "study.objective": sc.objective, "study.sampler": sc.sampler,
            "study.trial_steps": sc.steps, "study.variant": variant, "study.dataset": sc.dataset,
            "study.seed": sc.seed, "study.space": describe_space(space, sc.base_config(variant)),
            "study.storage": masked(sc.storage_url()),
        })
        study.set_user_attr("objective", sc.objective)
        study.set_user_attr("space", describe_space(space, sc.base_config(variant)))
        if not study.trials:  # the default schedule is trial 0, so the answer compares with it
            default = default_point(sc.base_config(variant), space)
            if default is not None:
                study.enqueue_trial(default, user_attrs={"default_schedule": True})
        study.set_user_attr("mlflow_parent_run_id", run_id)  # last: a starter that sees it sees the rest
        return run_id


def study_status(name: str, storage: str | None = None) -> str:
    """``bench study --status NAME``: the study's state as ``storage`` (default: the studies' SQLite file)
    holds it, read without creating anything."""
    url = storage or StudyConfig().storage_url()
    check_optuna_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        names = optuna.get_all_study_names(url)
        raise BenchError(f"no study named {name!r} in {masked(url)}; it holds: {', '.join(names) or 'none'}") from None
    return describe_status(study, url)


def run_study(sc: StudyConfig, progress: bool = True, notice: str | None = None) -> list[StudyResult]:
    """Run (or resume, or join) one study per variant; returns their summaries. ``progress``: print a line
    per finished trial and per exact re-evaluation, with bars on a terminal (see :class:`studies.summary.Progress`).
    ``notice``: a line for stderr once the first study is open (a refused study prints its one error line alone).

    Any number of ``bench study`` processes, on any machines sharing the storage and the tracking store,
    may work on one study: each returns once every trial has finished, and the first to get there does
    the exact re-evaluation, records the study in its parent run and closes it FINISHED (:func:`_finish`)."""
    sc.validate()
    spaces = {variant: sc.space(variant) for variant in sc.variants}  # every study file checked before any study opens
    d, _ = dist_mod.setup(sc.run_overrides.get("device", "auto"))
    if d.active and sc.workers > 1:
        raise BenchError("under torchrun the ranks are one study worker that trains each trial on all of them; "
                         "leave --workers out (start more torchrun jobs for more workers)")
    client = d.main_decides(lambda: tracking.client(sc.tracking_uri))
    results = []
    for variant in sc.variants:
        name, space = sc.name_for(variant), spaces[variant]
        study = _open_study(sc, name) if d.main else None
        parent_run_id = d.share(d.main_decides(partial(_parent_run, client, study, sc, name, variant, space)))
        if not d.main:
            _work(sc, name, variant, space, parent_run_id, d)
            continue
        if progress:
            print(describe_start(sc, name, variant, parent_run_id), flush=True)
        if notice:
            print(notice, file=sys.stderr, flush=True)
            notice = None
        try:
            with Progress(study, sc, variant, progress):
                if d.active:
                    _work(sc, name, variant, space, parent_run_id, d)
                else:
                    _run_workers(sc, name, variant, space, parent_run_id)
            results.append(_finish(client, sc, name, variant, parent_run_id, progress))
        except BaseException as err:
            _leave(client, study, parent_run_id, err, progress)
            raise
    return results


def _finish(client, sc: StudyConfig, name: str, variant: str, parent_run_id: str, progress: bool) -> StudyResult:
    """Once: the exact re-evaluation of the best trials, the study's record in its parent run, the parent
    closed FINISHED. Under the storage's lock, so of several processes reaching the end together one
    does it and the others read the result (a study resumed with more trials is finished again)."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    with store_lock(sc.storage_url(), "finish"):
        study = _open_study(sc, name)
        done = study.user_attrs.get("finished")
        if isinstance(done, dict) and done.get("trials") == len(study.trials):
            if progress:
                print(f"study {name}: every trial has finished; {done['by']} recorded it and closed its parent run "
                      f"{parent_run_id}", flush=True)
            RunLogger(client, parent_run_id).end("FINISHED")  # a starter with nothing left reopened it
            return log_study(study, sc, name, variant, NoLog(parent_run_id))
        if get_variant(variant).continuous:  # L_∞ is an integral: no exact form; every trial's estimate stands
            if progress and sc.exact_top:
                print(f"study {name}: no exact re-evaluation: a continuous-time model's bound has no exact form "
                      "(its trials' bpd are unbiased estimates with their standard errors)", flush=True)
        else:
            exact_reevaluation(study, sc, progress)
        log = RunLogger(client, parent_run_id)
        result = log_study(study, sc, name, variant, log)
        log.tags({"finished_by": me})
        log.end("FINISHED")
        study.set_user_attr("finished", {"by": me, "trials": len(study.trials), "at": time.time()})
        return result


def _leave(client, study, parent_run_id: str, err: BaseException, progress: bool) -> None:
    """This process stops before the study is done: its parent run stays RUNNING while other workers
    carry on (whoever finishes closes it); with none left it ends KILLED (interrupted) or FAILED."""
    ours = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}  # stopping with us
    host = socket.gethostname()
    others = [w for w in workers_alive(study) if not (w.rsplit(":", 1)[0] == host and int(w.rsplit(":", 1)[1]) in ours)]
    if others:
        if progress:
            print(f"study {study.study_name}: {len(others)} other worker(s) carry on ({', '.join(others[:4])}"
                  f"{' …' if len(others) > 4 else ''}); the one that finishes closes the parent run", flush=True)
        return
    RunLogger(client, parent_run_id).end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
