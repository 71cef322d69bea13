"""Continuous-time noise schedules (VDM, Kingma et al. 2021): γ(t) = −log SNR(t) on t ∈ [0, 1], increasing.

z_t = α_t x + σ_t ε with α_t² = sigmoid(−γ(t)) and σ_t² = sigmoid(γ(t)) (variance preserving). The continuous-time
diffusion loss weighs each t by γ'(t), so every schedule gives γ and its derivative together
(:meth:`NoiseSchedule.gamma_and_slope`); for a learned schedule the slope keeps its graph, so the loss's gradient
reaches the schedule's parameters through γ'(t) as well as through γ(t).

The schedules:

- :class:`FixedLinear`: VDM's fixed γ(t) = γ_min + (γ_max − γ_min) t, γ_min = −13.3, γ_max = 5.0.
- :class:`LearnedEndpoints`: γ(t) = b + |w| t (VDM's "learnable_scalar"): only the end points are learned.
- :class:`MonotoneNet`: VDM's monotone network γ(t) = l1(t) + l3(φ(l2(t)))/1024, every weight taken in absolute
  value so that γ increases in t; its end points are not pinned (as in the authors' code).

γ, γ' and everything formed from them are float32 or float64, never bfloat16 (the schedule's end points need
the digits): a half-precision time is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.errors import BenchError

VDM_GAMMA_MIN = -13.3
VDM_GAMMA_MAX = 5.0


def alpha_sigma_squared(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α², σ²) = (sigmoid(−γ), sigmoid(γ)) of a variance-preserving process."""
    return torch.sigmoid(-gamma), torch.sigmoid(gamma)


def low_discrepancy_times(batch: int, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VDM's low-discrepancy t for one batch: t_b = (u + b/B) mod 1 with one u ~ U(0, 1), so the batch has exactly
    one time in each interval [b/B, (b + 1)/B) (a lower-variance estimate of an integral over t than B draws)."""
    if batch < 1:
        raise BenchError(f"a batch of times needs at least one time, got {batch}")
    u = torch.rand((), generator=generator, dtype=dtype)
    return torch.remainder(u + torch.arange(batch, dtype=dtype) / batch, 1.0)


def _check_time(t: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(t) or t.dtype in (torch.float16, torch.bfloat16):
        raise BenchError(f"continuous time must be float32 or float64, got {t.dtype} (γ(t) needs the digits)")
    return t


def _check_ends(gamma_min: float, gamma_max: float) -> None:
    if not gamma_min < gamma_max:
        raise BenchError(f"a noise schedule needs gamma_min < gamma_max, got {gamma_min} and {gamma_max}")


class NoiseSchedule(nn.Module):
    """γ(t) = −log SNR(t), increasing on [0, 1]; a subclass defines ``forward(t)``."""

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t), in ``t``'s dtype."""
        return self(_check_time(t))

    def gamma_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ(t), γ'(t)). The slope is taken by autograd with its graph kept, so a loss weighted by γ'(t) trains
        the schedule's parameters through it (VDM's code takes it with a jvp)."""
        t = _check_time(t)
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            gamma = self(tt)
            (slope,) = torch.autograd.grad(gamma.sum(), tt, create_graph=True)
        return gamma, slope

    def endpoints(self, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
        """(γ(0), γ(1)): the expected continuous-time bound depends on the schedule only through these."""
        with torch.no_grad():
            g = self.gamma(torch.tensor([0.0, 1.0], dtype=dtype))
        return float(g[0]), float(g[1])


class FixedLinear(NoiseSchedule):
    """VDM's fixed schedule γ(t) = γ_min + (γ_max − γ_min) t."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedEndpoints(NoiseSchedule):
    """γ(t) = b + |w| t, started at γ_min and γ_max: the end points are learned, the shape is a straight line."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.b = nn.Parameter(torch.tensor(float(gamma_min)))
        self.w = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.b.to(t.dtype) + self.w.to(t.dtype).abs() * t


class _PositiveLinear(nn.Module):
    """A dense layer with its weights taken in absolute value, so its output increases in its input."""

    def __init__(self, inputs: int, outputs: int, weight: float | None = None, bias: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        self.bias = nn.Parameter(torch.zeros(outputs))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(inputs))
        if weight is not None:
            nn.init.constant_(self.weight, weight)
        if bias is not None:
            nn.init.constant_(self.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype).abs(), self.bias.to(x.dtype))


class MonotoneNet(NoiseSchedule):
    """VDM's learned monotone schedule γ(t) = l1(t) + l3(φ(l2(2(t − ½))))/1024 with φ(h) = 2(sigmoid(h) − ½), l1 a
    1→1 layer started at weight γ_max − γ_min and bias γ_min, l2 1→width, l3 width→1, all weights absolute-valued."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX, width: int = 1024):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.l1 = _PositiveLinear(1, 1, weight=gamma_max - gamma_min, bias=gamma_min)
        self.l2 = _PositiveLinear(1, width)
        self.l3 = _PositiveLinear(width, 1)
        self.width = width

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.reshape(-1, 1)
        h = 2 * (torch.sigmoid(self.l2(2 * (x - 0.5))) - 0.5)
        return (self.l1(x) + self.l3(h) / self.width).reshape(t.shape)
