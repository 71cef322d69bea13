"""Where the network runs and in which precision: the device a name stands for, bf16 autocast, the NHWC layout.

``auto`` means CUDA when a GPU is visible, else the CPU; ``precision="auto"`` means bf16 autocast on CUDA and
fp32 elsewhere; ``channels_last=None`` means NHWC on CUDA only. The bound's terms are formed in fp32 or wider
whatever the network's precision (:mod:`bench.diffusion.bound`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from bench.errors import BenchError


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:N``…;
    an unknown name, or CUDA on a machine without a GPU, refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the network when ``precision`` is 'bf16', or 'auto' on CUDA; else nothing."""
    resolved = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if resolved == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def channels_last(asked: bool | None, device: torch.device) -> bool:
    """Whether the network and its inputs use the NHWC layout: as ``asked``, else (None) on CUDA only."""
    return asked if asked is not None else device.type == "cuda"


class Autocast(torch.nn.Module):
    """Wraps a network so every call (training, evaluation, sampling) runs under :func:`autocast`; returns fp32."""

    def __init__(self, net: torch.nn.Module, precision: str, device: torch.device):
        super().__init__()
        self.net, self._precision, self._device = net, precision, device

    def forward(self, x, t, **options):
        with autocast(self._precision, self._device):
            return self.net(x, t, **options).float()


def without_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """The network an :class:`Autocast` wraps (any other model as it is): for what must not run in bf16."""
    return model.net if isinstance(model, Autocast) else model


def synchronize(device: torch.device) -> None:
    """Wait for the device's queue (a no-op off CUDA): before reading a wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
