"""The command line itself: every RunConfig field is an option with its default in the help, -h and
--version work, $MLFLOW_EXPERIMENT_NAME is honoured, and `bench study` passes run options to its trials."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest
from click.testing import CliRunner

from bench import cli as cli_mod
from bench.cli import RUN_OPTIONS, STUDY_OWNS, STUDY_RUN_OPTIONS, _param_name, cli
from bench.config import DATASET_DEFAULTS, RunConfig


def _invoke(args, **env):
    return CliRunner().invoke(cli, args, env={"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None, **env})


def test_every_config_field_is_a_run_option():
    options = {_param_name(o) for o in RUN_OPTIONS}
    missing = [f.name for f in fields(RunConfig) if f.name not in options]
    assert missing == []


def test_run_help_describes_every_option_with_its_default():
    res = _invoke(["run", "-h"])
    assert res.exit_code == 0, res.output
    command = cli.commands["run"]
    for param in command.params:
        if param.name == "help":
            continue
        assert param.help and len(param.help) > 10, f"--{param.name} has no description"
    # a default that differs per dataset is shown per dataset
    steps = re.sub(r"\s+", " ", res.output.split("--steps INTEGER", 1)[1].split("--batch-size", 1)[0])
    assert f"{DATASET_DEFAULTS['cifar10']['steps']:,} (cifar10)" in steps and f"{RunConfig().steps} (digits)" in steps
    assert "[default: 0.0]" in re.sub(r"\s+", " ", res.output.split("--weight-decay", 1)[1])[:80]


def test_toml_only_fields_now_reach_the_config(tmp_path):
    res = _invoke(["run", "--dry-run", "--weight-decay", "0.01", "--grad-clip", "0.5", "--hflip", "--eval-calls", "9",
                   "--eval-batch-size", "64", "--sample-grid", "16", "--no-system-metrics"],
                  BENCH_HOME=str(tmp_path))
    assert res.exit_code == 0, res.output
    config = json.loads(res.output)
    assert (config["weight_decay"], config["grad_clip"], config["hflip"], config["eval_calls"],
            config["eval_batch_size"], config["sample_grid"], config["system_metrics"]) == (0.01, 0.5, True, 9, 64, 16, False)


def test_dash_h_and_version():
    assert _invoke(["-h"]).output.startswith("Usage: ") and "Commands:" in _invoke(["-h"]).output
    assert "Show this message" in _invoke(["study", "-h"]).output
    res = _invoke(["--version"])
    assert res.exit_code == 0 and re.match(r"elbo-bench \d+\.\d+\.\d+ \(source \S+; torch \S+", res.output), res.output


def test_mlflow_experiment_name_is_honoured_below_the_option(tmp_path):
    res = _invoke(["run", "--dry-run"], BENCH_HOME=str(tmp_path), MLFLOW_EXPERIMENT_NAME="from-env")
    assert json.loads(res.output)["experiment"] == "from-env"
    res = _invoke(["run", "--dry-run", "--experiment", "given"], BENCH_HOME=str(tmp_path), MLFLOW_EXPERIMENT_NAME="from-env")
    assert json.loads(res.output)["experiment"] == "given"
    assert json.loads(_invoke(["run", "--dry-run"], BENCH_HOME=str(tmp_path)).output)["experiment"] == "elbo-bench"


@pytest.fixture
def captured_study(monkeypatch):
    """`bench study` up to the StudyConfig it would run (run_study replaced by a recorder)."""
    seen = []
    import studies.study

    monkeypatch.setattr(studies.study, "run_study", lambda sc: seen.append(sc) or [])
    return seen


def test_study_passes_run_options_to_its_trials(captured_study, tmp_path):
    config = tmp_path / "trial.toml"
    config.write_text("eval_calls = 7\nnetwork = 'tiny'\n")
    res = _invoke(["study", "--trials", "2", "--lr", "0.002", "--batch-size", "32", "--no-system-metrics",
                   "--config", str(config)], BENCH_HOME=str(tmp_path), MLFLOW_EXPERIMENT_NAME="env-exp")
    assert res.exit_code == 0, res.output
    [sc] = captured_study
    assert sc.run_overrides == {"lr": 0.002, "batch_size": 32, "system_metrics": False, "eval_calls": 7, "network": "tiny"}
    assert sc.experiment == "env-exp"
    trial = sc.base_config("simple")
    assert (trial.lr, trial.batch_size, trial.eval_calls, trial.steps) == (0.002, 32, 7, 500)


def test_study_refuses_options_its_space_tunes(captured_study, tmp_path):
    res = _invoke(["study", "--beta-end", "0.03"], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 2 and "--beta-end is tuned by the study's search space" in res.output
    res = _invoke(["study", "--tune-lr", "--lr", "0.01"], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 2 and "--lr is tuned" in res.output
    config = tmp_path / "bad.toml"
    config.write_text("steps = 10\n")
    res = _invoke(["study", "--config", str(config)], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 2 and "steps" in res.output and "sets itself" in res.output
    assert captured_study == []


def test_study_run_options_leave_out_what_the_study_sets():
    names = {_param_name(o) for o in STUDY_RUN_OPTIONS}
    assert not names & set(STUDY_OWNS)
    assert {"lr", "batch_size", "network", "eval_calls", "hflip", "device", "system_metrics"} <= names
    assert cli_mod.cli.commands["study"].params  # the options are on the command
