"""Tests of the DDPM U-Net (bench/nets/unet.py): size, shapes, conditioning, gradients, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.nets.unet import (
    NETWORK_PRESETS,
    AttnBlock,
    Downsample,
    ResnetBlock,
    UNet,
    UNetConfig,
    build_network,
    count_parameters,
    timestep_embedding,
)

DDPM_CIFAR10_PARAMS = 35_746_307  # Ho et al. 2020 report 35.7M; the pytorch_diffusion port has exactly this


@pytest.fixture(scope="module")
def cifar_net() -> UNet:
    torch.manual_seed(0)
    return build_network("ddpm-cifar10", 3, 3, 32)


def _perturb_zero_init(model: UNet, seed: int = 0) -> None:
    """Give the zero-initialised layers (and all biases) random values so every path is live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.zero_init_modules():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)


def test_ddpm_cifar10_parameter_count(cifar_net: UNet) -> None:
    n = count_parameters(cifar_net)
    assert n == DDPM_CIFAR10_PARAMS
    assert round(n / 1e6, 1) == 35.7


def test_ddpm_cifar10_structure(cifar_net: UNet) -> None:
    # Down: 4 levels x 2 blocks; middle: 2; up: 4 levels x 3 blocks. Attention at 16x16 only:
    # 2 on the way down, 3 on the way up, plus the middle one.
    assert sum(isinstance(m, ResnetBlock) for m in cifar_net.modules()) == 8 + 2 + 12
    assert sum(isinstance(m, AttnBlock) for m in cifar_net.modules()) == 2 + 1 + 3
    assert sum(isinstance(m, Downsample) for m in cifar_net.modules()) == 3
    assert cifar_net.temb_dense[0].in_features == 128 and cifar_net.temb_dense[1].out_features == 512


def test_fresh_network_outputs_zero_and_zero_init_layers_are_zero(cifar_net: UNet) -> None:
    zero_layers = cifar_net.zero_init_modules()
    assert len(zero_layers) == 22 + 6 + 1  # every res-block conv2, attention proj_out, and conv_out
    assert all(torch.count_nonzero(m.weight) == 0 for m in zero_layers)
    # The other weights are not zero (Xavier-uniform).
    assert torch.count_nonzero(cifar_net.conv_in.weight) > 0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = cifar_net.eval()(x, torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    ("preset", "in_ch", "out_ch", "size"),
    [("tiny", 1, 1, 8), ("tiny", 1, 2, 8), ("tiny", 3, 6, 16), ("ddpm-cifar10", 3, 6, 32)],
)
def test_output_shape(preset: str, in_ch: int, out_ch: int, size: int) -> None:
    net = build_network(preset, in_ch, out_ch, size).eval()
    x = torch.rand(3, in_ch, size, size) * 2 - 1
    with torch.no_grad():
        out = net(x, torch.tensor([0, 5, 999]))
    assert out.shape == (3, out_ch, size, size)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("preset", ["tiny", "ddpm-cifar10"])
def test_output_depends_on_t(preset: str) -> None:
    torch.manual_seed(1)
    size, in_ch = (8, 1) if preset == "tiny" else (32, 3)
    net = build_network(preset, in_ch, 2 * in_ch, size).eval()
    _perturb_zero_init(net)
    x = (torch.rand(1, in_ch, size, size) * 2 - 1).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 0, 500]))
    assert torch.equal(out[0], out[1])  # same x, same t: same output
    assert not torch.allclose(out[0], out[2], atol=1e-4)  # same x, other t: different output


def test_tiny_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    net = build_network("tiny", 1, 2, 8).train()
    _perturb_zero_init(net)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 1000, (16,))
    loss = nn.functional.mse_loss(net(x, t), torch.randn(16, 2, 8, 8))
    loss.backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())


def test_tiny_preset_is_a_real_unet() -> None:
    cfg = NETWORK_PRESETS["tiny"]
    assert len(cfg.ch_mult) >= 2 and cfg.num_res_blocks >= 1 and cfg.dropout == 0.0
    net = build_network("tiny", 1, 2, 8)
    assert any(isinstance(m, AttnBlock) for m in net.modules())
    assert sum(isinstance(m, Downsample) for m in net.modules()) == len(cfg.ch_mult) - 1


def test_timestep_embedding_values_and_float32_under_autocast() -> None:
    t = torch.tensor([0, 1, 999])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        emb = timestep_embedding(t, 128)
    assert emb.dtype == torch.float32 and emb.shape == (3, 128)
    assert torch.equal(emb[0], torch.cat([torch.zeros(64), torch.ones(64)]))  # sin(0), cos(0)
    # Lowest frequency is 1, highest is 1/10000 (the DDPM / tensor2tensor convention).
    assert emb[2, 0].item() == pytest.approx(math.sin(999.0), abs=1e-5)
    assert emb[2, 63].item() == pytest.approx(math.sin(999.0 / 10000.0), abs=1e-6)
    assert emb[2, 64].item() == pytest.approx(math.cos(999.0), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)  # odd dims are zero-padded


def test_forward_under_bf16_autocast_runs() -> None:
    net = build_network("tiny", 1, 2, 8).eval()
    _perturb_zero_init(net)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(torch.zeros(2, 1, 8, 8), torch.tensor([3, 4]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out.float()).all()


def test_downsample_uses_ddpm_asymmetric_padding() -> None:
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    out = down(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    # Padding only at the bottom/right: the top-left window is all input, the bottom-right one
    # sees 2x2 input pixels and 5 padded zeros.
    assert out[0, 0, 0, 0].item() == 9.0
    assert out[0, 0, 3, 3].item() == 4.0


def test_unknown_preset_lists_known_presets() -> None:
    with pytest.raises(BenchError, match=r"unknown network preset 'huge'.*known presets: ddpm-cifar10, iddpm-cifar10, tiny"):
        build_network("huge", 3, 3, 32)


@pytest.mark.parametrize(("preset", "size", "factor"), [("ddpm-cifar10", 30, 8), ("ddpm-cifar10", 4, 8)])
def test_bad_image_size(preset: str, size: int, factor: int) -> None:
    with pytest.raises(BenchError, match=rf"image_size={size} must be a positive multiple of {factor}"):
        build_network(preset, 3, 3, size)


def test_tiny_rejects_odd_image_size() -> None:
    build_network("tiny", 1, 2, 8)  # fine
    with pytest.raises(BenchError, match=r"image_size=7 must be a positive multiple of 2"):
        build_network("tiny", 1, 2, 7)


def test_num_groups_must_divide_channels() -> None:
    with pytest.raises(BenchError, match=r"num_groups=32 does not divide channel count\(s\) \[48\]"):
        UNetConfig(ch=48, ch_mult=(1, 2), num_groups=32)
    with pytest.raises(BenchError, match=r"num_groups=16 does not divide channel count\(s\) \[24, 72\]"):
        UNetConfig(ch=24, ch_mult=(1, 2, 3), num_groups=16)
    UNetConfig(ch=48, ch_mult=(1, 2), num_groups=16)  # fine


def test_forward_rejects_wrong_input_shape() -> None:
    net = build_network("tiny", 1, 2, 8)
    with pytest.raises(BenchError, match=r"expected x of shape \[B, 1, 8, 8\]"):
        net(torch.zeros(2, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(BenchError, match=r"expected t of shape \[2\]"):
        net(torch.zeros(2, 1, 8, 8), torch.tensor([0]))


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        NETWORK_PRESETS["tiny"].ch = 64  # type: ignore[misc]
