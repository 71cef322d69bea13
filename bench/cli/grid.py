"""``bench grid``: variants × seeds with one budget, then the report."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import replace

import click

from bench.cli import options
from bench.cli.options import RUN_OPTIONS, config_option, stating, with_options, without
from bench.cli.run import warn_short_budget
from bench.errors import BenchError
from bench.runtime.locks import LockBusy
from bench.training.config import assemble_config, read_toml
from bench.training.grid import claim, recorded_runs
from bench.training.run import train
from reports.build import build_report, check_out_dir, default_out_dir

TABLE2_VARIANTS = (  # DDPM Table 2's rows: μ̃ prediction, then ε prediction
    "mu-elbo-learned-diag", "mu-elbo", "mu-mse", "elbo-learned-diag", "elbo", "simple",
)
GRID_VARIANTS = (*TABLE2_VARIANTS, "hybrid", "elbo-learned")  # and iDDPM's learned-range Σ: `bench grid`'s default


def grid_defaults(dataset: str) -> dict:
    """The grid's own budget: above the dataset's defaults, below a --config file and the options."""
    return {"steps": 1000, "fid_samples": 500, "experiment": f"grid-{dataset}"}


# `bench run` options a grid has no use for: it sets these itself (--variant repeats, --seeds), or they act on one run;
# the help of the others states the grid's own defaults
GRID_OPTIONS = stating(without(RUN_OPTIONS, ("variant", "seed", "run_name")), grid_defaults("DATASET"))


@click.command("grid")
@config_option("variant", param="variants", multiple=True, state_default=False,
               help=f"Variants (repeat; default: the config file's variant, else {', '.join(GRID_VARIANTS)}).")
@click.option("--seeds", type=int, default=2, show_default=True, help="Seeds 0..N-1 per variant.")
@with_options(GRID_OPTIONS)
@options.report_out("Report folder (unset: ./report-EXPERIMENT).")
@options.log_to_mlflow("Also log the report as an MLflow run (experiment elbo-bench-reports).")
@options.dry_run("Print the plan (what would be trained, what is already recorded) and exit.")
def grid_cmd(variants, seeds, out, log_to_mlflow, dry_run, config_file, **values) -> None:
    """Run variants × seeds with one budget, then the report: from nothing to the table.

    Takes every `bench run` option and --config FILE, applied to each run; the grid's own defaults are
    --steps 1000, --fid-samples 500 and --experiment grid-<dataset>. A (config, seed) pair whose run is
    already in the experiment, FINISHED or diverged, is skipped, so an interrupted grid resumes where it stopped.
    Grids started together on one store share the pairs: each is trained by one of them."""
    if seeds < 1:
        raise BenchError(f"--seeds must be >= 1, got {seeds}")
    file_values = read_toml(config_file)
    variants = variants or ((file_values["variant"],) if "variant" in file_values else GRID_VARIANTS)
    replaced = sorted(set(file_values) & {"seed", "run_name"})
    if replaced:
        click.echo(f"note: the grid sets {' and '.join(replaced)} itself; the config file's value is not used",
                   err=True)
    configs = [replace(assemble_config({**values, "variant": v, "seed": s}, file_values, own=grid_defaults),
                       run_name=None)
               for v in dict.fromkeys(variants) for s in range(seeds)]  # all validated up front
    experiment, tracking_uri = configs[0].experiment, configs[0].tracking_uri
    if not dry_run:
        check_out_dir(out or default_out_dir([experiment]))  # refused before hours of training, not after
    recorded = recorded_runs(configs)
    warn_short_budget(configs[0])  # once the store answered: a refused grid prints its one error line alone
    diverged = skipped = elsewhere = 0
    deferred = []

    def train_claimed(config) -> None:
        """Train ``config``, its claim held, unless another grid recorded its result since the plan was made."""
        nonlocal diverged, elsewhere
        (rec,) = recorded_runs([config])
        if rec is not None and rec.is_result:
            elsewhere += 1
            diverged += rec.diverged
            click.echo(f"  skipped: recorded meanwhile by another grid as {rec.describe()}")
            return
        if rec is not None:
            click.echo(f"  training (again: {rec.describe()})")
        result = train(config)
        diverged += result.status == "FAILED"
        click.echo(f"  {result.status}" + (f" ({result.reason} at step {result.step})" if result.reason else ""))

    for i, (config, rec) in enumerate(zip(configs, recorded), 1):
        click.echo(f"[{i}/{len(configs)}] {config.default_run_name}")
        if rec is not None and rec.is_result:
            skipped += 1
            diverged += rec.diverged
            click.echo(f"  skipped: already recorded as {rec.describe()}")
            continue
        if dry_run:
            click.echo("  to train" + (f" (again: {rec.describe()})" if rec is not None else ""))
            continue
        with ExitStack() as held:
            try:
                held.enter_context(claim(config))
            except LockBusy as busy:  # another grid trains it: its result is waited for at the end
                click.echo(f"  deferred: {busy.holder} is training it; back to it after the others")
                deferred.append(config)
                continue
            train_claimed(config)
    for config in deferred:
        click.echo(f"[deferred] {config.default_run_name}: waiting for the process training it")
        with claim(config, wait=True):  # it finished, or died and left the pair to this grid
            train_claimed(config)
    if dry_run:
        click.echo(f"{len(configs)} runs: {len(configs) - skipped} to train, {skipped} already recorded; "
                   "every run's config but its variant and seed:")
        click.echo(json.dumps({k: v for k, v in configs[0].redacted().to_dict().items()
                               if k not in ("variant", "seed", "run_name")},
                              indent=2))
        return
    rep = build_report([experiment], None, out, tracking_uri, log_to_mlflow=log_to_mlflow)
    click.echo(f"report of {rep.runs} runs: {rep.html}"
               + (f"; logged as MLflow run {rep.run_id}" if rep.run_id else ""))
    click.echo(f"{len(configs)} runs, {diverged} diverged (recorded FAILED; counted, not averaged, in the report)"
               + (f"; {skipped} already recorded before this grid, skipped" if skipped else "")
               + (f"; {elsewhere} trained meanwhile by another grid" if elsewhere else ""))
