"""Ancestral sampling through a variant's reverse process, with all T steps or strided (iDDPM).

Strided sampling keeps K of the T timesteps, S = {s_1 < … < s_K} (evenly spaced, s_K = T), and
uses the schedule those steps define: ᾱ'_k = ᾱ_{s_k}, β'_k = 1 − ᾱ'_k/ᾱ'_{k−1}. The network is
called with the original timestep s_k and its output read on the original chain (x̂_0 from ε_θ, or
from μ_θ through the original one-step posterior); the jump's mean is the strided chain's posterior
mean at that x̂_0, and every variance (fixed or learned-range) is re-derived from the new β' and β̃',
as iDDPM's respacing does (:meth:`bench.diffusion.variant.Variant.p_mean_variance_strided`). A variant with
DDPM's learned diagonal Σ has no multi-step variance, so it is sampled with all T steps whatever was
asked, and the sampler's description says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.diffusion.schedule import Schedule
from bench.diffusion.streams import Stream
from bench.diffusion.variant import Variant
from bench.errors import BenchError
from bench.runtime.context import LOCAL, Runtime, evaluating
from bench.runtime.progress import Progress


@dataclass(frozen=True)
class Respaced:
    """A schedule over a subset of timesteps and the original 0-based index of each of its steps."""

    sched: Schedule
    timesteps: torch.Tensor  # long [K]: original index of respaced index k


def respace(sched: Schedule, steps: int | None) -> Respaced:
    """Keep ``steps`` evenly spaced timesteps of ``sched`` (all of them when None or T)."""
    T = sched.T
    if steps is None or steps == T:
        return Respaced(sched, torch.arange(T))
    if not 2 <= steps <= T:
        raise BenchError(f"sample steps must be between 2 and T = {T}, got {steps}")
    keep = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique()
    ab = sched.alphas_cumprod[keep]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    spec = {**sched.spec, "respaced_steps": steps}
    return Respaced(Schedule(1 - ab / prev, spec), keep)


def sampler_steps(variant: Variant, steps: int | None) -> int | None:
    """The steps ``sample`` takes when asked for ``steps``: all T (None) for a variant that cannot stride."""
    return steps if variant.strides else None


def describe_sampler(sched: Schedule, steps: int | None, variant: Variant) -> str:
    """How ``variant``'s samples were drawn when ``steps`` were asked, for tags: e.g. ``ancestral, 1000 of
    1000 steps``, ``ancestral, 250 of 1000 steps (strided, iDDPM respacing; x̂_0 read on the original chain)``."""
    taken = sampler_steps(variant, steps)
    n = sched.T if taken is None else taken
    text = f"ancestral, {n} of {sched.T} steps"
    if n != sched.T:
        return text + " (strided, iDDPM respacing; x̂_0 read on the original chain)"
    if steps is not None and steps != sched.T:
        return text + (f" ({steps} asked; a learned per-step diagonal Σ has no multi-step variance, "
                       "so all T steps are taken)")
    return text


@torch.no_grad()
def sample(
    model,
    variant: Variant,
    sched: Schedule,
    n: int,
    shape: tuple[int, int, int],
    steps: int | None = None,
    *,
    seed: int = 0,
    clip_x0: bool = True,
    runtime: Runtime = LOCAL,
) -> torch.Tensor:
    """Draw ``n`` images [n, C, H, W] as uint8 from p(x_T) = N(0, I) down to x_0.

    Each step draws x_{t−1} ~ N(μ_θ, σ_t²) (no noise at the last step); x̂_0 is clipped to [−1, 1]
    (``clip_x0``) as DDPM samples. Images are returned at the mean of the last step, quantised.

    Samples come in blocks of ``runtime.batch_size`` (default 256); block k draws all its noise (x_T, then
    each step's) on ``runtime.device`` from its stream (:attr:`Stream.SAMPLES`, keyed by (seed, k)), so sample
    j depends on (seed, j, batch size) only. Under torch.distributed (``runtime.dist``) each rank draws a
    contiguous block of the blocks and every rank gets all ``n`` samples, the same as one process draws. The
    reverse steps run in float32 (``runtime.precision`` is for the likelihoods' terms).
    """
    if n < 1:
        raise BenchError(f"the number of samples must be >= 1, got {n}")
    plan = respace(sched, sampler_steps(variant, steps))
    strided = len(plan.timesteps) != sched.T
    runtime = runtime.resolve(model, batch_size=256)
    device, dist, batch_size = runtime.device, runtime.dist, runtime.batch_size
    mine = dist.block(n, unit=batch_size)
    timesteps = plan.timesteps.to(device)
    out = [torch.empty(0, *shape, dtype=torch.uint8)]
    with evaluating(model):
        bar = Progress(len(mine), runtime.label(f"sampling ({describe_sampler(sched, steps, variant)})"), "image",
                       runtime.shows_progress)
        every = max(1, len(plan.timesteps) // 20)  # the reverse step within a batch, shown 20 times per batch
        for start in range(mine.start, mine.stop, batch_size):
            b = min(batch_size, n - start)
            g = Stream.SAMPLES.generator(seed, start // batch_size, device=device)
            x = torch.randn(b, *shape, generator=g, device=device)
            for k in reversed(range(len(plan.timesteps))):
                if k % every == 0:
                    bar.set_postfix_str(f"{b} in flight, reverse step {len(plan.timesteps) - k}/{len(plan.timesteps)}")
                t = timesteps[k].expand(b)
                net_out = model(x, t).float()
                if strided:
                    k_b = torch.full((b,), k, device=device, dtype=torch.long)
                    step = variant.p_mean_variance_strided(net_out, sched, plan.sched, x, t, k_b, clip_x0=clip_x0)
                else:
                    step = variant.p_mean_variance(net_out, sched, x, t, clip_x0=clip_x0)
                if k > 0:
                    x = step.mean + torch.exp(0.5 * step.log_var) * torch.randn(b, *shape, generator=g, device=device)
                else:
                    x = step.mean
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
            bar.update(b)
        bar.set_postfix_str("")
        bar.close()
    return dist.gather(torch.cat(out), n, unit=batch_size)
