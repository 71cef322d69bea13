"""What a run holds: its inputs (:func:`setup`), what the loop and the evaluation share (:class:`RunContext`), what
the loop changes (:class:`TrainState`, the logging window's loss sums included: :class:`Window`) and its checkpoint
(:func:`save`, :func:`load_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data.datasets import load_dataset
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import Loss, Variant
from bench.errors import BenchError, first_line
from bench.nets.ema import Ema, ema_weights
from bench.runtime.cores import CoreShare
from bench.runtime.devices import resolve_device
from bench.runtime.dist import SINGLE, Dist
from bench.runtime.urls import masked
from bench.tracking import store as tracking
from bench.training.checkpoint import save_checkpoint
from bench.training.config import RunConfig


def setup(config: RunConfig, device_name: str | None = None):
    """Validate ``config`` and load what a run needs: (device, train and test images, variant, schedule).
    Everything that can refuse bad input happens here, before any MLflow run exists."""
    config.validate()
    device = resolve_device(device_name or config.device)
    train_images = load_dataset(config.dataset, "train", config.data_dir, config.download)
    test_images = load_dataset(config.dataset, "test", config.data_dir, config.download)
    return device, train_images, test_images, config.build_variant(), config.build_schedule()


@dataclass
class RunContext:
    """What a run is, where it logs and which rank this process is: what the loop and the evaluation share."""

    config: RunConfig
    variant: Variant
    sched: Schedule
    device: torch.device
    train_images: torch.Tensor
    test_images: torch.Tensor
    log: object  # RunLogger on rank 0, record.NoLog elsewhere
    run_id: str
    uri: str
    dist: Dist = SINGLE
    progress: bool = True
    on_eval: object = None
    cores: CoreShare | None = None  # this process's share of the machine's cores, looked at every log step


@dataclass
class TrainState:
    """Everything the loop changes, as one checkpointable unit."""

    net: torch.nn.Module
    ema: Ema  # the EMA of the weights (``ema.module``), what evaluation and sampling use
    opt: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    data_gen: torch.Generator
    window: Window  # the loss sums of the logging window under way
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0


def checkpoint_path(run_id: str) -> Path:
    return tracking.bench_home() / "checkpoints" / run_id / "last.pt"


def save(state: TrainState, ctx: RunContext) -> Path:
    """Write the run's checkpoint (rank 0 only; every rank holds the same state). Returns its path."""
    path = checkpoint_path(ctx.run_id)
    window = state.window.state_dict(ctx.dist)  # every rank takes part
    if not ctx.dist.main:
        return path
    cuda = [torch.cuda.get_rng_state(ctx.device)] if ctx.device.type == "cuda" else []
    return save_checkpoint(path, {
        "config": ctx.config.redacted().to_dict(), "step": state.step, "model": state.net.state_dict(),
        "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(),
        "lr_schedule": state.lr_schedule.state_dict(),
        "variant": ctx.variant.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "data": state.data_gen.get_state(), "cuda": cuda},
        "run_id": ctx.run_id, "tracking_uri": masked(ctx.uri), "images_seen": state.images_seen,
        "train_seconds": state.train_seconds, "window": window,
    })


def load_weights(net: torch.nn.Module, weights: dict, what: str) -> None:
    """``net.load_state_dict(weights)``, a mismatch (missing or extra tensors, other shapes) refused in one line."""
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])[:300]
        raise BenchError(f"the checkpoint's {what} do not fit the network its config builds "
                         f"({detail or first_line(err)}); "
                         "it was written by another version of elbo-bench or altered") from None


def load_state(state: TrainState, variant, sched, ckpt: dict, device: torch.device, d: Dist) -> None:
    load_weights(state.net, ckpt["model"], "weights")
    load_weights(state.ema.module, ema_weights(ckpt["ema"]), "EMA weights")
    state.ema.n_averaged.fill_(int(ckpt["ema"].get("n_averaged", ckpt["step"] + 1)))
    state.opt.load_state_dict(ckpt["optimizer"])
    if "lr_schedule" in ckpt:
        state.lr_schedule.load_state_dict(ckpt["lr_schedule"])
    else:  # a checkpoint from before the schedule was saved: its position is the step count
        state.lr_schedule.last_epoch = ckpt["step"]
        for group, base, factor in zip(state.opt.param_groups, state.lr_schedule.base_lrs,
                                       state.lr_schedule.lr_lambdas):
            group["lr"] = base * factor(ckpt["step"])
    variant.load_state_dict(ckpt.get("variant", {}), sched.T)
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.data_gen.set_state(ckpt["rng"]["data"])
    if ckpt["rng"]["cuda"] and device.type == "cuda":  # the saving rank's device stream, on this rank's device
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    state.step, state.images_seen, state.train_seconds = ckpt["step"], ckpt["images_seen"], ckpt["train_seconds"]
    if "window" in ckpt:  # older checkpoints: the first window after the resume starts empty
        state.window.load_state_dict(ckpt["window"], d)


class Window:
    """The training loss of the logging window under way, summed on the device: each term's per-step means
    and the loss by quarter of t (:class:`Quarters`). It goes into checkpoints, so the first window after
    a resume averages the same steps as it would have without the interruption."""

    def __init__(self, T: int, device: torch.device):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}  # term → sum over the window's steps of this rank's batch mean
        self.quarters = Quarters(T, self.dtype, device)
        self.steps = 0

    def add(self, result: Loss) -> None:
        """One step's loss: its per-example loss and terms [B] (this rank's share) and timesteps t [B]."""
        for k, v in {"loss": result.loss, **result.terms}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().to(self.dtype).mean()
        self.quarters.add(result.t, result.loss)
        self.steps += 1

    def means(self, d: Dist) -> dict[str, float]:
        """The window's means over all ranks (``loss``, ``loss/<term>``, ``loss_q0``..): waits for the
        device; starts a new window."""
        keys = sorted(self.sums)
        values = (d.reduce(torch.stack([self.sums[k] for k in keys]), "sum") / (d.world * self.steps)).tolist()
        means = {("loss" if k == "loss" else f"loss/{k}"): v for k, v in zip(keys, values)}
        means.update(self.quarters.means(d))
        self.sums, self.steps = {}, 0
        return means

    def state_dict(self, d: Dist) -> dict:
        """The window so far, on the CPU, with every rank's part summed (every rank must call it): ``sums``
        holds each term's sum of global-batch means, ``quarters`` the loss sums and counts per quarter."""
        keys = sorted(self.sums)
        sums = d.reduce(torch.stack([self.sums[k] for k in keys]), "sum") / d.world if keys else torch.zeros(0)
        return {"steps": self.steps, "sums": dict(zip(keys, sums.cpu().clone())),
                "quarters": d.reduce(self.quarters.sums, "sum").cpu().clone()}

    def load_state_dict(self, state: dict, d: Dist) -> None:
        """Continue a checkpointed window at any number of ranks: rank 0 holds what all ranks had summed."""
        mine = 1 if d.main else 0  # rank 0 carries the window's past, the others start from zero
        self.steps = state["steps"]
        # means() divides the ranks' total by the world size
        self.sums = {k: (v * d.world * mine).to(self.device, self.dtype) for k, v in state["sums"].items()}
        self.quarters.sums = (state["quarters"] * mine).to(self.device, self.dtype)


class Quarters:
    """The training loss by quarter of t (``loss_q0`` for t in the first quarter of 1..T … ``loss_q3``),
    summed on the device over a logging window (improved-diffusion logs the same)."""

    def __init__(self, T: int, dtype: torch.dtype, device: torch.device):
        self.T = T
        self.sums = torch.zeros(2, 4, dtype=dtype, device=device)  # loss sums, counts

    def add(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        q = t * 4 // self.T
        self.sums[0].index_add_(0, q, loss.detach().to(self.sums.dtype))
        self.sums[1].index_add_(0, q, torch.ones_like(q, dtype=self.sums.dtype))

    def means(self, d: Dist) -> dict[str, float]:
        """The window's means over all ranks (a quarter no example fell in is left out); starts a new window."""
        sums, counts = d.reduce(self.sums, "sum").tolist()
        self.sums.zero_()
        return {f"loss_q{q}": s / n for q, (s, n) in enumerate(zip(sums, counts)) if n}
