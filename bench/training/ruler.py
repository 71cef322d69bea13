"""One ruler for every variant: the bound estimate, the probability-flow NLL, the sampler and its description, for a
DDPM variant (the discrete chain's) or a continuous-time one (VDM's, reading the model's own γ(t)).

Every bound is an upper bound on −log P of the same 8-bit test images, so the rows of both kinds compare; what
each is says its method string (the tags ``bpd_method``, ``fid_sampler``, ``nll_ode_method``).
"""

from __future__ import annotations

import torch

from bench.diffusion.bound import EstimateResult, estimate_bits_per_dim
from bench.diffusion.continuous_bound import ContinuousResult, continuous_bound
from bench.diffusion.continuous_sample import describe_continuous_sampler, nll_ode_continuous, sample_continuous
from bench.diffusion.ode import NllResult, OdeOptions, nll_ode
from bench.diffusion.sample import describe_sampler, sample
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import Variant
from bench.runtime.context import Runtime


def continuous_steps(sched: Schedule, steps: int | None) -> int:
    """The ancestral steps of a continuous-time model when ``steps`` are asked (None or 0: the config's T)."""
    return steps or sched.T


def continuous_t_per_image(calls: int) -> int:
    """The stratified t per image a continuous-time bound takes for ``calls`` (--eval-calls): rounded down to even
    (two replicates of equal strata)."""
    return max(2, calls - calls % 2)


def continuous_bound_name(variant: Variant, sched: Schedule) -> str:
    """Which bound a continuous-time variant is measured by: L_∞, or L_T at the config's T."""
    return f"L_T, T = {sched.T}" if variant.finite else "L_∞"


def sampler_description(sched: Schedule, steps: int | None, variant: Variant) -> str:
    """How ``variant``'s samples are drawn when ``steps`` are asked, for the tag ``fid_sampler``."""
    if variant.continuous:
        return describe_continuous_sampler(continuous_steps(sched, steps))
    return describe_sampler(sched, steps, variant)


def draw_samples(model, variant: Variant, sched: Schedule, n: int, shape: tuple[int, int, int], steps: int | None, *,
                 seed: int, runtime: Runtime) -> torch.Tensor:
    """``n`` uint8 samples [n, C, H, W] by the variant's sampler (see :func:`sampler_description`)."""
    if variant.continuous:
        return sample_continuous(model, n, shape, continuous_steps(sched, steps), seed=seed, runtime=runtime)
    return sample(model, variant, sched, n, shape, steps, seed=seed, runtime=runtime)


def bound_estimate(model, variant: Variant, sched: Schedule, images: torch.Tensor, calls: int, *, seed: int,
                   runtime: Runtime) -> EstimateResult | ContinuousResult:
    """The unbiased estimate of the variant's bound on uint8 ``images`` with about ``calls`` network calls per image:
    the discrete chain's (:func:`estimate_bits_per_dim`), or a continuous-time model's L_∞ (L_T for a finite-T
    variant) with ``calls`` rounded down to an even number of stratified t (:func:`continuous_bound`), L_∞'s t spread
    along the line between the model's end points (the same expectation as along its schedule, a far smaller Monte
    Carlo error on a curved one)."""
    if variant.continuous:
        return continuous_bound(model, images, t_per_image=continuous_t_per_image(calls),
                                T=sched.T if variant.finite else None, seed=seed, runtime=runtime,
                                along="schedule" if variant.finite else "line")
    return estimate_bits_per_dim(model, variant, sched, images, calls, seed=seed, runtime=runtime)


def ode_nll(flow_net, variant: Variant, sched: Schedule, images: torch.Tensor, options: OdeOptions, *, seed: int,
            runtime: Runtime) -> NllResult:
    """The probability-flow ODE NLL: of the discrete schedule's VP-SDE, or of the model's own γ(t)."""
    if variant.continuous:
        return nll_ode_continuous(flow_net, images, options, seed=seed, runtime=runtime)
    return nll_ode(flow_net, variant, sched, images, options, seed=seed, runtime=runtime)
