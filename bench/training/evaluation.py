"""Evaluation: the bound estimate and a sample grid during training, the final evaluation (the bound on the test
split, ``nll_ode``, samples, FID) and the same on a saved checkpoint (:func:`prepare_evaluation`,
:func:`run_evaluation`), with the names each result is logged under in its run.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.diffusion.bound import bits_per_dim, estimate_bits_per_dim
from bench.diffusion.continuous_bound import ContinuousResult
from bench.diffusion.ode import FlowFailed, network_dtype
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import Variant
from bench.errors import BenchError, reraised
from bench.metrics.extractors import FidUnavailable
from bench.metrics.fid import compute_fid
from bench.metrics.samples import save_samples
from bench.nets.ema import ema_weights
from bench.runtime import dist as dist_mod
from bench.runtime.context import Runtime
from bench.runtime.cores import CoreShare
from bench.runtime.devices import Autocast, without_autocast
from bench.runtime.dist import SINGLE, Dist
from bench.runtime.progress import Progress, format_duration, say
from bench.tracking import store as tracking
from bench.tracking.logger import RunLogger
from bench.tracking.plots import continuous_curve_figure, per_t_figure, sample_grid
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig
from bench.training.record import ADAPTIVE_FIGURE, NoLog, log_adaptive_schedule, schedule_metrics
from bench.training.ruler import (
    bound_estimate,
    continuous_bound_name,
    continuous_t_per_image,
    draw_samples,
    ode_nll,
    sampler_description,
)
from bench.training.state import RunContext, load_weights, setup

EVAL_SEED = 1234  # the noise of every bound evaluation, fixed so numbers compare across runs
BPD_CONVENTIONS = "bpd: x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM protocol); bpd_unclipped: not clipped"
CONTINUOUS_CONVENTION = ("a continuous-time model's bound: decoder + prior + diffusion, each an upper-bound term on "
                        "−log P of the 8-bit images (no x̂_0 clipping enters it)")
HEADLINE = "bpd"  # a run's final bound; `bpd_method` says whether it is exact or an estimate


def other_method_name(method: str) -> str:
    """Where a re-evaluation by ``method`` ('exact' or 'estimate') logs its bound in a run whose ``bpd`` came from the
    other method: ``bpd_eval_exact`` or ``bpd_eval_estimate`` (with ``…_stderr``, ``…/vb``…, ``…_method``)."""
    return f"{HEADLINE}_eval_{method}"


def eval_subset(test: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` test images (all of them for 0)."""
    return test[: min(n, len(test))] if n else test


def evaluation_plan(config: RunConfig) -> str:
    """What a training-time evaluation does, in a few words."""
    return (f"bound estimate on {config.eval_images} test images, {config.eval_calls} calls each; "
            f"{config.sample_grid} samples")


def evaluate_during_training(ema_model, ctx: RunContext, step: int, bar: Progress | None = None) -> None:
    """The training-time bound estimate on a test subset, a sample grid and a weighted run's adaptive noise schedule,
    logged at ``step``; ``bar`` (the training's progress) says the result and counts the evaluations still to come in
    its time left."""
    config = ctx.config
    started = time.monotonic()
    subset = eval_subset(ctx.test_images, config.eval_images)
    est = bound_estimate(ema_model, ctx.variant, ctx.sched, subset, config.eval_calls, seed=EVAL_SEED,
                         runtime=Runtime(ctx.device, ctx.dist, batch_size=config.eval_batch_size))
    calls = est.t_per_image if isinstance(est, ContinuousResult) else est.calls_per_image
    summary = {**est.summary("bpd_estimate"), "bpd_estimate_images": len(subset), "bpd_estimate_calls": calls}
    ctx.log.metrics(summary, step)
    if isinstance(est, ContinuousResult):
        ctx.log.tags({"bpd_estimate_method": f"estimate ({est.method}; seed {EVAL_SEED})"})
        if ctx.dist.main:
            log_continuous_curve(ctx.log, est, ctx.variant.label, f"estimate at step {step}",
                                 f"diffusion_by_t_estimate/step_{step:08d}")
    else:
        ctx.log.tags({"bpd_estimate_method": f"estimate ({est.calls_per_image} calls/image, {len(subset)} test "
                                             f"images, seed {EVAL_SEED}); bpd_estimate: x̂_0 clipped to [-1, 1] "
                                             "(DDPM/iDDPM), bpd_estimate_unclipped: unclipped"})
        if ctx.dist.main:
            binned = est.binned_per_t(ctx.sched.T)
            S = len(est.per_stratum)
            ctx.log.figure(per_t_figure({ctx.variant.label: binned},
                                        f"estimate at step {step}, mean over each of {S} strata of t"),
                           f"per_t_estimate/step_{step:08d}.png")
            ctx.log.dict({"step": step, "images": len(subset), "t_from": [1] + [int(e) + 1 for e in est.strata[:-1]],
                          "t_to": [1] + [int(e) for e in est.strata[1:]],
                          "L_t_bits_per_dim_mean": [float(binned[0])] + est.per_stratum.tolist(),
                          "note": "estimated: the decoder L_0 (t = 1), then the mean of L_t over each stratum of t "
                                  "(paper time, inclusive), x̂_0 clipped"}, f"per_t_estimate/step_{step:08d}.json")
    if ctx.dist.main:
        log_adaptive_schedule(ctx.log, ctx.variant, ema_model, f"{ADAPTIVE_FIGURE}/step_{step:08d}", step)
    grid = draw_samples(ema_model, ctx.variant, ctx.sched, config.sample_grid, tuple(ctx.train_images.shape[1:]),
                        config.sample_steps or None, seed=config.seed, runtime=Runtime(ctx.device, ctx.dist))
    if ctx.dist.main:
        ctx.log.image(sample_grid(grid), "samples", step)
    if bar is not None:
        bar.pauses_left = later = (config.steps - 1) // config.eval_every - step // config.eval_every
        bar.write(f"step {step}: bpd_estimate {summary['bpd_estimate']:.4f} ± {summary['bpd_estimate_stderr']:.4f} "
                  f"bits/dim (lower is better; {len(subset)} test images) "
                  f"in {format_duration(time.monotonic() - started)}; "
                  f"{later} more evaluation{'s' * (later != 1)} before the end")
    if ctx.on_eval is not None:
        ctx.on_eval(step, summary)


def log_continuous_curve(log, res: ContinuousResult, label: str, what: str, name: str) -> None:
    """A continuous-time bound's diffusion integrand by bin of t, as a figure and a JSON file ``name`` (not DDPM's
    ``per_t_…``, which hold L_t by step)."""
    centres = ((res.per_t_edges[1:] + res.per_t_edges[:-1]) / 2).tolist()
    log.figure(continuous_curve_figure({label: (centres, res.per_t.tolist())}, what), f"{name}.png")
    log.dict({"t_from": res.per_t_edges[:-1].tolist(), "t_to": res.per_t_edges[1:].tolist(),
              "diffusion_bits_per_dim_mean": res.per_t.tolist(),
              "note": f"{what}: {res.method}; the mean of the diffusion term's integrand over each bin of t"},
             f"{name}.json")


def final_evaluation(model, variant, sched, config: RunConfig, train_images, test_images, device, log, step: int,
                     progress: bool = True, dist: Dist = SINGLE, desc: str = "", bound: str | None = HEADLINE,
                     ode: str = "nll_ode", grid: bool = True) -> dict[str, float]:
    """The bound on the test split, the per-t curve, samples and FID; logged at ``step``. Under
    torchrun every rank shares the bound and the sampling; rank 0 alone scores FID and logs.
    ``desc`` names the progress bars (``desc: exact bits/dim``…). ``bound``: the name the bound is logged under
    (its tags ``<bound>_method``…, its per-t curve ``per_t_<bound>.json``), when it is not the run's headline ``bpd``
    (see :func:`other_method_name`); the description then gets a section of its own instead of its Result; None:
    no bound. ``ode``: the name ``nll_ode`` (with ``config.final_eval_ode``) is logged under. ``grid``: draw the
    sample grid (with ``config.fid_samples`` 0, no samples at all)."""
    metrics, res, method = {}, None, ""
    runtime = Runtime(device, dist, config.eval_batch_size, progress=progress, desc=desc)
    if bound is not None:
        subset = eval_subset(test_images, config.final_eval_images)
        if variant.continuous:
            res = bound_estimate(model, variant, sched, subset, config.eval_calls, seed=EVAL_SEED, runtime=runtime)
            method = f"estimate ({res.method})"
            metrics.update(schedule_metrics(model))  # the EMA model's γ(0), γ(1): the bound's end points
        elif config.final_eval == "exact":
            res = bits_per_dim(model, variant, sched, subset, seed=EVAL_SEED, runtime=runtime)
            method = f"exact (all {sched.T} t, {len(subset)} test images)"
        else:
            res = estimate_bits_per_dim(model, variant, sched, subset, config.eval_calls, seed=EVAL_SEED,
                                        runtime=runtime)
            method = f"estimate ({res.calls_per_image} calls/image, {len(subset)} test images)"
        metrics.update(res.summary(bound))
    nll, ode_failed, ode_tags = None, "", {}
    if config.final_eval_ode:  # a different estimand from the bound: logged as nll_ode, never as bpd
        ode_subset = eval_subset(test_images, config.ode_images or config.final_eval_images)
        flow_net = without_autocast(model)  # the network in float32 whatever the run's precision (network_score)
        ode_tags[f"{ode}_precision"] = str(network_dtype(flow_net)).removeprefix("torch.")
        try:
            nll = ode_nll(flow_net, variant, sched, ode_subset, config.ode_options(), seed=EVAL_SEED,
                          runtime=Runtime(device, dist, config.ode_batch_size, progress=progress, desc=desc))
            metrics.update({ode + k.removeprefix("nll_ode"): v for k, v in nll.summary().items()})
        except FlowFailed as err:  # diverged, or the solver gave up: a result about this network, recorded; the
            ode_failed = str(err)  # rest of the evaluation goes on
            warnings.warn(f"{ode} not computed: {err}", stacklevel=2)
    shape = tuple(train_images.shape[1:])
    steps = config.sample_steps or None
    drawn = max(config.fid_samples, config.sample_grid) if grid or config.fid_samples else 0
    images = draw_samples(model, variant, sched, drawn, shape, steps, seed=config.seed,
                          runtime=Runtime(device, dist, progress=progress, desc=desc)) if drawn else None
    if not dist.main:
        return metrics
    if res is not None:
        conventions = CONTINUOUS_CONVENTION if variant.continuous else BPD_CONVENTIONS.replace(HEADLINE, bound)
        log.tags({f"{bound}_method": f"{method}; {conventions}", f"{bound}_split": "test",
                  f"{bound}_images": len(subset), f"{bound}_rounded": _rounded(metrics, bound, method)})
    if nll is not None:
        log.tags({**ode_tags, f"{ode}_method": nll.method, f"{ode}_split": "test", f"{ode}_images": len(ode_subset)})
    if ode_failed:
        log.tags({**ode_tags, f"{ode}_failed": ode_failed[:500], f"{ode}_method": config.ode_options().describe()})
    if isinstance(res, ContinuousResult):
        log_continuous_curve(log, res, variant.label, "final bound",
                             "diffusion_by_t_bound" if bound == HEADLINE else f"diffusion_by_t_{bound}")
    elif res is not None and res.per_t.numel():
        per_t = "per_t_bound" if bound == HEADLINE else f"per_t_{bound}"
        log.figure(per_t_figure({variant.label: res.per_t}, sched.describe()), f"{per_t}.png")
        log.dict({"t": list(range(1, sched.T + 1)), "L_t_bits_per_dim": res.per_t.tolist(),
                  "L_t_bits_per_dim_unclipped": res.other.per_t.tolist()}, f"{per_t}.json")
    if grid and images is not None:
        log.image(sample_grid(images[: config.sample_grid]), "samples", step)
    sampler = sampler_description(sched, steps, variant)
    fid_tags: dict[str, str] = {}
    if config.fid_samples:
        with tempfile.TemporaryDirectory() as tmp:  # the samples FID scores, to re-score with `bench fid`
            log.artifact(save_samples(images[: config.fid_samples], Path(tmp) / "fid_samples.npz", config.dataset),
                         "samples")
        started = time.monotonic()
        say(f"FID: {config.fid_samples} samples against the {config.dataset} train split", progress)
        try:
            fid = compute_fid(images[: config.fid_samples], config.dataset, train_images,
                              cache_dir=tracking.bench_home() / "cache", device=device, fid_weights=config.fid_weights,
                              test_images=test_images)
            metrics.update(fid.metrics)
            fid_tags = fid.tags
            say(f"FID: done in {format_duration(time.monotonic() - started)}", progress)
            log.tags({**fid.tags, "fid_sampler": sampler})
        except FidUnavailable as err:
            warnings.warn(f"FID skipped: {err}", stacklevel=2)
            log.tags({"fid_skipped": str(err)[:500], "fid_sampler": sampler})
    log.metrics(metrics, step)
    fid = (f"; FID {metrics['fid']:.4g} ({config.fid_samples} samples, sampler: {sampler}; "
           f"features: {fid_tags['fid_extractor']})" if "fid" in metrics else "")
    ode_text = (f"{ode} {metrics[ode]:.4f} ± {metrics[f'{ode}_stderr']:.4f} bits/dim ({nll.method})" if nll is not None
                else f"{ode} not computed ({ode_failed})" if ode_failed else "")
    if res is None:  # no bound: the description's Result keeps saying what `bpd` is
        what = ode_text or fid.removeprefix("; ")
        if what:
            log.note_section(f"Re-evaluation ({ode if nll is not None or ode_failed else 'FID'})",
                             f"at step {step}, {what}. The run's bpd is unchanged.")
        return metrics
    stderr = f" ± {metrics[f'{bound}_stderr']:.4f} (Monte Carlo)" if f"{bound}_stderr" in metrics else ""
    result = (f"at step {step}, {bound} {metrics[bound]:.4f}{stderr}, "
              f"{method}{'; ' + ode_text if ode_text else ''}{fid}.")
    if bound == HEADLINE:
        log.note_section("Result", result)
    else:  # the Result keeps saying what `bpd` is; this number is another method's, under its own name
        log.note_section(f"Re-evaluation ({method.split(' ')[0]})", f"{result} The run's bpd is unchanged.")
    return metrics


@dataclass
class CheckpointEval:
    """A saved model's evaluation, resolved before anything is computed (:func:`prepare_evaluation`): the config it
    runs with, the data, and under which names it logs. ``bound``/``ode``: the names the bound and ``nll_ode`` are
    logged under (None: not computed); ``grid``: whether samples are drawn for a grid (with ``config.fid_samples``)."""

    ckpt: dict
    config: RunConfig
    dist: Dist
    device: torch.device
    train_images: torch.Tensor
    test_images: torch.Tensor
    variant: Variant
    sched: Schedule
    client: object | None  # the run's store when the results are logged into the run (rank 0), else None
    bound: str | None
    ode: str | None
    grid: bool
    model: torch.nn.Module | None = None  # the network itself where it is not the checkpoint's (an imported model)
    source: str = ""  # what is evaluated, where it is not a run's checkpoint

    @property
    def run_id(self) -> str:
        return self.ckpt["run_id"]

    def describe(self) -> str:
        """What will be computed, on how many images, by which method, and where it goes: a few lines."""
        c, n_test = self.config, len(self.test_images)
        lines = [f"evaluating {self.source} on {self.device}:" if self.source else
                 f"evaluating the EMA weights of run {self.run_id} at step {self.ckpt['step']} on {self.device}:"]
        if self.bound is None:
            lines.append("  bound      not computed")
        else:
            how = f"estimate of {continuous_bound_name(self.variant, self.sched)} " \
                f"({continuous_t_per_image(c.eval_calls)} stratified t per image)" if self.variant.continuous else \
                f"exact (all {self.sched.T} t)" if c.final_eval == "exact" else \
                f"estimate ({c.eval_calls} network calls per image)"
            lines.append(f"  bound      {how} on {len(eval_subset(self.test_images, c.final_eval_images))} of {n_test} "
                         f"test images, as {self.bound}")
        if self.ode is not None:
            images = len(eval_subset(self.test_images, c.ode_images or c.final_eval_images))
            lines.append(f"  nll_ode    probability-flow ODE ({c.ode_options().describe()}; "
                         f"batches of {c.ode_batch_size}) on {images} of {n_test} test images, as {self.ode}")
        sampler = sampler_description(self.sched, c.sample_steps or None, self.variant)
        if c.fid_samples:
            lines.append(f"  fid        {c.fid_samples} samples against the train split (sampler: {sampler}), and a "
                         f"grid of {c.sample_grid}")
        elif self.grid:
            lines.append(f"  samples    a grid of {c.sample_grid} (sampler: {sampler}); no FID")
        else:
            lines.append("  samples    none (no FID, no grid)")
        lines.append(f"  logged into run {self.run_id}" if self.client is not None
                     else "  printed, not logged (--log-to-run logs)")
        return "\n".join(lines)


def prepare_evaluation(path: str | Path, overrides: dict | None = None, bound: bool = True, grid: bool | None = None,
                       log_to_run: bool = False, device: str = "auto", alone: bool = False,
                       tracking_uri: str | None = None) -> CheckpointEval:
    """Resolve the evaluation of checkpoint ``path`` (see :class:`CheckpointEval`): its run's config with ``overrides``
    (RunConfig fields: ``final_eval``, ``final_eval_images``, ``final_eval_ode``, ``ode_*``, ``fid_samples``…),
    ``bound``: compute the bound; ``grid``: draw a sample grid (default: when ``fid_samples`` is not 0). Under
    torchrun the ranks share the work, unless ``alone`` (this process evaluates by itself: a study's rank 0 after
    the others have left); ``tracking_uri``: the store's URI with its password, where the checkpoint's is masked."""
    ckpt = load_checkpoint(path)
    d, device_name = (SINGLE, device) if alone else dist_mod.setup(device)
    # the run must still be there before minutes of evaluation
    client = d.main_decides(lambda: _run_client(ckpt, tracking_uri)) if log_to_run else None
    config = replace(RunConfig(**ckpt["config"]), device=device,
                     **{k: v for k, v in (overrides or {}).items() if v is not None})
    dev, train_images, test_images, variant, sched = setup(config, device_name)
    if not (bound or config.final_eval_ode or config.fid_samples or grid):
        raise BenchError("nothing to evaluate: no bound, no nll_ode and fid_samples 0; give --fid-samples N, or leave "
                         "out --only")
    names = {"bound": HEADLINE if bound else None, "ode": "nll_ode" if config.final_eval_ode else None}
    if client is not None:  # rank 0's: the others log nothing
        run = client.get_run(ckpt["run_id"]).data
        if bound:
            names["bound"] = _bound_name(run, "estimate" if variant.continuous else config.final_eval,
                                         len(eval_subset(test_images, config.final_eval_images)))
        if config.final_eval_ode:
            names["ode"] = _ode_name(run, len(eval_subset(test_images, config.ode_images or config.final_eval_images)))
    return CheckpointEval(ckpt, config, d, dev, train_images, test_images, variant, sched, client, **names,
                          grid=bool(config.fid_samples) if grid is None else grid)


def run_evaluation(plan: CheckpointEval, progress: bool = True, desc: str = "") -> dict[str, float]:
    """Compute ``plan`` (see :func:`prepare_evaluation`) and log it into the run when it says so (linked to the run's
    model, its tag ``model_id``). Returns the metrics under the names they are logged under."""
    c, d, dev = plan.config, plan.dist, plan.device
    C, H = plan.train_images.shape[1], plan.train_images.shape[2]
    if plan.model is not None:
        ema = plan.model
    else:
        ema = c.build_model(plan.variant, C, H)
        load_weights(ema, ema_weights(plan.ckpt["ema"]), "EMA weights")
    model = Autocast(ema.to(dev).eval(), c.precision, dev)
    log = NoLog()
    if plan.client is not None:
        log = RunLogger(plan.client, plan.run_id,
                                 model_id=plan.client.get_run(plan.run_id).data.tags.get("model_id"))
    with CoreShare():
        return final_evaluation(model, plan.variant, plan.sched, c, plan.train_images, plan.test_images, dev, log,
                                plan.ckpt["step"], progress and d.main, d, desc, plan.bound, plan.ode or "nll_ode",
                                plan.grid)


def _rounded(metrics: dict[str, float], bound: str, method: str) -> str:
    """The bound as the MLflow runs table should show it, which prints every digit of a metric: rounded, with its
    Monte Carlo standard error and method ('3.1235 ± 0.0123 bits/dim (estimate)'). A tag beside the metric,
    which keeps every digit."""
    se = f" ± {metrics[f'{bound}_stderr']:.4f}" if f"{bound}_stderr" in metrics else ""
    return f"{metrics[bound]:.4f}{se} bits/dim ({method.split(' ')[0]})"


def evaluate_checkpoint(path: str | Path, final_eval: str | None = None, fid_samples: int | None = None,
                        sample_steps: int | None = None, log_to_run: bool = False, device: str = "auto",
                        progress: bool = True, desc: str = "", alone: bool = False,
                        ode: bool | None = None,
                        tracking_uri: str | None = None) -> tuple[dict[str, float], str | None, Dist]:
    """The final evaluation of a saved model's EMA weights (:func:`prepare_evaluation`, then :func:`run_evaluation`);
    logged into its run when asked. Returns (metrics, the run logged into or None, this rank). ``desc`` names
    the progress bars."""
    plan = prepare_evaluation(path, {"final_eval": final_eval, "fid_samples": fid_samples, "sample_steps": sample_steps,
                                     "final_eval_ode": ode}, log_to_run=log_to_run, device=device, alone=alone,
                              tracking_uri=tracking_uri)
    return run_evaluation(plan, progress, desc), (plan.run_id if log_to_run else None), plan.dist


def _bound_name(run, method: str, images: int) -> str:
    """Where a re-evaluation by ``method`` on ``images`` test images logs its bound in ``run`` (its data): ``bpd``
    when the run has none yet, or its ``bpd`` came from the same method (``bpd_method``) on as many images
    (``bpd_images``); by the other method on as many images, its own name (:func:`other_method_name`); on another
    number of images, ``bpd_eval_<method>_<images>images``. So a run's ``bpd`` history never mixes an exact bound with
    an estimate nor a subset with the whole split, and ``bpd_method`` never changes."""
    if HEADLINE not in run.metrics:
        return HEADLINE
    if run.tags.get(f"{HEADLINE}_images", str(images)) != str(images):
        return f"{other_method_name(method)}_{images}images"
    return HEADLINE if run.tags.get(f"{HEADLINE}_method", "").split(" ")[0] == method else other_method_name(method)


def _ode_name(run, images: int) -> str:
    """Where ``nll_ode`` on ``images`` test images is logged in ``run``: ``nll_ode``, unless the run holds one on
    another number of images (``nll_ode_images``): then ``nll_ode_<images>images``."""
    if "nll_ode" in run.metrics and run.tags.get("nll_ode_images", str(images)) != str(images):
        return f"nll_ode_{images}images"
    return "nll_ode"


def _run_client(ckpt: dict, tracking_uri: str | None = None):
    """A client on the checkpoint's store (``tracking_uri`` when its recorded URI hides a password), checked to
    still hold the checkpoint's run."""
    client = tracking.client(tracking.recorded_store(ckpt["tracking_uri"], tracking_uri), must_exist=True)
    with reraised(lambda _: f"the checkpoint's MLflow run {ckpt['run_id']} is not in {ckpt['tracking_uri']}; "
                            "evaluate without --log-to-run", Exception):  # MLflow raises many kinds for a missing run
        client.get_run(ckpt["run_id"])
    return client

