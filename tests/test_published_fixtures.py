"""Smoke test of the fixtures in tests/fixtures/published/: they load as tensors only and have the shapes
tests/fixtures/published/make_fixtures.py documents, and the originals' outputs are not trivially zero."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

PUBLISHED = Path(__file__).parent / "fixtures" / "published"
T = 20

CASES = {
    "improved_diffusion": {
        "x_t": [4, 3, 8, 8], "t": [4], "t_model": [4], "out": [4, 6, 8, 8],
        "pixels": [2, 3, 8, 8], "x_start": [2, 3, 8, 8], "noise": [T, 2, 3, 8, 8],
        "vb": [2, T], "mse": [2, T], "xstart_mse": [2, T], "prior_bpd": [2], "total_bpd": [2],
        "vb_unclipped": [2, T], "total_bpd_unclipped": [2], "betas": [T],
    },
    "diffusers": {"x": [4, 3, 8, 8], "t": [4], "out": [4, 3, 8, 8]},
    "pytorch_diffusion": {"x": [4, 3, 8, 8], "t": [4], "out": [4, 3, 8, 8]},
}


def load(path: Path):
    return torch.load(path, weights_only=True)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape from a .safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_shapes_and_outputs(name: str) -> None:
    case = load(PUBLISHED / name / "case.pt")
    assert {key: list(value.shape) for key, value in case.items()} == CASES[name]
    assert case["t"].dtype == torch.long
    assert 0.1 < case["out"].std() < 10  # random weights everywhere: not the originals' zero output conv


def test_improved_diffusion() -> None:
    state = load(PUBLISHED / "improved_diffusion" / "model.pt")
    assert list(state)[:2] == ["time_embed.0.weight", "time_embed.0.bias"]
    assert list(state["out.2.weight"].shape) == [6, 32, 3, 3] and state["out.2.weight"].abs().max() > 0
    assert list(state["input_blocks.1.0.emb_layers.1.weight"].shape) == [64, 128]  # scale-shift: 2 × 32
    flags = json.loads((PUBLISHED / "improved_diffusion" / "flags.json").read_text())
    assert flags["image_size"] == 8 and flags["num_res_blocks"] == 3 and flags["channel_mult"] == [1, 2]
    assert flags["attention_resolutions"] == "8,4" and flags["diffusion_steps"] == T and flags["learn_sigma"]
    case = load(PUBLISHED / "improved_diffusion" / "case.pt")
    assert torch.equal(case["x_start"], case["pixels"].float() / 127.5 - 1)
    assert torch.equal(case["t_model"], case["t"].float() * 1000 / T)
    assert case["betas"].dtype == torch.float64
    assert (case["vb"] > 0).all() and (case["vb"][:, 0] > case["vb"][:, 1:].max(dim=1).values).all()  # L_0 first
    torch.testing.assert_close(case["total_bpd"], case["vb"].sum(1) + case["prior_bpd"])
    torch.testing.assert_close(case["total_bpd_unclipped"], case["vb_unclipped"].sum(1) + case["prior_bpd"])


def test_diffusers() -> None:
    folder = PUBLISHED / "diffusers"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"][1] == "UNet2DModel"
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["attention_head_dim"] is None and config["block_out_channels"] == [32, 32]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == T and scheduler["variance_type"] == "fixed_large"
    shapes = safetensors_shapes(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert shapes["conv_out.weight"] == [3, 32, 3, 3]
    assert shapes["down_blocks.1.attentions.0.to_q.weight"] == [64, 64]


def test_pytorch_diffusion() -> None:
    state = load(PUBLISHED / "pytorch_diffusion" / "model.pt")
    assert list(state)[:2] == ["temb.dense.0.weight", "temb.dense.0.bias"]
    assert list(state["conv_out.weight"].shape) == [3, 32, 3, 3]
    assert list(state["down.1.attn.0.q.weight"].shape) == [64, 64, 1, 1]
    flags = json.loads((PUBLISHED / "pytorch_diffusion" / "flags.json").read_text())
    assert flags["ch_mult"] == [1, 2] and flags["attn_resolutions"] == [4] and flags["resolution"] == 8
