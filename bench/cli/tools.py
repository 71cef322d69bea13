"""``bench variants``, ``bench weightings``, ``bench runs`` and ``bench fid``: list the objectives and the
weightings of the weighted-ELBO family, the running runs; score samples."""

from __future__ import annotations

import dataclasses

import click

from bench.cli import options
from bench.cli.options import config_option, show
from bench.diffusion.weighting import WEIGHTINGS, is_monotone
from bench.metrics.fid import score_samples
from bench.metrics.samples import samples_dataset
from bench.tracking import liveness
from bench.tracking import store as tracking
from bench.training.config import RunConfig
from variants import VARIANTS, get_variant


@click.command("variants")
def variants_cmd() -> None:
    """List the objective variants with their objective, mean and variance."""
    width = max(len(n) for n in VARIANTS)
    for name in sorted(VARIANTS):
        v = get_variant(name)
        kind = ("time=continuous (weighted ELBO family)" if v.weighted else "time=continuous (VDM)" if v.continuous
                else f"mean={v.mean_type:<3}  variance={v.var_type:<13}")
        click.echo(f"{name:<{width}}  {kind:<{38}}  {v.objective}")


@click.command("weightings")
def weightings_cmd() -> None:
    """List the weightings w(λ) of --variant weighted (--weighting NAME): formula, whether each is monotone
    (non-increasing in λ = log SNR: then L_w is an ELBO of noise-augmented data), hyper-parameters, source."""
    config = RunConfig(variant="weighted")  # the defaults a weighted run resolves: hyper-parameters, schedule
    variant = config.build_variant()
    schedule = config.build_noise_schedule(variant)
    name_of = variant.gamma_schedule(config.gamma_schedule)
    width = max(len(n) for n in WEIGHTINGS)
    pad = " " * (width + 2)
    for name, kind in WEIGHTINGS.items():
        if kind.monotone == "with the schedule":
            weighting = dataclasses.replace(config, weighting=name).build_weighting()
            monotone = f"depends on the schedule: on the default {name_of}, " \
                       f"{'yes' if is_monotone(weighting, schedule) else 'no'}"
        else:
            monotone = "depends on the table" if kind.monotone == "read" else kind.monotone
        hyper = [f"--{k.replace('_', '-')} FILE.csv (required)" if getattr(config, k) is None
                 else f"--{k.replace('_', '-')} (default {show(getattr(config, k))})" for k in kind.hyper]
        formula = kind.formula if kind.formula.startswith("w(λ)") else f"w(λ) = {kind.formula}"
        click.echo(f"{name:<{width}}  {formula}")
        click.echo(f"{pad}monotone: {monotone}")
        click.echo(f"{pad}options: {', '.join(hyper) or 'none'}")
        click.echo(f"{pad}source: {kind.source}")


@click.command("runs")
@options.experiments("MLflow experiment(s) (default: all).")
@click.option("--cleanup", is_flag=True, help="Mark the runs whose process is gone KILLED (with tag killed_reason).")
@options.tracking_uri("MLflow tracking URI.")
def runs_cmd(experiments, cleanup, tracking_uri) -> None:
    """List the runs that MLflow shows as RUNNING and whether their process is still alive."""
    client = tracking.client(tracking_uri)
    exps = tracking.experiments(client, list(experiments) or None)
    running = client.search_runs([e.experiment_id for e in exps], filter_string="attributes.status = 'RUNNING'",
                                 max_results=5000)
    for r in running:
        gone = liveness.owner_gone(r.data.tags)
        owner = f"process {r.data.tags['owner.pid']} on {r.data.tags.get('owner.host')}" if "owner.pid" in r.data.tags \
            else "owner unknown (no owner tags)"
        click.echo(f"{r.info.run_id}  {r.info.run_name}  {owner}: {'gone (' + gone + ')' if gone else 'alive'}")
    if cleanup:
        closed = liveness.close_dead_runs(client, [e.experiment_id for e in exps])
        click.echo(f"marked {len(closed)} run(s) KILLED")
    elif not running:
        click.echo("no RUNNING runs")


@click.command("fid")
@click.argument("samples_file", metavar="SAMPLES.npz", type=click.Path(dir_okay=False))
@config_option("dataset", state_default=False,
               help="What the samples imitate (default: the dataset the samples file records).")
@config_option("data_dir", state_default=False, help="Data root (else $BENCH_DATA_DIR).")
@config_option("fid_weights", state_default=False, help="Inception weights file for RGB FID.")
@config_option("device", state_default=False, help="auto, cpu, cuda, cuda:N.", default="auto", show_default=True)
def fid_cmd(samples_file, dataset, data_dir, fid_weights, device) -> None:
    """Score a saved-samples file (uint8 .npz, key 'samples', as runs save it) against the train split:
    FID, KID, precision/recall, IS and the reference points, with how they were computed."""
    dataset = samples_dataset(samples_file, dataset)
    res = score_samples(samples_file, dataset, cache_dir=tracking.bench_home() / "cache", data_dir=data_dir,
                        fid_weights=fid_weights, device=device)
    width = max(len(k) for k in (*res.metrics, *res.tags))
    click.echo(f"{samples_file}: {res.tags['fid_samples']} {dataset} samples")
    for k, v in res.metrics.items():
        click.echo(f"  {k:<{width}}  {v:.6g}")
    click.echo("provenance:")
    for k, v in res.tags.items():
        click.echo(f"  {k:<{width}}  {v}")
