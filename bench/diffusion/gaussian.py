"""Gaussian pieces of the bound (docs/MATH.md, "The variational bound"); every result is in nats.

Nats become bits/dim in exactly one place: :func:`bits_per_dim_from_nats`.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr

BIN_HALF_WIDTH = 1.0 / 255.0  # half the width of one uint8 bin on the [-1, 1] scale


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats.

    ½(log v2 − log v1 + v1/v2 + (m1 − m2)²/v2 − 1). Arguments broadcast.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b, stable in both tails (by symmetry for a > 0)."""
    flip = a > 0
    lo = torch.where(flip, -b, a)  # Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    hi = torch.where(flip, -a, b)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log p(x) per element, in nats, for x on the uint8 grid of [-1, 1].

    p(x) = ∫_{δ−(x)}^{δ+(x)} N(y; mean, e^log_var) dy with bins x ± 1/255 and open edge bins
    (δ+ = +∞ at x = 1, δ− = −∞ at x = −1); so the 256 bins of a pixel sum to 1.
    """
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x - mean + BIN_HALF_WIDTH) * inv_std
    lower = (x - mean - BIN_HALF_WIDTH) * inv_std
    top_edge = x > 1.0 - 1e-3
    bottom_edge = x < -1.0 + 1e-3
    log_cdf_upper = log_ndtr(upper)  # bottom bin: P(y < upper)
    log_sf_lower = log_ndtr(-lower)  # top bin: P(y > lower)
    middle = _log_diff_ndtr(lower, torch.where(top_edge | bottom_edge, lower + 1.0, upper))
    return torch.where(bottom_edge, log_cdf_upper, torch.where(top_edge, log_sf_lower, middle))


def bits_per_dim_from_nats(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Convert a negative log-likelihood summed over ``dims`` dimensions (nats) to bits/dim."""
    return nats / (dims * math.log(2.0))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] → [B]."""
    return x.flatten(1).mean(dim=1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: [B, ...] → [B]."""
    return x.flatten(1).sum(dim=1)


def to_data_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels u ∈ {0..255} → x_0 = u/127.5 − 1 ∈ [−1, 1] (float32)."""
    return images.to(torch.float32) / 127.5 - 1.0
