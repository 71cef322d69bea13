"""Pictures the trainer logs: sample grids, the per-timestep bound curve (iDDPM Fig. 2) and the adaptive noise
schedule's density over λ."""

from __future__ import annotations

import threading
from functools import cache
from types import ModuleType

import numpy as np
import torch

FIGURES = threading.RLock()  # matplotlib is not thread-safe: figures are made and drawn under this lock


@cache
def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use; the one place the project imports pyplot,
    so the backend is chosen before pyplot loads."""
    import matplotlib  # heavy: only figures need it

    matplotlib.use("Agg")  # no display: figures are written to files and MLflow
    import matplotlib.pyplot as plt  # heavy: only figures need it

    return plt


def sample_grid(images: torch.Tensor, min_side: int = 32) -> np.ndarray:
    """uint8 [N, C, H, W] → one uint8 image [rows·H', cols·W', 3], each tile upscaled (nearest)
    to at least ``min_side`` pixels so 8×8 digits stay visible."""
    from torchvision.utils import make_grid  # heavy: only sample grids need it

    scale = max(1, -(-min_side // images.shape[-1]))
    big = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    if big.shape[1] == 1:
        big = big.expand(-1, 3, -1, -1)
    nrow = max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(big, nrow=nrow, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy().copy()


def per_t_figure(curves: dict[str, torch.Tensor], title: str = "", colors: dict | None = None):
    """L_t in bits/dim against paper time t = 1..T for each labelled curve, log-scaled, in the order given;
    ``colors``: a colour per label (else matplotlib's cycle)."""
    with FIGURES:
        return _per_t_figure(curves, title, colors or {})


def continuous_curve_figure(curves: dict[str, tuple[list[float], list[float]]], title: str = ""):
    """A continuous-time bound's diffusion integrand (bits/dim) against t ∈ [0, 1], one (t, value) curve per label."""
    with FIGURES:
        fig, ax = pyplot().subplots(figsize=(7, 4))
        for label, (t, values) in curves.items():
            ax.plot(t, np.clip(values, 1e-12, None), label=label, lw=1.2, marker=".")
        return _log_scaled(fig, ax, "continuous time t (γ(t) = −log SNR increases with t)",
                           "½γ'(t)‖ε − ε̂‖² (bits/dim)",
                           f"The continuous-time bound's diffusion term by t{': ' + title if title else ''}")


def adaptive_density_figure(edges: np.ndarray, density: np.ndarray, lam: np.ndarray, schedule_density: np.ndarray,
                            title: str = ""):
    """The adaptive noise schedule's piecewise-constant density q(λ) over its bins (``edges`` [bins + 1], ``density``
    [bins], per unit λ) beside the fixed schedule's own p(λ) = 1/γ'(t) (``schedule_density`` at each ``lam``), log y."""
    with FIGURES:
        fig, ax = pyplot().subplots(figsize=(7, 4))
        ax.stairs(np.clip(density, 1e-12, None), edges, baseline=None, label="adaptive q(λ)", lw=1.4)
        ax.plot(lam, np.clip(schedule_density, 1e-12, None), label="the schedule's p(λ) = 1/γ'(t)", lw=1.0, ls="--")
        return _log_scaled(fig, ax, "λ = log SNR (−γ)", "density over λ",
                           f"The adaptive noise schedule's density{': ' + title if title else ''}")


def _per_t_figure(curves: dict[str, torch.Tensor], title: str, colors: dict):
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for label, per_t in curves.items():
        values = per_t.detach().cpu().double().numpy()
        ax.plot(np.arange(1, len(values) + 1), np.clip(values, 1e-12, None), label=label, lw=1.2,
                color=colors.get(label))
    return _log_scaled(fig, ax, "diffusion step t (t = 1: decoder L_0)", "L_t term of the bound (bits/dim)",
                       f"Per-timestep terms of the variational bound{': ' + title if title else ''}")


def _log_scaled(fig, ax, xlabel: str, ylabel: str, title: str):
    """A per-t curve's axes finished: log y, labels, title, grid and legend; the figure closed and returned."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    pyplot().close(fig)  # still drawable by MLflow / savefig; not kept in pyplot's registry
    return fig
