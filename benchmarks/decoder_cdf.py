"""How far the papers' decoder term is from the project's: the exact normal CDF against DDPM's tanh approximation.

The bound's last term L_0 = −log p(x_0 | x_1) integrates the decoder's Gaussian over each pixel's bin. The project
integrates it exactly (``log_ndtr``); DDPM's and improved-diffusion's code use the approximation
Φ(y) ≈ ½(1 + tanh(√(2/π)(y + 0.044715y³))) and floor bin probabilities at 1e-12. Every other term of the bound is
the same in both (tests/test_published.py checks it against improved-diffusion's ``calc_bpd_loop``). This script
measures the difference on trained models: for each checkpoint, L_0 in bits/dim under both CDFs on the test split
(x̂_0 clipped, the papers' convention; x_1 drawn with the bound's own noise stream and seed), its mean difference
and the largest over images.

    python benchmarks/decoder_cdf.py CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.data.datasets import load_dataset
from bench.diffusion.gaussian import discretized_gaussian_log_likelihood, to_data_scale
from bench.diffusion.streams import Stream
from bench.nets.ema import ema_weights
from bench.training.checkpoint import load_checkpoint
from bench.training.config import RunConfig
from bench.training.evaluation import EVAL_SEED
from bench.training.state import load_weights


def tanh_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log p(x) per element in nats under DDPM's approximate normal CDF (open edge bins, probabilities ≥ 1e-12)."""
    def cdf(y):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))

    inv_std = torch.exp(-0.5 * log_var)
    hi, lo = cdf((x - mean + 1 / 255) * inv_std), cdf((x - mean - 1 / 255) * inv_std)
    return torch.where(x < -0.999, hi.clamp(min=1e-12).log(),
                       torch.where(x > 0.999, (1 - lo).clamp(min=1e-12).log(), (hi - lo).clamp(min=1e-12).log()))


@torch.no_grad()
def decoder_bits(path: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(label, exact L_0 [N], approximate L_0 [N]) in bits/dim on the checkpoint's test split."""
    ckpt = load_checkpoint(path)
    config = RunConfig(**ckpt["config"])
    variant, sched = config.build_variant(), config.build_schedule()
    if variant.continuous:
        raise SystemExit(f"{path}: a continuous-time model; its decoder is not DDPM's")
    images = load_dataset(config.dataset, "test", config.data_dir)
    net = config.build_model(variant, images.shape[1], images.shape[2])
    load_weights(net, ema_weights(ckpt["ema"]), "EMA weights")
    net.eval()
    x0 = to_data_scale(images).double()
    shape = images.shape[1:]
    noise = torch.stack([torch.randn(sched.T, *shape, generator=Stream.BOUND_NOISE.generator(EVAL_SEED, i))[0]
                         for i in range(len(images))])  # the exact bound's noise at t = 1 for each image
    t = torch.zeros(len(images), dtype=torch.long)
    x1 = sched.q_sample(x0.float(), t, noise)
    step = variant.p_mean_variance(net(x1, t).double(), sched, x1.double(), t, clip_x0=True)
    scale = -1 / (x0[0].numel() * math.log(2))
    exact = discretized_gaussian_log_likelihood(x0, step.mean, step.log_var).flatten(1).sum(1) * scale
    approx = tanh_log_likelihood(x0, step.mean, step.log_var).flatten(1).sum(1) * scale
    return f"{variant.label} ({config.dataset}, {ckpt['step']} steps)", exact, approx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    print("| model | images | L_0 exact CDF | L_0 tanh CDF | mean difference | largest |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        label, exact, approx = decoder_bits(path)
        diff = approx - exact
        print(f"| {label} | {len(exact)} | {exact.mean():.5f} | {approx.mean():.5f} | {diff.mean():+.2e} | "
              f"{diff.abs().max():.2e} |")


if __name__ == "__main__":
    main()
