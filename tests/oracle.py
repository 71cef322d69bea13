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
