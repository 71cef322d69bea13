"""An analytic oracle: the optimal reverse process for data x_0 ~ N(0, s² I).

For such data x_t ~ N(0, v_t) with v_t = ᾱ_t s² + 1 − ᾱ_t, so E[ε | x_t] = √(1−ᾱ_t) x_t / v_t, and
q(x_{t−1} | x_t) is Gaussian with variance v_{t−1} − α_t v_{t−1}² / v_t (v_0 = s²). The oracle
outputs that ε (or, with ``mean_type="mu"``, the one-step posterior mean μ̃_t(x_t, E[x_0 | x_t]) it
implies) and, for learned variances, that variance in the variant's parameterisation.
"""

import math

import torch
from torch.special import ndtr

from bench import Schedule
from bench.diffusion.continuous import ContinuousDenoiser, NoiseSchedule


class GaussianOracle(torch.nn.Module):
    def __init__(self, sched: Schedule, s: float, var_type: str, mean_type: str = "eps"):
        super().__init__()
        self.sched, self.mean_type = sched, mean_type
        ab, abp = sched.alphas_cumprod, sched.alphas_cumprod_prev
        v, vp = ab * s * s + 1 - ab, abp * s * s + 1 - abp
        self.var_type = var_type
        self.eps_coef = (1 - ab).sqrt() / v
        self.true_log_var = (vp - sched.alphas * vp**2 / v).log()
        lo, hi = sched.posterior_log_variance_clipped, sched.log_betas
        self.range_v = 2 * (self.true_log_var - lo) / (hi - lo) - 1  # frac = (v + 1)/2 hits the true variance

    def forward(self, x, t):
        eps = Schedule.gather(self.eps_coef, t, x) * x
        if self.mean_type == "mu":
            eps = self.sched.q_posterior_mean(self.sched.predict_x0_from_eps(x, t, eps), x, t)
        if self.var_type == "learned_range":
            return torch.cat([eps, Schedule.gather(self.range_v, t, x).expand_as(x)], 1)
        if self.var_type == "learned":
            return torch.cat([eps, Schedule.gather(self.true_log_var, t, x).expand_as(x)], 1)
        return eps


def gaussian_grid_data(n: int, s: float, shape=(1, 8, 8), seed: int = 0):
    """n images of N(0, s²) pixels put on the uint8 grid, and each image's exact NLL in bits/dim
    under that discretised law (edge bins open)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64) * s
    u = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    grid = u.double() / 127.5 - 1
    upper = torch.where(u == 255, torch.full_like(grid, math.inf), grid + 1 / 255)
    lower = torch.where(u == 0, torch.full_like(grid, -math.inf), grid - 1 / 255)
    nll = -(ndtr(upper / s) - ndtr(lower / s)).log()
    return u, nll.flatten(1).mean(1) / math.log(2)


# --------------------------------------------------------------------- the continuous-time oracle (VDM)
class GaussianContinuousOracle(ContinuousDenoiser):
    """The optimal ε̂ of a continuous-time model for data x ~ N(μ, s² I) per dimension, on any schedule γ(t):
    z_t = α x + σ ε is Gaussian with E[ε | z_t] = σ (z_t − α μ)/(α² s² + σ²), and the optimal ε-error per
    dimension is Var(ε | z_t) = α² s²/(α² s² + σ²) = s²/(s² + e^γ). γ(t) is read from the schedule in float64
    (not from the network's conditioning, which is float32); μ is a float64 parameter, so the evaluators run
    the oracle in float64."""

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float):
        super().__init__(torch.nn.Module(), schedule)
        self.mu = torch.nn.Parameter(torch.tensor(float(mu), dtype=torch.float64), requires_grad=False)
        self.s = float(s)

    def forward(self, z, t):
        gamma = self.schedule.gamma(t.to(torch.float64)).reshape(-1, *([1] * (z.dim() - 1)))
        a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return s2.sqrt() * (z.to(torch.float64) - a2.sqrt() * self.mu) / (a2 * self.s**2 + s2)


class PowerSchedule(NoiseSchedule):
    """γ(t) = γ₀ + (γ₁ − γ₀) tᵖ, or with ``flipped`` γ₁ − (γ₁ − γ₀)(1 − t)ᵖ: non-linear shapes with the end points
    of ``FixedLinear(γ₀, γ₁)``, bent toward small γ (slow start) or away from it (fast start)."""

    def __init__(self, gamma_min: float, gamma_max: float, power: float = 3.0, flipped: bool = False):
        super().__init__()
        self.gamma_min, self.gamma_max, self.power, self.flipped = float(gamma_min), float(gamma_max), power, flipped

    def forward(self, t):
        span = self.gamma_max - self.gamma_min
        return self.gamma_max - span * (1 - t) ** self.power if self.flipped else self.gamma_min + span * t**self.power


def continuous_diffusion_closed_form(gamma_0: float, gamma_1: float, s: float, dims: int) -> float:
    """E_x,ε[L_∞] in nats of the optimal denoiser for x ~ N(μ, s² I) in ``dims`` dimensions:
    ½ D ∫_{γ₀}^{γ₁} s²/(s² + e^γ) dγ = ½ D [log(1 + s² e^{−γ₀}) − log(1 + s² e^{−γ₁})]."""
    return 0.5 * dims * (math.log1p(s * s * math.exp(-gamma_0)) - math.log1p(s * s * math.exp(-gamma_1)))


def continuous_diffusion_given_x(x: torch.Tensor, gamma_0: float, gamma_1: float, mu: float, s: float) -> torch.Tensor:
    """E_ε[L_∞ | x] in nats per image [N] of the same denoiser, these images held fixed. Per dimension
    E_ε‖ε − ε̂*‖² = (α⁴s⁴ + α²σ²(x − μ)²)/(α²s² + σ²)² = (s⁴ + u (x − μ)²)/(s² + u)² with u = e^γ, and dγ = du/u:
    ½ ∫ s⁴/(u (s² + u)²) du = ½ [log(u/(s² + u)) + s²/(s² + u)], ½ ∫ (x − μ)²/(s² + u)² du = −½ (x − μ)²/(s² + u),
    between u₀ = e^{γ₀} and u₁ = e^{γ₁} (their mean over x ~ N(μ, s²) is the closed form above)."""
    a = s * s

    def antiderivative(u: float, sq: torch.Tensor) -> torch.Tensor:
        return 0.5 * (math.log(u / (a + u)) + a / (a + u) - sq / (a + u))

    sq = ((x.to(torch.float64) - mu) ** 2).flatten(1)
    return (antiderivative(math.exp(gamma_1), sq) - antiderivative(math.exp(gamma_0), sq)).sum(1)


def finite_diffusion_closed_form(gamma, T: int, s: float, dims: int) -> float:
    """E_x,ε[L_T] in nats of the same denoiser: Σ_{i=1..T} ½ expm1(γ(i/T) − γ((i−1)/T)) · D s²/(s² + e^{γ(i/T)}),
    for ``gamma`` a function of t (float → float)."""
    g = [gamma(i / T) for i in range(T + 1)]
    return sum(0.5 * math.expm1(g[i] - g[i - 1]) * dims * s * s / (s * s + math.exp(g[i])) for i in range(1, T + 1))


def finite_diffusion_given_x(x: torch.Tensor, gamma, T: int, mu: float, s: float) -> torch.Tensor:
    """E_ε[L_T | x] in nats per image [N]: Σ_i ½ expm1(γ(i/T) − γ((i−1)/T)) · Σ_d (s⁴ + u (x_d − μ)²)/(s² + u)²
    with u = e^{γ(i/T)}."""
    sq = ((x.to(torch.float64) - mu) ** 2).flatten(1)
    g = [gamma(i / T) for i in range(T + 1)]
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(1, T + 1):
        u = math.exp(g[i])
        total += 0.5 * math.expm1(g[i] - g[i - 1]) * ((s**4 + u * sq) / (s * s + u) ** 2).sum(1)
    return total
