"""``bench study``: tune the noise schedule of variants with Optuna, each trial a ``bench run``."""

from __future__ import annotations

import os
from dataclasses import fields

import click

from bench.cli import options
from bench.cli.options import RUN_OPTIONS, config_option, stating, with_options, without
from bench.errors import BenchError
from bench.training.config import read_toml
from bench.training.run import short_budget
from studies.space import describe_space
from studies.study import OBJECTIVES, SAMPLERS, StudyConfig, run_study, study_status
from studies.summary import compare_results, describe_result

STUDY = {f.name: f.default for f in fields(StudyConfig)}  # the study's own defaults (studies.study.StudyConfig)
STUDY_OWNS = ("variant", "dataset", "steps", "seed", "experiment", "tracking_uri", "fid_samples", "run_name", "resume",
              "reopen", "dry_run", "nproc")  # `bench study` options of its own, or options that act on one run
# the trials' own defaults (studies.study.StudyConfig.base_config), stated in the options' help
STUDY_RUN_OPTIONS = stating(without(RUN_OPTIONS, STUDY_OWNS),
                            {"final_eval": "estimate", "eval_every": "--steps/4", "checkpoint_every": "--steps"})


@click.command("study")
@config_option("variant", param="variants", multiple=True, state_default=False,
               help=f"Variant to tune (repeat for several: one study each). [default: {', '.join(STUDY['variants'])}]")
@config_option("dataset", help="", state_default=False, default=STUDY["dataset"], show_default=True)
@click.option("--trials", type=int, default=STUDY["trials"], show_default=True,
              help="Trials in the study (resumed ones count; a trial lost with its worker is replaced by its retry).")
@click.option("--timeout", type=float, default=STUDY["timeout"], help="Seconds per study and worker (unset: no limit).")
@config_option("steps", help="Optimiser steps per trial.", state_default=False, default=STUDY["steps"],
               show_default=True)
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default=STUDY["objective"], show_default=True,
              help="What trials minimise: estimated bits/dim on the test split, FID, or both (a Pareto front).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=STUDY["sampler"], show_default=True,
              help="Optuna sampler.")
@config_option("seed", help="Seeds the sampler and every trial's training.", state_default=False, default=STUDY["seed"],
               show_default=True)
@click.option("--workers", type=int, default=STUDY["workers"], show_default=True,
              help="Worker processes sharing the study.")
@options.storage("Optuna RDB URL (unset: sqlite optuna.db in BENCH_HOME).")
@options.study_name("Name a study, or resume one (unset: schedule-DATASET-OBJECTIVE-VARIANT).")
@config_option("tracking_uri")
@config_option("experiment", state_default=False,
               help="MLflow experiment of the study and trial runs "
                    "(unset: $MLFLOW_EXPERIMENT_NAME, else elbo-bench-studies).")
@click.option("--space", "space_file", default=None, help="Study TOML (path or a name in studies/; see --show-space).")
@click.option("--tune-lr", is_flag=True, help="Add the learning rate to the search space.")
@click.option("--exact-top", type=int, default=STUDY["exact_top"], show_default=True,
              help="Best trials re-evaluated with the exact bound.")
@config_option("fid_samples", help="Samples per trial when FID is an objective (else none).", state_default=False,
               default=STUDY["fid_samples"], show_default=True)
@click.option("--heartbeat", type=int, default=STUDY["heartbeat"], show_default=True,
              help="Seconds between worker heartbeats (a trial silent for twice this is failed and retried).")
@click.option("--show-space", is_flag=True, help="Print the search space and exit.")
@click.option("--status", "status_of", metavar="NAME", default=None,
              help="Print study NAME's state from --storage (trials by state, best so far, workers alive) and exit.")
@with_options(STUDY_RUN_OPTIONS)
def study_cmd(variants, space_file, tune_lr, show_space, status_of, config_file, **values) -> None:
    """Tune the noise schedule of one or several variants with Optuna, tracked in MLflow.

    Every trial is a `bench run` with this command's --steps, --seed and --fid-samples. The `bench run`
    options from --config on (and a --config FILE) set the rest of every trial's config, except what the
    search space tunes; their defaults are `bench run`'s except --final-eval estimate,
    --final-eval-images 0, --eval-every STEPS/4 and --checkpoint-every STEPS."""
    if status_of is not None:
        click.echo(study_status(status_of, values["storage"]))
        return
    run_values = {k: v for k, v in values.items() if k not in STUDY and v is not None}
    overrides = {**read_toml(config_file), **run_values}
    owned = sorted(set(overrides) & set(STUDY_OWNS))
    if owned:
        raise BenchError(f"--config {config_file} sets {', '.join(owned)}, which bench study sets itself; "
                         "use the study's own options instead")
    study_values = {k: v for k, v in values.items() if k in STUDY}
    study_values["experiment"] = study_values["experiment"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") \
        or STUDY["experiment"]
    sc = StudyConfig(variants=tuple(variants) or STUDY["variants"], space_file=space_file, tune_lr=tune_lr,
                     run_overrides=overrides, **study_values).validate()
    spaces = {v: sc.space(v) for v in sc.variants}  # a variant's kind decides its default space
    if show_space:
        for v, space in spaces.items():
            text = describe_space(space, sc.base_config(v))
            click.echo(text if len(spaces) == 1 else f"variant {v}:\n" + "\n".join(f"  {line}" for line in
                                                                                  text.splitlines()))
        return
    tuned = sorted(set(overrides) & {name for space in spaces.values() for name in space})
    if tuned:
        flags = ", ".join("--" + k.replace("_", "-") for k in tuned)
        raise BenchError(f"{flags} is tuned by the study's search space; fix it with a --space file (see --show-space) "
                         "instead of an option")
    results = run_study(sc, notice=short_budget(sc.base_config(sc.variants[0]), tuned=spaces[sc.variants[0]]))
    for r in results:
        click.echo(describe_result(r, sc))
    if len(results) > 1:
        click.echo(compare_results(results, sc))
