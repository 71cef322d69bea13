"""Kingma & Gao's adaptive noise schedule, measured on trained `weighted` models: same objective, lower variance?

For each checkpoint's EMA model (held fixed) and its own weighting w(λ), the weighted loss L_w on the test images is
estimated two ways with the variant's own loss:

- by the model's fixed schedule: t ~ U(0, 1) (low-discrepancy over the batch), each example weighted by w(λ)·γ'(t);
- by the adaptive schedule, first adapted on ``--adapt`` training batches of this model's losses and then held
  fixed: λ drawn from its piecewise-constant density q, each example weighted by w(λ)/q(λ).

With ``--line-bound`` it instead estimates the model's bound L_∞ twice (the trainer's final-evaluation protocol: the
whole test split, 2 × 16 stratified t per image, seed 1234), with t spread along the straight line between the
model's own end points γ(0), γ(1) (what the ruler does) and along its schedule (what the ruler did before): the same
expectation (L_∞ depends on the schedule only through its end points, and the network is conditioned on γ, so it is
the same denoiser), but on the line γ'(t) is constant, which on a cosine schedule cuts the Monte Carlo error many
times over.

Both sampler estimates are unbiased for the same L_w. Each is repeated ``--repeats`` times over the same images with
fresh t (or λ) and ε; the table gives each estimate's mean over the repeats with its standard error, and the variance
of one repeat's mean (the estimator's variance at this batch size) and its ratio, adaptive over fixed. Also whether the
weighting is monotone on the model's schedule.

Usage: ``python benchmarks/weighting_claims.py CKPT [CKPT ...] [--adapt N] [--repeats R] [--batch B]``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch

from bench.data.datasets import load_dataset
from bench.diffusion.continuous import find_denoiser
from bench.diffusion.continuous_bound import continuous_bound
from bench.diffusion.gaussian import to_data_scale
from bench.diffusion.weighting import is_monotone
from bench.nets.ema import ema_weights
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig
from bench.training.state import load_weights
from variants import get_variant


def load_model(path: str):
    """(the EMA model, its config) of a `weighted` checkpoint."""
    ckpt = load_checkpoint(path)
    config = replace(RunConfig(**ckpt["config"]), device="cpu")
    if config.variant != "weighted":
        raise SystemExit(f"{path}: variant {config.variant} is not `weighted`")
    images = load_dataset(config.dataset, "test", config.data_dir)
    model = config.build_model(config.build_variant(), images.shape[1], images.shape[2])
    load_weights(model, ema_weights(ckpt["ema"]), "EMA weights")
    return model.eval(), config


SEED = 1234  # the evaluation seed of the trainer's final bound


@torch.no_grad()
def line_bound(path: str, t_per_image: int = 32) -> dict:
    """The model's L_∞ on the whole test split with t along the line through its own end points (module docstring),
    beside the schedule's own estimate with the same draws."""
    model, config = load_model(path)
    images = load_dataset(config.dataset, "test", config.data_dir)
    result = {along: continuous_bound(model, images, t_per_image=t_per_image, seed=SEED, along=along)
              for along in ("schedule", "line")}
    return {"weighting": config.build_weighting().short() + ("+adaptive" if config.adaptive_schedule else ""),
            "seed": config.seed, **{k: {**r.summary(), "images": len(images)} for k, r in result.items()}}


def _mean_loss(variant, model, sched, x0: torch.Tensor, g: torch.Generator, batch: int) -> float:
    """One estimate of L_w (bits/dim) over the images x0: the mean of the variant's per-example loss, ``batch`` at a
    time; an adaptive schedule's state is put back after each call, so it stays as adapted."""
    total = 0.0
    for i in range(0, len(x0), batch):
        held = variant.adaptive.state_dict() if variant.adaptive is not None else None
        total += variant.loss(model, sched, x0[i : i + batch], g).loss.sum().item()
        if held is not None:
            variant.adaptive.load_state_dict(held)
    return total / len(x0)


@torch.no_grad()
def claims(path: str, adapt: int = 200, repeats: int = 30, batch: int = 128, seed: int = 0) -> dict:
    model, config = load_model(path)
    sched = config.build_schedule()
    test = to_data_scale(load_dataset(config.dataset, "test", config.data_dir)).float()
    train = to_data_scale(load_dataset(config.dataset, "train", config.data_dir)).float()
    fixed = get_variant("weighted", weighting=config.build_weighting(), adaptive=False)
    adaptive = get_variant("weighted", weighting=config.build_weighting(), adaptive=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(adapt):  # the adaptive schedule learns this model's losses on training batches
        adaptive.loss(model, sched, train[torch.randint(0, len(train), (batch,), generator=g)], g)
    rows = {}
    for name, variant in (("fixed", fixed), ("adaptive", adaptive)):
        values = torch.tensor([_mean_loss(variant, model, sched, test, g, batch) for _ in range(repeats)],
                              dtype=torch.float64)
        rows[name] = {"mean": values.mean().item(), "se": values.std().item() / math.sqrt(repeats),
                      "var": values.var().item()}
    schedule = find_denoiser(model).schedule
    return {"checkpoint": path, "weighting": config.build_weighting().describe(),
            "monotone": is_monotone(config.build_weighting(), schedule), "seed": config.seed, **rows,
            "ratio": rows["adaptive"]["var"] / rows["fixed"]["var"], "images": len(test), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--adapt", type=int, default=200, help="training batches the adaptive schedule learns from")
    parser.add_argument("--repeats", type=int, default=30, help="estimates of L_w per sampler")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--line-bound", action="store_true", help="only L_∞ along the line through the end points")
    args = parser.parse_args()
    if args.line_bound:
        print("| weighting | seed | L_∞, t along its schedule | MC se | L_∞, t along the line | MC se |\n"
              "|---|---|---|---|---|---|")
        for path in args.checkpoints:
            r = line_bound(path)
            own, line = r["schedule"], r["line"]
            print(f"| {r['weighting']} | {r['seed']} | {own['bpd']:.4f} | {own['bpd_stderr_mc']:.4f} | "
                  f"{line['bpd']:.4f} | {line['bpd_stderr_mc']:.4f} |", flush=True)
        return
    print("| weighting | seed | monotone | L_w, fixed schedule | L_w, adaptive | var(estimate) fixed | adaptive | "
          "ratio |\n|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        start = time.perf_counter()
        r = claims(path, args.adapt, args.repeats, args.batch)
        f, a = r["fixed"], r["adaptive"]
        monotone = "yes" if r["monotone"] else "no"
        print(f"| {r['weighting']} | {r['seed']} | {monotone} | {f['mean']:.5f} ± {f['se']:.5f} "
              f"| {a['mean']:.5f} ± {a['se']:.5f} | {f['var']:.3g} | {a['var']:.3g} | {r['ratio']:.3f} |", flush=True)
        seconds = time.perf_counter() - start
        print(f"<!-- {path}: {r['images']} test images, {r['repeats']} repeats, {seconds:.0f} s -->")


if __name__ == "__main__":
    main()
