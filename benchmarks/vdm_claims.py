"""VDM's claims, measured on trained continuous-time models (checkpoints of `vdm`, `vdm-fixed`, `vdm-finite`).

For each checkpoint's EMA model, on the same test images:

1. L_T for T = 10, 100, 1000 beside L_∞ (each an unbiased estimate with its standard errors): VDM's "L_∞ ≤ L_T,
   the tighter the more steps" for this model.
2. Invariance to the schedule's shape: the same network (conditioned on γ, so as a function of (z, γ) it is the
   same denoiser) with its schedule's line replaced by two bent shapes through the same end points,
   γ(t) = γ₀ + (γ₁ − γ₀)·t³ and γ₁ − (γ₁ − γ₀)·(1 − t)³. The expected bound must not move (within the standard
   errors); only the Monte Carlo variance should.
3. The estimator's Monte Carlo variance (``bpd_stderr_mc`` and the per-image variance of the two replicates' mean),
   to compare learned and fixed schedules.

Usage: ``python benchmarks/vdm_claims.py CKPT [CKPT ...] [--images N] [--t-per-image K]``. Prints a markdown table
per checkpoint (bits/dim; "± se" the standard error over images and Monte Carlo, "mc" its Monte Carlo part).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from bench.data.datasets import load_dataset
from bench.diffusion.continuous import NoiseSchedule, find_denoiser
from bench.diffusion.continuous_bound import ContinuousResult, continuous_bound
from bench.nets.ema import ema_weights
from bench.runtime.context import Runtime
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig
from bench.training.state import load_weights
from variants import get_variant

SEED = 1234  # the evaluation seed of the trainer's final bound


class Bent(NoiseSchedule):
    """γ(t) = γ₀ + (γ₁ − γ₀)·t^p (or, ``flipped``, γ₁ − (γ₁ − γ₀)(1 − t)^p): another shape, the same end points."""

    def __init__(self, gamma_0: float, gamma_1: float, power: float = 3.0, flipped: bool = False):
        super().__init__()
        self.gamma_0, self.gamma_1, self.power, self.flipped = gamma_0, gamma_1, power, flipped

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        span = self.gamma_1 - self.gamma_0
        return self.gamma_1 - span * (1 - t) ** self.power if self.flipped else self.gamma_0 + span * t**self.power


def load_model(path: str):
    """(the EMA model, its variant, its config) of a continuous-time checkpoint."""
    ckpt = load_checkpoint(path)
    config = replace(RunConfig(**ckpt["config"]), device="cpu")
    variant = get_variant(config.variant, config.variance)
    if not variant.continuous:
        raise SystemExit(f"{path}: variant {config.variant} is not a continuous-time model")
    images = load_dataset(config.dataset, "test", config.data_dir)
    model = config.build_model(variant, images.shape[1], images.shape[2])
    load_weights(model, ema_weights(ckpt["ema"]), "EMA weights")
    return model.eval(), variant, config


def row(name: str, res: ContinuousResult, seconds: float) -> dict:
    mc_var = (res.stderr_mc * len(res.total)) ** 2 / len(res.total)  # per-image variance of the replicates' mean
    return {"bound": name, "bpd": res.total.mean().item(), "se": res.stderr, "mc": res.stderr_mc, "mc_var": mc_var,
            "diffusion": res.diffusion.mean().item(), "decoder": res.decoder.mean().item(),
            "prior": res.prior.mean().item(), "seconds": seconds}


def claims(path: str, images: int = 0, t_per_image: int = 32, steps=(10, 100, 1000), batch_size: int = 1024) -> list:
    """The rows of one checkpoint (see the module docstring)."""
    model, variant, config = load_model(path)
    test = load_dataset(config.dataset, "test", config.data_dir)
    test = test[:images] if images else test
    runtime = Runtime(device="cpu", batch_size=batch_size, precision=torch.float64)
    rows = []

    def measure(name: str, net, T=None):
        start = time.monotonic()
        res = continuous_bound(net, test, t_per_image=t_per_image, T=T, seed=SEED, runtime=runtime)
        rows.append(row(name, res, time.monotonic() - start))

    measure("L_∞", model)
    for T in steps:
        measure(f"L_{T}", model, T)
    denoiser = find_denoiser(model)
    line = denoiser.schedule
    g0, g1 = line.endpoints()
    for name, shape in (("L_∞, shape t³", Bent(g0, g1)), ("L_∞, shape 1 − (1 − t)³", Bent(g0, g1, flipped=True))):
        denoiser.schedule = shape  # the same network: it is conditioned on γ, which the new shape spans the same
        try:
            measure(name, model)
        finally:
            denoiser.schedule = line
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=0, help="test images (0: the whole split)")
    parser.add_argument("--t-per-image", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for path in args.checkpoints:
        _, variant, config = load_model(path)
        print(f"\n{path}: {variant.label}, seed {config.seed}, {config.steps} steps; {args.t_per_image} t per image, "
              f"evaluation seed {SEED}, float64 terms\n")
        print("| bound | bpd ± se (mc) | diffusion | decoder | prior | MC variance per image | s |")
        print("|---|---|---|---|---|---|---|")
        for r in claims(path, args.images, args.t_per_image):
            print(f"| {r['bound']} | {r['bpd']:.4f} ± {r['se']:.4f} ({r['mc']:.4f}) | {r['diffusion']:.4f} | "
                  f"{r['decoder']:.4f} | {r['prior']:.4f} | {r['mc_var']:.4f} | {r['seconds']:.0f} |")
        print("\n(se: over images and Monte Carlo; mc: its Monte Carlo part; all rows share the test images)")


if __name__ == "__main__":
    main()
