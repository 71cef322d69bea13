"""What every import shares: the converted model, reading tensors safely, and loading under exact names and shapes."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.errors import BenchError, first_line
from bench.nets.unet import UNet, UNetConfig


@dataclass(frozen=True)
class Converted:
    """A published model in the project's terms.

    ``diffusion`` holds the RunConfig fields the source fixes (``variant``, ``variance``, ``T``, ``schedule``,
    ``beta_start``, ``beta_end``, ``cosine_s``); ``flags`` what the model was built from, as the source names it."""

    source_format: str
    unet: UNetConfig
    in_channels: int
    out_channels: int
    image_size: int
    state_dict: dict[str, torch.Tensor]  # under the project UNet's names
    diffusion: dict
    flags: dict = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # project name → the source's name, for error lines

    def network(self) -> UNet:
        """The project's U-Net holding these weights (every tensor's name and shape checked)."""
        net = UNet(self.unet, self.in_channels, self.out_channels, self.image_size)
        load_exactly(net, self.state_dict, self.source_format, self.origin)
        return net.eval()


def read_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.safetensors`` file or a torch state dict read with ``weights_only=True``
    (never unpickled); anything else is one error line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{what} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # only this format needs it

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - both readers raise several types for a damaged or foreign file
        raise BenchError(f"{what} {path} cannot be read as tensors ({first_line(err)[:200]})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BenchError(f"{what} {path} is not a state dict (a flat mapping of names to tensors)")
    return state


def load_exactly(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                 origin: dict[str, str] | None = None) -> None:
    """Load ``state`` into ``net`` when every name and shape agrees; else one error line naming the first tensor
    that is missing, left over or of another shape (and how many more there are), by the source's name where
    ``origin`` (project name → source name) knows it."""
    own, origin = net.state_dict(), origin or {}

    def name(k: str) -> str:
        return f"{origin[k]} (here {k})" if k in origin and origin[k] != k else k

    problems = [f"{name(k)} is missing" for k in own if k not in state]
    problems += [f"{name(k)} has no place in the network" for k in state if k not in own]
    problems += [f"{name(k)} has shape {tuple(state[k].shape)}, the network's is {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BenchError(f"the {source} weights do not fit the network built from its flags: {problems[0]}{more}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def read_flags(text: str | dict, defaults: dict, what: str, example: str) -> dict:
    """What a model was built with over ``defaults``: ``--name value`` pairs as ``what`` (its code) takes them, a
    dict, or the path of a JSON file of one; each value of its default's type. An unknown name, a bad value or an
    unreadable file is one error line; ``example`` shows the syntax."""
    if isinstance(text, dict):
        given = dict(text)
    elif text.strip().endswith(".json"):
        path = Path(text.strip())
        try:
            given = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise BenchError(f"--flags {path}: not a readable JSON file ({first_line(err)[:200]})") from None
        if not isinstance(given, dict):
            raise BenchError(f"--flags {path}: expected a JSON object of flags, got {type(given).__name__}")
    else:
        words = shlex.split(text)
        if len(words) % 2 or any(not w.startswith("--") for w in words[::2]):
            raise BenchError(f"--flags {text!r}: write them as {what} takes them, '--name value' pairs "
                             f"(e.g. '{example}')")
        given = {w[2:]: v for w, v in zip(words[::2], words[1::2], strict=True)}
    flags = dict(defaults)
    for name, value in given.items():
        if name not in defaults:
            raise BenchError(f"--flags: {what} has no flag --{name}; it takes {', '.join(sorted(defaults))}")
        flags[name] = _typed(name, value, defaults[name])
    return flags


def _typed(name: str, value, default):
    if isinstance(value, (list, tuple)):  # a list of ints from a JSON file, where the flag is "1,2,2,2"
        value = ",".join(map(str, value))
    text = str(value)
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise BenchError(f"--flags: --{name} takes True or False, got {text!r}")
    try:
        return type(default)(text)
    except ValueError:
        raise BenchError(f"--flags: --{name} takes {type(default).__name__}, got {text!r}") from None
