"""The ``bench`` command line: thin click commands that parse, validate and call one library function.

Exit status: 0 done; 2 bad input (one line on stderr, ``error: …``, nothing written);
3 ``bench run`` trained but the run diverged (recorded in MLflow as FAILED); 130 interrupted.

``bench run`` and ``bench eval`` also run as the ranks of ``torchrun -m bench …`` (see :mod:`bench.runtime.dist`);
rank 0 alone prints results.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from dataclasses import fields

import click

from bench.training.config import FINAL_EVALS, PRECISIONS, SCHEDULES, RunConfig, make_config, read_toml
from bench.data.datasets import DATASETS
from bench.errors import BenchError
from bench.diffusion.ode import PROBE_TYPES, SOLVERS
from bench.nets.unet import NETWORK_PRESETS
from bench.runtime.urls import masked
from variants import VARIANTS, get_variant

EXIT_DIVERGED = 3  # `bench run`: the run diverged and is recorded FAILED (a result, yet a script must tell)


class BenchGroup(click.Group):
    """A click group whose errors are one line and a non-zero exit."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        global _ARGV
        _ARGV = list(sys.argv[1:] if args is None else args)
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        where = "" if rank == "0" else f" (rank {rank})"
        try:
            rv = super().main(args=args, prog_name=prog_name or "bench", standalone_mode=False, **extra)
        except click.UsageError as err:
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
            click.echo(f"error{where}: {err.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"error{where}: {err.format_message()}", err=True)
            sys.exit(err.exit_code or 1)
        except BenchError as err:
            click.echo(f"error{where}: {err}", err=True)
            sys.exit(2)
        except OSError as err:  # a full disk wherever it strikes (checkpoints say more: bench.training.checkpoint)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            place = f" writing {err.filename}" if err.filename else ""
            click.echo(f"error{where}: {os.strerror(err.errno).lower()}{place}; free some space, then run the command "
                       "again (a run resumes from its last checkpoint: bench run --resume)", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, click.Abort):
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            from bench.runtime.dist import teardown

            teardown()
        sys.exit(rv if isinstance(rv, int) else 0)


_ARGV: list[str] = []  # the arguments of this invocation, for `--nproc` to hand to its ranks


def _print_version(ctx, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from bench.tracking.store import git_commit, versions

    libs = ", ".join(f"{k.removeprefix('version.')} {v}" for k, v in versions().items())
    click.echo(f"elbo-bench {version('elbo-bench')} (source {git_commit()}; {libs})")
    ctx.exit(0)


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version (with the source's git commit and the libraries') and exit.")
def cli() -> None:
    """elbo-bench: train DDPMs with different objectives and compare them by bits/dim and FID."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")


def main() -> None:
    cli.main()


# ------------------------------------------------------------------------- bench variants
@cli.command("variants")
def variants_cmd() -> None:
    """List the objective variants with their objective, mean and variance."""
    width = max(len(n) for n in VARIANTS)
    for name in sorted(VARIANTS):
        v = get_variant(name)
        click.echo(f"{name:<{width}}  mean={v.mean_type:<3}  variance={v.var_type:<13}  {v.objective}")


# ------------------------------------------------------------------------- bench run
def _show(v) -> str:
    """A default as the help states it: unset, true/false, 800,000."""
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else f"{v:_}".replace("_", ",") \
        if isinstance(v, int) and abs(v) >= 10_000 else str(v)


def _default_text(field: str) -> str:
    """``default: 3000 (digits), 800000 (cifar10)``: the RunConfig default, per dataset where it differs."""
    from bench.training.config import DATASET_DEFAULTS, RunConfig

    generic = getattr(RunConfig(), field)
    per = {d: DATASET_DEFAULTS[d].get(field, generic) for d in sorted(DATASET_DEFAULTS)}
    if all(v is None for v in per.values()):
        return ""  # the help says what unset means
    if len(set(map(repr, per.values()))) == 1:
        return f"default: {_show(generic)}"
    return "default: " + ", ".join(f"{_show(v)} ({d})" for d, v in per.items())


def _opt(name: str, *decls, help: str, field: str | None = None, show_default: bool = True, **kw):
    """An option for the RunConfig field ``field`` (from ``name``), defaulting to None so the config's own
    default (one place) applies; the help ends with that default, per dataset where it differs."""
    default = _default_text(field or name.replace("-", "_")) if show_default else ""
    return click.option(f"--{name}", *decls, default=None, show_default=False,
                        help=f"{help} [{default}]" if default else help, **kw)


def _switch(name: str, help: str, field: str | None = None, **kw):
    """A --NAME/--no-NAME option for a boolean RunConfig field (None when not given)."""
    default = _default_text(field or name.replace("-", "_"))
    return click.option(f"--{name}/--no-{name}", default=None, help=f"{help} [{default}]" if default else help, **kw)


RUN_OPTIONS = [
    # what is trained
    _opt("variant", type=click.Choice(sorted(VARIANTS)), help="Objective variant (see `bench variants`)."),
    _opt("dataset", type=click.Choice(sorted(DATASETS)), help="Dataset: digits (embedded) or cifar10 (download or --data-dir)."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False),
                 help="TOML file of RunConfig values (keys: these options' names with _); options given here win."),
    _opt("variance", type=click.Choice(["small", "large"]),
         help="Fixed reverse variance of fixed-Σ variants: β̃_t (small) or β_t (large); unset means small."),
    _opt("network", type=click.Choice(sorted(NETWORK_PRESETS)), help="U-Net preset (ddpm-cifar10: DDPM's 35.7M network)."),
    _opt("data-dir", type=click.Path(file_okay=False), help="Data root for file-backed datasets (unset: $BENCH_DATA_DIR)."),
    _switch("download", help="Download a missing dataset (needs internet)."),
    # noise schedule
    _opt("schedule", type=click.Choice(SCHEDULES), help="Noise schedule."),
    _opt("T", "T", type=int, help="Diffusion steps T."),
    _opt("beta-start", type=float, help="Linear schedule: β_1."),
    _opt("beta-end", type=float, help="Linear schedule: β_T."),
    _opt("cosine-s", type=float, help="Cosine schedule: offset s."),
    # optimisation
    _opt("steps", type=int, help="Optimiser steps."),
    _opt("batch-size", type=int, help="Images per optimiser step (the global batch, whatever the number of processes)."),
    _opt("lr", type=float, help="AdamW peak learning rate."),
    _opt("warmup-steps", type=int, help="Steps of linear learning-rate warmup to the peak (0: none)."),
    _opt("weight-decay", type=float, help="AdamW weight decay."),
    _opt("grad-clip", type=float, help="Largest global gradient norm (0: no clipping)."),
    _opt("ema-decay", type=float, help="Per-step decay of the weights' EMA, which evaluation and sampling use."),
    _switch("ema-warmup", help="Warm the EMA's decay up: update n uses min(--ema-decay, (1+n)/(10+n)), so a short "
                               "run's EMA is not its initial network (0.995 is reached after 1,790 updates)."),
    _switch("hflip", help="Random horizontal flips of training images."),
    _opt("seed", type=int, help="Seed of weights, batches, noise, evaluation and sampling."),
    # evaluation and samples
    _opt("log-every", type=int, help="Steps between logged training-loss means."),
    _opt("eval-every", type=int, help="Steps between training-time bpd estimates and sample grids (0: only at the end)."),
    _opt("eval-images", type=int, help="Test images in the training-time bpd estimate."),
    _opt("eval-calls", type=int, help="Network calls per image in a bpd estimate (>= 3)."),
    _opt("final-eval", type=click.Choice(FINAL_EVALS),
         help="Final bound on the test split: exact (all T terms) or the unbiased estimate."),
    _opt("final-eval-images", type=int, help="Test images in the final bound (0: the whole split)."),
    _opt("eval-batch-size", type=int, help="(image, t) pairs per network call in evaluation."),
    _switch("final-eval-ode", help="Also the NLL under the probability-flow ODE at the end (nll_ode: a likelihood "
                                   "estimate, not a bound; slow: hundreds of network calls per image)."),
    _opt("ode-images", type=int, help="Test images for nll_ode (0: the final bound's)."),
    _opt("ode-method", type=click.Choice(SOLVERS), help="The ODE solver (scipy solve_ivp)."),
    _opt("ode-rtol", type=float, help="The ODE solver's relative tolerance."),
    _opt("ode-atol", type=float, help="The ODE solver's absolute tolerance."),
    _opt("ode-probes", type=int, help="Hutchinson probes per image, each with its own dequantisation draw."),
    _opt("ode-probe-type", type=click.Choice(["rademacher", "gaussian"]), help="Law of the Hutchinson probes."),
    _opt("ode-batch-size", type=int, help="Images solved together as one ODE (they share its adaptive steps)."),
    _opt("fid-samples", type=int, help="Samples scored by FID against the train split (0: no FID)."),
    _opt("sample-steps", type=int, help="Ancestral sampler steps (fewer than T: strided; 0: all T)."),
    _opt("sample-grid", type=int, help="Images in each logged sample grid."),
    _opt("fid-weights", type=click.Path(dir_okay=False),
         help="Inception weights file for RGB FID (unset: torch-fidelity's cache, downloaded when missing)."),
    _switch("log-model", help="Log the EMA network as an MLflow model at the end (a LoggedModel; its torch.export "
                              "takes 5-15 s on a CPU core); the checkpoint holds the weights either way."),
    # system
    _opt("device", help="auto (cuda when present), cpu, cuda or cuda:N."),
    _opt("precision", type=click.Choice(PRECISIONS), help="auto: bf16 autocast on CUDA, fp32 elsewhere."),
    _switch("compile", help="torch.compile the network."),
    _switch("channels-last", help="NHWC memory layout for the network (unset: on CUDA only)."),
    _opt("checkpoint-every", type=int, help="Steps between checkpoints (one is always written at the end)."),
    _switch("system-metrics", help="Log CPU/GPU utilisation and memory through MLflow's system metrics."),
    # tracking
    _opt("experiment", help="MLflow experiment (unset: $MLFLOW_EXPERIMENT_NAME, else the default)."),
    _opt("run-name", help="MLflow run name (unset: VARIANT-DATASET-seedN)."),
    _opt("tracking-uri", help="MLflow tracking URI (unset: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in BENCH_HOME)."),
    # this invocation
    click.option("--resume", type=click.Path(dir_okay=False), help="Continue the run of this checkpoint."),
    click.option("--reopen", is_flag=True, help="With --resume: continue a FINISHED run to a larger --steps."),
    click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
    click.option("--nproc", type=click.IntRange(min=1), default=None,
                 help="Train with N data-parallel processes on this machine (torch's elastic launcher, like "
                      "`torchrun --standalone --nproc_per_node N -m bench run …`): one per GPU, or gloo on CPU."),
]


def _stating(options, defaults: dict) -> list:
    """``options`` (of RUN_OPTIONS) with the help of those named in ``defaults`` ending in that default instead
    of `bench run`'s: a command's own defaults, stated as its --dry-run resolves them."""
    return [_restated(o, defaults[_param_name(o)]) if _param_name(o) in defaults else o for o in options]


def _restated(option, default):
    def decorate(f):
        f = option(f)
        param = f.__click_params__[-1]  # the Option that ``option`` just added
        param.help = re.sub(r" \[default: [^\]]*\]$", "", param.help) + f" [default: {_show(default)}]"
        return f

    return decorate


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def build_config(dataset: str, config_file: str | None, cli_values: dict, command_defaults=None) -> RunConfig:
    """Defaults < dataset defaults < the command's own (``command_defaults(dataset)``, a dict) <
    $MLFLOW_EXPERIMENT_NAME (the experiment) < TOML file < command line."""
    file_values = read_toml(config_file) if config_file else {}
    dataset = cli_values.get("dataset") or file_values.get("dataset") or dataset
    names = {f.name for f in fields(RunConfig)}
    given = {k: v for k, v in cli_values.items() if k in names and v is not None}
    own = command_defaults(dataset) if command_defaults else {}
    env = {"experiment": os.environ["MLFLOW_EXPERIMENT_NAME"]} if os.environ.get("MLFLOW_EXPERIMENT_NAME") else {}
    return make_config(**{**own, **env, **file_values, **given, "dataset": dataset})


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


def _warn_short_budget(config: RunConfig, tuned=()) -> None:
    """One line on stderr (rank 0) when ``config``'s steps end inside a warm-up (bench.training.run.short_budget)."""
    from bench.training.run import short_budget

    line = short_budget(config, tuned)
    if line and os.environ.get("RANK", "0") == "0":
        click.echo(line, err=True)


def _param_name(option) -> str:
    """The parameter name that an option decorator of RUN_OPTIONS declares."""
    return option(lambda: None).__click_params__[-1].name


@cli.command("run")
@_with(RUN_OPTIONS)
def run_cmd(config_file, resume, reopen, dry_run, nproc, **values) -> int:
    """Train one variant, evaluate it (bits/dim, samples, FID) and record it in MLflow.

    Exits 3 when the run diverged (recorded in MLflow as FAILED with the reason and step). Several
    processes: --nproc N here, or `torchrun --nproc_per_node N -m bench run …` (multi-node: torchrun's
    --nnodes/--rdzv-* flags); the global batch stays --batch-size."""
    from bench.training.checkpoint import load_checkpoint
    from bench.training.record import summarize
    from bench.training.run import resume_config, train

    if nproc and "WORLD_SIZE" in os.environ:
        raise BenchError("--nproc starts its own ranks; under torchrun leave it out (torchrun's --nproc_per_node sets them)")
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
        config = build_config("digits", config_file, values)
    if dry_run:
        _warn_short_budget(config)
        click.echo(json.dumps(config.redacted().to_dict(), indent=2))
        return 0
    if nproc and nproc > 1:
        if config.batch_size % nproc:
            raise BenchError(f"--batch-size {config.batch_size} does not split over --nproc {nproc}; use a multiple of {nproc}")
        from bench.runtime.dist import launch

        return launch(nproc, _without_nproc(_ARGV))
    result = train(config, resume=resume, reopen=reopen, warn_short_budget=True)
    if result.rank != 0:
        return EXIT_DIVERGED if result.status == "FAILED" else 0
    click.echo(f"run {result.run_id}: {result.status} at step {result.step}")
    if result.status == "FAILED":
        click.echo(f"  the run diverged ({result.reason}); recorded in MLflow as FAILED with tags failure_reason, failure_step")
    else:
        click.echo(summarize(result.metrics, "  "))
        click.echo(f"  checkpoint: {result.checkpoint}")
    click.echo(f"  tracking store: {masked(result.tracking_uri)}")
    click.echo(f"  browse: bench ui   (or: mlflow ui --backend-store-uri {masked(result.tracking_uri)})")
    return EXIT_DIVERGED if result.status == "FAILED" else 0


# ------------------------------------------------------------------------- bench eval
def _eval_opt(name: str, help: str, **kw):
    """An option of `bench eval` for the RunConfig field of ``name``; unset, the run's own value applies."""
    return _opt(name, help=f"{help} [default: the run's]", show_default=False, **kw)


EVAL_OPTIONS = [
    _eval_opt("final-eval", type=click.Choice(FINAL_EVALS),
              help="The bound's method: exact (all T terms) or the unbiased estimate (--eval-calls per image)."),
    _eval_opt("final-eval-images", type=click.IntRange(min=0), help="Test images in the bound (0: the whole split)."),
    _eval_opt("eval-calls", type=click.IntRange(min=3), help="Network calls per image in the estimate."),
    _eval_opt("eval-batch-size", type=click.IntRange(min=1), help="(image, t) pairs per network call in the bound."),
    _eval_opt("ode-images", type=click.IntRange(min=0), help="Test images for nll_ode (0: the bound's)."),
    _eval_opt("ode-method", type=click.Choice(SOLVERS), help="The ODE solver (scipy solve_ivp)."),
    _eval_opt("ode-rtol", type=float, help="The ODE solver's relative tolerance."),
    _eval_opt("ode-atol", type=float, help="The ODE solver's absolute tolerance."),
    _eval_opt("ode-probes", type=click.IntRange(min=1), help="Hutchinson probes per image, each with its own dequantisation draw."),
    _eval_opt("ode-probe-type", type=click.Choice(PROBE_TYPES), help="Law of the Hutchinson probes."),
    _eval_opt("ode-batch-size", type=click.IntRange(min=1), help="Images solved together as one ODE."),
    _eval_opt("fid-samples", type=click.IntRange(min=0), help="Samples scored by FID, with a sample grid (0: no FID, no grid)."),
    _eval_opt("sample-steps", type=click.IntRange(min=0), help="Sampler steps (0: all T)."),
]
ONLY = {"bound": "the bound alone", "ode": "nll_ode alone (a run's bpd and FID untouched, not recomputed)",
        "fid": "samples, FID and the grid alone"}


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--nll", type=click.Choice(["bound", "ode"]), default=None,
              help="ode: also the NLL under the probability-flow ODE (nll_ode, with its Monte Carlo error and NFE; not a "
                   "bound); bound: the bound without it. [default: the run's final_eval_ode]")
@click.option("--only", type=click.Choice(list(ONLY)), default=None,
              help="Compute one thing: " + "; ".join(f"{k}: {v}" for k, v in ONLY.items())
                   + ". `--only ode --log-to-run` adds the ODE likelihood to a run.")
@_with(EVAL_OPTIONS)
@click.option("--device", default="auto", show_default=True)
@click.option("--log-to-run", is_flag=True,
              help="Log the results into the run that produced the checkpoint: a bound by the run's method on as many "
                   "images extends bpd; by the other method, bpd_eval_exact/_estimate; on another number of images, "
                   "bpd_eval_<method>_<N>images (nll_ode likewise), so the run's own numbers are never overwritten.")
@click.option("--tracking-uri", default=None,
              help="With --log-to-run: the run's store, where the checkpoint holds its URI with the password masked.")
def eval_cmd(checkpoint, nll, only, device, log_to_run, tracking_uri, **values) -> None:
    """Evaluate a saved model's EMA weights: bits/dim on the test split, nll_ode, samples and FID.

    Unset options take the run's own config; the first lines say what will be computed, on how many images and by
    which method. Under `torchrun --nproc_per_node N -m bench eval …` the ranks share the bound and the sampling."""
    from bench.training.evaluation import HEADLINE, other_method_name, prepare_evaluation, run_evaluation
    from bench.training.record import summarize

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


# ------------------------------------------------------------------------- bench study
STUDY_OWNS = ("variant", "dataset", "steps", "seed", "experiment", "tracking_uri", "fid_samples", "run_name", "resume",
              "reopen", "dry_run", "nproc")  # `bench study` options of its own, or options that act on one run
# the trials' own defaults (studies.study.StudyConfig.base_config), stated in the options' help
STUDY_RUN_OPTIONS = _stating([o for o in RUN_OPTIONS if _param_name(o) not in STUDY_OWNS],
                             {"final_eval": "estimate", "eval_every": "--steps/4", "checkpoint_every": "--steps"})


@cli.command("study")
@click.option("--variant", "variants", multiple=True, type=click.Choice(sorted(VARIANTS)),
              help="Variant to tune (repeat for several: one study each). [default: simple]")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="digits", show_default=True)
@click.option("--trials", type=int, default=20, show_default=True, help="Trials in the study (resumed ones count; a trial lost with its worker is replaced by its retry).")
@click.option("--timeout", type=float, default=None, help="Seconds per study and worker (unset: no limit).")
@click.option("--steps", type=int, default=500, show_default=True, help="Optimiser steps per trial.")
@click.option("--objective", type=click.Choice(["bpd", "fid", "both"]), default="bpd", show_default=True,
              help="What trials minimise: estimated bits/dim on the test split, FID, or both (a Pareto front).")
@click.option("--sampler", type=click.Choice(["tpe", "random", "gp", "nsga2"]), default="tpe", show_default=True,
              help="Optuna sampler.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every trial's training.")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes sharing the study.")
@click.option("--storage", default=None, help="Optuna RDB URL (unset: sqlite optuna.db in BENCH_HOME).")
@click.option("--study-name", default=None, help="Name a study, or resume one (unset: schedule-DATASET-OBJECTIVE-VARIANT).")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (unset: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in BENCH_HOME).")
@click.option("--experiment", default=None,
              help="MLflow experiment of the study and trial runs (unset: $MLFLOW_EXPERIMENT_NAME, else elbo-bench-studies).")
@click.option("--space", "space_file", default=None, help="Study TOML (path or a name in studies/; see --show-space).")
@click.option("--tune-lr", is_flag=True, help="Add the learning rate to the search space.")
@click.option("--exact-top", type=int, default=3, show_default=True, help="Best trials re-evaluated with the exact bound.")
@click.option("--fid-samples", type=int, default=500, show_default=True, help="Samples per trial when FID is an objective (else none).")
@click.option("--heartbeat", type=int, default=60, show_default=True,
              help="Seconds between worker heartbeats (a trial silent for twice this is failed and retried).")
@click.option("--show-space", is_flag=True, help="Print the search space and exit.")
@click.option("--status", "status_of", metavar="NAME", default=None,
              help="Print study NAME's state from --storage (trials by state, best so far, workers alive) and exit.")
@_with(STUDY_RUN_OPTIONS)
def study_cmd(variants, space_file, tune_lr, show_space, status_of, config_file, **values) -> None:
    """Tune the noise schedule of one or several variants with Optuna, tracked in MLflow.

    Every trial is a `bench run` with this command's --steps, --seed and --fid-samples. The `bench run`
    options from --config on (and a --config FILE) set the rest of every trial's config, except what the
    search space tunes; their defaults are `bench run`'s except --final-eval estimate,
    --final-eval-images 0, --eval-every STEPS/4 and --checkpoint-every STEPS."""
    from studies.space import describe_space, load_space
    from studies.study import StudyConfig, run_study
    from studies.summary import describe_result

    if status_of is not None:
        from studies.study import study_status

        click.echo(study_status(status_of, values["storage"]))
        return
    space = load_space(space_file, tune_lr)
    if show_space:
        click.echo(describe_space(space))
        return
    study_fields = {f.name for f in fields(StudyConfig)}
    run_values = {k: v for k, v in values.items() if k not in study_fields and v is not None}
    overrides = {**(read_toml(config_file) if config_file else {}), **run_values}
    owned = sorted(set(overrides) & set(STUDY_OWNS))
    if owned:
        raise BenchError(f"--config {config_file} sets {', '.join(owned)}, which bench study sets itself; "
                         "use the study's own options instead")
    tuned = sorted(set(overrides) & set(space))
    if tuned:
        flags = ", ".join("--" + k.replace("_", "-") for k in tuned)
        raise BenchError(f"{flags} is tuned by the study's search space; fix it with a --space file (see --show-space) "
                         "instead of an option")
    study_values = {k: v for k, v in values.items() if k in study_fields}
    study_values["experiment"] = study_values["experiment"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") \
        or "elbo-bench-studies"
    sc = StudyConfig(variants=tuple(variants) or ("simple",), space_file=space_file, tune_lr=tune_lr,
                     run_overrides=overrides, **study_values).validate()
    from bench.training.run import short_budget

    for r in run_study(sc, notice=short_budget(sc.base_config(sc.variants[0]), tuned=space)):
        click.echo(describe_result(r, sc))


# ------------------------------------------------------------------------- bench report / grid / ui
@cli.command("report")
@click.option("--experiment", "experiments", multiple=True, help="MLflow experiment(s) to read (default: all).")
@click.option("--filter", "filter_string", default=None, help="MLflow search filter, e.g. \"params.`config.T` = '1000'\".")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Report folder (default: ./report-<name>).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI.")
@click.option("--log-to-mlflow", is_flag=True,
              help="Also log the report as an MLflow run (experiment elbo-bench-reports); off, so reports add no runs.")
def report_cmd(experiments, filter_string, out, tracking_uri, log_to_mlflow) -> None:
    """Compare runs: a table by variant, paired differences, figures, report.html and report.md."""
    from reports.build import build_report

    rep = build_report(list(experiments) or None, filter_string, out, tracking_uri, log_to_mlflow=log_to_mlflow)
    click.echo(f"report of {rep.runs} runs: {rep.html}")
    click.echo(f"  markdown: {rep.markdown}" + (f"; logged as MLflow run {rep.run_id}" if rep.run_id else ""))


TABLE2_VARIANTS = (  # DDPM Table 2's rows: μ̃ prediction, then ε prediction
    "mu-elbo-learned-diag", "mu-elbo", "mu-mse", "elbo-learned-diag", "elbo", "simple",
)
GRID_VARIANTS = (*TABLE2_VARIANTS, "hybrid", "elbo-learned")  # and iDDPM's learned-range Σ: `bench grid`'s default


def grid_defaults(dataset: str) -> dict:
    """The grid's own budget: above the dataset's defaults, below a --config file and the options."""
    return {"steps": 1000, "fid_samples": 500, "experiment": f"grid-{dataset}"}


# `bench run` options a grid has no use for: it sets these itself (--variant repeats, --seeds), or they act on one run;
# the help of the others states the grid's own defaults
GRID_OPTIONS = _stating([o for o in RUN_OPTIONS if _param_name(o) not in ("variant", "seed", "run_name", "resume", "reopen",
                                                                          "dry_run", "nproc")], grid_defaults("DATASET"))


@cli.command("grid")
@click.option("--variant", "variants", multiple=True, type=click.Choice(sorted(VARIANTS)),
              help=f"Variants (repeat; default: the config file's variant, else {', '.join(GRID_VARIANTS)}).")
@click.option("--seeds", type=int, default=2, show_default=True, help="Seeds 0..N-1 per variant.")
@_with(GRID_OPTIONS)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Report folder (unset: ./report-EXPERIMENT).")
@click.option("--log-to-mlflow", is_flag=True, help="Also log the report as an MLflow run (experiment elbo-bench-reports).")
@click.option("--dry-run", is_flag=True, help="Print the plan (what would be trained, what is already recorded) and exit.")
def grid_cmd(variants, seeds, out, log_to_mlflow, dry_run, config_file, **values) -> None:
    """Run variants × seeds with one budget, then the report: from nothing to the table.

    Takes every `bench run` option and --config FILE, applied to each run; the grid's own defaults are
    --steps 1000, --fid-samples 500 and --experiment grid-<dataset>. A (config, seed) pair whose run is
    already in the experiment, FINISHED or diverged, is skipped, so an interrupted grid resumes where it stopped.
    Grids started together on one store share the pairs: each is trained by one of them."""
    from contextlib import ExitStack
    from dataclasses import replace

    from bench.training.grid import claim, recorded_runs
    from bench.runtime.locks import LockBusy
    from bench.training.run import train
    from reports.build import build_report, check_out_dir, default_out_dir

    if seeds < 1:
        raise BenchError(f"--seeds must be >= 1, got {seeds}")
    file_values = read_toml(config_file) if config_file else {}
    variants = variants or ((file_values["variant"],) if "variant" in file_values else GRID_VARIANTS)
    replaced = sorted(set(file_values) & {"seed", "run_name"})
    if replaced:
        click.echo(f"note: the grid sets {' and '.join(replaced)} itself; the config file's value is not used", err=True)
    configs = [replace(build_config("digits", config_file, {**values, "variant": v, "seed": s}, grid_defaults),
                       run_name=None) for v in dict.fromkeys(variants) for s in range(seeds)]  # all validated up front
    experiment, tracking_uri = configs[0].experiment, configs[0].tracking_uri
    if not dry_run:
        check_out_dir(out or default_out_dir([experiment]))  # refused before hours of training, not after
    recorded = recorded_runs(configs)
    _warn_short_budget(configs[0])  # once the store answered: a refused grid prints its one error line alone
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
        click.echo(json.dumps({k: v for k, v in configs[0].redacted().to_dict().items() if k not in ("variant", "seed", "run_name")},
                              indent=2))
        return
    rep = build_report([experiment], None, out, tracking_uri, log_to_mlflow=log_to_mlflow)
    click.echo(f"report of {rep.runs} runs: {rep.html}" + (f"; logged as MLflow run {rep.run_id}" if rep.run_id else ""))
    click.echo(f"{len(configs)} runs, {diverged} diverged (recorded FAILED; counted, not averaged, in the report)"
               + (f"; {skipped} already recorded before this grid, skipped" if skipped else "")
               + (f"; {elsewhere} trained meanwhile by another grid" if elsewhere else ""))


@cli.command("runs")
@click.option("--experiment", "experiments", multiple=True, help="MLflow experiment(s) (default: all).")
@click.option("--cleanup", is_flag=True, help="Mark the runs whose process is gone KILLED (with tag killed_reason).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI.")
def runs_cmd(experiments, cleanup, tracking_uri) -> None:
    """List the runs that MLflow shows as RUNNING and whether their process is still alive."""
    from bench.tracking import store as tracking

    client = tracking.client(tracking_uri)
    exps = tracking.experiments(client, list(experiments) or None)
    running = client.search_runs([e.experiment_id for e in exps], filter_string="attributes.status = 'RUNNING'",
                                 max_results=5000)
    for r in running:
        gone = tracking.owner_gone(r.data.tags)
        owner = f"process {r.data.tags['owner.pid']} on {r.data.tags.get('owner.host')}" if "owner.pid" in r.data.tags \
            else "owner unknown (no owner tags)"
        click.echo(f"{r.info.run_id}  {r.info.run_name}  {owner}: {'gone (' + gone + ')' if gone else 'alive'}")
    if cleanup:
        closed = tracking.close_dead_runs(client, [e.experiment_id for e in exps])
        click.echo(f"marked {len(closed)} run(s) KILLED")
    elif not running:
        click.echo("no RUNNING runs")


@cli.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on (beyond 127.0.0.1: no authentication).")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--tracking-uri", default=None, help="The store to browse (default: $MLFLOW_TRACKING_URI, else the embedded one).")
@click.option("--experiment", default=None,
              help="Experiment to open (default: $MLFLOW_EXPERIMENT_NAME, else the one with the newest run).")
@click.option("--browser/--no-browser", default=True, show_default=True, help="Open the page in a browser when one is available.")
def ui_cmd(host, port, tracking_uri, experiment, browser) -> None:
    """Start the MLflow UI on the runs table of an experiment (bpd, fid, variant shown); Ctrl-C stops it."""
    from bench.serve.ui import serve

    serve(tracking_uri, host, port, experiment=experiment, open_browser=browser)


@cli.command("server")
@click.option("--backend-store-uri", default=None, envvar="MLFLOW_BACKEND_STORE_URI",
              help="Database of the runs: postgresql://USER:PASSWORD@HOST/DB, or sqlite:///PATH (unset: "
                   "$MLFLOW_BACKEND_STORE_URI, which keeps a password off the command line, else mlflow.db in BENCH_HOME).")
@click.option("--artifacts-destination", default=None,
              help="Where uploaded artifacts are kept: a folder or an object-store URI such as s3://bucket/path "
                   "(unset: mlartifacts-served/ in BENCH_HOME).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; workers on other machines need 0.0.0.0 or this machine's address (no authentication).")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True, help="Server processes answering requests.")
@click.option("--allowed-hosts", default=None,
              help="Host names workers may use to reach the server, comma-separated (MLflow's DNS-rebinding guard; "
                   "unset: localhost and private addresses).")
def server_cmd(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts) -> None:
    """Start an MLflow tracking server for studies across machines; Ctrl-C stops it.

    Workers then log to it with `--tracking-uri http://HOST:PORT`; artifacts go through the server, so
    they need no shared disk."""
    from bench.serve.ui import serve_tracking

    serve_tracking(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts)


@cli.command("dashboard")
@click.option("--storage", default=None, help="Optuna RDB URL (default: the sqlite optuna.db in BENCH_HOME that bench study uses).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on (beyond 127.0.0.1: no authentication).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--browser/--no-browser", default=True, show_default=True, help="Open the page in a browser when one is available.")
@click.option("--study-name", default=None, help="Open this study's page (default: the list of studies).")
def dashboard_cmd(storage, host, port, browser, study_name) -> None:
    """Start optuna-dashboard on the studies' storage; Ctrl-C stops it."""
    from bench.serve.ui import serve_dashboard

    serve_dashboard(storage, host, port, open_browser=browser, study_name=study_name)


# ------------------------------------------------------------------------- bench fid
@cli.command("fid")
@click.argument("samples_file", metavar="SAMPLES.npz", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default=None,
              help="What the samples imitate (default: the dataset the samples file records).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Data root (else $BENCH_DATA_DIR).")
@click.option("--fid-weights", type=click.Path(dir_okay=False), default=None, help="Inception weights file for RGB FID.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
def fid_cmd(samples_file, dataset, data_dir, fid_weights, device) -> None:
    """Score a saved-samples file (uint8 .npz, key 'samples', as runs save it) against the train split:
    FID, KID, precision/recall, IS and the reference points, with how they were computed."""
    from bench.tracking import store as tracking
    from bench.metrics.fid import samples_dataset, score_samples

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
