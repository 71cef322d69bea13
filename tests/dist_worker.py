"""Run by tests/test_distributed.py as ``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT``:
the exact bound, the estimate and samples of one model (and of a continuous-time model, with a training step's
gradient), shared over the ranks and computed by rank 0 alone,
written by rank 0 to OUT (a torch file of plain tensors) for the test to compare."""

from __future__ import annotations

import sys

import torch
from nets import nonzero_network, output_scale  # tests/nets.py: this script runs from tests/

from bench.data.datasets import load_dataset
from bench.diffusion.bound import bits_per_dim, estimate_bits_per_dim
from bench.diffusion.continuous import ContinuousDenoiser, CosineEnds, LearnedEndpoints
from bench.diffusion.continuous_bound import continuous_bound
from bench.diffusion.continuous_sample import sample_continuous
from bench.diffusion.gaussian import to_data_scale
from bench.diffusion.sample import sample
from bench.diffusion.schedule import Schedule
from bench.diffusion.weighting import build_weighting
from bench.runtime import dist
from bench.runtime.context import Runtime
from variants import get_variant


def continuous_results(d) -> dict[str, torch.Tensor]:
    """A continuous-time model (learned schedule): its bound and samples shared over the ranks, and the gradient of
    one DDP training step of `vdm` on a global batch of 8 (each rank its 4); rank 0 also computes them alone."""
    variant = get_variant("vdm")
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), LearnedEndpoints(-12.0, 4.0))
    images = load_dataset("digits", "test")[:7]
    x0 = to_data_scale(load_dataset("digits", "train")[:8])
    sched = Schedule.linear(T=40)

    def step(net, dist_) -> torch.Tensor:
        variant.distribute(dist_)
        mine = slice(dist_.rank * 4, dist_.rank * 4 + 4) if dist_.active else slice(0, 8)
        net.zero_grad()
        variant.loss(net, sched, x0[mine], torch.Generator().manual_seed(9)).loss.mean().backward()
        inner = net.module if hasattr(net, "module") else net
        return torch.cat([p.grad.flatten() for p in inner.parameters()])

    got = {"shared.vdm.bound": continuous_bound(model, images, t_per_image=6, seed=3,
                                                runtime=Runtime(batch_size=8, dist=d)).total,
           "shared.vdm.samples": sample_continuous(model, 5, (1, 8, 8), 6, seed=5,
                                                   runtime=Runtime(batch_size=2, dist=d)),
           "shared.vdm.grad": step(torch.nn.parallel.DistributedDataParallel(model), d)}
    if d.main:
        got.update({"alone.vdm.bound": continuous_bound(model, images, t_per_image=6, seed=3,
                                                        runtime=Runtime(batch_size=8)).total,
                    "alone.vdm.samples": sample_continuous(model, 5, (1, 8, 8), 6, seed=5,
                                                           runtime=Runtime(batch_size=2)),
                    "alone.vdm.grad": step(model, dist.SINGLE)})
    return got


def weighted_results(d) -> dict[str, torch.Tensor]:
    """Two DDP training steps of `weighted` (min-SNR, v-prediction, the adaptive schedule) on a global batch of 8: the
    second step's gradient and the adaptive schedule's state after both, on every rank and (rank 0) alone."""
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), CosineEnds(-12.0, 4.0), prediction="v")
    x0 = to_data_scale(load_dataset("digits", "train")[:8])
    sched = Schedule.linear(T=40)

    def two_steps(net, dist_) -> tuple[torch.Tensor, torch.Tensor]:
        variant = get_variant("weighted", weighting=build_weighting("min-snr"), adaptive=True)
        variant.distribute(dist_)
        mine = slice(dist_.rank * 4, dist_.rank * 4 + 4) if dist_.active else slice(0, 8)
        g = torch.Generator().manual_seed(9)
        for _ in range(2):  # the second step samples λ from what the first one taught the schedule
            net.zero_grad()
            variant.loss(net, sched, x0[mine], g).loss.mean().backward()
        inner = net.module if hasattr(net, "module") else net
        return torch.cat([p.grad.flatten() for p in inner.parameters()]), variant.adaptive.ema.clone()

    got = dict(zip(("shared.weighted.grad", "shared.weighted.ema"),
                   two_steps(torch.nn.parallel.DistributedDataParallel(model), d), strict=True))
    if d.main:
        got.update(zip(("alone.weighted.grad", "alone.weighted.ema"), two_steps(model, dist.SINGLE), strict=True))
    return got


def main(out: str) -> None:
    d, _ = dist.setup("cpu")
    torch.manual_seed(0)
    variant = get_variant("hybrid")  # a learned variance: both halves of the output matter
    sched = Schedule.linear(T=40)
    net = nonzero_network("tiny", 1, variant.out_channels(1), 8).eval()  # a fresh one outputs zeros
    images = load_dataset("digits", "test")[:7]  # 7 images, 280 pairs: batches of 64 split unevenly
    shared = {
        "exact": bits_per_dim(net, variant, sched, images, seed=3, runtime=Runtime(batch_size=64, dist=d)),
        "estimate": estimate_bits_per_dim(net, variant, sched, images, calls_per_image=9, seed=3,
                                          runtime=Runtime(batch_size=16, dist=d)),
        "samples": sample(net, variant, sched, 11, (1, 8, 8), steps=10, seed=5, runtime=Runtime(batch_size=4, dist=d)),
    }
    continuous = {**continuous_results(d), **weighted_results(d)}
    if d.main:
        alone = {
            "exact": bits_per_dim(net, variant, sched, images, seed=3, runtime=Runtime(batch_size=64)),
            "estimate": estimate_bits_per_dim(net, variant, sched, images, calls_per_image=9, seed=3,
                                              runtime=Runtime(batch_size=16)),
            "samples": sample(net, variant, sched, 11, (1, 8, 8), steps=10, seed=5, runtime=Runtime(batch_size=4)),
        }
        flat = {}
        for how, results in (("shared", shared), ("alone", alone)):
            for name in ("exact", "estimate"):
                r = results[name]
                flat[f"{how}.{name}.total"] = r.total
                flat[f"{how}.{name}.unclipped"] = r.other.total
            flat[f"{how}.estimate.stderr"] = torch.tensor(results["estimate"].stderr)
            flat[f"{how}.exact.per_t"] = results["exact"].per_t
            flat[f"{how}.samples"] = results["samples"]
        flat.update(continuous)
        flat["world"] = torch.tensor(d.world)
        flat["output_scale"] = torch.tensor(output_scale(net, 1, 8, sched.T))
        torch.save(flat, out)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
