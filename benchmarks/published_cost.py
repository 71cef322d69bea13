"""What evaluating a published model costs: each published CIFAR-10 network's measured forward throughput, and the
wall time of the bound, its estimate and FID-50k projected from it.

For each published architecture, built from the project's presets (random weights: the time of a forward does not
depend on their values):

- improved-diffusion CIFAR-10 (``iddpm-cifar10``: 128 channels, 3 residual blocks, attention at 16 and 8 with 4
  heads, scale-shift norm; learned Σ, so 6 output channels), T = 4000;
- DDPM CIFAR-10 (``ddpm-cifar10``: Ho et al.'s 35.7M network; 3 output channels), T = 1000;

it measures the network's forward throughput in images per second (one image = one (image, t) pair, one network call)
at a batch size, in fp32, and on CUDA also under bf16 autocast. Then it projects, as network calls ÷ that measured
throughput (the network's time only: the bound's Gaussian terms, data loading and the FID's Inception features are
left out; they are small beside T network calls per image):

- the exact bound: N test images × T calls, for N = 10,000 (the CIFAR-10 test split) and 1,000 (improved-diffusion's
  NLL script's default);
- the unbiased estimate: N × eval_calls calls (the project's default eval_calls, RunConfig);
- FID-50k: 50,000 samples × the sampler's steps, all T and strided to 250 and 100.

    python benchmarks/published_cost.py                       # on cuda if present, batch 256
    OMP_NUM_THREADS=1 python benchmarks/published_cost.py --quick --device cpu   # batch 2, 2 repeats: a smoke test

Printed tables are Markdown: what was measured (device, batch, dtype, images/s), then what is projected.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.nets.unet import build_network, count_parameters
from bench.runtime.devices import resolve_device, synchronize
from bench.training.config import RunConfig

CIFAR10_TEST_IMAGES = 10_000
IDDPM_NLL_IMAGES = 1_000  # improved-diffusion's scripts/image_nll.py --num_samples default
FID_SAMPLES = 50_000
STRIDED_STEPS = (250, 100)  # sampler steps besides all T (strided, iDDPM respacing)


@dataclass(frozen=True)
class Published:
    name: str  # as the tables print it
    preset: str  # bench.nets.unet.NETWORK_PRESETS
    out_channels: int
    T: int


PUBLISHED = (Published("improved-diffusion CIFAR-10", "iddpm-cifar10", 6, 4000),
             Published("DDPM CIFAR-10", "ddpm-cifar10", 3, 1000))


@dataclass(frozen=True)
class Measured:
    model: Published
    parameters: int
    device: str
    batch: int
    dtype: str
    images_per_sec: float


def measure(model: Published, device: torch.device, batch: int, dtype: str, warmup: int, repeats: int) -> Measured:
    """Forward passes per second × batch of ``model``'s network on 3×32×32 inputs at random t, in eval mode."""
    net = build_network(model.preset, 3, model.out_channels, 32).to(device).eval()
    channels_last = device.type == "cuda"  # as the evaluation runs on CUDA (RunConfig.channels_last unset)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, model.T, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            net(x, t)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
        synchronize(device)
        seconds = time.perf_counter() - start
    return Measured(model, count_parameters(net), _device_name(device), batch, dtype, batch * repeats / seconds)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def jobs(model: Published, eval_calls: int) -> list[tuple[str, int]]:
    """(what, network calls) of each projected job for ``model``."""
    out = [(f"exact bound, {n:,} test images × {model.T} t", n * model.T)
           for n in (CIFAR10_TEST_IMAGES, IDDPM_NLL_IMAGES)]
    n = CIFAR10_TEST_IMAGES
    out.append((f"estimate, {n:,} test images × {eval_calls} calls", n * eval_calls))
    for steps in (model.T, *(s for s in STRIDED_STEPS if s < model.T)):
        out.append((f"FID-50k, {FID_SAMPLES:,} samples × {steps} steps", FID_SAMPLES * steps))
    return out


def duration(seconds: float) -> str:
    """'42.0 s', '12.5 min', '3.2 h' or '1.5 d'."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def tables(measured: list[Measured], eval_calls: int) -> str:
    lines = ["Measured: the network's forward throughput (one image = one network call on one (image, t) pair).", "",
             "| network | parameters | T | device | batch | dtype | images/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m.model.name} | {m.parameters:,} | {m.model.T} | {m.device} | {m.batch} | {m.dtype} "
              f"| {m.images_per_sec:,.1f} |" for m in measured]
    lines += ["", "Projected (a projection, not a measurement): wall time = network calls ÷ the measured images/s "
              f"above, on the same device; eval_calls = {eval_calls} (the project's default).", "",
              "| network | dtype | job | network calls | images/s | projected wall time |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m.model.name} | {m.dtype} | {what} | {calls:,} | {m.images_per_sec:,.1f} "
              f"| {duration(calls / m.images_per_sec)} |"
              for m in measured for what, calls in jobs(m.model, eval_calls)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default: 256 on CUDA, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 warm-up and 2 timed forwards (a smoke test)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (2 if args.quick else 256 if cuda else 8)
    repeats = args.repeats or (2 if args.quick else 20 if cuda else 3)
    warmup = 1 if args.quick else 3
    if cuda:
        torch.backends.cudnn.benchmark = True
    dtypes = ("fp32", "bf16") if cuda else ("fp32",)
    measured = [measure(model, device, batch, dtype, warmup, repeats) for model in PUBLISHED for dtype in dtypes]
    print(tables(measured, RunConfig().eval_calls))


if __name__ == "__main__":
    main()
