"""``bench grid`` (issue 9, item 6): the default set is DDPM Table 2's six rows plus iDDPM's two, it takes
--config and every ``bench run`` option, and a rerun trains only the (config, seed) pairs without a result.

Runs are tiny (T = 40, 3 steps, 8 test images, no FID); MLflow is read back from the embedded store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from bench.cli.grid import GRID_VARIANTS, TABLE2_VARIANTS
from bench.cli.main import cli
from bench.training.config import flatten, make_config

TINY = ["--T", "40", "--steps", "3", "--batch-size", "16", "--log-every", "1", "--eval-every", "0",
        "--eval-images", "8", "--final-eval", "estimate", "--final-eval-images", "8", "--fid-samples", "0",
        "--sample-steps", "10", "--no-log-model"]
PAIR = ["--variant", "simple", "--variant", "mu-elbo-learned-diag", "--seeds", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(tmp_path, store_template) -> Path:
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return tmp_path


def invoke(home: Path, args: list[str]):
    return CliRunner().invoke(cli, ["grid", *args], env={"BENCH_HOME": str(home), "MLFLOW_TRACKING_URI": None,
                                                         "BENCH_DATA_DIR": None})


def describe(result) -> str:
    import traceback

    tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info and result.exception else ""
    return f"exit {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-3000:]}\n{tb}"


def grid_ok(home: Path, args: list[str]) -> str:
    result = invoke(home, args)
    assert result.exit_code == 0, describe(result)
    return result.stdout


def training_runs(home: Path, experiment: str) -> list:
    """The experiment's training runs (the report's own run carries no variant tag)."""
    c = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else [r for r in c.search_runs([exp.experiment_id]) if "variant" in r.data.tags]


def dry_run_config(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1:])


def test_default_set_is_table_2_and_iddpm(tmp_path):
    # DDPM Table 2: μ̃ prediction {L, learned diagonal Σ}, {L, fixed isotropic Σ}, ‖μ̃ − μ̃_θ‖²;
    # ε prediction {L, learned diagonal Σ}, {L, fixed isotropic Σ}, L_simple
    assert set(TABLE2_VARIANTS) == {"mu-elbo-learned-diag", "mu-elbo", "mu-mse", "elbo-learned-diag", "elbo", "simple"}
    assert GRID_VARIANTS == (*TABLE2_VARIANTS, "hybrid", "elbo-learned")
    out = grid_ok(tmp_path, ["--dry-run"])
    plan = [line.split()[1] for line in out.splitlines() if line.startswith("[")]
    assert plan == [f"{v}-digits-seed{s}" for v in GRID_VARIANTS for s in (0, 1)]
    assert "16 runs: 16 to train, 0 already recorded" in out
    cfg = dry_run_config(out)  # the grid's own budget over the run defaults
    assert (cfg["steps"], cfg["fid_samples"], cfg["experiment"]) == (1000, 500, "grid-digits")
    assert not (tmp_path / "mlflow.db").exists()  # a dry run writes nothing


def test_a_rerun_trains_only_the_pairs_without_a_result(home):
    args = [*PAIR, *TINY, "--experiment", "g", "--out", str(home / "rep")]
    first = invoke(home, args)
    out = first.stdout
    assert first.exit_code == 0, describe(first)
    assert "2 runs, 0 diverged" in out and "skipped" not in out
    # 3 steps, inside the 100-step learning-rate warm-up: said once for the grid, not once per run
    (warning,) = [w for w in first.stderr.splitlines() if w.startswith("warning:")]
    assert warning.startswith("warning: --steps 3 ends inside the learning-rate warm-up")
    runs = {r.data.tags["variant"]: r for r in training_runs(home, "g")}
    assert sorted(runs) == ["mu-elbo-learned-diag", "simple[small]"]
    assert all(r.info.status == "FINISHED" for r in runs.values())

    out = grid_ok(home, args)  # everything done: nothing trained, the report rebuilt
    assert out.count("skipped: already recorded as run") == 2, out
    assert "2 already recorded before this grid, skipped" in out and "report of 2 runs" in out
    assert len(training_runs(home, "g")) == 2
    assert "2 runs: 0 to train, 2 already recorded" in grid_ok(home, [*args, "--dry-run"])

    killed = runs["simple[small]"].info.run_id  # as if the grid had been interrupted during this run
    MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").set_terminated(killed, "KILLED")
    out = grid_ok(home, args)
    assert f"training (again: run {killed} KILLED)" in out and out.count("skipped") == 2, out  # one pair, one total
    after = training_runs(home, "g")
    new = [r for r in after if r.info.run_id not in {r.info.run_id for r in runs.values()}]
    assert len(after) == 3 and len(new) == 1
    assert new[0].data.tags["variant"] == "simple[small]" and new[0].info.status == "FINISHED"
    old_params = {k: v for k, v in runs["simple[small]"].data.params.items() if k.startswith("config.")}
    assert {k: v for k, v in new[0].data.params.items() if k.startswith("config.")} == old_params


def test_a_diverged_pair_is_a_result_a_crashed_one_is_not(home):
    args = ["--variant", "simple", "--seeds", "1", *TINY, "--lr", "1e30", "--experiment", "g",
            "--out", str(home / "rep")]
    assert "1 runs, 1 diverged" in grid_ok(home, args)
    (run,) = training_runs(home, "g")
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
    out = grid_ok(home, args)
    assert f"skipped: already recorded as run {run.info.run_id} diverged, recorded FAILED" in out
    assert "1 runs, 1 diverged" in out and len(training_runs(home, "g")) == 1

    MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").delete_tag(run.info.run_id, "diverged")  # as if it crashed
    out = grid_ok(home, args)
    assert f"training (again: run {run.info.run_id} FAILED" in out and len(training_runs(home, "g")) == 2


def test_config_file_and_run_options_reach_every_run(home):
    toml = home / "grid.toml"
    toml.write_text('variant = "mu-elbo"\nlr = 3e-4\nbeta_end = 0.03\nseed = 7\nsteps = 50\n')
    args = ["--config", str(toml), *TINY, "--lr", "5e-4", "--seeds", "2", "--out", str(home / "rep")]
    dry = invoke(home, [*args, "--dry-run"])
    assert dry.exit_code == 0, describe(dry)
    assert "note: the grid sets seed itself" in dry.stderr
    assert [line.split()[1] for line in dry.stdout.splitlines() if line.startswith("[")] == [
        "mu-elbo-digits-seed0", "mu-elbo-digits-seed1"]  # the file's variant, the grid's seeds

    grid_ok(home, args)
    runs = sorted(training_runs(home, "grid-digits"), key=lambda r: r.data.params["config.seed"])
    assert [r.data.params["config.seed"] for r in runs] == ["0", "1"]
    for seed, run in enumerate(runs):
        expected = make_config(variant="mu-elbo", seed=seed, lr=5e-4, beta_end=0.03, steps=3, T=40, batch_size=16,
                               log_every=1, eval_every=0, eval_images=8, final_eval="estimate", final_eval_images=8,
                               fid_samples=0, sample_steps=10, log_model=False, experiment="grid-digits")
        assert {k: v for k, v in run.data.params.items() if k.startswith("config.")} == flatten(expected)
    # the full config tells pairs apart: a new seed, or any other value, is still to train
    assert "3 runs: 1 to train, 2 already recorded" in grid_ok(home, [*args, "--seeds", "3", "--dry-run"])
    assert "2 runs: 2 to train, 0 already recorded" in grid_ok(home, [*args, "--ema-decay", "0.9", "--dry-run"])


@pytest.mark.parametrize("claimant", ["finishes", "dies"])
def test_a_pair_another_grid_is_training_is_left_to_it_or_taken_over(home, monkeypatch, claimant):
    """Two grids on one experiment train each pair once: a pair another live grid holds is deferred to the end,
    then skipped once that grid recorded its result, or trained if that grid died (its claim freed) without one."""
    import threading

    import bench.cli.grid
    from bench.training.grid import claim

    for key, value in {"BENCH_HOME": str(home), "MLFLOW_TRACKING_URI": None, "BENCH_DATA_DIR": None}.items():
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    seed0 = make_config(variant="simple", seed=0, steps=3, T=40, batch_size=16, log_every=1, eval_every=0,
                        eval_images=8, final_eval="estimate", final_eval_images=8, fid_samples=0, sample_steps=10,
                        log_model=False,
                        experiment="g")  # the grid's first pair
    train, trained, held, grid_waits = bench.cli.grid.train, [], threading.Event(), threading.Event()

    def the_other_grid():
        with claim(seed0):
            held.set()
            assert grid_waits.wait(300)
            if claimant == "finishes":
                train(seed0, progress=False)
        # the claim is freed here: on finishing, or as by its process's death

    def grid_trains(config, *args, **kwargs):
        trained.append(config.seed)
        result = train(config, *args, **kwargs)
        if config.seed == 1:
            grid_waits.set()  # the grid has trained its own pair; next it waits for the deferred one
        return result

    monkeypatch.setattr(bench.cli.grid, "train", grid_trains)
    other = threading.Thread(target=the_other_grid)
    other.start()
    try:
        assert held.wait(60)
        out = grid_ok(home, ["--variant", "simple", "--seeds", "2", *TINY, "--experiment", "g",
                             "--out", str(home / "rep")])
    finally:
        grid_waits.set()
        other.join()
    assert "[1/2] simple-digits-seed0\n  deferred: pid " in out, out
    assert "[deferred] simple-digits-seed0: waiting for the process training it" in out, out
    runs = training_runs(home, "g")
    assert sorted(r.data.params["config.seed"] for r in runs) == ["0", "1"]  # each pair once
    assert all(r.info.status == "FINISHED" for r in runs)
    if claimant == "finishes":
        assert trained == [1]
        assert ("skipped: recorded meanwhile by another grid as run" in out
                and "1 trained meanwhile by another grid" in out)
    else:
        assert trained == [1, 0]
        assert "2 runs, 0 diverged" in out and "meanwhile" not in out


BAD = {
    "unknown option": (["--nope", "1"], "No such option"),
    "a run-only option": (["--resume", "x.pt"], "No such option"),
    "bad config value": (["--config", "{toml}"], "lr"),
    "bad option value": (["--lr", "0"], "lr"),
    "no seeds": (["--seeds", "0"], "seeds"),
    "a value the second variant refuses": (["--variant", "simple", "--variant", "hybrid", "--variance", "large"],
                                           "learns its variance"),  # validated before the first run
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_nothing_trained(case, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('lr = "fast"\n')
    args, needle = BAD[case]
    result = invoke(tmp_path, [a.format(toml=toml) for a in args])
    assert result.exit_code == 2, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


def test_an_ode_solver_failure_is_a_result_the_run_finishes_and_a_rerun_skips_it(home, monkeypatch):
    """The solver giving up on the probability flow (scipy's status -1, e.g. "Required step size is less than
    spacing between numbers.") is recorded like a diverged flow: the run ends FINISHED with the reason in
    tag nll_ode_failed and its bound logged, the grid exits 0, and a second grid does not retrain it."""
    import scipy.integrate

    gave_up = []

    def solver_gives_up(*args, **kwargs):
        gave_up.append(1)
        return SimpleNamespace(status=-1, message="Required step size is less than spacing between numbers.", nfev=9)

    monkeypatch.setattr(scipy.integrate, "solve_ivp", solver_gives_up)  # the ODE imports scipy on first use
    args = ["--variant", "simple", "--seeds", "1", *TINY, "--final-eval-ode", "--experiment", "g",
            "--out", str(home / "rep")]
    assert "1 runs, 0 diverged" in grid_ok(home, args)
    (run,) = training_runs(home, "g")
    assert gave_up and run.info.status == "FINISHED"
    assert "bpd" in run.data.metrics and "nll_ode" not in run.data.metrics
    assert "stopped before s = 1: Required step size" in run.data.tags["nll_ode_failed"]
    assert run.data.tags["nll_ode_precision"] == "float32"
    out = grid_ok(home, args)
    assert f"skipped: already recorded as run {run.info.run_id}" in out and len(training_runs(home, "g")) == 1
