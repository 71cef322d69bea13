"""Continuous-time objectives (VDM, Kingma et al. 2021) as variants of the shared trainer.

A continuous-time variant trains a :class:`~bench.diffusion.continuous.ContinuousDenoiser`: the network
conditioned on γ(t), with the noise schedule γ(t) as its submodule (so the optimiser, the EMA and the checkpoint
carry a learned schedule with the network). Its loss is the whole bound in bits/dim, per example,

    (L_recon + L_prior + L_diffusion) / (D ln 2),

with L_diffusion = L_∞ = ½ γ'(t) ‖ε − ε̂(z_t; t)‖² at one low-discrepancy t per example (``vdm``, ``vdm-fixed``),
or the finite-T form L_T = (T/2)·expm1(γ(t_i) − γ(t_{i−1}))·‖ε − ε̂‖² at a step i of T (``vdm-finite``);
L_recon = −log p(x | z_0) of VDM's 256-way decoder with one z_0 ~ q(z_0 | x); L_prior = KL(q(z_1 | x) ‖ N(0, I)).
The end points γ(0), γ(1) reach the loss through the decoder and the prior, the schedule's shape through γ'(t)
(and the network's conditioning). γ, γ' and the three terms are float32 (the network may run in bf16).

These variants have no discrete reverse step: the evaluator, the sampler and the ODE of a continuous-time model
are their own (``continuous_bound``, ``continuous_sample``); :attr:`ContinuousVariant.continuous` says which.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.diffusion.continuous import (
    CosineEnds,
    CosineReading,
    FixedLinear,
    LearnedEndpoints,
    LinearBetaReading,
    MonotoneNet,
    NoiseSchedule,
    low_discrepancy_times,
)
from bench.diffusion.continuous_bound import bound_terms_nats
from bench.diffusion.variant import Loss, Variant
from bench.errors import BenchError, check_choice

# γ(t) schedules by name: what a continuous-time variant may train with (config field gamma_schedule)
# VDM's line; the project's schedules read as continuous γ(t); the continuous cosine between the end points
FIXED_GAMMAS = ("fixed", "linear-beta", "cosine", "cosine-ends")
LEARNED_GAMMAS = ("learned-ends", "learned-net")  # end points learned (a line); VDM's monotone network
GAMMA_SCHEDULES = ("auto", *FIXED_GAMMAS, *LEARNED_GAMMAS)


def build_noise_schedule(name: str, gamma_min: float, gamma_max: float, **discrete) -> NoiseSchedule:
    """The γ(t) schedule ``name`` (one of GAMMA_SCHEDULES but ``auto``). ``fixed``, ``learned-ends`` and
    ``learned-net`` start at (``gamma_min``, ``gamma_max``), ``cosine-ends`` runs between them; ``linear-beta`` and
    ``cosine`` read the project's
    discrete schedule given by ``discrete`` (T, beta_start, beta_end, cosine_s) as continuous γ(t)."""
    check_choice("gamma_schedule", name, GAMMA_SCHEDULES[1:])
    if name == "fixed":
        return FixedLinear(gamma_min, gamma_max)
    if name == "learned-ends":
        return LearnedEndpoints(gamma_min, gamma_max)
    if name == "learned-net":
        return MonotoneNet(gamma_min, gamma_max)
    if name == "cosine-ends":
        return CosineEnds(gamma_min, gamma_max)
    return _discrete_reading(name, **discrete)


def describe_gamma(schedule: NoiseSchedule) -> str:
    """A schedule in words with its end points now, e.g. ``learned (end points; a line), γ(0) = −13.3, γ(1) = 5``."""
    kinds = {FixedLinear: "fixed (VDM's line)", LearnedEndpoints: "learned (end points; a line)",
             MonotoneNet: "learned (VDM's monotone network)", LinearBetaReading: "fixed (the linear β schedule read "
             "in continuous time)", CosineReading: "fixed (the cosine schedule read in continuous time)",
             CosineEnds: "fixed (the continuous cosine between the end points)"}
    kind = kinds.get(type(schedule), f"fixed ({type(schedule).__name__})")
    start, end = schedule.endpoints()
    return f"{kind}, γ(0) = {start:.4g}, γ(1) = {end:.4g}"


def _discrete_reading(name: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                      cosine_s: float = 0.008) -> NoiseSchedule:
    if name == "linear-beta":
        return LinearBetaReading(T=T, beta_start=beta_start, beta_end=beta_end)
    return CosineReading(T=T, s=cosine_s)


class ContinuousVariant(Variant):
    """A continuous-time variant: subclasses set ``name``, ``objective``, ``learns_schedule`` and ``finite``."""

    continuous: ClassVar[bool] = True
    learns_schedule: ClassVar[bool] = False  # trains γ(t) (a learned gamma_schedule), else a fixed one
    finite: ClassVar[bool] = False  # L_T with the config's T instead of L_∞
    mean_type = "eps"
    var_type = "fixed_small"  # unused: a continuous-time model has no discrete reverse variance

    def __init__(self, variance: str | None = None):
        if variance is not None:
            raise BenchError(f"variant {self.name!r} is a continuous-time model with no reverse variance to fix: "
                             "--variance small|large applies only to DDPM's fixed-variance variants")
        super().__init__()

    @property
    def label(self) -> str:
        return self.name

    def gamma_schedule(self, asked: str) -> str:
        """The γ(t) schedule this variant trains with when ``asked`` (config gamma_schedule; ``auto``: learned
        end points for a learned schedule, else VDM's fixed line); BenchError on one it cannot train with."""
        check_choice("gamma_schedule", asked, GAMMA_SCHEDULES)
        if asked == "auto":
            return "learned-ends" if self.learns_schedule else "fixed"
        allowed = LEARNED_GAMMAS if self.learns_schedule else FIXED_GAMMAS if not self.finite else GAMMA_SCHEDULES[1:]
        if asked not in allowed:
            raise BenchError(f"variant {self.name!r} trains with gamma_schedule {' or '.join(allowed)}, "
                             f"not {asked!r}" + ("; learn the schedule with --variant vdm" if asked in LEARNED_GAMMAS
                                                 else "; a fixed schedule is --variant vdm-fixed"))
        return asked

    def describe(self) -> dict:
        return {"variant": self.label, "variant_name": self.name, "objective": self.objective,
                "mean_type": "eps", "var_type": "none (continuous time)", "time": "continuous"}

    def p_mean_variance(self, *args, **kwargs):
        raise BenchError(f"variant {self.name!r} is a continuous-time model: it has no discrete reverse step "
                         "(its bound, sampler and ODE are the continuous-time ones)")

    p_mean_variance_strided = vb_bits = p_mean_variance

    def loss(self, model, sched, x0: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        """The bound in bits/dim per example of a batch x_0 [B, C, H, W]: one low-discrepancy t (of the global
        batch) and one ε per example, for z_t and the decoder's z_0 (:func:`bound_terms_nats`); ``t`` of the result is
        t on the grid of ``sched.T`` (for the loss's quarters of t)."""
        t = low_discrepancy_times(x0.shape[0] * self._dist.world, generator)
        t, eps = self.share(x0.shape[0], t, self.global_noise(x0, generator))
        t = t.to(x0.device, torch.float32)
        if self.finite:  # a step i ∈ 1..T, uniform over the steps (low-discrepancy too), at t = i/T
            t = torch.clamp(torch.ceil(t * sched.T), 1, sched.T) / sched.T
        nats = bound_terms_nats(model, x0.float(), t, eps, sched.T if self.finite else None)
        per_dim = 1 / (x0[0].numel() * math.log(2))
        terms = {k: v * per_dim for k, v in nats.items()}
        grid = torch.clamp((t * sched.T).long(), max=sched.T - 1)
        return Loss(terms["diffusion"] + terms["decoder"] + terms["prior"], grid, terms)
