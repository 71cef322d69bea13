"""Noise schedules β_1..β_T and every table derived from them (docs/MATH.md, "Forward process").

All tables are float64 tensors of length T indexed 0..T-1, where array index ``i`` is paper time
``t = i + 1``. Coefficients are gathered from these tables and cast to the working dtype only when
they are applied (``Schedule.gather``), so ᾱ near 0 or 1 never passes through fp32 arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from bench.errors import BenchError


@dataclass(frozen=True, eq=False)
class Schedule:
    """A validated noise schedule and its derived float64 tables.

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`. ``spec`` records how it was
    made (for MLflow params and checkpoints); ``Schedule.from_spec(spec)`` rebuilds it.
    """

    betas: torch.Tensor  # β_1..β_T, float64 [T]
    spec: dict = field(default_factory=dict)  # how the schedule was built, e.g. {"kind": "linear", ...}

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu().reshape(-1)
        if betas.numel() < 2:
            raise BenchError(f"a schedule needs T >= 2 timesteps, got T = {betas.numel()}")
        if not torch.isfinite(betas).all():
            raise BenchError("schedule betas contain NaN or infinity; every β_t must be a finite number")
        if not ((betas > 0) & (betas < 1)).all():
            lo, hi = betas.min().item(), betas.max().item()
            raise BenchError(f"every β_t must lie in (0, 1); got values in [{lo:g}, {hi:g}]")
        object.__setattr__(self, "betas", betas)
        if not self.spec:
            object.__setattr__(self, "spec", {"kind": "explicit", "T": betas.numel()})

    # ----------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, scale_to_T: bool = False
    ) -> Schedule:
        """DDPM's linear schedule. ``scale_to_T`` applies iDDPM's rule: both ends times 1000/T, so
        the curve of the T = 1000 schedule is kept for another T."""
        _check_T(T)
        if not (0 < beta_start < beta_end < 1):
            raise BenchError(f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        scale = 1000.0 / T if scale_to_T else 1.0
        betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
        spec = {"kind": "linear", "T": T, "beta_start": beta_start, "beta_end": beta_end, "scale_to_T": scale_to_T}
        return cls(betas, spec)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """iDDPM's cosine schedule: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2),
        β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta)."""
        _check_T(T)
        if not (s > 0 and math.isfinite(s)):
            raise BenchError(f"cosine schedule offset s must be a positive number, got {s}")
        if not (0 < max_beta < 1):
            raise BenchError(f"cosine schedule max_beta must lie in (0, 1), got {max_beta}")
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)
        return cls(betas, {"kind": "cosine", "T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def from_betas(cls, betas) -> Schedule:
        """An explicit schedule; ``betas`` is any sequence of β_1..β_T."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(betas, {"kind": "explicit", "T": int(betas.numel()), "betas": betas.tolist()})

    @classmethod
    def from_spec(cls, spec: dict) -> Schedule:
        """Rebuild a schedule from its ``spec`` (as logged or checkpointed)."""
        kind = spec.get("kind")
        args = {k: v for k, v in spec.items() if k != "kind"}
        if kind == "linear":
            return cls.linear(**args)
        if kind == "cosine":
            return cls.cosine(**args)
        if kind == "explicit" and "betas" in spec:
            return cls.from_betas(spec["betas"])
        raise BenchError(f"cannot rebuild a schedule from spec {spec!r}: kind must be linear, cosine or explicit")

    # ----------------------------------------------------------------- derived tables (float64 [T])
    # Cached: the training step and the evaluator gather from them many times per batch.

    @property
    def T(self) -> int:
        return self.betas.numel()

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = ∏_{s≤t} α_s."""
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t−1}, with ᾱ_0 = 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_1 = 0."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log β̃_t with β̃_1 (= 0) replaced by β̃_2, as both reference implementations do."""
        var = self.posterior_variance
        return torch.log(torch.cat([var[1:2], var[1:]]))

    @cached_property
    def log_betas(self) -> torch.Tensor:
        return torch.log(self.betas)

    @cached_property
    def log_betas_decoder(self) -> torch.Tensor:
        """log β_t for the fixed "large" variance, with β̃_2 at t = 1 for the decoder (iDDPM)."""
        return torch.cat([self.posterior_log_variance_clipped[:1], self.log_betas[1:]])

    @cached_property
    def posterior_mean_coef1(self) -> torch.Tensor:
        """Coefficient of x_0 in μ̃_t: √ᾱ_{t−1} β_t / (1 − ᾱ_t)."""
        return self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef2(self) -> torch.Tensor:
        """Coefficient of x_t in μ̃_t: √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)."""
        return torch.sqrt(self.alphas) * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def sqrt_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    @cached_property
    def sqrt_one_minus_alphas_cumprod(self) -> torch.Tensor:
        return (1 - self.alphas_cumprod).sqrt()

    @cached_property
    def sqrt_recip_alphas_cumprod(self) -> torch.Tensor:
        return (1 / self.alphas_cumprod).sqrt()

    @cached_property
    def sqrt_recipm1_alphas_cumprod(self) -> torch.Tensor:
        return (1 / self.alphas_cumprod - 1).sqrt()

    @cached_property
    def _on_device(self) -> dict:
        """Copies of the tables on each device they were asked for, made once: (name, device) → tensor."""
        return {}

    # ----------------------------------------------------------------- application
    def take(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The table ``name`` at ``t``, as :meth:`gather` gives it, from a copy kept on t's device (no
        host-to-device copy per call)."""
        key = (name, t.device)
        table = self._on_device.get(key)
        if table is None:
            table = self._on_device[key] = getattr(self, name).to(t.device)
        return self.gather(table, t, like)

    @staticmethod
    def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` reshaped to broadcast against ``like`` ([B, ...]), in ``like``'s dtype/device.

        ``t`` is the 0-based index [B]. The gather happens in float64; only the result is cast.
        """
        dtype = like.dtype if like.is_floating_point() else torch.float32
        out = table.to(t.device)[t].to(device=like.device, dtype=dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (docs/MATH.md, q(x_t | x_0)); t is the 0-based index [B]."""
        return self.take("sqrt_alphas_cumprod", t, x0) * x0 + self.take("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """μ̃_t(x_t, x_0)."""
        return self.take("posterior_mean_coef1", t, x_t) * x0 + self.take("posterior_mean_coef2", t, x_t) * x_t

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t."""
        return (self.take("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.take("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def describe(self) -> str:
        """A short human-readable name, e.g. ``linear(T=1000, 1e-4..0.02)``."""
        s = self.spec
        if s.get("kind") == "linear":
            scaled = ", scaled to T" if s.get("scale_to_T") else ""
            return f"linear(T={self.T}, {s['beta_start']:g}..{s['beta_end']:g}{scaled})"
        if s.get("kind") == "cosine":
            return f"cosine(T={self.T}, s={s['s']:g})"
        return f"explicit(T={self.T})"


def _check_T(T) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise BenchError(f"a schedule needs an integer T >= 2, got {T!r}")
