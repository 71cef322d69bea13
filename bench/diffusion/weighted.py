"""The weighted-ELBO family on the shared trainer: a continuous-time model trained by L_w for a weighting w(λ)
(:mod:`bench.diffusion.weighting`), measured by the same ruler as every other model.

The loss of one example at one t (or one λ from the adaptive schedule), in bits/dim, is

    ½ · w(λ)/q(λ) · c(λ) · ‖target − output‖² / (D ln 2),

where the network outputs its ``prediction`` (ε, x or v; the ContinuousDenoiser's), the target is the matching
ε, x or v = α ε − σ x, c turns that error into the ε-error (1, SNR, α²) and q is the sampling density of λ: the
schedule's own p(λ) = 1/γ'(t) at low-discrepancy t ~ U(0, 1), or the adaptive schedule's. Computing the error in
the prediction's own space keeps it finite where the ε-form is not (v-prediction near zero SNR). With w ≡ 1 and
ε-prediction the loss is exactly the continuous-time bound's diffusion term ½γ'(t)‖ε − ε̂‖².

Only the diffusion term is trained: the schedule is fixed (the decoder and the prior have no parameters then), so
w ≡ 1 trains what ``vdm-fixed`` trains. Every model of the family is then measured by L_∞ (decoder + prior +
diffusion), FID of VDM's ancestral sampler and the ODE NLL, whatever it was trained on.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.diffusion.continuous import (
    alpha_sigma_squared,
    find_denoiser,
    low_discrepancy_times,
    prediction_target,
    sum_dims,
    time_of_gamma,
)
from bench.diffusion.ode import network_dtype
from bench.diffusion.variant import Loss
from bench.diffusion.vdm import FIXED_GAMMAS, ContinuousVariant
from bench.diffusion.weighting import AdaptiveSchedule, Weighting, build_weighting, schedule_weights
from bench.errors import BenchError, check_choice

DEFAULT_GAMMA = "cosine-ends"  # the continuous cosine schedule: p(λ) ∝ sech(λ/2), the schedule Kingma & Gao tabulate


class WeightedVariant(ContinuousVariant):
    """A member of the weighted-ELBO family: ``weighting`` (default ε-MSE), optionally with the adaptive schedule."""

    weighted: ClassVar[bool] = True

    def __init__(self, variance: str | None = None, weighting: Weighting | None = None, adaptive: bool = False):
        super().__init__(variance)
        self.weighting = weighting or build_weighting("eps")
        self.adaptive_asked = bool(adaptive)
        self.adaptive: AdaptiveSchedule | None = None  # made on the first step (or from a checkpoint)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.weighting.short()}{'+adaptive' if self.adaptive_asked else ''}]"

    def gamma_schedule(self, asked: str) -> str:
        check_choice("gamma_schedule", asked, ("auto", *FIXED_GAMMAS))
        return DEFAULT_GAMMA if asked == "auto" else asked

    def describe(self) -> dict:
        return {**super().describe(), "weighting": self.weighting.name, "weighting_formula": self.weighting.describe(),
                "adaptive_schedule": self.adaptive_asked}

    def adaptive_for(self, model) -> AdaptiveSchedule:
        """The adaptive schedule over the model's λ range [−γ(1), −γ(0)] (made once, or read from a checkpoint: then
        checked against that range)."""
        g0, g1 = find_denoiser(model).schedule.endpoints()
        if self.adaptive is None:
            self.adaptive = AdaptiveSchedule(-g1, -g0)
        elif [self.adaptive.lam_min, self.adaptive.lam_max] != [-g1, -g0]:
            raise BenchError(f"the checkpoint's adaptive schedule covers λ in [{self.adaptive.lam_min}, "
                             f"{self.adaptive.lam_max}], this model's schedule [{-g1}, {-g0}]: resume with the "
                             "checkpoint's config")
        return self.adaptive

    def loss(self, model, sched, x0: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        """½·w/q·‖ε-error‖² per example in bits/dim, at one t (or adaptive λ) of the global batch per example."""
        den = find_denoiser(model)
        schedule, prediction, B = den.schedule, den.prediction, x0.shape[0] * self._dist.world
        lam = q = None
        if self.adaptive_asked:
            lam, q = self.adaptive_for(model).sample(B, generator)
            t = time_of_gamma(schedule, -lam)
        else:
            t = low_discrepancy_times(B, generator)
        noise = self.global_noise(x0, generator)
        t, eps = self.share(x0.shape[0], t, noise)
        if q is not None:
            (q,) = self.share(x0.shape[0], q)
            q = q.to(x0.device, torch.float32)
        t = t.to(x0.device, torch.float32)
        x = x0.float()
        with torch.autocast(x.device.type, enabled=False):
            gamma, factor = schedule_weights(self.weighting, schedule, t, prediction, q)
            a2, s2 = alpha_sigma_squared(gamma.reshape(-1, 1, 1, 1))
            z = a2.sqrt() * x + s2.sqrt() * eps
        out = model(z.to(network_dtype(model)), t, raw=True)
        with torch.autocast(x.device.type, enabled=False):
            err = sum_dims((prediction_target(prediction, x, eps, gamma) - out.float()) ** 2)
            nats = 0.5 * factor * err
        bits = nats / (x0[0].numel() * math.log(2))
        if self.adaptive_asked:
            self._update(lam, nats.detach() * q)  # ½ w(λ)‖ε − ε̂‖²: the integrand in λ
        grid = torch.clamp((t * sched.T).long(), max=sched.T - 1)
        return Loss(bits, grid, {"weighted": bits})

    def _update(self, lam: torch.Tensor, integrand: torch.Tensor) -> None:
        """Fold the global batch's λ (as drawn, on every rank) and integrands (this rank's share, gathered in global
        batch order) into the adaptive schedule, so every rank's stays the same."""
        d = self._dist
        values = integrand.detach().double()
        if d.active:
            values = d.gather(values, len(values) * d.world)
        self.adaptive.update(lam, values)

    def state_dict(self) -> dict:
        return {"adaptive": self.adaptive.state_dict()} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict, T: int) -> None:
        if "adaptive" not in state:
            return
        if not self.adaptive_asked:
            raise BenchError("the checkpoint holds an adaptive noise schedule but this run has none: resume with "
                             "--adaptive-schedule")
        saved = state["adaptive"]
        if self.adaptive is None:  # its range is checked against the model's at the first step
            self.adaptive = AdaptiveSchedule(*saved["range"], bins=saved["bins"])
        self.adaptive.load_state_dict(saved)
