"""The DDPM U-Net of Ho et al. 2020, with named network presets.

The architecture follows the official DDPM TensorFlow model (``diffusion_tf/models/unet.py``) and its
PyTorch port ``pytorch_diffusion``: sinusoidal timestep embedding -> 2-layer MLP, a stack of
GroupNorm/swish residual blocks with a projected timestep embedding, single-head self-attention at
chosen resolutions, strided-conv downsampling, nearest+conv upsampling, and concatenated skips.

Initialisation follows DDPM: every conv/linear weight uses ``variance_scaling(1.0, fan_avg,
uniform)`` (= Xavier-uniform) with zero bias, and the layers DDPM initialises with ``scale=0`` —
the second conv of each residual block, the attention output projection and the final conv — are
initialised to exactly zero (DDPM uses scale 1e-10, which is zero for all practical purposes).
A freshly built network therefore outputs zeros for every input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError, check_choice

EMBEDDINGS = ("ddpm", "iddpm")
DOWNSAMPLE_PADS = ("asymmetric", "symmetric")

__all__ = ["NETWORK_PRESETS", "UNet", "UNetConfig", "build_network", "count_parameters", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the DDPM U-Net; the single home of the network defaults.

    The defaults are the Ho et al. 2020 CIFAR-10 network. Validation raises ``BenchError``.
    """

    ch: int = 128  # base channel count; level i has ch * ch_mult[i] channels, the time MLP has 4 * ch
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channel multiplier per resolution level (top to bottom)
    num_res_blocks: int = 2  # residual blocks per level on the down path (the up path has one more)
    attn_resolutions: tuple[int, ...] = (16,)  # sizes (H == W) with self-attention after each res block
    dropout: float = 0.1  # dropout probability inside residual blocks (before their second conv)
    num_groups: int = 32  # GroupNorm groups; must divide ch * m for every m in ch_mult and ch itself
    # What improved-diffusion's UNetModel differs in (its released models: num_heads 4, scale_shift_norm, "iddpm"
    # embedding, norm_eps 1e-5, "symmetric" down-sampling, time_scale 1000/T); the defaults are DDPM's.
    num_heads: int = 1  # attention heads; q, k and v split into contiguous chunks of C/heads channels per head
    scale_shift_norm: bool = False  # the timestep sets scale and shift of the second GroupNorm: norm(h)(1 + s) + b
    embedding: str = "ddpm"  # ddpm: [sin, cos] with frequencies 10⁴^(−i/(h−1)); iddpm: [cos, sin] with 10⁴^(−i/h)
    norm_eps: float = 1e-6  # GroupNorm epsilon
    downsample_pad: str = "asymmetric"  # asymmetric: DDPM's (0, 1, 0, 1) zero pad; symmetric: one pixel each side
    time_scale: float = 1.0  # the network embeds t · time_scale (improved-diffusion's rescaled timesteps: 1000/T)

    def __post_init__(self) -> None:
        if self.ch <= 0 or self.num_res_blocks <= 0:
            raise BenchError(
                f"UNetConfig: ch and num_res_blocks must be positive, got ch={self.ch}, "
                f"num_res_blocks={self.num_res_blocks}"
            )
        if len(self.ch_mult) == 0 or any(m <= 0 for m in self.ch_mult):
            raise BenchError(
                f"UNetConfig: ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise BenchError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.num_groups <= 0:
            raise BenchError(f"UNetConfig: num_groups must be positive, got {self.num_groups}")
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_choice("downsample_pad", self.downsample_pad, DOWNSAMPLE_PADS)
        if not (self.norm_eps > 0 and self.time_scale > 0):
            raise BenchError(f"UNetConfig: norm_eps and time_scale must be positive, got {self.norm_eps}, "
                             f"{self.time_scale}")
        bad_heads = sorted({self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % max(self.num_heads, 1)})
        if self.num_heads <= 0 or bad_heads:
            raise BenchError(f"UNetConfig: num_heads={self.num_heads} must be positive and divide every level's "
                             f"channels {sorted({self.ch * m for m in self.ch_mult})}")
        # Every GroupNorm input is ch * m for some m in (1,) + ch_mult, or a sum of two such counts.
        bad = sorted({self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % self.num_groups != 0})
        if bad:
            raise BenchError(
                f"UNetConfig: num_groups={self.num_groups} does not divide channel count(s) {bad} "
                f"(ch={self.ch}, ch_mult={self.ch_mult}); pick one dividing ch * m for every multiplier"
            )


NETWORK_PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10 (32x32): 35,746,307 parameters with in=out=3. These are the defaults.
    "ddpm-cifar10": UNetConfig(),
    # 8x8 single-channel digits on CPU: levels 8x8 and 4x4 (32 ch each), attention at 4x4; ~285k params
    # with in=1, out=2. Sized so a batch-128 training step runs at >= 1000 images/s on 2 CPU cores
    # (measured ~1500-1900 on an idle machine; benchmarks/train_speed.py). ch=32, ch_mult=(1, 2) ran at
    # only ~1100-1200, too close to the goal.
    "tiny": UNetConfig(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=8
    ),
    # improved-diffusion's CIFAR-10 models (Nichol & Dhariwal 2021; its flags --num_channels 128 --num_res_blocks 3
    # --dropout 0.3 and the defaults --num_heads 4 --attention_resolutions 16,8 --use_scale_shift_norm True, with
    # T = 4000 and rescaled timesteps): 52,546,438 parameters with in=3, out=6.
    "iddpm-cifar10": UNetConfig(
        num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.3, num_heads=4, scale_shift_norm=True,
        embedding="iddpm", norm_eps=1e-5, downsample_pad="symmetric", time_scale=1000 / 4000
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, kind: str = "ddpm") -> torch.Tensor:
    """Sinusoidal embedding of timesteps, as in DDPM / tensor2tensor.

    t: [B] (any numeric dtype) -> [B, dim] float32 ``[sin(t * f_0..f_{h-1}), cos(...)]`` with
    ``f_i = exp(-log(10000) * i / (h - 1))``, ``h = dim // 2``; zero-padded when ``dim`` is odd.
    ``kind="iddpm"`` is improved-diffusion's: ``[cos(...), sin(...)]`` with ``f_i = exp(-log(10000) * i / h)``.
    Always computed in float32, even inside an autocast region.
    """
    if t.dim() != 1:
        raise BenchError(f"timestep_embedding: t must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    with torch.autocast(device_type=t.device.type, enabled=False):
        scale = math.log(10000.0) / (max(half - 1, 1) if kind == "ddpm" else half)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
        args = t.to(torch.float32)[:, None] * freqs[None, :]
        parts = [torch.sin(args), torch.cos(args)]
        emb = torch.cat(parts if kind == "ddpm" else parts[::-1], dim=1)
        if dim % 2 == 1:
            emb = F.pad(emb, (0, 1))
    return emb


def _swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 (+ temb projection), GroupNorm-swish-dropout-conv3x3, residual add.
    With ``scale_shift`` the projection gives the second GroupNorm's scale and shift instead (improved-diffusion).

    forward: x [B, in_ch, H, W], temb [B, temb_ch] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int,
                 eps: float = 1e-6, scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)  # zero-initialised
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        emb = self.temb_proj(_swish(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(_swish(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions, residual add. x [B, C, H, W] -> same. ``heads`` (DDPM: 1) split
    the channels of q, k and v into contiguous chunks of C/heads, each attending with scale 1/sqrt(C/heads)."""

    def __init__(self, ch: int, num_groups: int, eps: float = 1e-6, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups, ch, eps=eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)  # zero-initialised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, heads, HW, C/heads]; softmax(q k^T / sqrt(C/heads)) v, as in DDPM (one head).
        q, k, v = (m(h).reshape(b, self.heads, c // self.heads, hh * ww).transpose(2, 3)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        a = a.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Conv3x3 stride 2 after DDPM's asymmetric (0, 1, 0, 1) zero pad, or with one pixel of zeros on every side
    (``symmetric``, improved-diffusion). [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, ch: int, pad: str = "asymmetric") -> None:
        super().__init__()
        self.asymmetric = pad == "asymmetric"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample: nn.Module | None = None


class UNet(nn.Module):
    """DDPM U-Net: (x [B, in_channels, S, S] on [-1, 1], t long [B]) -> [B, out_channels, S, S].

    ``t`` is the 0-based timestep index (index 0 is the paper's t = 1), fed to the sinusoidal
    embedding unchanged, exactly as the DDPM code does.
    """

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise BenchError(
                f"UNet: in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
            )
        factor = 2 ** (len(config.ch_mult) - 1)
        if image_size <= 0 or image_size % factor != 0:
            raise BenchError(
                f"UNet: image_size={image_size} must be a positive multiple of {factor} "
                f"(2**(len(ch_mult)-1) for ch_mult={config.ch_mult})"
            )
        self.config = config
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        ch, g, nrb, p = config.ch, config.num_groups, config.num_res_blocks, config.dropout
        temb_ch = 4 * ch
        n_levels = len(config.ch_mult)

        def block(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_ch, p, g, config.norm_eps, config.scale_shift_norm)

        def attention(c: int) -> AttnBlock:
            return AttnBlock(c, g, config.norm_eps, config.num_heads)

        self.temb_dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; skip_chs records the channel count of every tensor pushed onto the skip stack.
        res, cur = image_size, ch
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(config.ch_mult):
            level = _Level()
            for _ in range(nrb):
                level.block.append(block(cur, ch * mult))
                cur = ch * mult
                if res in config.attn_resolutions:
                    level.attn.append(attention(cur))
                skip_chs.append(cur)
            if i != n_levels - 1:
                level.resample = Downsample(cur, config.downsample_pad)
                res //= 2
                skip_chs.append(cur)
            self.down.append(level)

        self.mid_block_1 = block(cur, cur)
        self.mid_attn_1 = attention(cur)
        self.mid_block_2 = block(cur, cur)

        # Up path, stored bottom level first (the order it runs in).
        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            level = _Level()
            for _ in range(nrb + 1):
                level.block.append(block(cur + skip_chs.pop(), ch * config.ch_mult[i]))
                cur = ch * config.ch_mult[i]
                if res in config.attn_resolutions:
                    level.attn.append(attention(cur))
            if i != 0:
                level.resample = Upsample(cur)
                res *= 2
            self.up.append(level)
        assert not skip_chs

        self.norm_out = nn.GroupNorm(g, cur, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)  # zero-initialised
        self._init_weights()

    def _init_weights(self) -> None:
        """DDPM init: Xavier-uniform weights, zero biases; zero for conv2 / attention proj_out / conv_out."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.zero_init_modules():
            nn.init.zeros_(m.weight)

    def zero_init_modules(self) -> list[nn.Module]:
        """The layers DDPM initialises to zero (res-block conv2, attention proj_out, final conv_out)."""
        out: list[nn.Module] = [self.conv_out]
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                out.append(m.conv2)
            elif isinstance(m, AttnBlock):
                out.append(m.proj_out)
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, S, S] float, t [B] long -> [B, out_channels, S, S]."""
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (s, s):
            raise BenchError(
                f"UNet: expected x of shape [B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}], got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],):
            raise BenchError(f"UNet: expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")
        c = self.config
        temb = timestep_embedding(t * c.time_scale if c.time_scale != 1 else t, c.ch, c.embedding)
        temb = self.temb_dense[1](_swish(self.temb_dense[0](temb)))  # [B, 4ch]

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(hs[-1], temb)), temb)

        for level in self.up:
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(_swish(self.norm_out(h)))


def build_network(preset: str, in_channels: int, out_channels: int, image_size: int) -> UNet:
    """Build the U-Net for a named preset in ``NETWORK_PRESETS``; BenchError on an unknown preset."""
    if preset not in NETWORK_PRESETS:
        known = ", ".join(sorted(NETWORK_PRESETS))
        raise BenchError(f"unknown network preset {preset!r}; known presets: {known}")
    return UNet(NETWORK_PRESETS[preset], in_channels, out_channels, image_size)


def count_parameters(model: nn.Module) -> int:
    """Total number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
