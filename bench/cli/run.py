"""``bench run`` (train one variant) and ``bench eval`` (evaluate a saved model)."""

from __future__ import annotations

import json
import os

import click

from bench.cli import options
from bench.cli.options import ARGV, FIELDS, RUN_OPTIONS, config_option, with_options
from bench.errors import BenchError
from bench.published.evaluate import EMA_WORDS, EXPERIMENT, FORMATS, finish_import, prepare_import, read_published
from bench.runtime.dist import launch
from bench.runtime.urls import masked
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig, assemble_config, read_toml
from bench.training.evaluation import HEADLINE, other_method_name, prepare_evaluation, run_evaluation
from bench.training.record import summarize
from bench.training.run import resume_config, short_budget, train

EXIT_DIVERGED = 3  # `bench run`: the run diverged and is recorded FAILED (a result, yet a script must tell)


def warn_short_budget(config: RunConfig, tuned=()) -> None:
    """One line on stderr (rank 0) when ``config``'s steps end inside a warm-up (bench.training.run.short_budget)."""
    line = short_budget(config, tuned)
    if line and os.environ.get("RANK", "0") == "0":
        click.echo(line, err=True)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``): what each rank runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@click.command("run")
@with_options(RUN_OPTIONS)
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue the run of this checkpoint.")
@click.option("--reopen", is_flag=True, help="With --resume: continue a FINISHED run to a larger --steps.")
@options.dry_run("Print the resolved config and exit.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with N data-parallel processes on this machine (torch's elastic launcher, like "
                   "`torchrun --standalone --nproc_per_node N -m bench run …`): one per GPU, or gloo on CPU.")
def run_cmd(config_file, resume, reopen, dry_run, nproc, **values) -> int:
    """Train one variant, evaluate it (bits/dim, samples, FID) and record it in MLflow.

    Exits 3 when the run diverged (recorded in MLflow as FAILED with the reason and step). Several
    processes: --nproc N here, or `torchrun --nproc_per_node N -m bench run …` (multi-node: torchrun's
    --nnodes/--rdzv-* flags); the global batch stays --batch-size."""
    if nproc and "WORLD_SIZE" in os.environ:
        raise BenchError("--nproc starts its own ranks; "
                         "under torchrun leave it out (torchrun's --nproc_per_node sets them)")
    if resume:
        extra = sorted(k for k, v in values.items() if v is not None and k not in ("steps", "device", "tracking_uri"))
        if extra or config_file:
            given = ", ".join("--" + k.replace("_", "-") for k in extra) + (" --config" if config_file else "")
            raise BenchError(f"--resume continues a run with its own config; only --steps, --device and --tracking-uri "
                             f"(the run's store, with its password) may be given with it (got {given.strip(', ')})")
        resume = load_checkpoint(resume)
        config = resume_config(resume, values["steps"], values["device"], values["tracking_uri"]).validate()
    else:
        if reopen:
            raise BenchError("--reopen goes with --resume CHECKPOINT (it continues a FINISHED run)")
        config = assemble_config(values, read_toml(config_file))
    if dry_run:
        warn_short_budget(config)
        click.echo(json.dumps(config.redacted().to_dict(), indent=2))
        return 0
    if nproc and nproc > 1:
        if config.batch_size % nproc:
            raise BenchError(f"--batch-size {config.batch_size} does not split over --nproc {nproc}; "
                             f"use a multiple of {nproc}")
        return launch(nproc, _without_nproc(click.get_current_context().meta[ARGV]))
    result = train(config, resume=resume, reopen=reopen, warn_short_budget=True)
    if result.rank != 0:
        return EXIT_DIVERGED if result.status == "FAILED" else 0
    click.echo(f"run {result.run_id}: {result.status} at step {result.step}")
    if result.status == "FAILED":
        click.echo(f"  the run diverged ({result.reason}); "
                   "recorded in MLflow as FAILED with tags failure_reason, failure_step")
    else:
        click.echo(summarize(result.metrics, "  "))
        click.echo(f"  checkpoint: {result.checkpoint}")
    click.echo(f"  tracking store: {masked(result.tracking_uri)}")
    click.echo(f"  browse: bench ui   (or: mlflow ui --backend-store-uri {masked(result.tracking_uri)})")
    return EXIT_DIVERGED if result.status == "FAILED" else 0


# ------------------------------------------------------------------------- bench eval
def _eval_option(name: str, help: str | None = None, **click_kw):
    """An option of `bench eval` for the RunConfig field ``name``, with the field's help or, where eval's says
    something else, ``help``; unset, the run's own value applies."""
    return config_option(name, help=f"{help or FIELDS[name].metadata['help']} [default: the run's]",
                         state_default=False, **click_kw)


EVAL_OPTIONS = [
    _eval_option("final_eval",
                 help="The bound's method: exact (all T terms) or the unbiased estimate (--eval-calls per image)."),
    _eval_option("final_eval_images", type=click.IntRange(min=0),
                 help="Test images in the bound (0: the whole split)."),
    _eval_option("eval_calls", type=click.IntRange(min=3), help="Network calls per image in the estimate."),
    _eval_option("eval_batch_size", type=click.IntRange(min=1), help="(image, t) pairs per network call in the bound."),
    _eval_option("ode_images", type=click.IntRange(min=0), help="Test images for nll_ode (0: the bound's)."),
    _eval_option("ode_method"),
    _eval_option("ode_rtol"),
    _eval_option("ode_atol"),
    _eval_option("ode_probes", type=click.IntRange(min=1)),
    _eval_option("ode_probe_type"),
    _eval_option("ode_batch_size", type=click.IntRange(min=1), help="Images solved together as one ODE."),
    _eval_option("fid_samples", type=click.IntRange(min=0),
                 help="Samples scored by FID, with a sample grid (0: no FID, no grid)."),
    _eval_option("sample_steps", type=click.IntRange(min=0), help="Sampler steps (0: all T)."),
]
ONLY = {"bound": "the bound alone", "ode": "nll_ode alone (a run's bpd and FID untouched, not recomputed)",
        "fid": "samples, FID and the grid alone"}


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--from", "source_format", type=click.Choice(sorted(FORMATS)), default=None,
              help="CHECKPOINT is a published model in this format (a file; a folder for diffusers): it is read as "
                   "tensors into the project's network, measured like a trained run and recorded as a new run tagged "
                   "imported (in --experiment, default 'published').")
@click.option("--flags", default=None,
              help="With --from: what the model was built with, as its own code takes them (improved-diffusion: "
                   "'--num_channels 128 --num_res_blocks 3 --learn_sigma True …'; pytorch-diffusion: its Model's "
                   "arguments), or a JSON file of them. [default: a released file's own; else the format's defaults]")
@click.option("--ema", type=click.Choice(EMA_WORDS), default=None,
              help="With --from: whether the file holds EMA weights (recorded). [default: known for a released file, "
                   "else unknown]")
@config_option("dataset", help="With --from: the test split and FID reference it is measured on.", default="cifar10",
               show_default=True)
@config_option("experiment", help="With --from: the MLflow experiment its run is recorded in.", default=EXPERIMENT,
               show_default=True)
@config_option("data_dir", help="With --from: the dataset's folder (unset: $BENCH_DATA_DIR).")
@config_option("download", help="With --from: download the dataset when it is missing.")
@click.option("--nll", type=click.Choice(["bound", "ode"]), default=None,
              help="ode: also the NLL under the probability-flow ODE (nll_ode, with its Monte Carlo error and NFE; "
                   "not a bound); bound: the bound without it. [default: the run's final_eval_ode]")
@click.option("--only", type=click.Choice(list(ONLY)), default=None,
              help="Compute one thing: " + "; ".join(f"{k}: {v}" for k, v in ONLY.items())
                   + ". `--only ode --log-to-run` adds the ODE likelihood to a run.")
@with_options(EVAL_OPTIONS)
@config_option("device", help="", state_default=False, default="auto", show_default=True)
@click.option("--log-to-run", is_flag=True,
              help="Log the results into the run that produced the checkpoint: a bound by the run's method on as many "
                   "images extends bpd; by the other method, bpd_eval_exact/_estimate; on another number of images, "
                   "bpd_eval_<method>_<N>images (nll_ode likewise), so the run's own numbers are never overwritten.")
@options.tracking_uri("With --log-to-run: the run's store, "
                      "where the checkpoint holds its URI with the password masked.")
def eval_cmd(checkpoint, source_format, flags, ema, dataset, experiment, data_dir, download, nll, only, device,
             log_to_run, tracking_uri, **values) -> None:
    """Evaluate a saved model's EMA weights: bits/dim on the test split, nll_ode, samples and FID.

    Unset options take the run's own config; the first lines say what will be computed, on how many images and by
    which method. Under `torchrun --nproc_per_node N -m bench eval …` the ranks share the bound and the sampling.

    With --from, CHECKPOINT is a published model (improved-diffusion's or the PyTorch DDPM port's state dict, a
    diffusers folder): it gets the same evaluation on --dataset (options unset take the dataset's defaults), is
    recorded as a new run tagged imported, and the paper's value is printed beside the measured one when known."""
    if source_format is None and (flags or ema or dataset != "cifar10" or experiment != EXPERIMENT or data_dir
                                  or download is not None):
        raise BenchError("--flags, --ema, --dataset, --data-dir, --download and --experiment are for a published "
                         "model: add --from FORMAT")
    if only and nll and (nll == "ode") != (only == "ode"):
        raise BenchError(f"--only {only} and --nll {nll} contradict each other; give one of them")
    if only in ("bound", "ode") and values["fid_samples"]:
        raise BenchError(f"--only {only} draws no samples; leave out --fid-samples {values['fid_samples']}")
    if only == "fid" and values["fid_samples"] == 0:
        raise BenchError("--only fid with --fid-samples 0 computes nothing; give --fid-samples N")
    ode = only == "ode" if only else {"ode": True, "bound": False}.get(nll)  # None: the run's final_eval_ode
    overrides = {**values, "final_eval_ode": ode}
    if only in ("bound", "ode"):
        overrides["fid_samples"] = 0
    if source_format is not None:
        if log_to_run:
            raise BenchError("--log-to-run is for a run's checkpoint; a published model is recorded as a new run")
        _eval_published(checkpoint, source_format, flags, ema, dataset, experiment,
                        {**overrides, "data_dir": data_dir, "download": download}, only, device, tracking_uri)
        return
    plan = prepare_evaluation(checkpoint, overrides, bound=only in (None, "bound"), log_to_run=log_to_run,
                              device=device, tracking_uri=tracking_uri)
    if plan.dist.main:
        click.echo(plan.describe())
    metrics = run_evaluation(plan)
    if not plan.dist.main:
        return
    click.echo(summarize(metrics))
    if plan.client is not None:
        click.echo(f"logged into run {plan.run_id}")
        if plan.bound not in (None, HEADLINE):
            why = "the other method" if plan.bound == other_method_name(plan.config.final_eval) else "other test images"
            click.echo(f"  the run's bpd came from {why} and is kept: this bound is logged as {plan.bound}")
        if plan.ode not in (None, "nll_ode"):
            click.echo(f"  the run's nll_ode came from other test images and is kept: this one is logged as {plan.ode}")


def _eval_published(path, source_format, flags, ema, dataset, experiment, overrides, only, device,
                    tracking_uri) -> None:
    """`bench eval PATH --from FORMAT`: read, evaluate, record; the paper's value beside the measured one."""
    imported = read_published(path, source_format, flags, ema)
    plan = prepare_import(imported, overrides, dataset=dataset, experiment=experiment, device=device,
                          tracking_uri=tracking_uri)
    if only in ("ode", "fid"):
        plan.bound = None
    if plan.dist.main:
        click.echo(plan.describe())
    ok = False
    try:
        metrics = run_evaluation(plan)
        ok = True
    finally:
        finish_import(plan, ok)
    if not plan.dist.main:
        return
    click.echo(summarize(metrics))
    if imported.known is not None and imported.known.paper_values():
        click.echo(f"the paper reports {imported.known.paper_values()}")
    click.echo(f"recorded as run {plan.run_id} in experiment {plan.config.experiment} (tagged imported)")
