"""Tests of ``bench study`` (studies/): Optuna schedule studies nested in MLflow.

Every trial is tiny (4 optimiser steps, batch 16, 8 test images for the bound, 5 network calls per
image for the estimate, 4-image sample grids with 10 sampler steps) and everything is written under
pytest's ``tmp_path`` (``BENCH_HOME``); Optuna and MLflow are read back from their SQLite files there.

Library tests shrink trials with ``StudyConfig.run_overrides``.  The CLI has no such option and, with
the default budget, even ``--steps 4`` takes ~9 minutes for 3 trials on 2 cores (the exact bound
with T = 1000 on the whole test split dominates), so CLI tests shrink the *digits dataset defaults*
instead: in-process by monkeypatching ``bench.training.config.DATASET_DEFAULTS["digits"]``, in subprocesses
through a ``python -c`` wrapper that does the same before calling ``bench.cli.main``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import bench.training.config as bench_config
from bench.cli.main import cli
from bench.errors import BenchError
from bench.tracking import liveness
from bench.tracking import store as tracking
from studies import study as study_mod
from studies.space import DEFAULT_SPACE, TUNABLE, Param, load_space, suggest
from studies.study import StudyConfig, StudyResult, run_study
from studies.summary import best_so_far, compare_results, describe_result, describe_trial

REPO = Path(__file__).resolve().parents[1]
TINY = {"batch_size": 16, "eval_images": 8, "eval_calls": 5, "sample_grid": 4, "sample_steps": 10, "log_every": 2,
        "log_model": False}
LIB = {**TINY, "final_eval_images": 8}  # library trials keep T = 1000: the bound on 8 images is cheap
CLI_DEFAULTS = {**TINY, "T": 40}  # the CLI forces final_eval_images = 0 (whole test split): keep T small
STEPS = 4  # eval_every = steps // 4 = 1: estimates (and pruning checks) after steps 1, 2, 3
EXPERIMENT = "elbo-bench-studies"
DEFAULT_PARAMS = {"schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "T": 1000}
WRAPPER = (  # `bench <args>` in a fresh process, with the digits defaults shrunk to CLI_DEFAULTS
    "import json, sys; import bench.training.config as c; c.DATASET_DEFAULTS['digits'] = json.loads(sys.argv.pop(1)); "
    "sys.argv[0] = 'bench'; from bench.cli.main import main; main()"
)
FINISHED_STATES = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- fixtures and helpers


def _isolate(mp: pytest.MonkeyPatch, home: Path) -> None:
    mp.setenv("BENCH_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("BENCH_DATA_DIR", raising=False)
    mp.setenv("OMP_NUM_THREADS", "1")  # for spawned workers and subprocesses


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, store_template) -> Path:
    """BENCH_HOME = tmp_path with an empty MLflow store; nothing can land in the repository."""
    _isolate(monkeypatch, tmp_path)
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture
def t40_space(tmp_path) -> Path:
    """Study file for the CLI tests: the default space with T narrowed to the (patched) default 40."""
    path = tmp_path / "t40.toml"
    path.write_text("[params.T]\nchoices = [40]\n")
    return path


def optuna_url(home: Path) -> str:
    return f"sqlite:///{home}/optuna.db"


def load(home: Path, name: str):
    return optuna.load_study(study_name=name, storage=optuna_url(home))


def mlflow_client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")


def tables(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def invoke(monkeypatch, args: list[str], **defaults):
    """``bench <args>`` in-process, with the digits defaults shrunk to CLI_DEFAULTS (and ``defaults``)."""
    monkeypatch.setitem(bench_config.DATASET_DEFAULTS, "digits", {**CLI_DEFAULTS, **defaults})
    return CliRunner().invoke(cli, [str(a) for a in args])


def trial_lines(text: str) -> dict[int, tuple[int, int, str]]:
    """The per-trial lines of a study's output: trial number → (k, N, line) for lines ``[k/N] trial n ...``."""
    lines = {}
    for line in text.splitlines():
        if m := re.match(r"\[(\d+)/(\d+)\] trial (\d+)\b", line):
            assert int(m[3]) not in lines, f"two lines for trial {m[3]}:\n{text}"
            lines[int(m[3])] = (int(m[1]), int(m[2]), line)
    return lines


def param_cell(v) -> str:
    """A parameter's value as the study prints it: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def param_text(params: dict) -> list[str]:
    """``name=value`` for each parameter, in the search space's order (studies.space.TUNABLE)."""
    return [f"{k}={param_cell(params[k])}" for k in sorted(params, key=list(TUNABLE).index)]


def describe(result) -> str:
    import traceback

    tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info and result.exception else ""
    return f"exit {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-3000:]}\n{tb}"


def bench_process(home: Path, args: list[str], tag: str) -> subprocess.Popen:
    """``bench <args>`` as a separate process (shrunk digits defaults); output in home/<tag>.out|err."""
    env = {**os.environ, "BENCH_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(home / f"{tag}.out", "w") as out, open(home / f"{tag}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", WRAPPER, json.dumps(CLI_DEFAULTS), *args],
                                cwd=home, env=env, stdout=out, stderr=err, text=True)


def process_output(home: Path, tag: str) -> str:
    err = (home / f"{tag}.err").read_text()
    return f"--- stdout\n{(home / f'{tag}.out').read_text()}\n--- stderr (tail)\n{err[-3000:]}"


def precreate_stores(home: Path) -> None:
    """The Optuna schema and the studies' MLflow experiment, as after an earlier study: creating them
    from two processes at once races (reported separately), and the tests below are about the trials."""
    optuna.storages.RDBStorage(optuna_url(home))
    tracking.experiment_id(mlflow_client(home), EXPERIMENT)


def study_config(**kw) -> StudyConfig:
    values = {"trials": 3, "steps": STEPS, "exact_top": 1, "run_overrides": dict(LIB)} | kw
    return StudyConfig(**values)


def trial_runs(client, trials) -> dict:
    return {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}


def ask_many(space, n=200, seed=0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(suggest(trial, space))
        study.tell(trial, 0.0)
    return points


# ----------------------------------------------------------------------------- 1. end to end (CLI)
def test_cli_three_trial_study_end_to_end(home, monkeypatch, t40_space):
    res = invoke(monkeypatch, ["study", "--trials", "3", "--steps", str(STEPS), "--study-name", "e2e",
                               "--exact-top", "1", "--space", str(t40_space)])
    assert res.exit_code == 0, describe(res)
    # 4 steps a trial, inside the 100-step learning-rate warm-up: said once for the study, not once per trial
    assert [w for w in res.stderr.splitlines() if w.startswith("warning:")] == [
        "warning: --steps 4 ends inside the learning-rate warm-up (--warmup-steps 100: its last step trains at 4% of "
        "--lr); raise --steps to 100 or more, or lower --warmup-steps"]

    # Optuna: its own SQLite file, not MLflow's
    optuna_db, mlflow_db = home / "optuna.db", home / "mlflow.db"
    assert optuna_db.exists() and mlflow_db.exists() and optuna_db != mlflow_db
    assert "trials" in tables(optuna_db) and "runs" not in tables(optuna_db)
    assert "runs" in tables(mlflow_db) and "trials" not in tables(mlflow_db)
    study = load(home, "e2e")
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs.get("default_schedule") is True
    assert trials[0].params == {**DEFAULT_PARAMS, "T": 40}  # the default schedule (T: the patched default)
    assert not any(t.user_attrs.get("default_schedule") for t in trials[1:])
    assert all(len(t.intermediate_values) == STEPS - 1 for t in trials)  # reported after steps 1, 2, 3

    # MLflow: one parent, three nested trial runs
    client = mlflow_client(home)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.params["study.name"] == "e2e" and parent.data.params["study.trial_steps"] == str(STEPS)
    runs = trial_runs(client, trials)
    assert len({r.info.run_id for r in runs.values()}) == 3
    for t in trials:
        run = runs[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.study"] == "e2e" and run.data.tags["optuna.trial"] == str(t.number)
        assert run.data.params["config.steps"] == str(STEPS) and run.data.params["config.T"] == "40"
        assert run.data.params["config.final_eval"] == "estimate"
        assert t.user_attrs["bpd_estimate"] == pytest.approx(t.value)

    # the best trial, re-evaluated exactly
    best = study.best_trial
    assert best.value == min(t.value for t in trials)
    assert parent.data.metrics["best_bpd"] == pytest.approx(min(t.value for t in trials))
    assert parent.data.metrics["default_bpd"] == pytest.approx(trials[0].value)
    assert parent.data.metrics["trials_complete"] == 3 and parent.data.metrics["trials_fail"] == 0
    assert parent.data.tags["best.trial"] == str(best.number)
    best_params = {k.removeprefix("best."): v for k, v in parent.data.tags.items()
                   if k.startswith("best.") and k != "best.trial"}
    assert best_params == {k: str(v) for k, v in best.params.items()}
    exact = study.user_attrs["bpd_exact"]
    assert set(exact) == {str(best.number)}  # --exact-top 1
    assert parent.data.metrics["best_bpd_exact"] == pytest.approx(exact[str(best.number)])
    # logged beside the trial's estimated bpd, under its own name: a bound never replaces another method's
    assert runs[best.number].data.metrics["bpd_eval_exact"] == pytest.approx(exact[str(best.number)])
    assert runs[best.number].data.tags["bpd_eval_exact_method"].startswith("exact")
    assert runs[best.number].data.metrics["bpd"] == pytest.approx(best.value)
    for t in trials:
        assert runs[t.number].data.tags["bpd_method"].startswith("estimate")
        assert ("bpd_eval_exact" in runs[t.number].data.metrics) == (t.number == best.number)

    # the parent's artifacts
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"trials.csv", "optimization_history.png", "study_best.json"} <= artifacts
    local = Path(client.download_artifacts(parent_id, "trials.csv", str(home)))
    rows = list(csv.DictReader(local.open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"COMPLETE"}
    summary = json.loads(Path(client.download_artifacts(parent_id, "study_best.json", str(home))).read_text())
    assert summary["best"][0]["trial"] == best.number and summary["default"]["trial"] == 0
    assert summary["counts"]["complete"] == 3

    # what the command printed: a line per finished trial, then the exact bound, then the summary
    out = res.stdout
    lines = trial_lines(out)
    assert sorted(lines) == [0, 1, 2] and sorted(k for k, _, _ in lines.values()) == [1, 2, 3], out
    se = {t.number: runs[t.number].data.metrics["bpd_stderr"] for t in trials}  # the estimate's Monte Carlo error
    assert all(v > 0 for v in se.values()) and {t.user_attrs["bpd_images"] for t in trials} == {297}
    for t in trials:
        k, n, line = lines[t.number]
        assert n == 3
        assert f"trial {t.number}{' [default schedule]' if t.number == 0 else ''} complete  " \
               f"bpd {t.value:.4f} ± {se[t.number]:.4f} (se) bits/dim (estimate, test split)" in line
        assert all(p in line.split() for p in param_text(t.params)), line
        assert re.search(r"\((\d+m)?\d+s\)$", line), line  # the trial's duration
    exact_line = (f"exact bound, trial {best.number}: bpd {exact[str(best.number)]:.4f} "
                  "bits/dim (exact bound, test split)")
    assert f"exact bound, trial {best.number} (1/1): its checkpoint on the test split, all T steps, 297 test images " \
           "(as its estimate)" in out
    summary = ["study e2e: variant simple on digits, objective bpd",
               f"  MLflow parent run {parent_id} (experiment {EXPERIMENT})",
               "  trials: 3 complete",
               f"  best trial {best.number}: bpd {best.value:.4f} ± {se[best.number]:.4f} (se) bits/dim (estimate), "
               f"{exact[str(best.number)]:.4f} bits/dim (exact bound)",
               f"  default schedule, trial 0: bpd {trials[0].value:.4f} ± {se[0]:.4f} (se) bits/dim (estimate)"
               + (f", {exact[str(0)]:.4f} bits/dim (exact bound)" if best.number == 0 else "")]
    positions = [out.index(lines[t.number][2]) for t in sorted(trials, key=lambda t: lines[t.number][0])]
    assert positions == sorted(positions)  # in the order they finished
    assert max(positions) < out.index(exact_line) < out.index(summary[0] + "\n" + summary[1])
    out_lines = out.splitlines()
    assert all(line in out_lines for line in summary), out


# ----------------------------------------------------------------------------- 2. two objectives
def test_objective_both_is_a_pareto_study_without_intermediate_reports(home, monkeypatch, t40_space):
    res = invoke(monkeypatch, ["study", "--trials", 2, "--steps", STEPS, "--objective", "both", "--fid-samples", 16,
                               "--study-name", "mo", "--exact-top", 1, "--space", t40_space])
    assert res.exit_code == 0, describe(res)
    study = load(home, "mo")
    assert len(study.directions) == 2
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    client = mlflow_client(home)
    runs = trial_runs(client, study.trials)
    for t in study.trials:
        assert len(t.values) == 2
        assert t.intermediate_values == {}  # Trial.report is single-objective only
        assert runs[t.number].data.metrics["fid"] == pytest.approx(t.values[1])
        assert runs[t.number].data.params["config.fid_samples"] == "16"
        assert t.user_attrs["fid_extractor"] == runs[t.number].data.tags["fid_extractor"]
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent_id)}

    # a line per trial with both objectives and their units
    lines = trial_lines(res.stdout)
    assert sorted(lines) == [0, 1], res.stdout
    for t in study.trials:
        se = runs[t.number].data.metrics["bpd_stderr"]
        assert f"complete  bpd {t.values[0]:.4f} ± {se:.4f} (se) bits/dim (estimate, test split)  " \
               f"fid {t.values[1]:.2f} (n=16, vs train split)" in lines[t.number][2]
    # the Pareto front as a table: a header, then one row per front trial, lowest bpd first
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    exact = {int(k): v for k, v in study.user_attrs["bpd_exact"].items()}
    assert list(exact) == [front[0].number]  # --exact-top 1: the front's lowest bpd
    out = res.stdout.splitlines()
    assert f"  Pareto front, {len(front)} trial{'s' * (len(front) > 1)} (* the default schedule):" in out, res.stdout
    head = out.index(next(line for line in out if line.startswith("  Pareto front")))
    params = sorted({k for t in front for k in t.params}, key=list(TUNABLE).index)
    assert out[head + 1].split() == ["trial", "bpd", "fid", "exact", "bpd", *params], res.stdout
    for row, t in zip(out[head + 2: head + 2 + len(front)], front):
        cells = row.split()
        assert cells[:4] == [f"{t.number}{'*' if t.number == 0 else ''}", f"{t.values[0]:.4f}", f"{t.values[1]:.2f}",
                             f"{exact[t.number]:.4f}" if t.number in exact else "-"], row
        assert cells[4:] == [param_cell(t.params[k]) if k in t.params else "-" for k in params], row
    legend = (f"  fid: FID of n=16 samples against the digits train split, "
              f"{front[0].user_attrs['fid_extractor']} features")
    assert any(line.startswith(legend) for line in out), res.stdout


# ----------------------------------------------------------------------------- 3. parallel workers
def test_two_worker_processes_share_one_study(home, capsys):
    run_study(study_config(trials=4, workers=2, study_name="par"), progress=True)
    study = load(home, "par")
    trials = study.trials
    # the parent prints every worker's trials, read from the storage: one line each, counted 1..4
    lines = trial_lines(capsys.readouterr().out)
    assert sorted(lines) == [t.number for t in trials]
    assert sorted((k, n) for k, n, _ in lines.values()) == [(k, 4) for k in range(1, 5)]
    for t in trials:
        assert f"trial {t.number}" in lines[t.number][2]
        assert ({TrialState.COMPLETE: " complete  bpd ", TrialState.PRUNED: " pruned at step "}[t.state]
                in lines[t.number][2]), lines[t.number][2]
    assert len(trials) == 4  # trials are taken under the storage's lock: no overshoot
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sum(bool(t.user_attrs.get("default_schedule")) for t in trials) == 1
    client = mlflow_client(home)
    ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(ids)) == len(trials)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    for t, run in trial_runs(client, trials).items():
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.info.status == ("FINISHED" if trials[t].state == TrialState.COMPLETE else "KILLED")
    assert client.get_run(parent_id).info.status == "FINISHED"


def check_shared_study(home: Path, name: str, n: int) -> None:
    """n trials, none lost, none run twice, none drawn twice, each with one MLflow run under the one parent."""
    study = load(home, name)
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(n))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [t.state for t in trials]
    assert sum(bool(t.user_attrs.get("default_schedule")) for t in trials) == 1
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == n, points  # same sampler seed in every process drew identical points
    client = mlflow_client(home)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = [r for r in client.search_runs([exp], max_results=1000)
            if r.data.tags.get("optuna.study") == name and "variant" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(n))  # one run per trial
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    for t, run in trial_runs(client, trials).items():
        assert run.info.status == ("FINISHED" if trials[t].state == TrialState.COMPLETE else "KILLED")
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_eight_spawned_workers_lose_and_duplicate_no_trial(home):
    # raises if a worker failed
    run_study(study_config(trials=8, workers=8, study_name="w8", exact_top=0), progress=False)
    check_shared_study(home, "w8", 8)


@pytest.mark.slow
def test_four_separate_processes_lose_and_duplicate_no_trial(home, t40_space):
    args = ["study", "--trials", "8", "--steps", str(STEPS), "--study-name", "p4", "--space", str(t40_space),
            "--exact-top", "0"]
    procs = [bench_process(home, args, f"p{i}") for i in range(4)]  # same seed, same storage, started together
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, process_output(home, f"p{i}")
    check_shared_study(home, "p4", 8)


def test_trial_n_draws_the_same_point_in_any_process_and_different_points_from_trial_m():
    def draw(number_of_earlier_trials: int) -> dict:
        study = optuna.create_study(sampler=study_mod._sampler(StudyConfig(sampler="random", seed=7)))
        for _ in range(number_of_earlier_trials):
            study.enqueue_trial({"x": 0.5})
            study.tell(study.ask(), 0.0)
        trial = study.ask()
        return {"number": trial.number, "x": trial.suggest_float("x", 0.0, 1.0)}

    assert draw(2) == draw(2)  # reproducible from (seed, trial number)
    assert draw(2)["x"] != draw(3)["x"]


def test_concurrent_starts_share_one_parent_run(home, monkeypatch):
    """Two run_study calls on one study, gated so both open it before either creates the parent run
    (what two `bench study` processes started together do; seen with real processes too)."""
    original = study_mod._open_study
    gate, seen = threading.Barrier(2, timeout=120), threading.local()

    def gated(sc, name):
        study = original(sc, name)
        if not getattr(seen, "done", False):
            seen.done = True
            gate.wait()
        return study

    monkeypatch.setattr(study_mod, "_open_study", gated)
    precreate_stores(home)
    errors = []

    def start():
        try:
            run_study(study_config(trials=3, study_name="race"), progress=False)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    study = load(home, "race")
    client = mlflow_client(home)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = [r.info.run_id for r in client.search_runs([exp])
               if r.data.tags.get("optuna.study") == "race" and "mlflow.parentRunId" not in r.data.tags]
    assert parents == [study.user_attrs["mlflow_parent_run_id"]]
    assert sum(bool(t.user_attrs.get("default_schedule")) for t in study.trials) == 1
    assert not errors, errors
    for run in trial_runs(client, study.trials).values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0]


def test_experiment_created_by_another_process_in_between_is_used(home, monkeypatch):
    client = mlflow_client(home)
    original, calls = client.get_experiment_by_name, []

    def first_look_misses(name):  # we look, then the other process creates it, then we create
        calls.append(name)
        if len(calls) == 1:
            existing.append(client.create_experiment(name))
            return None
        return original(name)

    existing = []
    monkeypatch.setattr(client, "get_experiment_by_name", first_look_misses)
    assert tracking.experiment_id(client, EXPERIMENT) == existing[0]


def test_a_study_whose_trials_all_run_elsewhere_is_summarised(home, monkeypatch):
    """A worker waits while the study's trials run elsewhere (their heartbeats fresh); stopped by its
    timeout, it summarises the study as it stands."""
    sc = study_config(trials=1, study_name="busy", heartbeat=1, timeout=4.0, exact_top=0)
    study = study_mod._open_study(sc, "busy")
    trial = study.ask()  # another worker's trial, still RUNNING: its heartbeat is fresh
    beat = lambda: study._storage.record_heartbeat(trial._trial_id)  # noqa: E731
    beat()
    finish, waited = study_mod._finish, []

    def timed_finish(*args, **kwargs):
        waited.append(time.monotonic() - start)
        return finish(*args, **kwargs)

    monkeypatch.setattr(study_mod, "_finish", timed_finish)
    start = time.monotonic()
    with liveness.every(0.3, beat, "elsewhere"):
        [result] = run_study(sc, progress=False)
    assert waited[0] >= sc.timeout  # waited for it: neither gave up nor failed it
    assert [t.state for t in load(home, "busy").trials] == [TrialState.RUNNING]
    assert result.counts["running"] == 1 and result.best == []
    assert mlflow_client(home).get_run(result.parent_run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------- 4. pruning
def test_a_pruned_trial_ends_its_run_killed(home):
    sc = study_config(study_name="prune")
    space = load_space()
    client = mlflow_client(home)
    parent_id = client.create_run(tracking.experiment_id(client, EXPERIMENT), run_name="prune").info.run_id
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: study_mod._objective(trial, sc, "prune", "simple", space, parent_id), n_trials=1)
    [trial] = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # pruned at the first evaluation (step 1)
    assert "checkpoint" not in trial.user_attrs
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    why = f"at step 1 by Optuna's ThresholdPruner (estimated bpd {trial.intermediate_values[1]:.4f} bits/dim)"
    assert trial.user_attrs["pruned"] == why
    assert run.data.tags["stop_reason"] == f"pruned {why}"
    assert describe_trial(trial, ("bpd",)).startswith(f"trial 0 pruned {why}  {' '.join(param_text(trial.params))}  (")
    assert run.data.tags["stop_step"] == "1"
    assert run.data.tags["mlflow.parentRunId"] == parent_id


# ----------------------------------------------------------------------------- 5. divergence
def test_a_diverging_trial_fails_and_the_study_goes_on(home, monkeypatch, t40_space):
    res = invoke(monkeypatch, ["study", "--trials", 2, "--steps", STEPS, "--study-name", "div", "--space", t40_space],
                 lr=1e30)
    assert res.exit_code == 0, describe(res)
    study = load(home, "div")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # trial 1 ran after trial 0 failed
    client = mlflow_client(home)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    lines = trial_lines(res.stdout)
    for t, run in trial_runs(client, trials).items():
        assert "non-finite" in trials[t].user_attrs["failure_reason"]
        assert "checkpoint" not in trials[t].user_attrs
        assert run.info.status == "FAILED"
        assert run.data.tags["diverged"] == "true" and "non-finite" in run.data.tags["failure_reason"]
        reason = f"{run.data.tags['failure_reason']} at step {run.data.tags['failure_step']}"
        assert trials[t].user_attrs["failure_reason"] == reason
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert lines[t][:2] == (t + 1, 2)
        assert f"trial {t}{' [default schedule]' if t == 0 else ''} failed (diverged: {reason})  " in lines[t][2]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_fail"] == 2 and parent.data.metrics["trials_complete"] == 0
    assert "best_bpd" not in parent.data.metrics and not any(k.startswith("best.") for k in parent.data.tags)
    out = res.stdout.splitlines()
    assert "  trials: 2 failed (2 diverged)" in out and "  no trial completed, so there is no best" in out
    assert "  default schedule: no complete trial (outside the search space, or it failed)" in out
    assert not any(line.startswith("exact bound") for line in out)


# ----------------------------------------------------------------------------- 6. resuming by name
@pytest.fixture(scope="module")
def resumed(tmp_path_factory, store_template):
    """A study run with trials=2, then resumed by name with trials=3. The first session's trials barely move
    from their initial weights (lr 1e-9), the second trains longer at the default lr: its trial is the best."""
    home = tmp_path_factory.mktemp("resumed")
    shutil.copyfile(store_template, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, home)
        [first] = run_study(study_config(trials=2, study_name="resume", run_overrides={**LIB, "lr": 1e-9}),
                            progress=False)
        best_after_first = load(home, "resume").best_trial.number
        # the flat EMA: 16 steps from the zero-output network keep it near that network under the drawn schedule
        # (11.28 bits/dim against the first session's 11.71); the warmed-up EMA tracks a 16-step network (13.34)
        [second] = run_study(study_config(trials=3, steps=16, study_name="resume",
                                          run_overrides={**LIB, "warmup_steps": 1, "ema_warmup": False}),
                             progress=False)
    return {"home": home, "first": first, "second": second, "best_after_first": best_after_first,
            "study": load(home, "resume")}


def test_resuming_by_name_continues_the_same_study(resumed):
    study, first, second = resumed["study"], resumed["first"], resumed["second"]
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [bool(t.user_attrs.get("default_schedule")) for t in trials] == [True, False, False]
    assert trials[0].params == DEFAULT_PARAMS  # the default schedule under the default space
    assert second.parent_run_id == first.parent_run_id == study.user_attrs["mlflow_parent_run_id"]
    client = mlflow_client(resumed["home"])
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == 3
    for run in trial_runs(client, trials).values():
        assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert client.get_run(trials[2].user_attrs["mlflow_run_id"]).data.params["config.steps"] == "16"


def test_a_resumed_study_draws_new_points(resumed):
    trials = resumed["study"].trials
    assert trials[2].params != trials[1].params


def test_a_resumed_study_updates_the_best_params(resumed):
    study = resumed["study"]
    assert resumed["best_after_first"] in (0, 1) and study.best_trial.number == 2
    parent = mlflow_client(resumed["home"]).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.metrics["best_bpd"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)


# ----------------------------------------------------------------------------- 7. heartbeat
def _running_trial_with_params(db: Path, name: str) -> bool:
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute(
                "SELECT t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE s.study_name = ? AND t.state = 'RUNNING' "
                "AND EXISTS (SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id)", (name,)).fetchone()
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return False
    return row is not None


def _trial_run_started(db: Path) -> bool:
    """The MLflow run of trial 0 exists (it is created tagged) and is RUNNING."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT 1 FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                              "WHERE r.status = 'RUNNING' AND t.key = 'optuna.trial' AND t.value = '0'").fetchone()
    except sqlite3.OperationalError:
        return False
    return row is not None


def test_a_killed_workers_trial_is_failed_and_retried(home, t40_space, capsys):
    args = ["study", "--heartbeat", "1", "--steps", "2000", "--trials", "2", "--study-name", "hb",
            "--space", str(t40_space), "--exact-top", "1"]
    proc = bench_process(home, args, "hb")
    try:
        deadline = time.monotonic() + 90
        while not (_running_trial_with_params(home / "optuna.db", "hb") and _trial_run_started(home / "mlflow.db")):
            assert proc.poll() is None, (f"exited with {proc.returncode} before a trial ran\n"
                                         + process_output(home, "hb"))
            assert time.monotonic() < deadline, "no RUNNING trial appeared\n" + process_output(home, "hb")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(3)  # > grace period (2 x heartbeat = 2 s)
    capsys.readouterr()
    [result] = run_study(study_config(trials=2, heartbeat=1, study_name="hb", space_file=str(t40_space),
                                      run_overrides=dict(CLI_DEFAULTS)), progress=True)
    lines = trial_lines(capsys.readouterr().out)
    trials = load(home, "hb").trials
    # the lost trial does not count toward --trials 2: its retry and one more trial do
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    stale, retry, _ = trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
        assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]
    assert retry.params == stale.params == {**DEFAULT_PARAMS, "T": 40}
    assert lines[0][2].startswith("[1/3] trial 0 [default schedule] failed "
                                  "(its worker stopped sending heartbeats (killed or stalled); retried as trial 1)  ")
    assert lines[1][2].startswith("[2/3] trial 1 [default schedule, retry of trial 0] "
                                  f"complete  bpd {retry.value:.4f} ")
    assert lines[2][2].startswith("[3/3] trial 2 complete  bpd ")
    assert retry.user_attrs.get("default_schedule") is True
    client = mlflow_client(home)
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert result.counts["fail"] == 1 and result.counts["complete"] == 2
    # the killed worker's MLflow run does not stay RUNNING: the study's next worker closed it
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (dead,) = [r for r in client.search_runs([exp]) if r.data.tags.get("optuna.trial") == "0"]
    assert dead.info.status == "KILLED" and "is gone" in dead.data.tags["killed_reason"]


LEFT_BY_A_DEAD_WORKER = {
    "taken": "killed between taking its trial and the trial's first heartbeat",
    "claimed": "killed before the first heartbeat, as an older version left it (worker attribute, no heartbeat)",
    "training": "killed while training (a heartbeat, gone stale, and a RUNNING MLflow run on another host)",
}


@pytest.mark.parametrize("name, left", [("lost", "taken"), ("lost", "claimed"), ("o'hara", "training")])
def test_a_trial_left_running_by_a_dead_worker_is_retried_and_the_study_finishes(home, t40_space, name, left):
    """The trial a dead worker leaves RUNNING, heartbeat or none, turns stale and is retried: a later
    `bench study` of the same name (or the workers still on it) finishes with every trial, whatever the
    study is called. Without the fix: "taken" stopped with the trial RUNNING, "claimed" waited forever, and
    "o'hara" went into an MLflow filter unquoted and crashed the worker."""
    sc = study_config(trials=2, heartbeat=1, study_name=name, exact_top=0, space_file=str(t40_space),
                      run_overrides={**CLI_DEFAULTS, "final_eval_images": 8, "eval_every": 0},
                      timeout=240.0)  # the timeout: a hang fails, not hangs
    client = tracking.client()
    study = study_mod._open_study(sc, name)
    # the dead worker's start: trial 0 queued
    study_mod._parent_run(client, study, sc, name, "simple", load_space(sc.space_file))
    lost = study.ask()  # … and taken: RUNNING
    dead_run = None
    if left != "taken":
        lost.set_user_attr("worker", "elsewhere.invalid:4242")
    if left == "training":
        study._storage.record_heartbeat(lost._trial_id)
        dead_run = client.create_run(tracking.experiment_id(client, EXPERIMENT), tags={
            "optuna.study": name, "optuna.trial": "0", "variant": "simple", "owner.host": "elsewhere.invalid",
            "owner.pid": "4242", "owner.heartbeat": str(int(time.time()))}).info.run_id  # alive as far as MLflow knows

    [result] = run_study(sc, progress=False)
    trials = load(home, name).trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state == TrialState.FAIL and study_mod.lost_worker(trials[0])
    assert {t.state for t in trials[1:]} == {TrialState.COMPLETE}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        (retry,) = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert retry.params == {**DEFAULT_PARAMS, "T": 40} and retry.user_attrs["default_schedule"] is True  # trial 0's
    assert result.counts["complete"] == 2 and result.counts["running"] == 0
    c = mlflow_client(home)
    assert c.get_run(result.parent_run_id).info.status == "FINISHED"
    if dead_run is not None:
        run = c.get_run(dead_run)
        assert run.info.status == "KILLED" and "stopped sending heartbeats" in run.data.tags["killed_reason"]


# ----------------------------------------------------------------------------- 8. bad input, --show-space
BAD_FILES = {
    "unknown-parameter": ("[params.gamma]\nlow = 0.1\nhigh = 0.2\n", "unknown parameter 'gamma'"),
    "low-not-below-high": ("[params.cosine_s]\nlow = 0.1\nhigh = 0.01\n", "impossible range"),
    "low-equals-high": ("[params.T]\nlow = 100\nhigh = 100\n", "impossible range"),
    "beta-start-above-beta-end": ("[params.beta_start]\nlow = 0.01\nhigh = 0.02\n", "beta_start's low"),
    "log-with-zero-low": ("[params.cosine_s]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "low must be > 0"),
    "unknown-section": ("[search]\nsampler = 'tpe'\n", "unknown section(s) search"),
    "categorical-without-choices": ("[params.schedule]\nlow = 1\nhigh = 2\n", "categorical"),
    "unknown-schedule": ("[params.schedule]\nchoices = ['sigmoid']\n", "schedule choices"),
    "beta-end-reaches-one": ("[params.beta_end]\nlow = 0.01\nhigh = 1.0\n", "below 1"),
    "not-toml": ("[params.T\n", "not valid TOML"),
}


def _one_error_line(res) -> str:
    assert res.exit_code not in (0, None), describe(res)
    assert res.exception is None or isinstance(res.exception, SystemExit), describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), describe(res)
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_study_file_is_one_error_line(home, tmp_path, monkeypatch, case):
    text, message = BAD_FILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    res = invoke(monkeypatch, ["study", "--trials", "1", "--steps", "1", "--space", str(path)])
    assert message in _one_error_line(res)
    assert not (home / "optuna.db").exists()  # refused before anything was opened


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "trials must be an integer >= 1, got 0"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--workers", "0"], "workers must be an integer >= 1"),
    (["--heartbeat", "0"], "heartbeat must be an integer >= 1"),
    (["--timeout", "0"], "timeout must be > 0"),
    (["--space", "no-such-study"], "study file no-such-study not found"),
    (["--sampler", "grid"], "Invalid value for '--sampler'"),
])
def test_bad_options_are_one_error_line(home, monkeypatch, args, message):
    res = invoke(monkeypatch, ["study", *args])
    assert message in _one_error_line(res)
    assert not (home / "optuna.db").exists()


def test_storage_in_the_mlflow_store_is_refused(home, monkeypatch):
    res = invoke(monkeypatch, ["study", "--trials", "1", "--steps", "1", "--storage", f"sqlite:///{home}/mlflow.db"])
    line = _one_error_line(res)
    assert "trials" not in tables(home / "mlflow.db")  # MLflow's store left alone
    assert "is the MLflow store" in line


@pytest.mark.parametrize("kwargs", [
    {"objective": "fid", "fid_samples": 0}, {"exact_top": -1},
    {"trials": 0}, {"workers": 0}, {"heartbeat": 0}, {"timeout": -1.0}, {"objective": "loss"},
    {"sampler": "cmaes"}, {"variants": ()}, {"run_overrides": {"lr": -1.0}},
])
def test_study_config_refuses_nonsense(kwargs):
    with pytest.raises(BenchError):
        StudyConfig(**kwargs).validate()


@pytest.mark.parametrize("text", [
    "[params.warmup_steps]\nlow = -10\nhigh = -1\n",
    "[params.ema_decay]\nlow = 0.9\nhigh = 1.5\n",
    "[params.T]\nchoices = [0, 40]\n",
])
def test_ranges_outside_what_a_run_accepts_are_refused_up_front(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BenchError):
        load_space(path)


def test_show_space_lists_the_parameters(home, tmp_path, monkeypatch):
    res = invoke(monkeypatch, ["study", "--show-space"])
    assert res.exit_code == 0, describe(res)
    lines = res.stdout.splitlines()
    assert lines[:5] == [
        "schedule: one of ['linear', 'cosine']",
        "beta_start: log-uniform in [1e-05, 0.001]",
        "beta_end: log-uniform in [0.005, 0.05]",
        "cosine_s: log-uniform in [0.001, 0.1]",
        "T: one of [250, 500, 1000]",
    ]
    assert not any(line.startswith("lr:") for line in lines)
    assert not (home / "optuna.db").exists() and "trials" not in tables(home / "mlflow.db")

    res = invoke(monkeypatch, ["study", "--show-space", "--tune-lr"])
    assert res.exit_code == 0, describe(res)
    assert "lr: log-uniform in [0.0001, 0.003]" in res.stdout.splitlines()

    dropped = tmp_path / "dropped.toml"
    dropped.write_text("[params.cosine_s]\nenabled = false\n[params.T]\nenabled = false\n")
    res = invoke(monkeypatch, ["study", "--show-space", "--space", str(dropped)])
    assert res.exit_code == 0, describe(res)
    names = [line.split(":")[0] for line in res.stdout.splitlines()[:-1]]
    assert names == ["schedule", "beta_start", "beta_end"]

    res = invoke(monkeypatch, ["study", "--show-space", "--space", "narrow"])  # studies/narrow.toml, by name
    assert res.exit_code == 0, describe(res)
    assert "schedule: one of ['cosine']" in res.stdout
    assert "lr: log-uniform in [0.0003, 0.003]" in res.stdout


def test_a_narrowed_space_runs(home):
    run_study(study_config(trials=2, study_name="narrow", space_file="narrow"), progress=False)
    trials = load(home, "narrow").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.params["schedule"] == "cosine" and 3e-4 <= t.params["lr"] <= 3e-3 for t in trials)


def test_show_space_of_a_ddpm_and_a_continuous_time_variant(home, monkeypatch):
    res = invoke(monkeypatch, ["study", "--show-space", "--variant", "vdm-fixed", "--variant", "vdm"])
    assert res.exit_code == 0, describe(res)
    assert res.stdout.splitlines() == [
        "variant vdm-fixed:", "  gamma_min: uniform in [-16, -8]", "  gamma_max: uniform in [2, 8]",
        "  (gamma_min/gamma_max: the fixed schedule's end points γ(0), γ(1); gamma_max is drawn first and γ(0) < γ(1))",
        "variant vdm:", "  gamma_min: uniform in [-16, -8]", "  gamma_max: uniform in [2, 8]",
        "  (gamma_min/gamma_max: the learned schedule's starting end points γ(0), γ(1) (training moves them); "
        "gamma_max is drawn first and γ(0) < γ(1))"]
    res = invoke(monkeypatch, ["study", "--show-space", "--variant", "simple", "--variant", "vdm-fixed",
                               "--space", "vdm-ends"])
    assert "parameter gamma_max does not act on variant simple" in _one_error_line(res)
    res = invoke(monkeypatch, ["study", "--variant", "vdm-fixed", "--gamma-min", "-10"])
    assert "--gamma-min is tuned by the study's search space" in _one_error_line(res)


def test_tuned_and_learned_schedule_studies_run_and_compare(home):
    """`bench study --variant vdm-fixed --variant vdm`: one study each, γ's end points tuned, trial 0 VDM's line."""
    sc = study_config(variants=("vdm-fixed", "vdm"), trials=2, exact_top=0, space_file="vdm-ends")
    results = run_study(sc, progress=False)
    client = mlflow_client(home)
    for r in results:
        trials = load(home, r.name).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, r.variant
        assert trials[0].params == {"gamma_min": -13.3, "gamma_max": 5.0}  # the configured schedule
        for t, run in trial_runs(client, trials).items():
            p = trials[t].params
            assert -16 <= p["gamma_min"] < p["gamma_max"] <= 8
            assert float(run.data.params["config.gamma_min"]) == p["gamma_min"]  # what the trial trained with
            assert float(run.data.params["config.gamma_max"]) == p["gamma_max"]
            assert run.data.params["config.variant"] == r.variant
    text = compare_results(results, sc)
    assert "vdm-fixed" in text and "γ(t) fixed, γ(0)=" in text and "γ(t) learned-ends, learned from γ(0)=" in text
    assert "the learned schedule's starting end points" in describe_result(results[1], sc)


def test_a_weighting_study_gives_the_pareto_front_with_each_trials_weighting(home):
    """`bench study --variant weighted --space weightings --objective both`: trial 0 the configured ε-MSE, then a
    drawn weighting (seed 6: min-SNR with its γ); each trial trains what it drew; the front names each weighting."""
    sc = study_config(variants=("weighted",), trials=2, steps=2, exact_top=0, objective="both", fid_samples=4, seed=6,
                      space_file="weightings", run_overrides={**LIB, "eval_every": 0, "sample_steps": 4})
    [r] = run_study(sc, progress=False)
    trials = load(home, r.name).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.params for t in trials] == [{"weighting": "eps"},
                                          {"weighting": "min-snr", "min_snr_gamma": trials[1].params["min_snr_gamma"]}]
    assert 1 <= trials[1].params["min_snr_gamma"] <= 20 and all(len(t.values) == 2 for t in trials)
    runs = trial_runs(mlflow_client(home), trials)
    for t in trials:  # what the trial trained with, as `bench report` reads it
        run = runs[t.number].data
        gamma = f" γ={t.params['min_snr_gamma']:g}" if "min_snr_gamma" in t.params else ""
        assert run.params["config.weighting"] == t.params["weighting"] and run.tags["variant"] == \
            f"weighted[{t.params['weighting']}{gamma}]"
        assert float(run.params["config.min_snr_gamma"]) == t.params.get("min_snr_gamma", 5.0)
        assert run.metrics["fid"] == pytest.approx(t.values[1])
    for t in trials:  # each trial's line
        assert describe_trial(t, ("bpd", "fid")).split("  ")[-2] == " ".join(param_text(t.params))
    out = describe_result(r, sc).splitlines()
    front = sorted(load(home, r.name).best_trials, key=lambda t: t.values)
    head = out.index(f"  Pareto front, {len(front)} trial{'s' * (len(front) > 1)} (* the default schedule):")
    params = [k for k in ("weighting", "min_snr_gamma") if any(k in t.params for t in front)]
    assert out[head + 1].split() == ["trial", "bpd", "fid", "exact", "bpd", *params], out
    for row, t in zip(out[head + 2: head + 2 + len(front)], front):
        assert row.split()[4:] == [param_cell(t.params.get(k, "-")) for k in params], row


def _result(variant: str, params: dict, bpd: float, exact=None) -> StudyResult:
    row = {"trial": 1, "params": params, "values": [bpd], "bpd_estimate": bpd, "bpd_stderr": 0.01,
           "bpd_exact": exact, "mlflow_run_id": "r", "default_schedule": False, "fid_samples": None,
           "fid_extractor": None}
    return StudyResult(f"s-{variant}", variant, "parent", [row], None, {"complete": 1})


def test_several_studies_compare_their_best_trials_and_schedules():
    sc = StudyConfig(variants=("simple", "vdm-fixed", "vdm"))
    results = [_result("simple", {"schedule": "cosine", "cosine_s": 0.01, "T": 500}, 1.5, 1.4567),
               _result("vdm-fixed", {"gamma_min": -12.25, "gamma_max": 4.5}, 1.25),
               _result("vdm", {"gamma_min": -10.5, "gamma_max": 6.0}, 1.125)]
    lines = compare_results(results, sc).splitlines()
    assert lines[0] == "studies compared, the best trial of each:"
    assert lines[1].split() == ["variant", "trial", "bpd", "exact", "bpd", "schedule"]
    assert lines[2].split() == ["simple", "1", "1.5000", "1.4567", "cosine", "s=0.01,", "T=500"]
    assert lines[3].split() == ["vdm-fixed", "1", "1.2500", "-", "γ(t)", "fixed,", "γ(0)=-12.25", "γ(1)=4.5"]
    assert lines[4].split() == ["vdm", "1", "1.1250", "-", "γ(t)", "learned-ends,", "learned", "from", "γ(0)=-10.5",
                                "γ(1)=6"]
    text = describe_result(results[2], sc)
    assert "    gamma_min=-10.5 gamma_max=6" in text.splitlines()
    assert "  gamma_min/gamma_max: the learned schedule's starting end points γ(0), γ(1) (training moves them)" in text
    assert "gamma_min/gamma_max" not in describe_result(results[0], sc)  # a DDPM study's block as before


def test_a_weighted_study_names_its_weighting_in_the_comparison_and_when_not_tuned():
    sc = StudyConfig(variants=("vdm-fixed", "weighted"))
    results = [_result("vdm-fixed", {"gamma_min": -12.25, "gamma_max": 4.5}, 1.25),
               _result("weighted", {"gamma_min": -12.0, "gamma_max": 5.0, "weighting": "min-snr",
                                    "min_snr_gamma": 4.25}, 1.125)]
    lines = compare_results(results, sc).splitlines()
    assert lines[1].split() == ["variant", "trial", "bpd", "exact", "bpd", "schedule", "weighting"]
    assert lines[2].split()[-1] == "-" and lines[3].split()[-1] == "min-snr(min_snr_gamma=4.25)", lines
    assert "    gamma_min=-12 gamma_max=5 weighting=min-snr min_snr_gamma=4.25" in \
        describe_result(results[1], sc).splitlines()  # a tuned weighting is among the trial's parameters
    assert "weighting (not tuned)" not in describe_result(results[1], sc)
    fixed = StudyConfig(variants=("weighted",), run_overrides={"weighting": "sigmoid", "sigmoid_bias": -2.0})
    text = describe_result(_result("weighted", {"gamma_min": -12.0, "gamma_max": 5.0}, 1.1), fixed)
    assert "  weighting (not tuned): sigmoid(sigmoid_bias=-2)" in text.splitlines(), text


# ----------------------------------------------------------------------------- 9. the sampler's constraints
def test_suggest_keeps_beta_start_below_beta_end():
    points = ask_many(DEFAULT_SPACE)
    linear = [p for p in points if p["schedule"] == "linear"]
    cosine = [p for p in points if p["schedule"] == "cosine"]
    assert len(linear) > 50 and len(cosine) > 50
    for p in linear:
        assert set(p) == {"schedule", "beta_start", "beta_end", "T"}
        assert 1e-5 <= p["beta_start"] < p["beta_end"] <= 5e-2 and p["beta_end"] >= 5e-3
        assert p["T"] in (250, 500, 1000)
    for p in cosine:
        assert set(p) == {"schedule", "cosine_s", "T"}
        assert 1e-3 <= p["cosine_s"] <= 0.1
    # overlapping ranges: the bound β_1 < β_T actually binds
    for p in ask_many({"beta_start": Param("beta_start", low=1e-3, high=4e-2, log=True),
                       "beta_end": DEFAULT_SPACE["beta_end"]}):
        assert p["beta_start"] < p["beta_end"]


def test_suggest_keeps_categorical_beta_start_below_beta_end(tmp_path):
    path = tmp_path / "cat.toml"
    path.write_text("[params.beta_start]\nchoices = [0.001, 0.01]\n")
    try:
        space = load_space(path)
    except BenchError:
        return  # refusing such a space is a fix too
    for p in ask_many(space):
        if p["schedule"] == "linear":
            assert p["beta_start"] < p["beta_end"], p


# ----------------------------------------------------------------------------- 10. what a study prints
def test_best_so_far_names_the_metric_and_the_front():
    def done(number, *values):
        t = optuna.trial.create_trial(values=list(values))
        t.number = number
        return t

    running = optuna.trial.create_trial(state=TrialState.RUNNING)
    assert best_so_far([], ("bpd",)) == "no trial complete yet"
    assert best_so_far([done(0, 5.0), done(1, 4.25), done(2, 4.5)], ("bpd",)) == "best bpd 4.2500 bits/dim (trial 1)"
    assert best_so_far([done(0, 31.0), running, running], ("fid",)) == "best fid 31.00 (trial 0), 2 running"
    # (4, 30) and (5, 20) are the front; (6, 25) is dominated by (5, 20)
    both = [done(0, 4.0, 30.0), done(1, 5.0, 20.0), done(2, 6.0, 25.0)]
    assert best_so_far(both, ("bpd", "fid")) == "Pareto front 2 trials (best bpd 4, fid 20)"


def test_a_stale_trial_out_of_retries_says_so():
    t = optuna.trial.create_trial(state=TrialState.FAIL, params={"T": 40},
                                  distributions={"T": optuna.distributions.CategoricalDistribution([40])},
                                  system_attrs={"failed_trial": 3, "retry_history": [3, 5]})
    t.number = 7
    assert describe_trial(t, ("bpd",)) == ("trial 7 [retry of trial 3] failed (its worker stopped sending heartbeats "
                                           "(killed or stalled); not retried (retried 2 times already))  T=40  (0s)")


def test_spawned_workers_spread_over_the_gpus():
    assert study_mod.worker_devices("auto", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert study_mod.worker_devices("cuda", 2, 4) == ["cuda:0", "cuda:1"]
    assert study_mod.worker_devices("auto", 2, 0) == ["auto", "auto"]  # no GPU: each picks for itself
    assert study_mod.worker_devices("cuda:3", 2, 8) == ["cuda:3", "cuda:3"]  # a named device is kept
