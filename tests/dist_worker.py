"""Run by tests/test_distributed.py as ``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT``:
the exact bound, the estimate and samples of one model, shared over the ranks and computed by rank 0 alone,
written by rank 0 to OUT (a torch file of plain tensors) for the test to compare."""

from __future__ import annotations

import sys

import torch
from nets import nonzero_network, output_scale  # tests/nets.py: this script runs from tests/

from bench.data.datasets import load_dataset
from bench.diffusion.bound import bits_per_dim, estimate_bits_per_dim
from bench.diffusion.sample import sample
from bench.diffusion.schedule import Schedule
from bench.runtime import dist
from bench.runtime.context import Runtime
from variants import get_variant


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
        flat["world"] = torch.tensor(d.world)
        flat["output_scale"] = torch.tensor(output_scale(net, 1, 8, sched.T))
        torch.save(flat, out)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
