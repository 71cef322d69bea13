"""diffusers' format both ways: a ``UNet2DModel`` (+ ``DDPMScheduler``) folder read into the project's terms, and a
project checkpoint written as a folder that ``diffusers.DDPMPipeline.from_pretrained`` loads.

Both directions read and write the files themselves (JSON, and safetensors or a torch state dict read with
``weights_only=True``); diffusers is not imported here, only by the tests that load what this module writes.

The two networks are the same DDPM U-Net under other names: diffusers' ``up_blocks[0]`` is the bottom level, as the
project's ``up[0]``; its attention projections are ``Linear`` layers where the project has 1×1 convolutions. What a
``UNet2DModel`` config can say that the project's :class:`~bench.nets.unet.UNetConfig` cannot (attention on one
path only, class embeddings, other block types or activations…) is refused in one line naming the setting.
Both directions live here because they share the tensor names and the two configs' correspondence.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data.datasets import DATASETS
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import Variant
from bench.errors import BenchError, first_line, reraised
from bench.nets.ema import ema_weights
from bench.nets.unet import UNet, UNetConfig
from bench.published.common import Converted, load_exactly, read_tensors
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig

SOURCE = "diffusers"
DIFFUSERS_VERSION = "0.42.1"  # the release the export is checked against (tests/test_published_diffusers.py)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what a UNet folder holds, by choice
# UNet2DModel.__init__'s defaults (diffusers 0.42), for the keys a config.json leaves out
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# the UNet2DModel settings the project's network has no counterpart for, and the one value it shares with them
UNET_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# DDPMScheduler.__init__'s defaults (diffusers 0.42), for the keys a scheduler_config.json leaves out
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
EMBEDDINGS = {"ddpm": (False, 1), "iddpm": (True, 0)}  # UNetConfig.embedding → (flip_sin_to_cos, freq_shift)
DOWNSAMPLE_PADDING = {"asymmetric": 0, "symmetric": 1}  # UNetConfig.downsample_pad → downsample_padding
# variance_type → the project's fixed variance (the _log forms are the same σ² computed through its log)
VARIANCES = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large", "fixed_large_log": "large"}
COSINE_S = 0.008  # squaredcos_cap_v2's offset, fixed in diffusers
MALFORMED = (TypeError, ValueError, KeyError, IndexError, ArithmeticError)  # a config's values of the wrong kind
BETAS_RTOL = 1e-6  # trained_betas equal a named schedule when every β agrees to this (a float32 copy does)

# project module → diffusers module, by the project name's prefix; then the leaf layer's name within it
_MODULES = (
    (r"temb_dense\.0", "time_embedding.linear_1"), (r"temb_dense\.1", "time_embedding.linear_2"),
    (r"norm_out", "conv_norm_out"), (r"mid_block_1", "mid_block.resnets.0"), (r"mid_block_2", "mid_block.resnets.1"),
    (r"mid_attn_1", "mid_block.attentions.0"),
    (r"down\.(\d+)\.block\.(\d+)", r"down_blocks.\1.resnets.\2"),
    (r"down\.(\d+)\.attn\.(\d+)", r"down_blocks.\1.attentions.\2"),
    (r"down\.(\d+)\.resample", r"down_blocks.\1.downsamplers.0"),
    (r"up\.(\d+)\.block\.(\d+)", r"up_blocks.\1.resnets.\2"),
    (r"up\.(\d+)\.attn\.(\d+)", r"up_blocks.\1.attentions.\2"),
    (r"up\.(\d+)\.resample", r"up_blocks.\1.upsamplers.0"),
)
_LAYERS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut",  # residual blocks
           "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # attention
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers < 0.15's names

__all__ = ["diffusers_name", "diffusers_unet_config", "read_diffusers", "scheduler_config", "unet_config",
           "unexportable", "write_diffusers"]


# ----------------------------------------------------------------------------- names
def diffusers_name(name: str) -> str:
    """The diffusers name of the project U-Net's tensor ``name``: ``down.1.attn.0.q.weight`` →
    ``down_blocks.1.attentions.0.to_q.weight``, ``up.0.block.2.temb_proj.bias`` →
    ``up_blocks.0.resnets.2.time_emb_proj.bias``."""
    for pattern, replacement in _MODULES:
        m = re.match(pattern + r"(\.|$)", name)
        if m:
            module, rest = m.expand(replacement), name[m.end():]
            layer, _, param = rest.rpartition(".")
            return ".".join(p for p in (module, _LAYERS.get(layer, layer), param) if p)
    return name  # conv_in, conv_out


def _is_attention_matrix(name: str) -> bool:
    """Whether the project tensor ``name`` is an attention projection's weight (a 1×1 conv here)."""
    return re.fullmatch(r"(mid_attn_1|(down|up)\.\d+\.attn\.\d+)\.(q|k|v|proj_out)\.weight", name) is not None


# ----------------------------------------------------------------------------- the network's config
def unet_config(config: dict, where: str = "config.json") -> tuple[UNetConfig, int, int, int]:
    """A ``UNet2DModel`` config (a config.json's mapping; missing keys take diffusers' defaults) as the project's
    (UNetConfig, in_channels, out_channels, image_size); a setting the project's U-Net cannot express is refused in
    one line naming it. Dropout is the config's ``dropout`` (0 when absent, as diffusers)."""
    with reraised(lambda err: f"diffusers UNet2DModel {where} is malformed ({first_line(err)})", *MALFORMED):
        return _unet_config(config, where)


def _unet_config(config: dict, where: str) -> tuple[UNetConfig, int, int, int]:
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    def refuse(why: str) -> BenchError:
        return BenchError(f"diffusers UNet2DModel {where}: {why}; the project's U-Net cannot express it")

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise BenchError(f"diffusers {where} describes a {config['_class_name']}; only UNet2DModel is read")
    for key, value in UNET_FIXED.items():
        if c[key] != value:
            raise refuse(f"{key} is {c[key]!r} (only {value!r})")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise refuse(f"resnet_time_scale_shift is {c['resnet_time_scale_shift']!r} (only 'default' or 'scale_shift')")
    channels, groups = [int(x) for x in c["block_out_channels"]], c["norm_num_groups"]
    ch = channels[0]
    if any(x % ch for x in channels):
        raise refuse(f"block_out_channels {channels} are not multiples of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise refuse(f"time_embedding_dim is {c['time_embedding_dim']} (only 4 × block_out_channels[0] = {4 * ch})")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(channels) or len(up) != len(channels):
        raise BenchError(f"diffusers UNet2DModel {where}: {len(channels)} block_out_channels but {len(down)} down and "
                         f"{len(up)} up block types")
    odd = [t for t in down if t not in ("DownBlock2D", "AttnDownBlock2D")] + \
        [t for t in up if t not in ("UpBlock2D", "AttnUpBlock2D")]
    if odd:
        raise refuse(f"block type {odd[0]} (only DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D)")
    attends = [t.startswith("Attn") for t in down]
    if attends != [t.startswith("Attn") for t in reversed(up)]:
        raise refuse(f"attention on one path only (down {down}, up {up}; the project attends at a resolution on both)")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise refuse(f"attn_norm_num_groups {c['attn_norm_num_groups']} differs from norm_num_groups {groups}")
    if c["resnet_time_scale_shift"] == "scale_shift" and c["attn_norm_num_groups"] is None:
        raise refuse("the middle attention has no GroupNorm (resnet_time_scale_shift 'scale_shift' without "
                     "attn_norm_num_groups)")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse(f"sample_size {list(size)} is not square")
        size = size[0]
    if not isinstance(size, int):
        raise BenchError(f"diffusers UNet2DModel {where} has no sample_size, so the image size is unknown")
    embedding = next((k for k, v in EMBEDDINGS.items() if v == (bool(c["flip_sin_to_cos"]), c["freq_shift"])), None)
    if embedding is None:
        raise refuse(f"flip_sin_to_cos {c['flip_sin_to_cos']} with freq_shift {c['freq_shift']} (only False with 1, "
                     "DDPM's, or True with 0, improved-diffusion's)")
    pad = next((k for k, v in DOWNSAMPLE_PADDING.items() if v == c["downsample_padding"]), None)
    if pad is None:
        raise refuse(f"downsample_padding is {c['downsample_padding']} (only 0 or 1)")
    attended = [channels[i] for i in range(len(channels)) if attends[i]] + [channels[-1]]  # and the middle's
    head_dim = c["attention_head_dim"]
    heads = {1} if head_dim is None else {x // head_dim for x in attended}  # None: one head of the block's width
    if head_dim is not None and (any(x % head_dim for x in attended) or len(heads) != 1):
        raise refuse(f"attention_head_dim {head_dim} gives another number of heads (or a remainder) at the "
                     f"attended widths {sorted(set(attended))} (the project has one number of heads)")
    unet = UNetConfig(
        ch=ch, ch_mult=tuple(x // ch for x in channels), num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(size // 2 ** i for i in range(len(channels)) if attends[i]),
        dropout=float(c["dropout"]), num_groups=int(groups), num_heads=heads.pop(),
        scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift", embedding=embedding,
        norm_eps=float(c["norm_eps"]), downsample_pad=pad)
    return unet, int(c["in_channels"]), int(c["out_channels"]), size


def diffusers_unet_config(unet: UNetConfig, in_channels: int, out_channels: int, image_size: int) -> dict:
    """The ``UNet2DModel`` config.json of the project's network (every key written); BenchError where UNet2DModel
    cannot hold it (:func:`unexportable_network`)."""
    why = unexportable_network(unet, image_size)
    if why:
        raise BenchError(f"UNet2DModel cannot hold this network: {why}")
    levels = [image_size // 2 ** i in unet.attn_resolutions for i in range(len(unet.ch_mult))]
    flip, shift = EMBEDDINGS[unet.embedding]
    widths = [unet.ch * m for m in unet.ch_mult]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        **UNET_FIXED, "sample_size": image_size, "in_channels": in_channels, "out_channels": out_channels,
        "time_embedding_dim": None, "num_train_timesteps": None, "flip_sin_to_cos": flip, "freq_shift": shift,
        "block_out_channels": widths, "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
        "downsample_padding": DOWNSAMPLE_PADDING[unet.downsample_pad], "dropout": unet.dropout,
        "attention_head_dim": None if unet.num_heads == 1 else widths[-1] // unet.num_heads,
        "norm_num_groups": unet.num_groups, "norm_eps": unet.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if unet.scale_shift_norm else "default",
        # diffusers gives the middle attention no GroupNorm under scale_shift unless its groups are named
        "attn_norm_num_groups": unet.num_groups if unet.scale_shift_norm else None,
    }


def unexportable_network(unet: UNetConfig, image_size: int) -> str | None:
    """Why ``UNet2DModel`` cannot hold the project network ``unet`` (None when it can)."""
    if unet.time_scale != 1:
        return (f"its network embeds t · {unet.time_scale:g} (rescaled timesteps) and UNet2DModel embeds the timestep "
                "index itself")
    if unet.ch_mult[0] != 1:
        return (f"its first level is ch_mult[0] = {unet.ch_mult[0]} times wider than the input convolution and the "
                "time embedding's base, and UNet2DModel's are block_out_channels[0] wide")
    widths = {unet.ch * m for i, m in enumerate(unet.ch_mult) if image_size // 2 ** i in unet.attn_resolutions}
    widths.add(unet.ch * unet.ch_mult[-1])  # the middle attention's
    if unet.num_heads > 1 and len(widths) > 1:
        return (f"its {unet.num_heads} attention heads are of different widths at the attended widths {sorted(widths)}"
                " and UNet2DModel's attention_head_dim is one width for every attention")
    return None


# ----------------------------------------------------------------------------- the scheduler's config
def scheduler_diffusion(config: dict, where: str = "scheduler_config.json") -> dict:
    """A ``DDPMScheduler`` config (missing keys take diffusers' defaults) as the diffusion the model was trained with,
    in RunConfig's fields (``variant`` simple: an ε-model of fixed variance); what the project cannot build is
    refused in one line naming the setting."""
    with reraised(lambda err: f"diffusers DDPMScheduler {where} is malformed ({first_line(err)})", *MALFORMED):
        return _scheduler_diffusion(config, where)


def _scheduler_diffusion(config: dict, where: str) -> dict:
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise BenchError(f"diffusers {where} describes a {config['_class_name']}; only DDPMScheduler is read")
    if c["prediction_type"] != "epsilon":
        raise BenchError(f"diffusers {where}: prediction_type is {c['prediction_type']!r}; only 'epsilon' is read")
    if c["variance_type"] not in VARIANCES:
        raise BenchError(f"diffusers {where}: variance_type is {c['variance_type']!r}; only "
                         f"{', '.join(VARIANCES)} (a fixed variance) are read")
    if c["rescale_betas_zero_snr"]:
        raise BenchError(f"diffusers {where}: rescale_betas_zero_snr is set; the project has no zero-SNR schedule")
    T = int(c["num_train_timesteps"])
    named = {"variant": "simple", "variance": VARIANCES[c["variance_type"]], "T": T, "schedule": "linear",
             "beta_start": RunConfig.beta_start, "beta_end": RunConfig.beta_end, "cosine_s": RunConfig.cosine_s}
    if c["trained_betas"] is not None:
        if "num_train_timesteps" in config and len(c["trained_betas"]) != T:
            raise BenchError(f"diffusers {where}: {len(c['trained_betas'])} trained_betas but num_train_timesteps {T}")
        return {**named, **_named_schedule([float(b) for b in c["trained_betas"]], where)}
    if c["beta_schedule"] == "linear":
        return {**named, "beta_start": float(c["beta_start"]), "beta_end": float(c["beta_end"])}
    if c["beta_schedule"] == "squaredcos_cap_v2":
        return {**named, "schedule": "cosine", "cosine_s": COSINE_S}
    raise BenchError(f"diffusers {where}: beta_schedule {c['beta_schedule']!r}; only linear and squaredcos_cap_v2 "
                     "(or trained_betas equal to one of them)")


def _named_schedule(betas: list[float], where: str) -> dict:
    """The RunConfig schedule fields whose betas are ``betas`` (to ``BETAS_RTOL``); else one error line."""
    given = torch.tensor(betas, dtype=torch.float64)
    T = len(betas)
    candidates = {"linear": {"schedule": "linear", "beta_start": betas[0], "beta_end": betas[-1]},
                  "cosine": {"schedule": "cosine", "cosine_s": COSINE_S}}
    for fields in candidates.values():
        try:
            own = (Schedule.linear(T, betas[0], betas[-1]) if fields["schedule"] == "linear"
                   else Schedule.cosine(T, COSINE_S)).betas
        except BenchError:
            continue
        if torch.allclose(own, given, rtol=BETAS_RTOL, atol=0):
            return {"T": T, **fields}
    raise BenchError(f"diffusers {where}: its trained_betas (T = {T}) are neither a linear schedule from β_1 to β_T "
                     f"nor the cosine one (s = {COSINE_S}); the project builds only those")


def scheduler_config(config: RunConfig, variant: Variant) -> dict:
    """The ``DDPMScheduler`` config of a run: the schedule by name where diffusers' float32 table from the name is
    the project's float64 betas rounded to float32, bit for bit; else the project's betas as ``trained_betas``. The
    sampler clips x̂_0 to [−1, 1], as the project's does (bench.diffusion.sample)."""
    sched = config.build_schedule()
    own = sched.betas.to(torch.float32)
    if config.schedule == "linear":
        named = {"beta_schedule": "linear", "beta_start": config.beta_start, "beta_end": config.beta_end}
        exact = torch.equal(torch.linspace(config.beta_start, config.beta_end, sched.T, dtype=torch.float32), own)
    else:
        named = {"beta_schedule": "squaredcos_cap_v2", "beta_start": RunConfig.beta_start,
                 "beta_end": RunConfig.beta_end}
        exact = config.cosine_s == COSINE_S and torch.equal(_squaredcos_cap_v2(sched.T), own)
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER_DEFAULTS,
        "num_train_timesteps": sched.T, **named, "trained_betas": None if exact else sched.betas.tolist(),
        "variance_type": {"fixed_small": "fixed_small", "fixed_large": "fixed_large"}[variant.var_type],
        "clip_sample": True, "prediction_type": "epsilon",
    }


def _squaredcos_cap_v2(T: int) -> torch.Tensor:
    """diffusers' float32 betas of ``beta_schedule="squaredcos_cap_v2"``: 1 − f((i+1)/T)/f(i/T) capped at 0.999, with
    f(t) = cos²((t + 0.008)/1.008 · π/2), each in Python floats."""
    def f(t: float) -> float:
        return math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)


# ----------------------------------------------------------------------------- reading
def read_diffusers(path: str | Path, flags: str | dict = "") -> Converted:
    """A diffusers ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/: what ``save_pretrained`` writes) or a
    bare ``UNet2DModel`` folder (config.json and diffusion_pytorch_model.safetensors or .bin; its diffusion is then
    DDPMScheduler's defaults, DDPM's) as the project's network and diffusion. The weights are read as tensors only;
    every tensor's name and shape is checked here, and a mismatch is one line naming the diffusers tensor. ``flags``
    (the other formats' build flags) must be empty: the folder's configs say what the model is."""
    if flags:
        raise BenchError("a diffusers folder carries its own config (unet/config.json, "
                         "scheduler/scheduler_config.json); give no --flags")
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent  # the config.json or weights file of a UNet folder
    if (folder / "model_index.json").is_file():
        components = _read_json(folder / "model_index.json")
        unet_dir, scheduler_dir = folder / "unet", folder / "scheduler"
        for name, cls, where in (("unet", "UNet2DModel", unet_dir), ("scheduler", "DDPMScheduler", scheduler_dir)):
            if name not in components or not (where / ("config.json" if name == "unet" else
                                                       "scheduler_config.json")).is_file():
                raise BenchError(f"diffusers pipeline {folder} has no {name} ({where.name}/ with its config); a "
                                 f"DDPMPipeline folder holds unet/ and scheduler/")
            if list(components[name])[-1:] != [cls]:
                raise BenchError(f"diffusers pipeline {folder}: its {name} is a {components[name]}; only {cls} is read")
        scheduler = _read_json(scheduler_dir / "scheduler_config.json")
    elif (folder / "config.json").is_file():
        unet_dir, scheduler = folder, None
    else:
        raise BenchError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a UNet2DModel folder "
                         "(config.json)")
    weights = next((unet_dir / w for w in WEIGHTS if (unet_dir / w).is_file()), None)
    if weights is None:
        raise BenchError(f"diffusers UNet folder {unet_dir} has no weights ({' or '.join(WEIGHTS)})")
    config = _read_json(unet_dir / "config.json")
    unet, in_channels, out_channels, size = unet_config(config, str(unet_dir / "config.json"))
    diffusion = scheduler_diffusion(scheduler if scheduler is not None else {})
    with torch.device("meta"):  # the names and shapes only
        shell = UNet(unet, in_channels, out_channels, size)
    state, origin = _project_state(read_tensors(weights, "diffusers weights"), shell.state_dict())
    flags = {**{k: v for k, v in config.items() if not k.startswith("_")},
             **{f"scheduler.{k}": v for k, v in (scheduler or {}).items() if not k.startswith("_")},
             "weights": weights.name, "scheduler": "scheduler_config.json" if scheduler is not None else
             "none (DDPMScheduler's defaults: linear β from 1e-4 to 0.02, T = 1000, fixed_small)"}
    converted = Converted(SOURCE, unet, in_channels, out_channels, size, state, diffusion, flags, origin)
    with warnings.catch_warnings():  # checked now, in one line; loading into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*meta parameter in the current model.*")
        load_exactly(shell, state, SOURCE, origin)
    return converted


def _project_state(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' tensors under the project's names (``own``'s), attention matrices as 1×1 convs, and the origin of
    each (project name → diffusers name). A diffusers tensor with no place keeps its own name, so that the check
    names it."""
    state, origin, left = {}, {}, dict(tensors)
    for name in own:
        theirs = diffusers_name(name)
        legacy = re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{_LEGACY[m[1]]}.", theirs)
        found = theirs if theirs in left else legacy if legacy in left else None
        origin[name] = found or theirs
        if found is not None:
            value = left.pop(found)
            state[name] = value[:, :, None, None] if _is_attention_matrix(name) and value.dim() == 2 else value
    state.update(left)
    return state, origin


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(value, dict):
        raise BenchError(f"{path} is not a JSON object")
    return value


# ----------------------------------------------------------------------------- writing
def unexportable(variant: Variant) -> str | None:
    """Why a diffusers DDPMPipeline cannot hold a model of ``variant`` (None when it can: ε-prediction, fixed Σ)."""
    if variant.continuous:
        return (f"{variant.name} is a continuous-time model (its network is conditioned on γ(t), not on a timestep "
                "index of a discrete chain as DDPMScheduler's)")
    if variant.mean_type != "eps":
        return (f"{variant.name} predicts the posterior mean μ̃ and DDPMScheduler reads ε, x_0 or v only "
                "(prediction_type)")
    if variant.var_type == "learned":
        return (f"{variant.name} learns a per-step diagonal log-variance, which DDPMScheduler has no variance_type for "
                "(its 'learned' reads the output as σ², not log σ²)")
    if variant.var_type != "fixed_small" and variant.var_type != "fixed_large":
        return (f"{variant.name} learns its reverse variance Σ ({variant.var_type}); the export writes ε-prediction "
                "models of fixed variance only")
    return None


@dataclass(frozen=True)
class Exported:
    """What :func:`write_diffusers` wrote: the folder, its files (relative to it) and the checkpoint's step."""

    folder: Path
    files: tuple[str, ...]
    step: int
    variance_type: str
    named_schedule: bool  # False: the betas are written as trained_betas


def write_diffusers(checkpoint_path: str | Path, out_dir: str | Path) -> Exported:
    """Write the EMA network of a project checkpoint and its diffusion as a diffusers ``DDPMPipeline`` folder
    ``out_dir`` (model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors,
    scheduler/scheduler_config.json). ``out_dir`` must not exist or be an empty folder: the files are written into a
    temporary folder beside it and renamed into place, so a failure leaves nothing. A model diffusers cannot hold
    (μ̃ means, learned Σ, continuous time, rescaled timesteps) is refused in one line before anything is written."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BenchError(f"{out} exists and is not an empty folder; the export writes a new folder and overwrites "
                         "nothing: name another")
    ckpt = load_checkpoint(checkpoint_path)
    config = RunConfig(**ckpt["config"])
    variant = config.build_variant()
    info = DATASETS[config.dataset]
    why = unexportable(variant)
    net = None if why else config.build_model(variant, info.channels, info.image_size)
    why = why or unexportable_network(net.config, info.image_size)
    if why:
        raise BenchError(f"cannot export {checkpoint_path} to diffusers: {why}")
    load_exactly(net, ema_weights(ckpt["ema"]), "checkpoint's EMA")
    unet = diffusers_unet_config(net.config, info.channels, net.out_channels, info.image_size)
    scheduler = scheduler_config(config, variant)
    weights = {diffusers_name(k): (v[:, :, 0, 0] if _is_attention_matrix(k) else v).to(torch.float32).contiguous()
               for k, v in net.state_dict().items()}
    files = {
        "model_index.json": _json_writer({"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                          "scheduler": ["diffusers", "DDPMScheduler"],
                                          "unet": ["diffusers", "UNet2DModel"]}),
        "unet/config.json": _json_writer(unet),
        "unet/diffusion_pytorch_model.safetensors": _safetensors_writer(weights),
        "scheduler/scheduler_config.json": _json_writer(scheduler),
    }
    _write_folder(out, files)
    return Exported(out, tuple(files), int(ckpt["step"]), scheduler["variance_type"],
                    scheduler["trained_betas"] is None)


def _json_writer(value: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _safetensors_writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from safetensors.torch import save_file  # only the export writes this format

        save_file(tensors, str(path), metadata={"format": "pt"})
    return write


def _write_folder(out: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Create ``out`` holding ``files`` (relative name → writer): written in a temporary folder beside it, then renamed
    into place (an empty ``out`` is replaced); on any failure the temporary folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for name, write in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
