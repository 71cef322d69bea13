"""The EMA of the network's weights that evaluation and sampling use (torch's ``AveragedModel`` with an EMA
rule whose decay warms up with the step count), updated without waiting for the device."""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, n: int, warmup: bool = True) -> float:
    """The decay of the EMA's update ``n`` (0-based): min(decay, (1 + n) / (10 + n)) with the warm-up
    (TensorFlow's ``ExponentialMovingAverage(num_updates=…)``, diffusers' ``EMAModel``, LDM's ``LitEma``),
    else ``decay``."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def initial_share(decay: float, updates: int, warmup: bool = True) -> float:
    """The weight of the initial network in the EMA after ``updates`` updates: the product of the decays."""
    if not warmup:
        return decay ** updates
    return math.prod(warmup_decay(decay, n) for n in range(updates))


def horizon(decay: float, warmup: bool = True, share: float = 0.01) -> int:
    """The fewest updates after which the initial network's weight in the EMA is below ``share``."""
    n, left = 0, 1.0
    while left >= share:
        left *= warmup_decay(decay, n, warmup)
        n += 1
    return n


class Ema(AveragedModel):
    """The EMA of ``net``'s weights, started at its current weights: update n (0-based)
    W_ema ← d_n·W_ema + (1 − d_n)·W, buffers copied, with d_n = min(decay, (1 + n)/(10 + n)) when ``warmup``
    (:func:`warmup_decay`), else d_n = decay.

    The warm-up keeps a short run's EMA from being its initial network: at decay 0.995 without it the
    initial weights still make 37% of the EMA after 200 updates (0.995²⁰⁰); with it, 10% after one update,
    0.45% after three and 6·10⁻¹⁶ after 200. The decay reaches its cap after 1,790 updates at 0.995 (89,990
    at 0.9999); until then the EMA averages about the last n/9 updates, and from then on an update is the
    flat decay's, to the bit.

    n is the trainer's step, a host number restored with the rest of a checkpoint, so a resumed run decays as
    the uninterrupted one and the update stays one fused lerp by a number. Its state dict is AveragedModel's
    (``module.*`` and the update count ``n_averaged``, the initial copy counting as one). The count lives on
    ``net``'s device and is never read on the host: AveragedModel's own update branches on it
    (``bool(n_averaged == 0)``) and copies it to the device, each a wait for the GPU every step.
    """

    def __init__(self, net: torch.nn.Module, decay: float, warmup: bool = True):
        device = next(net.parameters()).device
        super().__init__(net, device=device)
        self.decay, self.warmup = decay, warmup
        self.requires_grad_(False).eval()
        self.n_averaged.fill_(1)  # the copy of net's weights counts as the first average, as in AveragedModel

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module, n: int) -> None:
        """Update ``n`` (0-based: the training step) towards ``model``'s weights (same architecture, same device)."""
        weight = 1 - warmup_decay(self.decay, n, self.warmup)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.n_averaged += 1


def ema_weights(saved: dict) -> dict:
    """The EMA network's own state dict from a checkpoint's ``ema`` entry (an AveragedModel's, or the bare
    network's in checkpoints from before it was one)."""
    if "n_averaged" not in saved:
        return saved
    return {k.removeprefix("module."): v for k, v in saved.items() if k != "n_averaged"}
