"""The PyTorch port of DDPM's models (pesser/pytorch_diffusion): its state dicts, EMA and raw.

The port's ``Model`` is the DDPM U-Net the project's own network follows, so the weights only change names: its
``temb.dense``, ``mid.*``, ``downsample``/``upsample`` and an up path stored top level first (the project runs and
stores it bottom level first). Its CIFAR-10 model (``ch 128``, ``ch_mult 1,2,2,2``, two residual blocks, attention
at 16×16, dropout 0.1) was trained by Ho et al. with L_simple on the linear β schedule (1e-4 to 0.02, T = 1000)
and is sampled with Σ = β_t (fixed-large): the project's ``simple`` with ``--variance large``.

Its architecture is written as the keyword arguments of its ``Model`` (``--ch 128 --ch_mult 1,2,2,2 …``); what
is not given takes its CIFAR-10 configuration.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.nets.unet import UNetConfig
from bench.published.common import Converted, read_flags, read_tensors

FORMAT = "pytorch-diffusion"

# the port's CIFAR-10 configuration (its Diffusion.from_pretrained) and Ho et al.'s diffusion for it
DEFAULT_FLAGS: dict = {"resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": "1,2,2,2",
                       "num_res_blocks": 2, "attn_resolutions": "16", "dropout": 0.1, "resamp_with_conv": True}
DIFFUSION = {"variant": "simple", "variance": "large", "T": 1000, "schedule": "linear",
             "beta_start": 1e-4, "beta_end": 0.02}


def parse_flags(text: str | dict) -> dict:
    """``--name value`` pairs naming its ``Model``'s arguments (or a dict, or the path of a JSON file of one) over
    its CIFAR-10 configuration; an unknown name or a bad value is one error line."""
    flags = read_flags(text, DEFAULT_FLAGS, "the port's Model", "--ch 128 --ch_mult 1,2,2,2")
    if not flags["resamp_with_conv"]:
        raise BenchError("--resamp_with_conv False: the project's network resamples with convolutions")
    return flags


def unet_config(flags: dict) -> UNetConfig:
    """The project's U-Net for the port's Model arguments."""
    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in str(text).split(",") if v.strip())

    return UNetConfig(ch=flags["ch"], ch_mult=ints(flags["ch_mult"]), num_res_blocks=flags["num_res_blocks"],
                      attn_resolutions=ints(flags["attn_resolutions"]), dropout=flags["dropout"], num_groups=32)


def convert_state(state: dict[str, torch.Tensor], levels: int) -> tuple[dict, dict]:
    """Its state dict under the project's names: (state, origin: project name → its name)."""
    out, origin = {}, {}
    for theirs, value in state.items():
        ours = theirs.replace("temb.dense.", "temb_dense.").replace("mid.block_", "mid_block_")
        ours = ours.replace("mid.attn_", "mid_attn_").replace(".downsample.", ".resample.")
        ours = ours.replace(".upsample.", ".resample.")
        match = re.match(r"up\.(\d+)\.(.*)", ours)
        if match:  # its up path is stored top level first; the project's bottom level first
            ours = f"up.{levels - 1 - int(match[1])}.{match[2]}"
        out[ours], origin[ours] = value, theirs
    return out, origin


def read_pytorch_diffusion(path: str | Path, flags: str | dict = "") -> Converted:
    """A state dict of the port's ``Model`` (its ``model-*.ckpt`` files) with the arguments it was built with."""
    flags = parse_flags(flags)
    config = unet_config(flags)
    state, origin = convert_state(read_tensors(path, "pytorch-diffusion model"), len(config.ch_mult))
    return Converted(FORMAT, config, flags["in_channels"], flags["out_ch"], flags["resolution"], state,
                     dict(DIFFUSION), flags, origin)
