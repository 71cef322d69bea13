"""improved-diffusion (Nichol & Dhariwal 2021) state dicts, with the flags they were trained with.

Its ``UNetModel`` is the DDPM U-Net with five differences, each a :class:`~bench.nets.unet.UNetConfig` field here:
several attention heads, the timestep setting the second GroupNorm's scale and shift, its own sinusoidal
embedding, GroupNorm ε 1e-5 and symmetric padding before the strided down-sampling convolution. With
``rescale_timesteps`` (its default) the network sees t·1000/T. A learned Σ (``learn_sigma``) doubles the output
channels: ε̂ first, then v with log σ² = ((v + 1)/2)·log β_t + ((1 − v)/2)·log β̃_t, as the project's
``learned_range`` variants read them. Its attention keeps q, k and v of each head side by side in one 1×1
convolution; they are split here into the project's three.

The flags are written as its scripts take them (``--num_channels 128 --num_res_blocks 3 …``); what is not given
takes its scripts' defaults. Which objective it was trained with follows from them: ``learn_sigma`` and
``use_kl`` → ``elbo-learned`` (L_vlb), ``learn_sigma`` alone → ``hybrid``, neither → ``simple`` with β (its
default) or β̃ (``sigma_small``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.errors import BenchError
from bench.nets.unet import UNetConfig
from bench.published.common import Converted, read_flags, read_tensors

FORMAT = "improved-diffusion"

# its scripts' defaults (script_util.model_and_diffusion_defaults), and channel_mult, which it derives from image_size
DEFAULT_FLAGS: dict = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "sigma_small": False,
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True, "channel_mult": "",
}
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}  # by image_size, as its create_model


def parse_flags(text: str | dict) -> dict:
    """``--name value`` pairs as its scripts take them (or a dict, or the path of a JSON file of one) over its
    defaults, each value of its default's type; an unknown name or a bad value is one error line."""
    return read_flags(text, DEFAULT_FLAGS, "improved-diffusion", "--num_channels 128 --learn_sigma True")


def unet_config(flags: dict) -> UNetConfig:
    """The project's U-Net for these flags; what it cannot build is one error line."""
    for name, why in (("class_cond", "the project's networks are unconditional"),
                      ("predict_xstart", "the project's discrete-time variants predict ε or μ̃, not x̂0")):
        if flags[name]:
            raise BenchError(f"--{name} True: not supported ({why})")
    if flags["timestep_respacing"]:
        raise BenchError("--timestep_respacing: give the model's full diffusion (the bound needs all T steps); "
                         "the sampler's steps are --sample-steps")
    if flags["diffusion_steps"] < 1 or flags["num_heads"] < 1:
        raise BenchError("--diffusion_steps and --num_heads must be at least 1")
    if flags["num_heads_upsample"] not in (-1, flags["num_heads"]):
        raise BenchError("--num_heads_upsample other than --num_heads: the project's network has one head count")
    size = flags["image_size"]
    mult = tuple(int(m) for m in flags["channel_mult"].split(",")) if flags["channel_mult"] else CHANNEL_MULT.get(size)
    if mult is None:
        raise BenchError(f"--image_size {size}: improved-diffusion builds {sorted(CHANNEL_MULT)} only; give "
                         "--channel_mult too (e.g. 1,2,2,2)")
    attention = tuple(int(r) for r in flags["attention_resolutions"].split(",") if r.strip())
    return UNetConfig(ch=flags["num_channels"], ch_mult=mult, num_res_blocks=flags["num_res_blocks"],
                      attn_resolutions=attention, dropout=flags["dropout"], num_groups=32,
                      num_heads=flags["num_heads"], scale_shift_norm=flags["use_scale_shift_norm"],
                      embedding="iddpm", norm_eps=1e-5, downsample_pad="symmetric",
                      time_scale=1000 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0)


def diffusion(flags: dict) -> dict:
    """The RunConfig fields of the diffusion these flags trained: objective, Σ and schedule."""
    T = flags["diffusion_steps"]
    if flags["learn_sigma"]:
        variant, variance = ("elbo-learned" if flags["use_kl"] else "hybrid"), None
    else:
        variant, variance = ("elbo" if flags["use_kl"] else "simple"), ("small" if flags["sigma_small"] else "large")
    if flags["noise_schedule"] == "cosine":
        schedule = {"schedule": "cosine", "cosine_s": 0.008}
    elif flags["noise_schedule"] == "linear":  # Ho's ends, scaled by 1000/T so the curve is kept for any T
        schedule = {"schedule": "linear", "beta_start": 1e-4 * 1000 / T, "beta_end": 0.02 * 1000 / T}
    else:
        raise BenchError(f"--noise_schedule {flags['noise_schedule']!r}: improved-diffusion knows linear and cosine")
    return {"variant": variant, "variance": variance, "T": T, **schedule}


def _block_names(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(its prefix, the project's prefix, kind) of every layer, kind one of res, attn, conv, norm, linear."""
    names = [("time_embed.0", "temb_dense.0", "linear"), ("time_embed.2", "temb_dense.1", "linear"),
             ("input_blocks.0.0", "conv_in", "conv")]
    n, k = len(config.ch_mult), 1
    for i in range(n):
        for j in range(config.num_res_blocks):
            names.append((f"input_blocks.{k}.0", f"down.{i}.block.{j}", "res"))
            names.append((f"input_blocks.{k}.1", f"down.{i}.attn.{j}", "attn"))
            k += 1
        if i != n - 1:
            names.append((f"input_blocks.{k}.0.op", f"down.{i}.resample.conv", "conv"))
            k += 1
    names += [("middle_block.0", "mid_block_1", "res"), ("middle_block.1", "mid_attn_1", "attn"),
              ("middle_block.2", "mid_block_2", "res")]
    k = 0
    for u, i in enumerate(reversed(range(n))):
        for j in range(config.num_res_blocks + 1):
            names.append((f"output_blocks.{k}.0", f"up.{u}.block.{j}", "res"))
            names.append((f"output_blocks.{k}.1", f"up.{u}.attn.{j}", "attn"))
            if i != 0 and j == config.num_res_blocks:  # its Upsample ends the level's last block
                names.append((f"output_blocks.{k}.@up.conv", f"up.{u}.resample.conv", "conv"))
            k += 1
    return names + [("out.0", "norm_out", "norm"), ("out.2", "conv_out", "conv")]


RES_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "temb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "nin_shortcut"}


def convert_state(state: dict[str, torch.Tensor], config: UNetConfig) -> tuple[dict, dict]:
    """Its state dict under the project's names: (state, origin) with origin mapping each project name to its own.
    Tensors it holds that have no place here are kept under their own names, so loading names them."""
    out, origin, used = {}, {}, set()

    def put(ours: str, theirs: str, value: torch.Tensor) -> None:
        out[ours], origin[ours] = value, theirs
        used.add(theirs)

    for theirs, ours, kind in _block_names(config):
        if "@up" in theirs:  # the Upsample sits after the block (and its attention, if any)
            level = theirs.split(".@")[0]
            found = sorted(k for k in state if k.startswith(level + ".") and k.endswith(".conv.weight"))
            if not found:
                continue
            theirs = found[-1].removesuffix(".weight")
        if kind == "res":
            for part, mine in RES_PARTS.items():
                for p in ("weight", "bias"):
                    origin[f"{ours}.{mine}.{p}"] = f"{theirs}.{part}.{p}"  # named if it is missing
                    if f"{theirs}.{part}.{p}" in state:
                        put(f"{ours}.{mine}.{p}", f"{theirs}.{part}.{p}", state[f"{theirs}.{part}.{p}"])
        elif kind == "attn":  # absent at a resolution without attention; a missing part is named when loading
            for p in ("weight", "bias"):
                for part in ("norm", "proj_out", "q", "k", "v"):
                    origin[f"{ours}.{part}.{p}"] = f"{theirs}.{'qkv' if part in 'qkv' else part}.{p}"
                if f"{theirs}.norm.{p}" in state:
                    put(f"{ours}.norm.{p}", f"{theirs}.norm.{p}", state[f"{theirs}.norm.{p}"])
                if f"{theirs}.proj_out.{p}" in state:  # a 1-d convolution here: one more axis for the 2-d one
                    proj = state[f"{theirs}.proj_out.{p}"]
                    put(f"{ours}.proj_out.{p}", f"{theirs}.proj_out.{p}", proj[..., None] if p == "weight" else proj)
                qkv = state.get(f"{theirs}.qkv.{p}")  # [3C(, C, 1)]: per head, its q, k and v channels side by side
                if qkv is not None and qkv.shape[0] % (3 * config.num_heads) == 0:  # else named as not fitting
                    split = qkv.reshape(config.num_heads, 3, -1, *qkv.shape[1:])
                    for s, name in enumerate("qkv"):
                        value = split[:, s].reshape(-1, *qkv.shape[1:])
                        put(f"{ours}.{name}.{p}", f"{theirs}.qkv.{p}", value[..., None] if p == "weight" else value)
        else:
            for p in ("weight", "bias"):
                origin[f"{ours}.{p}"] = f"{theirs}.{p}"
                if f"{theirs}.{p}" in state:
                    put(f"{ours}.{p}", f"{theirs}.{p}", state[f"{theirs}.{p}"])
    for theirs, value in state.items():
        if theirs not in used:
            out[theirs], origin[theirs] = value, theirs
    return out, origin


def read_improved_diffusion(path: str | Path, flags: str | dict = "") -> Converted:
    """An improved-diffusion state dict (``torch.save(model.state_dict())``, its ``model*.pt`` and
    ``ema_*.pt`` files) with the flags it was trained with."""
    flags = parse_flags(flags)
    config = unet_config(flags)
    state, origin = convert_state(read_tensors(path, "improved-diffusion model"), config)
    out = 6 if flags["learn_sigma"] else 3
    return Converted(FORMAT, config, 3, out, flags["image_size"], state, diffusion(flags), flags, origin)
