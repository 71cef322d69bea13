"""The command line itself: every RunConfig field is an option with its default in the help, -h and
--version work, $MLFLOW_EXPERIMENT_NAME is honoured, and `bench study` passes run options to its trials."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

import bench.cli.study
from bench.cli.main import cli
from bench.cli.options import RUN_OPTIONS, param_name
from bench.cli.study import STUDY_OWNS, STUDY_RUN_OPTIONS
from bench.data.datasets import DATASETS
from bench.training.config import DATASET_DEFAULTS, RunConfig


def _invoke(args, **env):
    return CliRunner().invoke(cli, args, env={"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None, **env})


def test_every_config_field_is_a_run_option():
    options = {param_name(o) for o in RUN_OPTIONS}
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
    assert ((config["weight_decay"], config["grad_clip"], config["hflip"], config["eval_calls"],
             config["eval_batch_size"], config["sample_grid"], config["system_metrics"])
            == (0.01, 0.5, True, 9, 64, 16, False))


def test_dash_h_and_version():
    assert _invoke(["-h"]).output.startswith("Usage: ") and "Commands:" in _invoke(["-h"]).output
    assert "Show this message" in _invoke(["study", "-h"]).output
    res = _invoke(["--version"])
    assert res.exit_code == 0 and re.match(r"elbo-bench \d+\.\d+\.\d+ \(source \S+; torch \S+", res.output), res.output


def test_mlflow_experiment_name_is_honoured_below_the_option(tmp_path):
    res = _invoke(["run", "--dry-run"], BENCH_HOME=str(tmp_path), MLFLOW_EXPERIMENT_NAME="from-env")
    assert json.loads(res.output)["experiment"] == "from-env"
    res = _invoke(["run", "--dry-run", "--experiment", "given"], BENCH_HOME=str(tmp_path),
                  MLFLOW_EXPERIMENT_NAME="from-env")
    assert json.loads(res.output)["experiment"] == "given"
    assert json.loads(_invoke(["run", "--dry-run"], BENCH_HOME=str(tmp_path)).output)["experiment"] == "elbo-bench"


@pytest.fixture
def captured_study(monkeypatch):
    """`bench study` up to the StudyConfig it would run (run_study replaced by a recorder)."""
    seen = []

    def recorder(sc, notice=None):  # says the notice as run_study does once the study is open
        if notice:
            print(notice, file=sys.stderr)
        seen.append(sc)
        return []

    monkeypatch.setattr(bench.cli.study, "run_study", recorder)
    return seen


def test_study_passes_run_options_to_its_trials(captured_study, tmp_path):
    config = tmp_path / "trial.toml"
    config.write_text("eval_calls = 7\nnetwork = 'tiny'\n")
    res = _invoke(["study", "--trials", "2", "--lr", "0.002", "--batch-size", "32", "--no-system-metrics",
                   "--config", str(config)], BENCH_HOME=str(tmp_path), MLFLOW_EXPERIMENT_NAME="env-exp")
    assert res.exit_code == 0, res.output
    [sc] = captured_study
    assert sc.run_overrides == {"lr": 0.002, "batch_size": 32, "system_metrics": False, "eval_calls": 7,
                                "network": "tiny"}
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
    names = {param_name(o) for o in STUDY_RUN_OPTIONS}
    assert not names & set(STUDY_OWNS)
    assert {"lr", "batch_size", "network", "eval_calls", "hflip", "device", "system_metrics"} <= names
    assert cli.commands["study"].params  # the options are on the command


# ----------------------------------------------------------------------------- a budget shorter than a warm-up
def _warnings(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("warning:")]


def test_a_run_shorter_than_the_learning_rate_warm_up_says_so_in_one_line(tmp_path):
    res = _invoke(["run", "--dry-run", "--steps", "30"], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 0 and json.loads(res.stdout)["steps"] == 30
    assert _warnings(res) == ["warning: --steps 30 ends inside the learning-rate warm-up (--warmup-steps 100: its last "
                              "step trains at 30% of --lr); raise --steps to 100 or more, or lower --warmup-steps"]
    res = _invoke(["run", "--dry-run", "--steps", "200", "--no-ema-warmup"], BENCH_HOME=str(tmp_path))
    assert _warnings(res) == ["warning: --steps 200 leaves 37% of the initial network in the EMA that evaluation and "
                              "sampling use (--ema-decay 0.995, --no-ema-warmup; under 1% from 919 steps); "
                              "raise --steps to 919 or more, or use --ema-warmup"]
    (both,) = _warnings(_invoke(["run", "--dry-run", "--steps", "30", "--no-ema-warmup"], BENCH_HOME=str(tmp_path)))
    assert "warm-up" in both and "86% of the initial network" in both and both.endswith(
        "raise --steps to 919 or more, or lower --warmup-steps, or use --ema-warmup")
    for quiet in (["--steps", "200"], ["--steps", "100"], ["--steps", "1000", "--no-ema-warmup"], []):
        res = _invoke(["run", "--dry-run", *quiet], BENCH_HOME=str(tmp_path))
        assert res.exit_code == 0 and _warnings(res) == [], quiet


def test_a_grid_and_a_study_say_it_once(tmp_path, captured_study):
    res = _invoke(["grid", "--dry-run", "--steps", "30", "--variant", "simple", "--variant", "elbo"],
                  BENCH_HOME=str(tmp_path))
    assert res.exit_code == 0, res.output
    assert len(_warnings(res)) == 1 and _warnings(res)[0].startswith("warning: --steps 30 ends inside")
    assert _warnings(_invoke(["grid", "--dry-run", "--variant", "simple"], BENCH_HOME=str(tmp_path))) == []
    res = _invoke(["study", "--steps", "30", "--variant", "simple", "--variant", "elbo"], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 0 and len(_warnings(res)) == 1 and "--steps 30 ends inside" in _warnings(res)[0]
    assert _warnings(_invoke(["study"], BENCH_HOME=str(tmp_path))) == []  # 500 steps a trial
    space = tmp_path / "warmup.toml"  # a tuned warm-up is not the configured one: nothing to say about it
    space.write_text("[params.warmup_steps]\nlow = 10\nhigh = 200\n")
    assert _warnings(_invoke(["study", "--steps", "30", "--space", str(space)], BENCH_HOME=str(tmp_path))) == []


# ----------------------------------------------------------------------------- help that agrees with --dry-run
def _stated_defaults(command) -> dict[str, str]:
    """Parameter name → the default its help states (``[default: …]``, the end of click's help record)."""
    ctx = click.Context(command, info_name=command.name)
    stated = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        m = re.search(r"\[(?:[^\]]*; )?default: ([^\]]*)\]$", record[1]) if record else None
        if m:
            stated[param.name] = m[1]
    return stated


def _for_dataset(text: str, dataset: str, steps: int) -> str:
    """The default a help text states for ``dataset`` (``3000 (digits), 800,000 (cifar10)``: per dataset), with
    DATASET and --steps (a study's --steps/4) filled in."""
    per = dict(re.fullmatch(r"(.+) \((\w+)\)", part).groups()[::-1] for part in text.split(", ")) \
        if all(re.fullmatch(r".+ \((\w+)\)", p) and p.rsplit("(", 1)[1][:-1] in DATASETS for p in text.split(", ")) \
        else None
    text = per[dataset] if per else text
    text = text.replace("DATASET", dataset)
    if m := re.fullmatch(r"--steps(?:/(\d+))?", text):
        text = str(max(1, steps // int(m[1] or 1)))
    return text


def _agrees(stated: str, value) -> bool:
    if value is None or isinstance(value, bool):
        return stated == ("unset" if value is None else str(value).lower())
    if isinstance(value, int | float):
        return float(stated.replace(",", "")) == value
    return stated == value


def _resolved(command: str, dataset: str, tmp_path) -> tuple[dict, int]:
    """(the config ``bench <command>`` resolves with its defaults for ``dataset``, the run steps it uses)."""
    if command == "study":  # no --dry-run: the trials' config, with run_study replaced by a recorder
        seen = []
        real = bench.cli.study.run_study
        bench.cli.study.run_study = lambda sc, notice=None: seen.append(sc) or []
        try:
            # --objective both: --fid-samples is the trials' own only where FID is an objective (its help says so)
            res = _invoke(["study", "--dataset", dataset, "--objective", "both"], BENCH_HOME=str(tmp_path))
        finally:
            bench.cli.study.run_study = real
        assert res.exit_code == 0, res.output
        return seen[0].base_config("simple").to_dict(), seen[0].steps
    extra = ["--variant", "simple", "--seeds", "1"] if command == "grid" else []
    res = _invoke([command, "--dry-run", "--dataset", dataset, *extra], BENCH_HOME=str(tmp_path))
    assert res.exit_code == 0, res.output
    config = json.loads(res.stdout[res.stdout.index("{"):])
    return config, config["steps"]


@pytest.mark.parametrize("command", ["run", "grid", "study"])
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_default_the_help_states_is_what_the_command_resolves(command, dataset, tmp_path):
    """Generic over options: each `[default: …]` of a config field in `bench <command> -h` is the value its
    --dry-run prints (a study: its trials' config), for each dataset."""
    stated = _stated_defaults(cli.commands[command])
    config, steps = _resolved(command, dataset, tmp_path)
    compared = {name: text for name, text in stated.items() if name in config and name != "dataset"}  # given
    assert len(compared) > 20  # the run options are there, not a hand list
    wrong = {name: (_for_dataset(text, dataset, steps), config[name]) for name, text in compared.items()
             if not _agrees(_for_dataset(text, dataset, steps), config[name])}
    assert wrong == {}, (f"bench {command} -h states defaults that --dry-run does not resolve "
                         f"(stated, resolved): {wrong}")
