"""Sampling and the probability-flow ODE of a continuous-time model (VDM): the network ε̂(z_t; t) and its own
noise schedule γ(t) (:class:`bench.diffusion.continuous.ContinuousDenoiser`).

**Ancestral sampling** (:func:`sample_continuous`) takes N equal steps t = i/N → s = (i − 1)/N from z_1 ~ N(0, I),
each a draw from p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t)), x̂ = (z_t − σ_t ε̂)/α_t, as VDM's sampler does; the
image is then drawn from VDM's 256-way decoder p(x | z_0) (:func:`bench.diffusion.continuous.decoder_logits`).
The step, derived from z_t = α_{t|s} z_s + σ_{t|s} ε' with α_{t|s} = α_t/α_s and σ_{t|s}² = σ_t² − α_{t|s}² σ_s²:
write c = 1 − SNR_t/SNR_s = −expm1(γ_s − γ_t) ∈ (0, 1), so σ_{t|s}² = σ_t² c. The Gaussian posterior is

  q(z_s | z_t, x) = N(α_{t|s} σ_s²/σ_t² · z_t + α_s c · x,  σ_s² c),

and since α_{t|s} σ_s²/σ_t² = (α_s/α_t)(1 − c), putting x = x̂ gives the mean (α_s/α_t)(z_t − σ_t c ε̂):

  z_s = (α_s/α_t)(z_t − σ_t c ε̂) + σ_s √c · ε,  ε ~ N(0, I)

(VDM's ``sample`` computes the same with ``c = -expm1(gamma_s - gamma_t)``). No clipping of x̂.

**The probability-flow ODE** (:func:`nll_ode_continuous`) reads the model's own schedule as the VP-SDE
dz = −½β(s) z ds + √β(s) dW with β(s) = d(−log α_s²)/ds = γ'(s)·sigmoid(γ(s)) (:class:`GammaSde`): started at
z_0 = α_0 x + σ_0 ε its marginals are q(z_s | x) = N(α_s x, σ_s²) at every s ∈ [0, 1]. The score is −ε̂/σ_s
(:func:`continuous_score`); the solve is :func:`bench.diffusion.ode.flow_nll`'s, with its options, streams and
rank layout.

γ and every step coefficient are float64 (float32 on MPS), the state z float32; never bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.diffusion.continuous import NoiseSchedule, decoder_logits, find_denoiser
from bench.diffusion.ode import NllResult, OdeOptions, ScoreFn, flow_nll, network_dtype
from bench.diffusion.streams import Stream
from bench.errors import BenchError
from bench.runtime.context import LOCAL, Runtime, default_precision, evaluating
from bench.runtime.progress import Progress

HALF_DTYPES = (torch.float16, torch.bfloat16)


def describe_continuous_sampler(steps: int) -> str:
    """How :func:`sample_continuous` draws, for the tag ``fid_sampler``."""
    return (f"ancestral, {steps} steps of the continuous-time model (p(z_s|z_t) = q(z_s|z_t, x̂)), "
            "x ~ p(x|z_0) from the 256-way decoder")


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BenchError(f"the continuous-time sampler needs an integer number of steps >= 1, got {steps!r}")
    return steps


@dataclass(frozen=True)
class StepTable:
    """The N steps' coefficients, float64 on the CPU, index i − 1 for the step t = i/N → s = (i − 1)/N:
    z_s = ``scale``·(z_t − ``eps_coef``·ε̂) + ``noise_std``·ε."""

    times: torch.Tensor  # [N + 1] t = i/N, i = 0..N
    gamma_0: float  # γ(0), for the decoder
    scale: torch.Tensor  # [N] α_s/α_t
    eps_coef: torch.Tensor  # [N] σ_t·c, c = −expm1(γ_s − γ_t)
    noise_std: torch.Tensor  # [N] σ_s·√c


def step_table(schedule: NoiseSchedule, steps: int, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> StepTable:
    """The coefficients of :func:`sample_continuous`'s ``steps`` steps under ``schedule`` (γ evaluated in ``dtype``
    on ``device``, where the schedule's parameters are; float32 or float64 only)."""
    steps = _check_steps(steps)
    times = torch.arange(steps + 1, dtype=dtype, device=device) / steps
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        gamma = schedule.gamma(times).detach().to("cpu", torch.float64)
    g_s, g_t = gamma[:-1], gamma[1:]
    log_a2, log_s2 = torch.nn.functional.logsigmoid(-gamma), torch.nn.functional.logsigmoid(gamma)
    c = -torch.expm1(g_s - g_t)
    return StepTable(times=times.to("cpu", torch.float64), gamma_0=float(gamma[0]),
                     scale=torch.exp(0.5 * (log_a2[:-1] - log_a2[1:])), eps_coef=torch.exp(0.5 * log_s2[1:]) * c,
                     noise_std=torch.exp(0.5 * log_s2[:-1]) * c.sqrt())


def reverse_chain(model, z: torch.Tensor, table: StepTable, normal: Callable[[], torch.Tensor],
                  on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """z_1 [B, C, H, W] (float32) carried down the table's steps to z_0: each step calls ``model(z, t)`` once (t
    [B] float64, float32 on MPS) and takes its noise from ``normal()`` (N(0, I), z's shape); ``on_step(k)`` is told
    before step k (1-based, in the order taken)."""
    steps = len(table.scale)
    t_dtype = torch.float32 if z.device.type == "mps" else torch.float64
    for k, i in enumerate(range(steps, 0, -1), start=1):
        if on_step is not None:
            on_step(k)
        t = torch.full((z.shape[0],), float(table.times[i]), dtype=t_dtype, device=z.device)
        eps_hat = model(z, t).float()
        j = i - 1
        z = float(table.scale[j]) * (z - float(table.eps_coef[j]) * eps_hat)
        z = z + float(table.noise_std[j]) * normal()
    return z


def decode_pixels(z0: torch.Tensor, gamma_0: float, uniforms: torch.Tensor) -> torch.Tensor:
    """8-bit pixels k [B, C, H, W] (uint8) drawn from VDM's decoder p(x | z_0) by the inverse CDF of each pixel's
    256-way softmax at its uniform in [0, 1) (``uniforms``, z0's shape), in float64 (float32 on MPS)."""
    dtype = default_precision(z0.device)
    probs = torch.softmax(decoder_logits(z0.to(dtype), torch.tensor(gamma_0, dtype=dtype, device=z0.device)), -1)
    cdf = torch.cumsum(probs, dim=-1)
    u = uniforms.to(dtype).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=255).to(torch.uint8)


@torch.no_grad()
def sample_continuous(model, n: int, shape: tuple[int, int, int], steps: int, *, seed: int = 0,
                      runtime: Runtime = LOCAL) -> torch.Tensor:
    """Draw ``n`` images [n, C, H, W] as uint8 with ``steps`` ancestral steps of the continuous-time ``model``
    (module docstring): z_1 ~ N(0, I), p(z_s | z_t) = q(z_s | z_t, x̂) for t = i/N, s = (i − 1)/N, then the
    pixels k ~ p(x | z_0) from the 256-way decoder. γ comes from ``find_denoiser(model).schedule``; ``model`` is
    called as ``model(z, t)`` with t float [B], in eval mode (restored afterwards).

    Samples come in blocks of ``runtime.batch_size`` (default 256) as in :func:`bench.diffusion.sample.sample`:
    block k draws all its noise (z_1, each step's, then the decoder's uniforms) on ``runtime.device`` from its
    stream (:attr:`Stream.SAMPLES`, keyed by (seed, k)), always for a full block (a short last block keeps the
    first rows), so sample j depends on (seed, j, batch size) only, not on ``n``; under ``runtime.dist`` each
    rank draws a contiguous block of the blocks and every rank gets all ``n``.
    """
    if n < 1:
        raise BenchError(f"the number of samples must be >= 1, got {n}")
    steps = _check_steps(steps)
    runtime = runtime.resolve(model, batch_size=256)
    device, dist, batch_size = runtime.device, runtime.dist, runtime.batch_size
    table = step_table(find_denoiser(model).schedule, steps, default_precision(device), device)
    mine = dist.block(n, unit=batch_size)
    out = [torch.empty(0, *shape, dtype=torch.uint8)]
    with evaluating(model):
        bar = Progress(len(mine), runtime.label(f"sampling ({describe_continuous_sampler(steps)})"), "image",
                       runtime.shows_progress)
        every = max(1, steps // 20)  # the reverse step within a batch, shown 20 times per batch
        for start in range(mine.start, mine.stop, batch_size):
            b = min(batch_size, n - start)
            g = Stream.SAMPLES.generator(seed, start // batch_size, device=device)

            def show(k: int, b: int = b) -> None:
                if k % every == 0 or k == 1:
                    bar.set_postfix_str(f"{b} in flight, reverse step {k}/{steps}")

            def normal(g: torch.Generator = g, b: int = b) -> torch.Tensor:
                return torch.randn(batch_size, *shape, generator=g, device=device)[:b]

            z0 = reverse_chain(model, normal(), table, normal, on_step=show)
            uniforms = torch.rand(batch_size, *shape, generator=g, device=device, dtype=default_precision(device))[:b]
            out.append(decode_pixels(z0, table.gamma_0, uniforms).cpu())
            bar.update(b)
        bar.set_postfix_str("")
        bar.close()
    return dist.gather(torch.cat(out), n, unit=batch_size)


# --------------------------------------------------------------------- the probability-flow ODE of γ(t)
@dataclass(frozen=True, eq=False)
class GammaSde:
    """The VP-SDE of a continuous-time schedule: β(s) = d(−log α_s²)/ds = γ'(s)·sigmoid(γ(s)) on s ∈ [0, 1],
    so that from z_0 = α_0 x + σ_0 ε its marginal at s is q(z_s | x) = N(α_s x, σ_s² I). The interface
    :func:`bench.diffusion.ode.flow_nll` reads (as from :class:`bench.diffusion.ode.VpSde`)."""

    schedule: NoiseSchedule

    def _gamma_and_slope(self, s: float) -> tuple[float, float]:
        param = next(self.schedule.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = default_precision(device)
        with torch.autocast(device.type, enabled=False):
            gamma, slope = self.schedule.gamma_and_slope(torch.tensor([s], dtype=dtype, device=device))
        return float(gamma.detach()), float(slope.detach())

    def gamma(self, s: float) -> float:
        """γ(s), float64."""
        return self._gamma_and_slope(s)[0]

    def beta(self, s: float) -> float:
        """β(s) = γ'(s)·sigmoid(γ(s)), float64."""
        gamma, slope = self._gamma_and_slope(s)
        return slope / (1 + math.exp(-gamma))

    def index(self, s: float) -> int:
        """s on a 1000-step scale (round(1000 s)), for an error message: the network is conditioned on the
        continuous γ(s), not on an index."""
        return round(1000 * s)

    def describe(self) -> str:
        """The process, for the tag ``nll_ode_method``: the model's own γ(t) and its end points."""
        g0, g1 = self.schedule.endpoints()
        return f"VP-SDE of the model's own γ(t) (γ(0) = {g0:.4g}, γ(1) = {g1:.4g})"


def continuous_score(model) -> ScoreFn:
    """The score the continuous-time ``model`` implies at s: ∇log p_s(z) ≈ −ε̂(z, s)/σ_s, σ_s² = sigmoid(γ(s)).
    The network runs in its own dtype (:func:`bench.diffusion.ode.network_dtype`: float32 for the suite's) with
    autocast off, whatever the run's precision, as :func:`bench.diffusion.ode.network_score` does; t is passed
    in z's dtype and the rest runs in z's dtype, which must be float32 or float64."""
    denoiser = find_denoiser(model)
    net_dtype = network_dtype(model)

    def score(x: torch.Tensor, s: float) -> torch.Tensor:
        if x.dtype in HALF_DTYPES or not x.is_floating_point():
            raise BenchError(f"the continuous-time score needs float32 or float64 points, got {x.dtype} "
                             "(γ(t) and the flow need the digits)")
        t = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            eps_hat = model(x.to(net_dtype), t).to(x.dtype)
            gamma = denoiser.schedule.gamma(t[:1]).detach().to(x.dtype)
        return -eps_hat / torch.sigmoid(gamma).sqrt()

    return score


def nll_ode_continuous(model, images: torch.Tensor, options: OdeOptions | None = None, *, seed: int = 0,
                       runtime: Runtime = LOCAL) -> NllResult:
    """The probability-flow NLL of ``images`` [N, C, H, W] under the continuous-time ``model``, the ODE reading the
    model's own γ(t) (:class:`GammaSde`, :func:`continuous_score`), in bits/dim: uint8 images are dequantised,
    floating points are taken as points of the density (:func:`bench.diffusion.ode.flow_nll`, which says the rest).
    ``model`` runs in eval mode (restored afterwards) on ``runtime.device`` (default: where its parameters are).
    Raises :class:`bench.diffusion.ode.FlowFailed` when the flow cannot be integrated."""
    runtime = runtime.resolve(model)
    if runtime.precision in HALF_DTYPES:
        raise BenchError(f"the ODE likelihood runs in float32 or float64, not {runtime.precision}")
    sde = GammaSde(find_denoiser(model).schedule)
    with evaluating(model):
        return flow_nll(continuous_score(model), sde, images, options, seed=seed, runtime=runtime)
