"""Time U-Net training steps (forward + backward + Adam step on an MSE loss) on the CPU.

Example (the speed goal for the ``tiny`` preset is >= 1000 images/s on a 2-core machine):

    python benchmarks/train_speed.py --preset tiny --batch-size 128 --steps 50 --warmup 5 \
        --image-size 8 --in-channels 1 --out-channels 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.nets.unet import NETWORK_PRESETS, build_network, count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(NETWORK_PRESETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2)
    p.add_argument("--num-timesteps", type=int, default=1000, help="t is drawn uniformly from [0, T)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_network(args.preset, args.in_channels, args.out_channels, args.image_size)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    b, s = args.batch_size, args.image_size
    x = torch.rand(b, args.in_channels, s, s) * 2 - 1
    target = torch.randn(b, args.out_channels, s, s)

    def step() -> float:
        t = torch.randint(0, args.num_timesteps, (b,))
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    elapsed = sum(times)
    median = statistics.median(times)

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"preset={args.preset} config={NETWORK_PRESETS[args.preset]}")
    print(
        f"in={args.in_channels} out={args.out_channels} image_size={s} batch={b} "
        f"params={count_parameters(model):,}"
    )
    print(
        f"{args.steps} steps in {elapsed:.3f} s: mean {elapsed / args.steps * 1e3:.1f} ms/step, "
        f"median {median * 1e3:.1f} ms/step"
    )
    print(f"images/s: {args.steps * b / elapsed:.0f} (mean), {b / median:.0f} (median step)")


if __name__ == "__main__":
    main()
