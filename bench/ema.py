"""The EMA of the network's weights that evaluation and sampling use (torch's ``AveragedModel`` with its
EMA rule), updated without waiting for the device."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class Ema(AveragedModel):
    """The EMA of ``net``'s weights, started at its current weights: after each step
    W_ema ← decay·W_ema + (1 − decay)·W (``get_ema_multi_avg_fn``), buffers copied.

    Its state dict is AveragedModel's (``module.*`` and the update count ``n_averaged``). The count lives on
    ``net``'s device and :meth:`update_parameters` never reads it: AveragedModel's own update branches on
    it (``bool(n_averaged == 0)``) and copies it to the device, each a wait for the GPU every step.
    """

    def __init__(self, net: torch.nn.Module, decay: float):
        device = next(net.parameters()).device
        super().__init__(net, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.requires_grad_(False).eval()
        self.n_averaged.fill_(1)  # the copy of net's weights counts as the first average, as in AveragedModel

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model``'s weights (same architecture, same device)."""
        self.multi_avg_fn(list(self.module.parameters()), [p.detach() for p in model.parameters()], self.n_averaged)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.n_averaged += 1


def ema_weights(saved: dict) -> dict:
    """The EMA network's own state dict from a checkpoint's ``ema`` entry (an AveragedModel's, or the bare
    network's in checkpoints from before it was one)."""
    if "n_averaged" not in saved:
        return saved
    return {k.removeprefix("module."): v for k, v in saved.items() if k != "n_averaged"}
