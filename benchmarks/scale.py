"""How fast the headline job runs on this machine's device, and how long DDPM's whole job would take.

For a network preset (default ``ddpm-cifar10``, 3×32×32 images) on the device it finds (CUDA if present,
else CPU), it times, through the suite's own code paths:

- training steps (``variant.loss`` → backward → grad clip → AdamW → EMA), at fp32, under bf16 autocast,
  and under bf16 autocast with ``torch.compile``;
- the exact bound (``bench.diffusion.bound.bits_per_dim``: every (image, t) pair, noise drawn as the real
  evaluation draws it), converted to images/s of the whole bound: pairs/s ÷ T;
- ancestral sampling (``bench.diffusion.sample.sample`` with a reduced step count), converted to images/s of a
  full T-step chain: network calls/s ÷ T.

Each row shows the model FLOP utilisation: FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``
on one forward (training ≈ 3× forward), against the device's dense peak from the vendor's datasheet
(``n/a`` for a device not in the table, the CPU included). Then the projected wall time of DDPM's job
(Ho et al. 2020 on CIFAR-10): 800k steps × 128 images, the exact bound on the 10k test images, FID on
50k samples with all 1000 steps. The targets printed beside the figures are for one H100.

    python benchmarks/scale.py                 # ddpm-cifar10, batch 128, on cuda if present
    python benchmarks/scale.py --skip-compile  # without the bf16+compile row (its compile takes minutes)
    OMP_NUM_THREADS=1 python benchmarks/scale.py --smoke   # tiny preset, 1×8×8, a few iterations, on CPU

Evaluation and sampling run at the job's own settings: the run config's precision rule (bf16 on CUDA,
fp32 elsewhere), channels_last on CUDA, no compile (the trainer evaluates the uncompiled EMA copy), and the
cifar10 config's batch sizes. Printed tables are Markdown, ready to paste.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.diffusion.bound import bits_per_dim
from bench.diffusion.gaussian import to_data_scale
from bench.diffusion.sample import sample
from bench.nets.unet import NETWORK_PRESETS, build_network, count_parameters
from bench.runtime.context import Runtime
from bench.runtime.devices import resolve_device
from bench.training.config import make_config
from variants import VARIANTS, get_variant

CIFAR10_TEST_IMAGES = 10_000
# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, per GPU. "tf32" is the tensor-core
# rate fp32 convolutions/matmuls get when TF32 is allowed. Names are matched by torch.cuda.get_device_name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
TARGETS = {"training": 5_000, "exact bound": 20, "sampling": 20}  # images/s on one H100 (issue 10)


def peak_for(device: torch.device) -> tuple[str | None, dict[str, float] | None]:
    """The datasheet entry for ``device``, or (None, None) when it is not one we know (never guessed)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    if "H200" in name and "NVL" not in name:
        key = "H200 SXM"
    elif "H100" in name and "PCIE" in name.upper():
        key = "H100 PCIe"
    elif "H100" in name and ("HBM3" in name or "SXM" in name):  # "NVIDIA H100 80GB HBM3" is the SXM5 part
        key = "H100 SXM"
    elif "A100" in name:
        key = "A100"
    else:
        return None, None
    return key, PEAK_TFLOPS[key]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(NETWORK_PRESETS), help="network (default ddpm-cifar10)")
    p.add_argument("--variant", default="simple", choices=sorted(VARIANTS), help="objective (default: the headline's)")
    p.add_argument("--batch-size", type=int, default=None, help="training images per step (default 128)")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="(image, t) pairs per network call in the bound (default: the cifar10 config's)")
    p.add_argument("--sample-batch-size", type=int, default=None, help="images sampled at once (default 256)")
    p.add_argument("--channels", type=int, default=None, help="image channels (default 3)")
    p.add_argument("--image-size", type=int, default=None, help="image height = width (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each row (default 5)")
    p.add_argument("--bound-images", type=int, default=None, help="images whose exact bound is timed (default 8)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps timed (default 20 of the T)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout (default: on CUDA, as the trainer)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the bf16+compile training row")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, 1×8×8 images, batch 8, a couple of iterations, no compile: checks the script")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = {"preset": "tiny", "batch_size": 8, "eval_batch_size": 256, "sample_batch_size": 8, "channels": 1,
             "image_size": 8, "steps": 2, "warmup": 1, "bound_images": 1, "sample_steps": 2}
    full = {"preset": "ddpm-cifar10", "batch_size": 128, "eval_batch_size": make_config("cifar10").eval_batch_size,
            "sample_batch_size": 256, "channels": 3, "image_size": 32, "steps": 30, "warmup": 5, "bound_images": 8,
            "sample_steps": 20}
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.skip_compile = True
    return args


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Autocast(torch.nn.Module):
    """The network under bf16 autocast (or none), returning fp32, as the trainer wraps it."""

    def __init__(self, net: torch.nn.Module, device: torch.device, bf16: bool):
        super().__init__()
        self.net, self.device_type, self.bf16 = net, device.type, bf16

    def forward(self, x, t):
        with torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext():
            return self.net(x, t).float()


def forward_flops(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """FLOPs of one image's forward pass (FlopCounterMode counts matmuls, convolutions, attention; 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device))
    return float(counter.get_total_flops())


@dataclass
class Row:
    name: str
    kind: str  # "training", "exact bound" or "sampling": which target applies
    batch: int
    images_per_sec: float | None  # None: skipped
    flops_per_image: float  # whole job per image: 3F for a training image, T·F for a bound or a sample
    precision: str  # which peak applies: bf16, tf32 or fp32
    note: str = ""


def build(args, variant, shape, device, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    net = build_network(args.preset, shape[0], variant.out_channels(shape[0]), shape[1]).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def time_training(args, config, variant, sched, shape, device, channels_last, bf16: bool,
                  compile: bool) -> tuple[float, str]:
    """Images/s of training steps as the trainer takes them (loss, backward, clip, fused AdamW on CUDA, EMA)."""
    net = build(args, variant, shape, device, channels_last)
    ema = copy.deepcopy(net).requires_grad_(False)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)
    model = Autocast(torch.compile(net) if compile else net, device, bf16)
    images = torch.randint(0, 256, (args.batch_size, *shape), dtype=torch.uint8, device=device)
    x0 = to_data_scale(images)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    params, ema_params = list(net.parameters()), list(ema.parameters())

    def steps(n: int) -> None:
        for _ in range(n):
            loss = variant.loss(model, sched, x0).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - config.ema_decay)

    warm = timed(lambda: steps(args.warmup), device)
    seconds = timed(lambda: steps(args.steps), device)
    note = f"warm-up incl. compile {warm:.0f} s" if compile else ""
    return args.steps * args.batch_size / seconds, note


def time_bound(args, variant, sched, shape, device, channels_last, bf16: bool) -> float:
    """Images/s of the exact bound (all T pairs per image) through bench.diffusion.bound.bits_per_dim."""
    model = Autocast(build(args, variant, shape, device, channels_last).eval(), device, bf16)
    images = torch.randint(0, 256, (args.bound_images, *shape), dtype=torch.uint8)
    runtime = Runtime(device, batch_size=args.eval_batch_size)
    bits_per_dim(model, variant, sched, images[:1], seed=args.seed, runtime=runtime)  # warm-up
    seconds = timed(lambda: bits_per_dim(model, variant, sched, images, seed=args.seed, runtime=runtime), device)
    pairs = args.bound_images * sched.T
    return pairs / seconds / sched.T


def time_sampling(args, variant, sched, shape, device, channels_last, bf16: bool) -> float:
    """Images/s of full T-step ancestral chains, from ``sample_steps`` strided steps of
    bench.diffusion.sample.sample."""
    model = Autocast(build(args, variant, shape, device, channels_last).eval(), device, bf16)
    n, k = args.sample_batch_size, args.sample_steps

    def run(steps: int) -> None:
        sample(model, variant, sched, n, shape, steps, seed=args.seed, runtime=Runtime(device, batch_size=n))

    run(2)  # warm-up
    seconds = timed(lambda: run(k), device)
    return n * k / seconds / sched.T  # network calls/s ÷ T calls per image


# ----------------------------------------------------------------------------- printing
def fmt_rate(v: float | None) -> str:
    if v is None:
        return "skipped"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}" if v >= 1 else f"{v:.3g}"


def fmt_duration(seconds: float) -> str:
    """Three significant figures in the largest fitting unit of s, min, h, d."""
    if not math.isfinite(seconds):
        return "n/a"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def mfu(row: Row, peaks: dict[str, float] | None) -> tuple[str, str]:
    """(achieved TFLOP/s, utilisation against the peak of the row's precision, or n/a)."""
    if row.images_per_sec is None:
        return "skipped", "skipped"
    achieved = row.images_per_sec * row.flops_per_image / 1e12
    if peaks is None:
        return f"{achieved:.3g}", "n/a"
    peak = peaks[row.precision]
    return f"{achieved:.3g}", f"{100 * achieved / peak:.1f}% of {peak:g} ({row.precision})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    job = make_config("cifar10")  # DDPM's job: steps, batch, T, the optimiser, FID samples
    config = make_config("cifar10", network=args.preset)
    sched, variant = config.build_schedule(), get_variant(args.variant)
    T = sched.T
    shape = (args.channels, args.image_size, args.image_size)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    eval_bf16 = device.type == "cuda"  # the run config's "auto" precision: bf16 autocast on CUDA
    fp32_peak = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    probe = build(args, variant, shape, device, channels_last)
    flops = forward_flops(probe, shape, device)
    params = count_parameters(probe)
    del probe
    peak_name, peaks = peak_for(device)

    rows = []
    for name, bf16, compile in (("training fp32", False, False), ("training bf16", True, False),
                                ("training bf16+compile", True, True)):
        if compile and args.skip_compile:
            rows.append(Row(name, "training", args.batch_size, None, 3 * flops, "bf16", "--skip-compile"))
            continue
        rate, note = time_training(args, config, variant, sched, shape, device, channels_last, bf16, compile)
        rows.append(Row(name, "training", args.batch_size, rate, 3 * flops, "bf16" if bf16 else fp32_peak, note))
    eval_precision = "bf16" if eval_bf16 else fp32_peak
    rows.append(Row(f"exact bound ({eval_precision}, all {T} t)", "exact bound", args.eval_batch_size,
                    time_bound(args, variant, sched, shape, device, channels_last, eval_bf16), T * flops,
                    eval_precision, f"{args.bound_images} images timed"))
    rows.append(Row(f"sampling ({eval_precision}, {T} steps)", "sampling", args.sample_batch_size,
                    time_sampling(args, variant, sched, shape, device, channels_last, eval_bf16), T * flops,
                    eval_precision, f"{args.sample_steps} of {T} steps timed"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    if device.type == "cuda":
        print(f"TF32: convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
              f"matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (torch defaults unless changed)")
    if peaks is None:
        print("peak: n/a (not in the datasheet table; MFU not shown)")
    else:
        print(f"peak ({peak_name}, dense, datasheet): " + ", ".join(f"{k} {v:g} TFLOP/s" for k, v in peaks.items()))
    print(f"network: {args.preset}, {params:,} parameters, {'×'.join(map(str, shape))} images, "
          f"{flops / 1e9:.3g} GFLOP per image forward (FlopCounterMode); variant {variant.label}, T = {T}, "
          f"channels_last {'on' if channels_last else 'off'}")
    print()
    print("| measurement | batch | images/s | TFLOP/s | MFU | target (one H100) | note |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        achieved, util = mfu(row, peaks)
        print(f"| {row.name} | {row.batch} | {fmt_rate(row.images_per_sec)} | {achieved} | {util} | "
              f"≥ {TARGETS[row.kind]:,} | {row.note} |")

    trained = [r for r in rows if r.kind == "training" and r.images_per_sec]
    best = max(trained, key=lambda r: r.images_per_sec)
    bound, sampling = rows[-2], rows[-1]
    train_images = job.steps * job.batch_size
    parts = [
        ("training", f"{job.steps:,} steps × {job.batch_size} images", best.name, train_images / best.images_per_sec),
        ("exact bound", f"{CIFAR10_TEST_IMAGES:,} test images × {T} t ({CIFAR10_TEST_IMAGES * T / 1e6:g}M calls)",
         bound.name, CIFAR10_TEST_IMAGES / bound.images_per_sec),
        ("FID samples", f"{job.fid_samples:,} samples × {T} steps ({job.fid_samples * T / 1e6:g}M calls)",
         sampling.name, job.fid_samples / sampling.images_per_sec),
    ]
    print()
    print(f"Projected wall time of DDPM's job on this device ({args.preset} at these rates):")
    print()
    print("| part | work | at | wall time |")
    print("|---|---|---|---|")
    for part, work, at, seconds in parts:
        print(f"| {part} | {work} | {at} | {fmt_duration(seconds)} |")
    print(f"| total | | | {fmt_duration(sum(p[3] for p in parts))} |")


if __name__ == "__main__":
    main()
