"""A second likelihood: the NLL under the probability-flow ODE of the trained network (docs/MATH.md,
"The probability-flow ODE likelihood"; Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The discrete schedule is read as the VP-SDE dx = −½β(s)x ds + √β(s) dW on s ∈ [0, 1] whose marginals
at s = t/T are the chain's (:class:`VpSde`); the network gives the score (:func:`network_score`), and
the ODE dx/ds = −½β(s)(x + ∇log p_s(x)) carries a data point to s = 1, where N(0, I) gives its density.
The divergence integral is estimated with Hutchinson–Skilling probes; an adaptive solver from scipy
(``solve_ivp``) integrates the batch as one state.

This is a different estimand from the bound (``bpd``): an estimate, unbiased over probes and
dequantisation draws, of the dequantised NLL of another model (the flow) built from the same network.
Its metrics are ``nll_ode…`` and are never mixed into ``bpd``.

Noise is keyed by (seed, image index) alone (streams DEQUANTISATION and PROBES), and ranks take
contiguous blocks of whole batches (each rank's solver takes its own steps; results are gathered after
the solves), so every rank gets the numbers one process computes with the same ``batch_size``. Within one batch
the solver's steps are shared by all its images: another ``batch_size`` changes an image's number by up to the
tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from bench.diffusion.gaussian import BIN_HALF_WIDTH, bits_per_dim_from_nats
from bench.diffusion.schedule import Schedule
from bench.diffusion.streams import Stream
from bench.diffusion.variant import Variant
from bench.errors import BenchError, check_choice
from bench.runtime.context import LOCAL, Runtime, evaluating
from bench.runtime.progress import progress_of

if TYPE_CHECKING:
    from scipy.interpolate import CubicHermiteSpline

SOLVERS = ("RK45", "RK23", "DOP853")  # solve_ivp's explicit methods (implicit ones need the state's Jacobian)
PROBE_TYPES = ("rademacher", "gaussian")

ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]  # (x [B, C, H, W], s) → ∇_x log p_s(x) [B, C, H, W]


class FlowFailed(BenchError):
    """The probability flow of this network could not be integrated to s = 1: its likelihood is not computed
    (a result to record, like a diverged run)."""


class FlowDiverged(FlowFailed):
    """The flow left the finite numbers."""


class SolverFailed(FlowFailed):
    """The adaptive solver gave up before s = 1 (its step fell below what float64 resolves at some s)."""


@dataclass(frozen=True)
class OdeOptions:
    """How the probability-flow NLL is computed; validated on construction (one-line BenchError)."""

    rtol: float = 1e-5  # relative tolerance of the adaptive solver
    atol: float = 1e-5  # absolute tolerance (x on the model's [−1, 1] scale, Δ log p in nats)
    method: str = "RK45"  # scipy.integrate.solve_ivp method, one of SOLVERS
    eps: float = 1e-5  # start time s_0 of the flow, in diffusion time s ∈ (0, 1) (score_sde's 1e-5)
    probe_type: str = "rademacher"  # Hutchinson–Skilling probe law: rademacher (±1) or gaussian (N(0, 1))
    probes: int = 1  # draws per image, each with its own probe and dequantisation noise

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise BenchError(f"the ODE solver's {name} must be a number > 0, got {value!r}")
        if not _is_number(self.eps) or not 0 < self.eps < 1:
            raise BenchError(f"the ODE start time eps must lie in (0, 1) (score_sde uses 1e-5), got {self.eps!r}")
        check_choice("ODE solver", self.method, SOLVERS)
        check_choice("probe type", self.probe_type, PROBE_TYPES)
        if not isinstance(self.probes, int) or isinstance(self.probes, bool) or self.probes < 1:
            raise BenchError(f"probes (draws per image) must be an integer >= 1, got {self.probes!r}")

    def describe(self) -> str:
        """The solver, tolerances, start time and estimator, for the tag ``nll_ode_method``."""
        return (f"scipy solve_ivp {self.method}, rtol={self.rtol:g}, atol={self.atol:g}, s0={self.eps:g}, "
                f"{self.probes} {self.probe_type} probe{'s' if self.probes > 1 else ''} per image")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------- the continuous-time process
class FlowSde(Protocol):
    """What the flow reads of its process: :class:`VpSde` here, ``GammaSde`` (a continuous-time model's own γ(t),
    bench.diffusion.continuous_sample)."""

    def beta(self, s: float) -> float: ...  # β(s) of dx = −½β(s)x ds + √β(s) dW, float64
    def index(self, s: float) -> int: ...  # where the network is at s, for error messages
    def describe(self) -> str: ...  # the process, for the tag nll_ode_method


@dataclass(frozen=True, eq=False)
class VpSde:
    """The VP-SDE dx = −½β(s)x ds + √β(s) dW the discrete schedule discretises, on diffusion time s ∈ [0, 1].

    log ᾱ(s) is a monotone cubic interpolation of the points (t/T, log ᾱ_t), t = 0..T (ᾱ_0 = 1), so the
    SDE's marginal q(x(s) | x_0) = N(√ᾱ(s) x_0, (1 − ᾱ(s)) I) is the chain's q(x_t | x_0) at every s = t/T.
    β(s) = −d log ᾱ/ds is continuous and non-negative, interpolates the step rates b_t = −T log(1 − β_t)
    ≈ T β_t (:meth:`knot_betas`) and has mean b_t over ((t−1)/T, t/T]. (A piecewise-constant β = b_t
    would match ᾱ too, but its T jumps cost the adaptive solver several times more steps.)
    """

    sched: Schedule

    @cached_property
    def _log_ab(self) -> CubicHermiteSpline:
        """s ↦ log ᾱ(s): the cubic through (t/T, log ᾱ_t) with slope −β at each knot (see :meth:`knot_betas`)."""
        import scipy.interpolate  # heavy: only the ODE needs it

        T = self.sched.T
        log_ab = np.concatenate([[0.0], torch.log(self.sched.alphas_cumprod).numpy()])
        return scipy.interpolate.CubicHermiteSpline(np.arange(T + 1, dtype=np.float64) / T, log_ab, -self.knot_betas())

    @cached_property
    def _minus_beta(self) -> CubicHermiteSpline:
        return self._log_ab.derivative()

    def knot_betas(self) -> np.ndarray:
        """β(s) at s = t/T, t = 0..T (float64 [T + 1]): with b_t = −T log(1 − β_t), the rate of step t, β is
        b_1 at s = 0, b_T at s = 1 and the harmonic mean 2 b_t b_{t+1}/(b_t + b_{t+1}) at interior knots
        (PCHIP's rule for equal spacing, which keeps the cubic monotone: Fritsch & Carlson 1980)."""
        b = -self.sched.T * torch.log1p(-self.sched.betas).numpy()
        return np.concatenate([b[:1], 2 * b[:-1] * b[1:] / (b[:-1] + b[1:]), b[-1:]])

    def log_alphas_cumprod(self, s: float) -> float:
        """log ᾱ(s)."""
        return float(self._log_ab(s))

    def beta(self, s: float) -> float:
        """β(s) = −d log ᾱ(s)/ds."""
        return -float(self._minus_beta(s))

    def index(self, s: float) -> int:
        """The network's 0-based timestep index at s: paper time t = round(sT) (the grid point nearest s),
        held in 1..T. The network was trained on these integer t only."""
        t = min(max(math.floor(s * self.sched.T + 0.5), 1), self.sched.T)
        return t - 1

    def describe(self) -> str:
        """The process, for the tag ``nll_ode_method``: ``VP-SDE of linear(T=1000, 0.0001..0.02)``."""
        return f"VP-SDE of {self.sched.describe()}"


def network_score(model, variant: Variant, sde: VpSde) -> ScoreFn:
    """The score the network implies at s: its estimate at the trained level nearest s, i = sde.index(s),

      ∇log p_s(x) ≈ −(x − √ᾱ_i x̂_0)/(1 − ᾱ_i) = −ε̂/√(1 − ᾱ_i),

    x̂_0 from ``variant.p_mean_variance`` unclipped (ε-networks: x̂_0 = (x − √(1−ᾱ_i) ε_θ)/√ᾱ_i, so this is
    −ε_θ/√(1 − ᾱ_i); μ-networks invert μ̃). Learned-variance channels are not used. The network runs in
    its own dtype (:func:`network_dtype`: float32 for the suite's) with autocast off, whatever the run's
    precision: the solver's tolerances (1e-5) are far below bf16's resolution, and in bf16 its steps shrink
    until it barely advances. The rest runs in x's dtype.
    """
    sched = sde.sched
    net_dtype = network_dtype(model)

    def score(x: torch.Tensor, s: float) -> torch.Tensor:
        i = sde.index(s)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            out = model(x.to(net_dtype), t).to(x.dtype)
        pred_x0 = variant.p_mean_variance(out, sched, x, t, clip_x0=False).pred_x0
        ab = sched.alphas_cumprod[i].item()
        return -(x - math.sqrt(ab) * pred_x0) / (1 - ab)

    return score


def network_dtype(model) -> torch.dtype:
    """The dtype :func:`network_score` runs ``model`` in: its parameters' (float32 when it has none)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    return next((p.dtype for p in params), torch.float32)


# --------------------------------------------------------------------- one solve
def draw_probes(seed: int, image: int, count: int, shape: tuple[int, ...], probe_type: str) -> torch.Tensor:
    """``count`` Hutchinson probes for one image, float64 [count, *shape], from its own stream: entries ±1
    (rademacher) or N(0, 1) (gaussian); either way E[v vᵀ] = I."""
    g = Stream.PROBES.generator(seed, image)
    if probe_type == "rademacher":
        return torch.randint(0, 2, (count, *shape), generator=g).to(torch.float64) * 2 - 1
    return torch.randn(count, *shape, generator=g, dtype=torch.float64)


def dequantise(pixels: torch.Tensor, seed: int, image: int, count: int) -> torch.Tensor:
    """``count`` dequantised copies of one uint8 image [C, H, W] on the model's scale, float64 [count, C, H, W]:
    z = (u + w − ½)/127.5 − 1, w ~ U[0, 1) per pixel, i.e. to_data_scale's grid point plus uniform noise over
    its bin (half-width ``BIN_HALF_WIDTH`` = 1/255, the decoder's bins)."""
    w = torch.rand(count, *pixels.shape, generator=Stream.DEQUANTISATION.generator(seed, image), dtype=torch.float64)
    return pixels.to(torch.float64) / 127.5 - 1 + (2 * w - 1) * BIN_HALF_WIDTH


def score_and_quadratic(score: ScoreFn, x: torch.Tensor, s: float,
                        probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """score(x, s) [B, …] and, per row, vᵀ (∂score/∂x) v [B] for the probe v of that row (one vector–Jacobian
    product; its mean over probes with E[v vᵀ] = I is the trace of the Jacobian)."""
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        x = x.detach().clone().requires_grad_(True)
        value = score(x, s)
        (vjp,) = torch.autograd.grad(value, x, grad_outputs=probes)
    return value.detach(), (vjp * probes).flatten(1).sum(1)


def flow_nll_nats(score: ScoreFn, sde: FlowSde, z: torch.Tensor, probes: torch.Tensor,
                  options: OdeOptions) -> tuple[torch.Tensor, int]:
    """−log p_{s_0}(z) in nats per row of z [B, C, H, W] under the probability-flow ODE, one solve for the batch.

    The state (x, Δ) goes from s_0 = ``options.eps`` to 1 with
      dx/ds = −½β(s)(x + score(x, s)),  dΔ/ds = div = −½β(s)(D + vᵀ (∂score/∂x) v),
    v the row's probe (fixed for the whole solve); then −log p = −log N(x(1); 0, I) − Δ(1). Rows run on
    z's device in z's dtype; the solver works in float64. Returns (nats [B] float64 on the CPU, the number
    of drift evaluations, each one network call and one vector–Jacobian product on the batch).
    """
    import scipy.integrate  # heavy: only the ODE needs it

    B, shape, D = z.shape[0], z.shape[1:], z[0].numel()
    device, dtype = z.device, z.dtype
    probes = probes.to(device=device, dtype=dtype)

    def drift(s: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(y[:-B])).to(device=device, dtype=dtype).view(B, *shape)
        value, quad = score_and_quadratic(score, x, s, probes)
        half_beta = 0.5 * sde.beta(s)
        dx = -half_beta * (x + value)
        ddelta = -half_beta * (D + quad)
        out = torch.cat([dx.flatten(), ddelta]).to(torch.float64).cpu().numpy()
        if not np.isfinite(out).all():
            where = "at the start" if not np.isfinite(y).all() or s <= options.eps else "along the flow"
            raise FlowDiverged(f"the flow's drift is not finite at s = {s:.6g} (network index {sde.index(s)}, "
                               f"{where}): the network's score sends x to NaN or infinity there"
                               + (" or its weights or the data hold them" if where == "at the start" else ""))
        return out

    y0 = np.concatenate([z.detach().to(torch.float64).cpu().numpy().reshape(-1), np.zeros(B)])
    sol = scipy.integrate.solve_ivp(drift, (options.eps, 1.0), y0, method=options.method, rtol=options.rtol,
                                    atol=options.atol, t_eval=(1.0,))
    if sol.status != 0:
        raise SolverFailed(f"the ODE solver ({options.method}) stopped before s = 1: {sol.message}; "
                           "try looser tolerances (rtol/atol)")
    y1 = torch.from_numpy(sol.y[:, -1])
    x1, delta = y1[:-B].view(B, D), y1[-B:]
    prior_logp = -0.5 * (x1**2).sum(1) - 0.5 * D * math.log(2 * math.pi)  # log N(x(1); 0, I)
    return -(prior_logp + delta), int(sol.nfev)


# --------------------------------------------------------------------- over a data set
@dataclass
class NllResult:
    """The probability-flow NLL per image in bits/dim, with its Monte Carlo error and solver cost.

    Dequantised 8-bit data: bits/dim of the discrete data (an upper bound, by Jensen, on the NLL of the
    flow's density binned on the pixel grid); continuous data: −log p(x)/(D ln 2), a density.
    """

    total: torch.Tensor  # [N] float64 bits/dim per image: the mean over its draws
    draws: torch.Tensor  # [N, K] float64 bits/dim of each (probe, dequantisation) draw
    nfe: torch.Tensor  # [N] drift evaluations of the solve that carried each image (its batch's)
    method: str  # what was computed and how, for the tag nll_ode_method
    options: OdeOptions  # the solver, tolerances, start time and probes it was computed with
    stderr: float  # std of total over images / √N: covers images, probes and dequantisation draws
    stderr_draws: float  # the draws' part alone, these images held fixed (NaN with one draw per image)

    def summary(self) -> dict[str, float]:
        """Means over the images, under the metric names the suite logs (never ``bpd``)."""
        out = {"nll_ode": self.total.mean().item(), "nll_ode_stderr": self.stderr,
               "nll_ode_nfe": self.nfe.mean().item()}
        if math.isfinite(self.stderr_draws):
            out["nll_ode_stderr_draws"] = self.stderr_draws
        return out


def nll_ode(model, variant: Variant, sched: Schedule, images: torch.Tensor, options: OdeOptions | None = None, *,
            seed: int = 0, runtime: Runtime = LOCAL) -> NllResult:
    """The probability-flow NLL of uint8 ``images`` [N, C, H, W] under ``model`` (its score through
    :func:`network_score`), dequantised, in bits/dim. ``model`` runs in eval mode (restored afterwards)
    on ``runtime.device`` (default: where its parameters are), in its own dtype without autocast
    (:func:`network_dtype`). See :func:`flow_nll` for the rest. Raises :class:`FlowFailed` when the flow
    cannot be integrated."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise BenchError("nll_ode needs uint8 images [N, C, H, W] with pixels 0..255")
    runtime = runtime.resolve(model)
    sde = VpSde(sched)
    with evaluating(model):
        return flow_nll(network_score(model, variant, sde), sde, images, options, seed=seed, runtime=runtime)


def flow_nll(score: ScoreFn, sde: FlowSde, data: torch.Tensor, options: OdeOptions | None = None, *,
             seed: int = 0, runtime: Runtime = LOCAL) -> NllResult:
    """The probability-flow NLL of ``data`` [N, C, H, W] under ``score``, in bits/dim.

    uint8 data are dequantised (:func:`dequantise`): each draw is E_w[−log p(z)] + D log 127.5 nats (127.5
    = 1/bin width on the model's scale), an unbiased estimate of the dequantised NLL of the discrete image.
    Floating data are points on the model's scale: −log p(x) of the density, no dequantisation.
    Images go ``runtime.batch_size`` (default 64) at a time (each with ``options.probes`` draws: batch size ·
    probes rows per network call) on ``runtime.device`` (default: the CPU), in ``runtime.precision`` (default
    float64; float32 on MPS); ``runtime.dist``: ranks solve contiguous blocks of whole batches and gather
    the results.
    """
    runtime = runtime.resolve(batch_size=64)
    batch_size, device, dist = runtime.batch_size, runtime.device, runtime.dist
    options = options or OdeOptions()
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.shape[0] == 0:
        raise BenchError("the ODE likelihood needs data of shape [N, C, H, W] with N >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BenchError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    dequantised = data.dtype == torch.uint8
    if not dequantised and not data.is_floating_point():
        raise BenchError(f"the ODE likelihood needs uint8 images or floating points, got {data.dtype}")
    data = data.detach().cpu()
    N, K, shape, D = data.shape[0], options.probes, tuple(data.shape[1:]), data[0].numel()
    mine = dist.block(N, unit=batch_size)
    local = torch.zeros(len(mine), K + 1, dtype=torch.float64)  # each image's K draws (nats) and its solve's NFE
    starts = range(mine.start, mine.stop, batch_size)
    for start in progress_of(starts, len(mine), runtime.label("probability-flow NLL"), "image", runtime.shows_progress,
                             weight=lambda start: min(batch_size, mine.stop - start)):
        batch = range(start, min(start + batch_size, mine.stop))
        points = torch.cat([dequantise(data[i], seed, i, K) if dequantised
                            else data[i].to(torch.float64).expand(K, *shape)
                            for i in batch])
        probes = torch.cat([draw_probes(seed, i, K, shape, options.probe_type) for i in batch])
        nats, nfe = flow_nll_nats(score, sde, points.to(device=device, dtype=runtime.precision), probes, options)
        rows = slice(start - mine.start, start - mine.start + len(batch))
        local[rows, :K] = nats.view(len(batch), K)
        local[rows, K] = nfe
    both = dist.gather(local, N, unit=batch_size)
    offset = D * math.log(1 / (2 * BIN_HALF_WIDTH)) if dequantised else 0.0  # −D log(bin width) = D log 127.5
    draws = bits_per_dim_from_nats(both[:, :K] + offset, D)
    total = draws.mean(dim=1)
    stderr = total.std().item() / math.sqrt(N) if N > 1 else math.nan
    # Var(mean of K draws | image) = s²_within / K per image; the mean over N images divides by N.
    stderr_draws = math.sqrt(draws.var(dim=1).mean().item() / (K * N)) if K > 1 else math.nan
    method = (f"probability-flow ODE NLL (not the bound), {sde.describe()}, "
              f"{'uniform dequantisation of 8-bit data' if dequantised else 'continuous data'}, {options.describe()}")
    return NllResult(total=total, draws=draws, nfe=both[:, K], method=method, options=options, stderr=stderr,
                     stderr_draws=stderr_draws)
