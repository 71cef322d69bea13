"""What every objective variant shares: the reverse-process parameterisations (mean and variance),
the per-timestep bound term L_t, and the base class a variant module subclasses.

A variant (one module in ``variants/``) declares its ``mean_type`` and ``var_type`` and writes its
training loss; everything else comes from here, so the evaluator and the sampler treat all variants
alike. Time indices are 0-based: index 0 is paper time t = 1 (the decoder term).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench.diffusion.gaussian import (
    bits_per_dim_from_nats,
    discretized_gaussian_log_likelihood,
    normal_kl,
    sum_flat,
)
from bench.diffusion.schedule import Schedule
from bench.diffusion.timesteps import UniformSampler
from bench.errors import BenchError
from bench.runtime.dist import SINGLE, Dist

MEAN_TYPES = ("eps", "mu")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
FIXED_VARIANCES = {"small": "fixed_small", "large": "fixed_large"}  # CLI word → var_type
HYBRID_LAMBDA = 0.001  # iDDPM's weight of L_vlb in L_hybrid


@dataclass
class ReverseStep:
    """p_θ(x_{t−1} | x_t) = N(mean, exp(log_var)), and the x̂_0 it implies; all [B, C, H, W]."""

    mean: torch.Tensor
    log_var: torch.Tensor
    pred_x0: torch.Tensor


@dataclass(frozen=True)
class Loss:
    """A batch's training loss, per example: ``loss`` [B] is what is minimised (its batch mean), ``t`` [B] the
    timesteps drawn (0-based), ``terms`` its named parts or diagnostics (``mse``, ``vb``: each [B]), which the
    trainer logs as ``loss/<name>``."""

    loss: torch.Tensor
    t: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------- mean parameterisations
def eps_mean(out: torch.Tensor, sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool):
    """ε-parameterisation: x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t (optionally clipped), mean μ̃_t(x_t, x̂_0).

    Without clipping this equals (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t.
    """
    pred_x0 = sched.predict_x0_from_eps(x_t, t, out)
    if clip_x0:
        pred_x0 = pred_x0.clamp(-1, 1)
    return sched.q_posterior_mean(pred_x0, x_t, t), pred_x0


def mu_mean(out: torch.Tensor, sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool):
    """μ̃-parameterisation: the network outputs μ_θ; x̂_0 inverts μ̃_t(x_t, x_0) for it."""
    coef1 = sched.take("posterior_mean_coef1", t, x_t)
    coef2 = sched.take("posterior_mean_coef2", t, x_t)
    pred_x0 = (out - coef2 * x_t) / coef1
    if clip_x0:
        pred_x0 = pred_x0.clamp(-1, 1)
        return sched.q_posterior_mean(pred_x0, x_t, t), pred_x0
    return out, pred_x0


MEANS = {"eps": eps_mean, "mu": mu_mean}


# --------------------------------------------------------------------- variance parameterisations
def fixed_small_log_var(v, sched: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ_t² = β̃_t, clipped to β̃_2 at t = 1."""
    return sched.take("posterior_log_variance_clipped", t, like).expand_as(like)


def fixed_large_log_var(v, sched: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ_t² = β_t, with β̃_2 at t = 1 for the decoder (iDDPM)."""
    return sched.take("log_betas_decoder", t, like).expand_as(like)


def learned_range_log_var(v, sched: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """iDDPM: frac = (v + 1)/2, log σ_t² = frac · log β_t + (1 − frac) · log β̃_t (clipped)."""
    frac = (v + 1) / 2
    max_log = sched.take("log_betas", t, v)
    min_log = sched.take("posterior_log_variance_clipped", t, v)
    return frac * max_log + (1 - frac) * min_log


def learned_log_var(v, sched: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """DDPM's learned diagonal Σ: the network outputs log σ_t² directly."""
    return v


VARIANCES = {
    "fixed_small": fixed_small_log_var,
    "fixed_large": fixed_large_log_var,
    "learned_range": learned_range_log_var,
    "learned": learned_log_var,
}


# --------------------------------------------------------------------- the bound term L_t
def vb_term_nats(step: ReverseStep, sched: Schedule, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """L_t per example in nats, summed over dimensions: [B].

    Index 0 (paper t = 1): the decoder −log p_θ(x_0 | x_1), discretised Gaussian.
    Index ≥ 1: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)).
    """
    true_mean = sched.q_posterior_mean(x0, x_t, t)
    true_log_var = sched.take("posterior_log_variance_clipped", t, x_t)
    terms = sum_flat(normal_kl(true_mean, true_log_var, step.mean, step.log_var))
    # The decoder term on every row without waiting for the device to say which rows have t = 0: the other
    # rows see a harmless stand-in (mean x_0, unit variance), so no gradient reaches them through its tails.
    decoder = (t == 0).view(-1, *([1] * (x0.dim() - 1)))
    mean = torch.where(decoder, step.mean, x0)
    log_var = torch.where(decoder, step.log_var, torch.zeros_like(step.log_var))
    decoder_nll = -sum_flat(discretized_gaussian_log_likelihood(x0, mean, log_var))
    return torch.where(t == 0, decoder_nll.to(terms.dtype), terms)


def prior_nats(sched: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per example in nats: [B]. Not learned."""
    ab_T = sched.alphas_cumprod[-1].item()
    mean = ab_T**0.5 * x0
    log_var = torch.full_like(x0, float(torch.log1p(torch.tensor(-ab_T, dtype=torch.float64))))
    return sum_flat(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)))


# --------------------------------------------------------------------- the base class
class Variant:
    """One way of training a DDPM. Subclasses set the class attributes and write :meth:`loss`.

    ``variance`` ('small' = β̃ or 'large' = β) is accepted only by fixed-variance variants; it is
    resolved here once, into ``var_type``, and shows in :attr:`label`.
    """

    name: ClassVar[str]  # registry key, e.g. "simple"
    objective: ClassVar[str]  # what the loss is, one line
    mean_type: ClassVar[str]  # 'eps' or 'mu'
    var_type: str = "fixed_small"  # one of VAR_TYPES; fixed variants may switch small ↔ large
    timestep_sampler: ClassVar[type[UniformSampler]] = UniformSampler
    continuous: ClassVar[bool] = False  # a continuous-time model (bench.diffusion.vdm), with its own bound and sampler
    weighted: ClassVar[bool] = False  # a member of the weighted-ELBO family (bench.diffusion.weighted): --weighting

    def __init__(self, variance: str | None = None):
        if variance is not None:
            if self.var_type not in FIXED_VARIANCES.values():
                raise BenchError(
                    f"variant {self.name!r} learns its variance ({self.var_type}); "
                    "--variance small|large applies only to fixed-variance variants"
                )
            if variance not in FIXED_VARIANCES:
                raise BenchError(f"variance must be one of {sorted(FIXED_VARIANCES)}, got {variance!r}")
            self.var_type = FIXED_VARIANCES[variance]
        if self.mean_type not in MEAN_TYPES or self.var_type not in VAR_TYPES:
            raise BenchError(f"variant {self.name!r} declares unknown types {self.mean_type!r}/{self.var_type!r}")
        self._mean_fn = MEANS[self.mean_type]
        self._log_var_fn = VARIANCES[self.var_type]
        self._sampler: UniformSampler | None = None
        self._dist: Dist = SINGLE

    # ----------------------------------------------------------------- description
    @property
    def learns_variance(self) -> bool:
        return self.var_type in ("learned_range", "learned")

    @property
    def label(self) -> str:
        """The name as results show it: fixed variants carry their variance, e.g. ``simple[small]``."""
        for word, var_type in FIXED_VARIANCES.items():
            if self.var_type == var_type:
                return f"{self.name}[{word}]"
        return self.name

    def out_channels(self, in_channels: int) -> int:
        """Network output channels for C input channels: C (the mean), or 2C with a learned variance."""
        return 2 * in_channels if self.learns_variance else in_channels

    def describe(self) -> dict:
        return {
            "variant": self.label,
            "variant_name": self.name,
            "objective": self.objective,
            "mean_type": self.mean_type,
            "var_type": self.var_type,
        }

    # ----------------------------------------------------------------- reverse process
    def p_mean_variance(
        self, out: torch.Tensor, sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False
    ) -> ReverseStep:
        """Turn the network output [B, out_channels, H, W] into p_θ(x_{t−1} | x_t)."""
        mean_out, var_out = self._split(out, x_t)
        mean, pred_x0 = self._mean_fn(mean_out, sched, x_t, t, clip_x0)
        log_var = self._log_var_fn(var_out, sched, t, x_t)
        return ReverseStep(mean=mean, log_var=log_var, pred_x0=pred_x0)

    @property
    def strides(self) -> bool:
        """Whether the reverse process can take a multi-step jump (strided sampling). DDPM's learned
        diagonal Σ (``learned``) is a per-step variance of the original chain with no counterpart for a
        jump over several steps, so those variants are sampled with all T steps."""
        return self.var_type != "learned"

    def p_mean_variance_strided(
        self, out: torch.Tensor, sched: Schedule, jump: Schedule, x_t: torch.Tensor, t: torch.Tensor, k: torch.Tensor,
        clip_x0: bool = False,
    ) -> ReverseStep:
        """p_θ(x_{s_{k−1}} | x_{s_k}) of a strided chain ``jump`` whose step k (0-based) is the original
        chain's step t = s_k (both long [B]).

        The network was trained on the original chain, so its output is read there, at the original
        timestep: x̂_0 from ε_θ, or by inverting the original one-step posterior mean for μ_θ. The jump's
        mean is then the jump's posterior μ̃'_k(x_{s_k}, x̂_0) and its variance comes from the jump's β'_k
        and β̃'_k (fixed or learned-range), as iDDPM respaces. For ε this equals :meth:`p_mean_variance`
        on ``jump`` (ᾱ'_k = ᾱ_{s_k}); for μ̃ it does not: the jump's own posterior coefficients would
        invert the network's output as if it were a jump's mean.
        """
        if not self.strides:
            raise BenchError(f"variant {self.name!r} learns a per-step variance ({self.var_type}): it has no "
                             "multi-step reverse variance, so sample it with all T steps")
        mean_out, var_out = self._split(out, x_t)
        _, pred_x0 = self._mean_fn(mean_out, sched, x_t, t, clip_x0)  # x̂_0 on the original chain (clipped if asked)
        log_var = self._log_var_fn(var_out, jump, k, x_t)
        return ReverseStep(mean=jump.q_posterior_mean(pred_x0, x_t, k), log_var=log_var, pred_x0=pred_x0)

    def _split(self, out: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network output [B, out_channels, H, W] as (mean part, variance part), its channels checked."""
        C = x_t.shape[1]
        if out.shape[1] != self.out_channels(C):
            raise BenchError(
                f"variant {self.name!r} needs {self.out_channels(C)} output channels for {C} input channels, "
                f"the network gives {out.shape[1]}"
            )
        return out[:, :C], out[:, C:]

    # ----------------------------------------------------------------- training
    def loss(self, model, sched: Schedule, x0: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        """The per-example loss of a batch x_0 [B, C, H, W] on [−1, 1], the t it drew and its named terms."""
        raise NotImplementedError

    def sampler(self, T: int) -> UniformSampler:
        """The timestep sampler for a T-step schedule (kept across calls: it may hold state)."""
        if self._sampler is None or self._sampler.T != T:
            self._sampler = self.timestep_sampler(T)
        return self._sampler

    def distribute(self, dist: Dist) -> None:
        """Train as one of ``dist``'s ranks: ``x0`` given to :meth:`loss` is then this rank's contiguous
        share of the global batch, and t and ε are drawn for the global batch (the same streams on every
        rank, as one process draws them) and cut to that share."""
        self._dist = dist

    def draw(self, model, sched: Schedule, x0: torch.Tensor, generator: torch.Generator | None = None):
        """Draw t (and its weight 1/(T p_t)) and ε on x0's device, form x_t, run the network.

        Returns (t, weight, noise, x_t, out).
        """
        B = x0.shape[0] * self._dist.world
        t, weight = self.sampler(sched.T).sample(B, x0.device, generator)
        t, weight, noise = self.share(x0.shape[0], t, weight, self.global_noise(x0, generator))
        x_t = sched.q_sample(x0, t, noise)
        return t, weight, noise, x_t, model(x_t, t)

    def global_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε ~ N(0, I) for the global batch of which x0 [b, C, H, W] is this rank's share: [b · world, C, H, W] on
        x0's device, from ``generator`` (on its own device) or the default stream."""
        shape = (x0.shape[0] * self._dist.world, *x0.shape[1:])
        if generator is not None:
            return torch.randn(shape, generator=generator, device=generator.device).to(x0.device)
        return torch.randn(shape, device=x0.device, dtype=x0.dtype)

    def share(self, b: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous share (``b`` rows) of each global-batch tensor (all of it in one process)."""
        d = self._dist
        if not d.active:
            return tensors
        return tuple(x[d.rank * b : (d.rank + 1) * b] for x in tensors)

    def record(self, sched: Schedule, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Give the timestep sampler this step's L_t values (any unit, the same for all t); under
        torch.distributed every rank's, gathered in global batch order."""
        d = self._dist
        if d.active:  # one collective: t rides along as float64 (exact for any timestep index)
            both = d.gather(torch.stack([t.to(torch.float64), losses.detach().to(torch.float64)], dim=1),
                            len(t) * d.world)
            t, losses = both[:, 0].long(), both[:, 1]
        self.sampler(sched.T).update(t, losses)

    def vb_bits(self, out: torch.Tensor, sched: Schedule, x0, x_t, t) -> torch.Tensor:
        """L_t per example in bits/dim (mean over dimensions), the unit iDDPM trains in: [B]."""
        step = self.p_mean_variance(out.float(), sched, x_t, t)
        return bits_per_dim_from_nats(vb_term_nats(step, sched, x0, x_t, t), x0[0].numel())

    def state_dict(self) -> dict:
        """Training state to checkpoint (the importance sampler's history, if any)."""
        return {"sampler": self._sampler.state_dict()} if self._sampler is not None else {}

    def load_state_dict(self, state: dict, T: int) -> None:
        if "sampler" in state:
            self.sampler(T).load_state_dict(state["sampler"])
