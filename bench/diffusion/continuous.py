"""Continuous-time noise schedules (VDM, Kingma et al. 2021): γ(t) = −log SNR(t) on t ∈ [0, 1], increasing.

z_t = α_t x + σ_t ε with α_t² = sigmoid(−γ(t)) and σ_t² = sigmoid(γ(t)) (variance preserving). The continuous-time
diffusion loss weighs each t by γ'(t), so every schedule gives γ and its derivative together
(:meth:`NoiseSchedule.gamma_and_slope`); for a learned schedule the slope keeps its graph, so the loss's gradient
reaches the schedule's parameters through γ'(t) as well as through γ(t).

The schedules:

- :class:`FixedLinear`: VDM's fixed γ(t) = γ_min + (γ_max − γ_min) t, γ_min = −13.3, γ_max = 5.0.
- :class:`LearnedEndpoints`: γ(t) = b + |w| t (VDM's "learnable_scalar"): only the end points are learned.
- :class:`MonotoneNet`: VDM's monotone network γ(t) = l1(t) + l3(φ(l2(2(t − ½))))/1024, every weight taken in absolute
  value so that γ increases in t; its end points are not pinned (as in the authors' code).
- :class:`CosineEnds`: the continuous cosine schedule α = cos(πu/2), σ = sin(πu/2), over the u where γ runs from
  γ_min to γ_max: its density in λ = −γ is p(λ) ∝ sech(λ/2), the weighting of ε-MSE with this schedule.

What the network predicts (``prediction``: ε, x or v = α ε − σ x) is converted exactly to ε̂
(:func:`eps_from_output`): every bound, sampler and ODE reads ε̂, whatever the network was trained to output.

γ, γ' and everything formed from them are float32 or float64, never bfloat16 (the schedule's end points need
the digits): a half-precision time is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.diffusion.schedule import Schedule
from bench.errors import BenchError

VDM_GAMMA_MIN = -13.3
VDM_GAMMA_MAX = 5.0


def alpha_sigma_squared(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α², σ²) = (sigmoid(−γ), sigmoid(γ)) of a variance-preserving process."""
    return torch.sigmoid(-gamma), torch.sigmoid(gamma)


def low_discrepancy_times(batch: int, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VDM's low-discrepancy t for one batch: t_b = (u + b/B) mod 1 with one u ~ U(0, 1), so the batch has exactly
    one time in each interval [b/B, (b + 1)/B) (a lower-variance estimate of an integral over t than B draws).
    On the CPU, whatever the generator's device."""
    if batch < 1:
        raise BenchError(f"a batch of times needs at least one time, got {batch}")
    device = generator.device if generator is not None else None  # u from the generator, on its own device
    u = torch.rand((), generator=generator, dtype=dtype, device=device).cpu()
    return torch.remainder(u + torch.arange(batch, dtype=dtype) / batch, 1.0)


def _check_time(t: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(t) or t.dtype in (torch.float16, torch.bfloat16):
        raise BenchError(f"continuous time must be float32 or float64, got {t.dtype} (γ(t) needs the digits)")
    return t


def _check_ends(gamma_min: float, gamma_max: float) -> None:
    if not gamma_min < gamma_max:
        raise BenchError(f"a noise schedule needs gamma_min < gamma_max, got {gamma_min} and {gamma_max}")


class NoiseSchedule(nn.Module):
    """γ(t) = −log SNR(t), increasing on [0, 1]; a subclass defines ``forward(t)``."""

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t), in ``t``'s dtype."""
        return self(_check_time(t))

    def gamma_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ(t), γ'(t)). The slope is taken by autograd with its graph kept, so a loss weighted by γ'(t) trains
        the schedule's parameters through it (VDM's code takes it with a jvp)."""
        t = _check_time(t)
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            gamma = self(tt)
            (slope,) = torch.autograd.grad(gamma.sum(), tt, create_graph=True)
        return gamma, slope

    def endpoints(self, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
        """(γ(0), γ(1)): the expected continuous-time bound depends on the schedule only through these."""
        with torch.no_grad():
            g = self.gamma(torch.tensor([0.0, 1.0], dtype=dtype))
        return float(g[0]), float(g[1])


class FixedLinear(NoiseSchedule):
    """VDM's fixed schedule γ(t) = γ_min + (γ_max − γ_min) t."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedEndpoints(NoiseSchedule):
    """γ(t) = b + |w| t, started at γ_min and γ_max: the end points are learned, the shape is a straight line."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.b = nn.Parameter(torch.tensor(float(gamma_min)))
        self.w = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.b.to(t.dtype) + self.w.to(t.dtype).abs() * t


class CosineEnds(NoiseSchedule):
    """The continuous cosine schedule with given end points: γ(t) = 2 log tan(πu/2), u = u₀ + t(u₁ − u₀), with
    u₀, u₁ where γ is γ_min and γ_max. Its slope is γ'(t) = 2π(u₁ − u₀)·cosh(γ/2), so t uniform puts the density
    p(λ) = sech(λ/2)/(2π(u₁ − u₀)) on λ = −γ: ε-MSE at uniform t is the weighting sech(λ/2) up to a constant."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.u0, self.u1 = (2 / math.pi * math.atan(math.exp(g / 2)) for g in (gamma_min, gamma_max))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * torch.log(torch.tan(math.pi / 2 * (self.u0 + t * (self.u1 - self.u0))))


def time_of_gamma(schedule: NoiseSchedule, gamma: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The t ∈ [0, 1] where the increasing ``schedule`` takes the values ``gamma`` [B] (clamped to its ends), by
    bisection in float64 (60 halvings: to the last digit), without a graph."""
    g = gamma.detach().to(torch.float64)
    lo, hi = torch.zeros_like(g), torch.ones_like(g)
    with torch.no_grad():
        for _ in range(iterations):
            mid = (lo + hi) / 2
            below = schedule.gamma(mid) < g
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------- what the network predicts
PREDICTIONS = ("eps", "x", "v")


def _broadcast(gamma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return gamma.reshape(-1, *([1] * (like.dim() - 1))) if gamma.dim() else gamma


def eps_from_output(prediction: str, out: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """ε̂ from the network's output ``out`` at z_t = α z + σ ε with γ = γ(t) [B]: ε itself; from x̂,
    ε̂ = (z − α x̂)/σ; from v̂ (v = α ε − σ x), ε̂ = σ z + α v̂. In γ's dtype (float32 or float64)."""
    if prediction == "eps":
        return out
    g = _broadcast(gamma, z)
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    out, z = out.to(g.dtype), z.to(g.dtype)
    if prediction == "x":
        return (z - a * out) / s
    if prediction == "v":
        return s * z + a * out
    raise BenchError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def prediction_target(prediction: str, x: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """What a network making ``prediction`` is trained to output at γ = γ(t) [B]: ε, x, or v = α ε − σ x."""
    if prediction == "eps":
        return eps
    if prediction == "x":
        return x
    g = _broadcast(gamma, x)
    return torch.sigmoid(-g).sqrt() * eps - torch.sigmoid(g).sqrt() * x


def eps_error_scale(prediction: str, gamma: torch.Tensor) -> torch.Tensor:
    """c(γ) with ‖ε − ε̂‖² = c·‖target − output‖² for ``prediction``: 1 for ε, SNR = e^{−γ} for x, α² = sigmoid(−γ)
    for v (so ‖v − v̂‖² = (1 + SNR)‖x − x̂‖²)."""
    if prediction == "eps":
        return torch.ones_like(gamma)
    return torch.exp(-gamma) if prediction == "x" else torch.sigmoid(-gamma)


class _PositiveLinear(nn.Module):
    """A dense layer with its weights taken in absolute value, so its output increases in its input."""

    def __init__(self, inputs: int, outputs: int, weight: float | None = None, bias: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        self.bias = nn.Parameter(torch.zeros(outputs))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(inputs))
        if weight is not None:
            nn.init.constant_(self.weight, weight)
        if bias is not None:
            nn.init.constant_(self.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype).abs(), self.bias.to(x.dtype))


class MonotoneNet(NoiseSchedule):
    """VDM's learned monotone schedule γ(t) = l1(t) + l3(φ(l2(2(t − ½))))/1024 with φ(h) = 2(sigmoid(h) − ½), l1 a
    1→1 layer started at weight γ_max − γ_min and bias γ_min, l2 1→width, l3 width→1, all weights absolute-valued."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN, gamma_max: float = VDM_GAMMA_MAX, width: int = 1024):
        super().__init__()
        _check_ends(gamma_min, gamma_max)
        self.l1 = _PositiveLinear(1, 1, weight=gamma_max - gamma_min, bias=gamma_min)
        self.l2 = _PositiveLinear(1, width)
        self.l3 = _PositiveLinear(width, 1)
        self.width = width

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.reshape(-1, 1)
        h = 2 * (torch.sigmoid(self.l2(2 * (x - 0.5))) - 0.5)
        return (self.l1(x) + self.l3(h) / self.width).reshape(t.shape)


# --------------------------------------------------------------------- the model: a network conditioned on γ(t)
def fourier_features(z: torch.Tensor, exponents: tuple[int, ...] = (6, 7)) -> torch.Tensor:
    """VDM's Fourier features of z_t [B, C, H, W]: sin and cos of 2ⁿ·2π·z for each n, [B, 2·len(n)·C, H, W]. They
    let the network see the fine detail of z near t = 0, where a pixel's 8-bit value is a small change in z."""
    freqs = torch.tensor([2.0**n * 2 * math.pi for n in exponents], dtype=z.dtype, device=z.device)
    h = (z.unsqueeze(2) * freqs.view(1, 1, -1, 1, 1)).flatten(1, 2)  # [B, C·len(n), H, W]
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


FOURIER_EXPONENTS = (6, 7)


class ContinuousDenoiser(nn.Module):
    """ε̂(z_t; t) of a continuous-time model: a network ``net(x, c)`` conditioned on c = 1000·(γ(t) − γ₀)/(γ₁ − γ₀),
    with γ₀, γ₁ the schedule's end points when built (so a fixed line conditions on 1000·t, DDPM's index scale),
    and the noise schedule ``schedule`` as a submodule, so the optimiser, the EMA and the checkpoint carry the
    schedule's parameters with the network's. γ is computed in float32 or float64 with autocast off, whatever
    the network's precision. With ``fourier`` the network also sees :func:`fourier_features` of z_t (its
    input then has 5·C channels)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, fourier: bool = False, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise BenchError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        self.net, self.schedule, self.fourier, self.prediction = net, schedule, bool(fourier), prediction
        self.cond_range = schedule.endpoints()

    @staticmethod
    def in_channels(channels: int, fourier: bool) -> int:
        """The network's input channels for C image channels."""
        return channels * (1 + 2 * len(FOURIER_EXPONENTS)) if fourier else channels

    def forward(self, z: torch.Tensor, t: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """z_t [B, C, H, W], t [B] float in [0, 1] → ε̂ [B, C, H, W] (``raw``: the network's own output, its
        ``prediction`` of ε, x or v)."""
        with torch.autocast(z.device.type, enabled=False):
            gamma = self.schedule.gamma(t if t.dtype == torch.float64 else t.float())
        lo, hi = self.cond_range
        cond = (gamma.float() - lo) * (1000.0 / (hi - lo))
        x = torch.cat([z, fourier_features(z, FOURIER_EXPONENTS)], dim=1) if self.fourier else z
        out = self.net(x, cond)
        if raw or self.prediction == "eps":
            return out
        with torch.autocast(z.device.type, enabled=False):
            return eps_from_output(self.prediction, out.float(), z.float(), gamma.float())


def find_denoiser(model: nn.Module) -> ContinuousDenoiser:
    """The :class:`ContinuousDenoiser` inside ``model``'s wrappers (autocast, DistributedDataParallel,
    torch.compile), to read its schedule; BenchError when there is none (a DDPM network)."""
    seen = model
    for _ in range(8):
        if isinstance(seen, ContinuousDenoiser):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None) or getattr(seen, "net", None)
        if seen is None:
            break
    raise BenchError(f"{type(model).__name__} is not a continuous-time model (no noise schedule γ(t) inside it): "
                     "a continuous-time variant needs the network its config builds")


# --------------------------------------------------------------------- the bound's three terms, per example in nats
def sum_dims(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: [B, ...] → [B]."""
    return x.flatten(1).sum(dim=1)


def diffusion_nats(eps: torch.Tensor, eps_hat: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """L_∞'s integrand at one t per example: ½ γ'(t) ‖ε − ε̂‖² [B] (summed over D), in the dtype of ``slope``."""
    return 0.5 * slope * sum_dims((eps.to(slope.dtype) - eps_hat.to(slope.dtype)) ** 2)


def finite_diffusion_nats(eps: torch.Tensor, eps_hat: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor,
                          T: int) -> torch.Tensor:
    """L_T's term at one step s = t − 1/T per example: (T/2)·expm1(γ(t) − γ(s))·‖ε − ε̂‖² [B]. The step's KL with
    the true posterior's variance is ½·expm1(γ_t − γ_s)·‖ε − ε̂‖²; T times it, at a uniform step, is unbiased for
    the sum over all T steps."""
    d = gamma_t - gamma_s
    return 0.5 * T * torch.expm1(d) * sum_dims((eps.to(d.dtype) - eps_hat.to(d.dtype)) ** 2)


def prior_nats(x: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x) ‖ N(0, I)) = ½ Σ_d [α₁² x_d² + σ₁² − log σ₁² − 1] per example [B]; ``gamma_1`` a scalar
    or [B]."""
    g = gamma_1.reshape(-1, *([1] * (x.dim() - 1))) if gamma_1.dim() else gamma_1
    x = x.to(g.dtype)
    terms = torch.sigmoid(-g) * x**2 + torch.sigmoid(g) - torch.nn.functional.logsigmoid(g) - 1
    return 0.5 * sum_dims(terms.expand_as(x))


def bin_centres(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 256 values an 8-bit pixel k takes on the project's scale, c_k = k/127.5 − 1 (``to_data_scale``): the
    decoder is a normalised distribution over these, so the bound is on −log P of the 8-bit image."""
    return torch.arange(256, dtype=dtype, device=device) / 127.5 - 1


def decoder_logits(z0: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """VDM's decoder p(x_d = c_k | z_0) ∝ q(z_0,d | x_d = c_k): logits −½ e^{−γ₀} (z_0,d/α₀ − c_k)² over the 256
    bin centres, [..., 256] (not normalised: take log_softmax over the last dimension). ``gamma_0`` a scalar or
    broadcastable to z0."""
    g = gamma_0.reshape(-1, *([1] * (z0.dim() - 1))) if gamma_0.dim() else gamma_0
    z = z0.to(g.dtype) / torch.sqrt(torch.sigmoid(-g))  # z_0/α₀
    c = bin_centres(g.dtype, z0.device)
    return -0.5 * torch.exp(-g).unsqueeze(-1) * (z.unsqueeze(-1) - c) ** 2


def decoder_nats(x: torch.Tensor, z0: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """−log p(x | z_0) of the 8-bit image x (on the project's scale, exactly some c_k per pixel) per example [B]."""
    k = torch.round((x.to(torch.float64) + 1) * 127.5).clamp(0, 255).long()
    logp = torch.log_softmax(decoder_logits(z0, gamma_0), dim=-1)
    return -sum_dims(logp.gather(-1, k.unsqueeze(-1)).squeeze(-1))


# --------------------------------------------------------------------- the project's discrete schedules, read as γ(t)
def _gamma_of_minus_log_alpha_squared(x: torch.Tensor) -> torch.Tensor:
    """γ = log(σ²/α²) = log(expm1(x)) for x = −log α² > 0, written x + log(−expm1(−x)) so that neither a small x
    (expm1 keeps its digits) nor a large one (no overflow) loses precision."""
    return x + torch.log(-torch.expm1(-x))


class LinearBetaReading(NoiseSchedule):
    """DDPM's linear schedule (``Schedule.linear(T, beta_start, beta_end)``) read as a continuous γ(t): step i of
    the chain (x_i, i = 1..T) sits at t = (i − 1)/(T − 1), so γ(0) is x_1's −log SNR and γ(1) is x_T's.

    With a = β_start and b = (β_end − β_start)/(T − 1) (β_j = a + b(j − 1)), −log ᾱ_i = Σ_{j≤i} −log(1 − β_j)
    = Σ_j (β_j + β_j²/2) + O(Σβ³); both power sums are polynomials in i, evaluated at the real i = 1 + t(T − 1):

      −log ᾱ(i) = i a + b i(i−1)/2 + ½ [i a² + a b i(i−1) + b² i(i−1)(2i−1)/6],

    i.e. the VP-SDE of the linear schedule in diffusion time u = i/T ∈ [1/T, 1] (its rate β(u) = d(−log ᾱ)/du
    ≈ T(a + b(Tu − ½)) is linear up to the β² term). It agrees with the chain's ᾱ_i at every step up to the
    omitted Σβ³/3: for T = 1000, 1e-4..0.02, γ at t = 0 within 1e-8 and at t = 1 within 7e-4 of the chain's
    −log SNR (score_sde's plain form T(a u + ½(β_end − β_start) u²) is off by 0.095 in γ at the first step).
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.spec = Schedule.linear(T, beta_start, beta_end).spec  # validates the arguments as the chain does
        self.T, self.a, self.b = T, float(beta_start), (beta_end - beta_start) / (T - 1)

    def discrete(self) -> Schedule:
        """The chain this schedule reads."""
        return Schedule.from_spec(self.spec)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        i = 1 + t * (self.T - 1)
        a, b, pairs = self.a, self.b, i * (i - 1)
        first = i * a + b * pairs / 2
        second = i * a * a + a * b * pairs + b * b * pairs * (2 * i - 1) / 6
        return _gamma_of_minus_log_alpha_squared(first + second / 2)


class CosineReading(NoiseSchedule):
    """iDDPM's cosine schedule (``Schedule.cosine(T, s)``) read as a continuous γ(t): ᾱ(u) = f(u)/f(0),
    f(u) = cos²((u + s)/(1 + s)·π/2), at u = u₀ + t(u₁ − u₀) with u₀ = 1/T (the chain's first step) and u₁ the
    time where ᾱ(u₁) is the chain's last ᾱ_T. The chain clips β at 0.999, so ᾱ_T is tiny but positive (2.4e-9
    for T = 1000) and γ(1) is finite (19.84); u₁ is just below 1. Between the ends ᾱ(u) is the chain's at every
    step u = i/T whose β was not clipped (for T = 1000, all but the last).

    γ = log((f(0) − f(u))/f(u)) is formed as log sin(θ − θ₀) + log sin(θ + θ₀) − 2 log cos θ (θ = (u + s)/(1 + s)
    ·π/2, f(0) − f(u) = sin(θ − θ₀) sin(θ + θ₀)), with cos θ = sin((1 − u)·π/(2(1 + s))) and
    1 − u = (1 − u₁) + (1 − t)(u₁ − u₀): no difference of nearly equal numbers at either end.
    """

    def __init__(self, T: int = 1000, s: float = 0.008):
        super().__init__()
        chain = Schedule.cosine(T, s)
        self.spec, self.T, self.s = chain.spec, T, float(s)
        k = math.pi / (2 * (1 + s))
        f0 = math.cos(s * k) ** 2
        self.u0 = 1 / T
        self.one_minus_u1 = math.asin(math.sqrt(float(chain.alphas_cumprod[-1]) * f0)) / k  # f(u₁) = ᾱ_T f(0)
        self.span = 1 - self.one_minus_u1 - self.u0  # u₁ − u₀

    def discrete(self) -> Schedule:
        """The chain this schedule reads."""
        return Schedule.from_spec(self.spec)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        k = math.pi / (2 * (1 + self.s))
        u = self.u0 + t * self.span
        rest = self.one_minus_u1 + (1 - t) * self.span  # 1 − u
        return (torch.log(torch.sin(u * k)) + torch.log(torch.sin((u + 2 * self.s) * k))
                - 2 * torch.log(torch.sin(rest * k)))
