"""The continuous-time bound's oracle figures (issue 21): the estimate against its closed form, L_T against L_∞,
and the schedule's shape against the estimator's variance, for Gaussian data with the analytic optimal denoiser.

Data x ~ N(μ, s² I) per dimension (μ = 0.1, s = 0.5, 1×4×4 images), the optimal ε̂* = σ(z − αμ)/(α²s² + σ²) of
tests/oracle.py (``GaussianContinuousOracle``), the schedule γ from −6 to 4 unless said otherwise; every figure is
bits/dim (nats / (D ln 2)), ± one standard error (the per-image spread over √N: images and Monte Carlo together).
"given x" is E_ε[· | x] of these very images in closed form: the estimate's gap to it is its Monte Carlo error alone.
The evaluator is ``bench.diffusion.continuous_bound.continuous_bound``.

    OMP_NUM_THREADS=1 python benchmarks/vdm_oracle.py            # N = 1024 images, 32 t per image (~1 min on CPU)
    OMP_NUM_THREADS=1 python benchmarks/vdm_oracle.py --images 128
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' analytic oracle

from oracle import (  # noqa: E402
    GaussianContinuousOracle,
    PowerSchedule,
    continuous_diffusion_closed_form,
    continuous_diffusion_given_x,
    finite_diffusion_closed_form,
    finite_diffusion_given_x,
)

from bench.diffusion.continuous import VDM_GAMMA_MAX, VDM_GAMMA_MIN, FixedLinear  # noqa: E402
from bench.diffusion.continuous_bound import continuous_bound  # noqa: E402

MU, S, SHAPE, D = 0.1, 0.5, (1, 4, 4), 16
G0, G1 = -6.0, 4.0


def bits(nats: float) -> float:
    return nats / (D * math.log(2))


def spread(x: torch.Tensor) -> float:
    return x.std().item() / math.sqrt(len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="Gaussian points (images) per estimate")
    parser.add_argument("--t-per-image", type=int, default=32, help="stratified t per image (two replicates)")
    args = parser.parse_args()
    N, K = args.images, args.t_per_image
    x = MU + S * torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    print(f"## L_∞ of the optimal denoiser: estimate vs closed form ({N} images × {K} t, bits/dim)\n")
    print("| γ₀ → γ₁ | closed form | estimate ± stderr | (estimate − closed)/stderr | given x | gap ± its stderr "
          "| stderr_mc |")
    print("|---|---|---|---|---|---|---|")
    for g0, g1 in ((G0, G1), (VDM_GAMMA_MIN, VDM_GAMMA_MAX)):
        r = continuous_bound(GaussianContinuousOracle(FixedLinear(g0, g1), MU, S), x, t_per_image=K)
        closed, est, se = bits(continuous_diffusion_closed_form(g0, g1, S, D)), r.diffusion.mean().item(), spread(
            r.diffusion)
        gap = r.diffusion - bits(continuous_diffusion_given_x(x, g0, g1, MU, S))
        print(f"| {g0:g} → {g1:g} | {closed:.4f} | {est:.4f} ± {se:.4f} | {(est - closed) / se:+.2f} "
              f"| {est - gap.mean().item():.4f} | {gap.mean().item():+.4f} ± {spread(gap):.4f} | {r.stderr_mc:.4f} |")

    oracle = GaussianContinuousOracle(FixedLinear(G0, G1), MU, S)
    continuous = bits(continuous_diffusion_closed_form(G0, G1, S, D))
    print(f"\n## L_T vs L_∞ for the same denoiser (γ {G0:g} → {G1:g}; L_∞ closed form {continuous:.4f})\n")
    print("| T | L_T closed form | L_T − L_∞ | estimate ± stderr | gap to given x ± its stderr |")
    print("|---|---|---|---|---|")
    for T in (1, 2, 4, 8, 10, 16, 100, 1000):
        closed = bits(finite_diffusion_closed_form(lambda t: G0 + (G1 - G0) * t, T, S, D))
        r = continuous_bound(oracle, x, t_per_image=K, T=T)
        gap = r.diffusion - bits(finite_diffusion_given_x(x, lambda t: G0 + (G1 - G0) * t, T, MU, S))
        print(f"| {T} | {closed:.4f} | {closed - continuous:.4f} | {r.diffusion.mean().item():.4f} "
              f"± {spread(r.diffusion):.4f} | {gap.mean().item():+.4f} ± {spread(gap):.4f} |")
    r = continuous_bound(oracle, x, t_per_image=K)
    gap = r.diffusion - bits(continuous_diffusion_given_x(x, G0, G1, MU, S))
    print(f"| ∞ | {continuous:.4f} | 0 | {r.diffusion.mean().item():.4f} ± {spread(r.diffusion):.4f} "
          f"| {gap.mean().item():+.4f} ± {spread(gap):.4f} |")

    print(f"\n## The schedule's shape between fixed end points (γ {G0:g} → {G1:g}; closed form {continuous:.4f})\n")
    print("| shape | estimate ± stderr | gap to given x ± its stderr | stderr_mc | Monte Carlo variance of one "
          "image's diffusion estimate (bits/dim)² |")
    print("|---|---|---|---|---|")
    given = bits(continuous_diffusion_given_x(x, G0, G1, MU, S))
    shapes = {"linear (FixedLinear)": FixedLinear(G0, G1), "γ₀ + Δt³ (slow start)": PowerSchedule(G0, G1),
              "γ₁ − Δ(1 − t)³ (fast start)": PowerSchedule(G0, G1, flipped=True)}
    for name, schedule in shapes.items():
        r = continuous_bound(GaussianContinuousOracle(schedule, MU, S), x, t_per_image=K)
        gap = r.diffusion - given
        print(f"| {name} | {r.diffusion.mean().item():.4f} ± {spread(r.diffusion):.4f} | {gap.mean().item():+.4f} "
              f"± {spread(gap):.4f} | {r.stderr_mc:.4f} | {gap.var().item():.4f} |")


if __name__ == "__main__":
    main()
