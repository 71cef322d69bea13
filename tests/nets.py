"""A small U-Net whose output is not zero, for tests that check numbers through a real network.

A freshly built network (bench.nets.unet) outputs exactly zero for every input (DDPM's zero-initialised
layers), so a test through one passes for code that mixes up images, timesteps or ranks.
:func:`nonzero_network` draws every parameter that starts at exactly zero from a seeded normal.
"""

from __future__ import annotations

import torch

from bench.nets.unet import build_network


def nonzero_network(preset: str, in_channels: int, out_channels: int, size: int, seed: int = 0,
                    std: float = 0.05) -> torch.nn.Module:
    """``build_network(preset, …)`` seeded with ``seed``, its zero-initialised weights and biases drawn
    from N(0, std²) with a generator seeded with ``seed`` (the same network in every process)."""
    torch.manual_seed(seed)
    net = build_network(preset, in_channels, out_channels, size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return net


def output_scale(net: torch.nn.Module, in_channels: int, size: int, T: int) -> float:
    """The mean |output| of ``net`` on a fixed batch of noise images at spread timesteps."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, in_channels, size, size, generator=gen)
    t = torch.tensor([0, T // 3, 2 * T // 3, T - 1])
    with torch.no_grad():
        return float(net(x, t).abs().mean())
