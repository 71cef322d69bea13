"""What a run records: its start (params, tags, description, config, dataset), the training loss and throughput at
every logging step, a weighted run's adaptive noise schedule, its EMA network as an MLflow model, and an
evaluation's metrics as aligned lines (:func:`summarize`). :class:`NoLog` stands in for the logger where nothing is
to be recorded.
"""

from __future__ import annotations

import math
import socket
import time
import warnings
from pathlib import Path

import torch

from bench.diffusion.continuous import find_denoiser, time_of_gamma
from bench.diffusion.vdm import describe_gamma
from bench.diffusion.weighting import is_monotone
from bench.errors import first_line
from bench.nets.unet import count_parameters
from bench.runtime.devices import synchronize
from bench.runtime.dist import Dist
from bench.runtime.progress import Progress
from bench.tracking import provenance
from bench.tracking.plots import adaptive_density_figure
from bench.training.config import RunConfig, flatten
from bench.training.ruler import continuous_bound_name, continuous_t_per_image, sampler_description
from bench.training.state import RunContext, TrainState, checkpoint_path

BOUND_TERMS = ("prior", "vb", "decoder")  # a bound's parts, logged as <bound>/<term>: total = prior + vb + decoder


class NoLog:
    """Stands in for a run's logger (:class:`bench.tracking.logger.RunLogger`) where nothing is recorded: on ranks
    other than 0, in an evaluation that is only printed, for a study recorded by another process."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def log_start(log, config, variant, sched, net, train_images, device, d: Dist, checkpoint: Path) -> None:
    """A new run's params, tags, description, config file and training dataset."""
    schedule = schedule_label(config, variant, sched)
    log.params({
        **flatten(config), **{f"variant.{k}": v for k, v in variant.describe().items()},
        **{f"schedule.{k}": v for k, v in sched.spec.items()}, "schedule": schedule,
        "network.parameters": count_parameters(net), "optimizer": "AdamW", "device": str(device),
        "lr_schedule": "LambdaLR: linear warmup over warmup_steps, then constant",
        "ema": "torch AveragedModel from the initial weights, decay min(ema_decay, (1+n)/(10+n)) at update n"
               if config.ema_warmup else "torch AveragedModel from the initial weights, decay ema_decay",
        "code_version": provenance.git_commit(), **provenance.versions(),
        # bpd with x̂_0 clipped to [-1, 1] (DDPM/iDDPM), or a continuous-time bound; reports keep conventions apart
        "protocol.bpd": CONTINUOUS_PROTOCOL if variant.continuous else "x0-clipped",
        "dist.world_size": d.world, "dist.backend": _backend(d),
    })
    log.tags({"variant": variant.label, "dataset": config.dataset, "schedule": schedule,
              "images_per_sec": "images trained per wall-clock second between two logging points, all ranks together "
                                "(evaluation and checkpoint time left out)",
              "checkpoint": str(checkpoint), "checkpoint_host": socket.gethostname(),
              "loss_quartiles": "loss_q0..loss_q3: the training loss (as minimised) of the examples whose t lies in "
                                "each quarter of 1..T, means over the logging window",
              **trained_on(variant, net)})
    log.note(describe_run(config, variant, sched, net, d))
    log.dict(config.redacted().to_dict(), "config.json")
    log.dataset(train_images, config.dataset, "train")


def trained_on(variant, net) -> dict[str, str]:
    """What a continuous-time run was trained on, as tags: ``prediction`` (eps, x or v); for the weighted family also
    ``weighting`` (its w(λ) with its hyper-parameters in words), ``weighting_monotone`` (yes/no: w non-increasing in
    λ on this run's schedule, so L_w is an ELBO of noise-augmented data) and ``adaptive_schedule`` (yes/no)."""
    if not variant.continuous:
        return {}
    tags = {"prediction": find_denoiser(net).prediction}
    if variant.weighted:
        tags.update({"weighting": variant.weighting.describe(),
                     "weighting_monotone": "yes" if _monotone(variant, net) else "no",
                     "adaptive_schedule": "yes" if variant.adaptive_asked else "no"})
    return tags


def _monotone(variant, net) -> bool:
    return is_monotone(variant.weighting, find_denoiser(net).schedule)


CONTINUOUS_PROTOCOL = "continuous-time"  # protocol.bpd of a continuous-time model: its bound has no x̂_0 to clip


def schedule_label(config: RunConfig, variant, sched) -> str:
    """The noise schedule a run trains with, as its ``schedule`` tag and param (part of a report row's key): the
    discrete schedule's description, or a continuous-time model's γ(t) as it starts (a learned one moves)."""
    if not variant.continuous:
        return sched.describe()
    name = variant.gamma_schedule(config.gamma_schedule)
    steps = f", T={sched.T}" if variant.finite else ""
    if name in ("linear-beta", "cosine"):
        return f"γ(t) {name} reading of {sched.describe()}{steps}"
    return f"γ(t) {name}({config.gamma_min:g}..{config.gamma_max:g}){steps}"


def describe_run(config: RunConfig, variant, sched, net, d: Dist) -> str:
    """The run's description in MLflow: what was trained and how it is measured."""
    world = f", {d.world} data-parallel processes" if d.world > 1 else ""
    final = (f"the unbiased estimate of the continuous-time bound ({continuous_bound_name(variant, sched)}; "
             f"{continuous_t_per_image(config.eval_calls)} stratified t per image)" if variant.continuous
             else f"the exact bound (all {sched.T} terms)" if config.final_eval == "exact"
             else f"the unbiased estimate of the bound ({config.eval_calls} network calls per image)")
    images = f"{config.final_eval_images} test images" if config.final_eval_images else "the whole test split"
    sampler = sampler_description(sched, config.sample_steps or None, variant)
    during = (f" During training, `bpd_estimate` (the unbiased estimate, {config.eval_calls} calls per image, "
              f"{config.eval_images} test images) every {config.eval_every} steps.") if config.eval_every else ""
    fid = (f"`fid`: {config.fid_samples} samples (sampler: {sampler}) against the train split, in the features of the "
           "dataset's extractor (tag `fid_extractor`)." if config.fid_samples else "No FID.")
    trained = ""
    if variant.continuous:
        kind = f"continuous time, {PREDICTION_WORDS[find_denoiser(net).prediction]}"
        schedule = f"γ(t) = −log SNR(t) {describe_gamma(find_denoiser(net).schedule)}"
        if variant.finite:
            schedule += f", T = {sched.T} steps"
        convention = "no x̂_0 clipping enters it (decoder + prior + diffusion terms: `bpd/decoder`, …)"
        if variant.weighted:
            monotone = _monotone(variant, net)
            trained = (f"Weighting {variant.weighting.describe()}; "
                       + ("it is non-increasing in λ on this schedule, so L_w is an ELBO of noise-augmented data"
                          if monotone else "it is not monotone in λ on this schedule, so L_w is not an ELBO")
                       + "; λ drawn " + ("by the adaptive noise schedule (an EMA of the weighted loss in λ-bins; its "
                                         f"density: {ADAPTIVE_FIGURE}.png)" if variant.adaptive_asked
                                         else "by the schedule at low-discrepancy t") + ". ")
    else:
        kind = f"mean: {variant.mean_type}, variance: {variant.var_type}"
        schedule = sched.describe()
        convention = "x̂_0 clipped to [-1, 1] in the reverse step (the DDPM/iDDPM protocol; `bpd_unclipped` without)"
    return (f"**{variant.label}** trained on **{config.dataset}**: {variant.objective} "
            f"({kind}). {trained}{config.network} U-Net, "
            f"{count_parameters(net):,} parameters; noise schedule {schedule}. {config.steps} steps of AdamW "
            f"(lr {config.lr:g}, {config.warmup_steps} warmup steps, batch {config.batch_size}, gradient clip "
            f"{config.grad_clip:g}), EMA decay {config.ema_decay:g}{' after a warm-up' * config.ema_warmup}, "
            f"seed {config.seed}{world}.\n\n"
            f"**Measured** with the EMA weights: `bpd` is {final} in bits/dim on {images}, {convention}. "
            f"{fid}{during} Loss by quarter "
            "of t: `loss_q0`..`loss_q3`.")


PREDICTION_WORDS = {"eps": "ε-prediction", "x": "x-prediction", "v": "v-prediction (v = α ε − σ x)"}
ADAPTIVE_FIGURE = "adaptive_schedule"  # the adaptive schedule at the end of training; adaptive_schedule/step_N during


def log_adaptive_schedule(log, variant, net, name: str, step: int) -> None:
    """A weighted run's adaptive noise schedule now (``variant.adaptive``: none without --adaptive-schedule or before
    the first step): its density q(λ) over its bins beside the schedule's own p(λ) = 1/γ'(t), as the figure
    ``name``.png and its bins as ``name``.json."""
    adaptive = getattr(variant, "adaptive", None)
    if adaptive is None:
        return
    schedule = find_denoiser(net).schedule
    edges = adaptive.lam_min + adaptive.width * torch.arange(adaptive.bins + 1, dtype=torch.float64)
    probability = adaptive.probabilities()
    lam = torch.linspace(adaptive.lam_min, adaptive.lam_max, 513, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2

    def schedule_density(at: torch.Tensor) -> torch.Tensor:  # p(λ) = 1/γ'(t) at the t where γ(t) = −λ
        with torch.no_grad():
            return 1 / schedule.gamma_and_slope(time_of_gamma(schedule, -at))[1].detach().double()

    log.figure(adaptive_density_figure(edges.numpy(), (probability / adaptive.width).numpy(), lam.numpy(),
                                       schedule_density(lam).numpy(), f"step {step}, {adaptive.updates} updates"),
               f"{name}.png")
    log.dict({"step": step, "updates": adaptive.updates, "decay": adaptive.decay, "floor": adaptive.floor,
              "lambda_from": edges[:-1].tolist(), "lambda_to": edges[1:].tolist(),
              "probability": probability.tolist(), "density": (probability / adaptive.width).tolist(),
              "schedule_density": schedule_density(centres).tolist(),
              "ema_weighted_loss": [None if math.isnan(v) else v for v in adaptive.ema.tolist()],
              "note": "the adaptive noise schedule: q(λ) per unit λ, constant in each bin [lambda_from, lambda_to), "
                      "proportional to the EMA of ½w(λ)‖ε − ε̂‖² seen there (null: not seen yet), mixed with floor of "
                      "the uniform density; schedule_density: the fixed schedule's own p(λ) = 1/γ'(t) at the bin's "
                      "centre"}, f"{name}.json")


def log_model(ema_net, ctx: RunContext, step: int) -> None:
    """The EMA network as the run's MLflow model (:meth:`bench.tracking.logger.RunLogger.model`), linked to the final
    metrics logged at ``step``. One that cannot be exported is a tag (``model_not_logged``) and a warning, not a
    failed run: the checkpoint holds the weights."""
    C, H, W = ctx.train_images.shape[1:]
    times = torch.tensor([0.0, 1.0]) if ctx.variant.continuous else torch.tensor([0, ctx.sched.T - 1])
    example = (torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0)), times)
    try:
        model_id = ctx.log.model(ema_net, example, step, metadata=model_metadata(ctx, step))
    except Exception as err:  # noqa: BLE001 - torch.export cannot trace some network, or the store refused the upload
        warnings.warn(f"the EMA network was not logged as an MLflow model: {first_line(err)}", stacklevel=2)
        ctx.log.tags({"model_not_logged": first_line(err)[:500]})
        return
    ctx.log.tags({"model_id": model_id})


def model_metadata(ctx: RunContext, step: int) -> dict:
    """What the logged MLflow model is and how to call it."""
    C, H, W = ctx.train_images.shape[1:]
    return {"what": f"EMA weights (decay {ctx.config.ema_decay:g}) of {ctx.variant.label} at step {step}",
            "call": (f"model(z_t, t): z_t float [B, {C}, {H}, {W}], t float [B] in [0, 1] (continuous time; the "
                     f"model holds its noise schedule γ(t)); returns [B, {C}, {H}, {W}]: the predicted ε"
                     if ctx.variant.continuous else
                     f"model(x_t, t): x_t float [B, {C}, {H}, {W}] on the [-1, 1] data scale, "
                    f"t long [B] in 0..{ctx.sched.T - 1} "
                    f"(paper time t + 1); returns [B, {ctx.variant.out_channels(C)}, {H}, {W}]: the predicted "
                    f"{'ε' if ctx.variant.mean_type == 'eps' else 'μ̃'}"
                    + (" then the variance channels" if ctx.variant.out_channels(C) > C else "")),
            "schedule": ctx.sched.describe(), "variant": ctx.variant.label, "dataset": ctx.config.dataset,
            "checkpoint": str(checkpoint_path(ctx.run_id))}


def _backend(d: Dist) -> str:
    return torch.distributed.get_backend() if d.active else "none"

class Throughput:
    """Images trained per wall-clock second between two logging points, evaluation and checkpoint time left out
    (``images_per_sec``); the time trained goes into ``train_seconds``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.images, self.seconds = 0, 0.0  # of the window under way
        self.tick = time.perf_counter()

    def count(self, images: int) -> None:
        self.images += images

    def lap(self, state: TrainState) -> float:
        """At a logging point, once the device was waited for: the window's images per second, its time added to
        ``state.train_seconds``; starts a new window."""
        now = time.perf_counter()  # the window's work is done
        self.seconds += now - self.tick
        self.tick = now
        ips = self.images / max(self.seconds, 1e-9)
        state.train_seconds += self.seconds
        self.images, self.seconds = 0, 0.0
        return ips

    def pause(self) -> None:
        """Stop the clock (evaluation or checkpoint ahead), with the device's work so far counted."""
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.tick

    def resume(self) -> None:
        self.tick = time.perf_counter()


def schedule_metrics(net) -> dict[str, float]:
    """A continuous-time model's noise schedule now: its end points ``gamma_0`` = γ(0) and ``gamma_1`` = γ(1)
    (a learned schedule's move with training)."""
    start, end = find_denoiser(net).schedule.endpoints()
    return {"gamma_0": start, "gamma_1": end}


def log_training(ctx: RunContext, step: int, means: dict[str, float], ips: float, lr: float, bar: Progress,
                 net=None) -> None:
    """The logging window's training loss (``loss``, ``loss/<term>``, ``loss_q0``..), ``images_per_sec``, the
    learning rate and, for a continuous-time model ``net``, its schedule's end points, logged at ``step`` and shown
    on the bar."""
    extra = schedule_metrics(net) if net is not None and ctx.variant.continuous else {}
    ctx.log.metrics({**means, "images_per_sec": ips, "lr": lr, **extra}, step)
    if ctx.cores is not None:
        ctx.cores.apply()  # another elbo-bench process may have started or ended on this machine
    bar.set_postfix(loss=f"{means['loss']:.4g}", img_s=f"{ips:.0f}")


def log_totals(ctx: RunContext, state: TrainState) -> None:
    """At the end of training: the time trained (``train_seconds``) and its overall images per second."""
    ctx.log.metrics({"train_seconds": state.train_seconds, "images_per_sec_overall":
                     state.images_seen / max(state.train_seconds, 1e-9)}, state.step)


def _number(v: float) -> str:
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def _summary_rows(metrics: dict[str, float]) -> list[tuple[str, ...]]:
    """(name, value, ± its standard error, unit, what it is) for :func:`summarize`; every metric shows once, NaN
    ones not at all."""
    m = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    rows, shown = [], set()

    def row(name: str, unit: str, note: str, error: str | None = None, *also: str) -> None:
        rows.append((name, _number(m[name]), f"± {_number(m[error])}" if error in m else "", unit, note))
        shown.update((name, error, *also))

    for name in [k for k in m if f"{k}/vb" in m]:  # bpd, bpd_unclipped, bpd_eval_exact…
        terms = [f"{name}/{t}" for t in BOUND_TERMS if f"{name}/{t}" in m]
        parts = " + ".join(f"{t.rsplit('/', 1)[1]} {_number(m[t])}" for t in terms)
        clip = "x̂_0 not clipped" if name.endswith("_unclipped") else "lower is better; x̂_0 clipped (DDPM protocol)"
        row(name, "bits/dim", f"{clip}; = {parts}", f"{name}_stderr", *terms)
    if "nll_ode" in m:
        nfe = f", {m['nll_ode_nfe']:.0f} network calls per solve" if "nll_ode_nfe" in m else ""
        row("nll_ode", "bits/dim", f"lower is better; probability-flow ODE NLL, an estimate, not a bound{nfe}",
            "nll_ode_stderr", "nll_ode_nfe", "nll_ode_stderr_draws")
    refs = [f"{what} {_number(m[k])}" for k, what in (("fid_ref_noise", "noise images (worst)"),
                                                       ("fid_ref_test", "real test images (the floor)")) if k in m]
    if "fid" in m:
        row("fid", "", "lower is better, against the train split" + (f"; for scale: {', '.join(refs)}" if refs else ""),
            None, "fid_ref_noise", "fid_ref_test")
    for name, note, error in (("kid", "lower is better", "kid_std"),
                              ("precision", "higher is better: samples near real images", None),
                              ("recall", "higher is better: real images near samples", None),
                              ("isc", "higher is better (inception score or its digits analogue)", "isc_std")):
        if name in m:
            row(name, "", note, error)
    rows += [(k, _number(v), "", "", "") for k, v in m.items() if k not in shown]
    return rows


def summarize(metrics: dict[str, float], indent: str = "") -> str:
    """The metrics of an evaluation as aligned lines: name, value ± its standard error, unit, what it is (which
    way is better, the bound's terms, FID's reference points)."""
    rows = _summary_rows(metrics)
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    return "\n".join(f"{indent}{name:<{widths[0]}}  {value:>{widths[1]}} {error:<{widths[2]}} "
                     f"{unit:<{widths[3]}}  {note}".rstrip() for name, value, error, unit, note in rows)
