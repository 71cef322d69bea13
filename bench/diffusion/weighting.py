"""The weighted-ELBO family (Kingma & Gao 2023): every diffusion loss as one weighting w(λ) of the ε-error over
λ = log SNR = −γ, and the adaptive noise schedule that samples λ for it.

    L_w(x) = ½ ∫ w(λ) E_ε ‖ε − ε̂(z_λ; λ)‖² dλ = ½ E_{λ~q} [ w(λ)/q(λ) · ‖ε − ε̂‖² ]

for any density q over [λ_min, λ_max]; a noise schedule γ(t) with t ~ U(0, 1) is the sampler q = p(λ) = 1/γ'(t),
so the expected loss depends on w and the end points, not on the schedule's shape (the shape, or the adaptive
sampler, changes only the variance). w ≡ 1 is the continuous-time ELBO's diffusion term L_∞; a w non-increasing in
λ makes L_w an ELBO of Gaussian-noise-augmented data ("monotone").

Each weighting is a function of λ and of the training schedule's density p(λ) there (L_simple's weighting *is* that
density), with its hyper-parameters; :data:`WEIGHTINGS` lists them with their formulas. Whether a weighting is
monotone is read on the schedule it trains with (:func:`is_monotone`): ε-MSE is sech(λ/2) — not monotone — on the
cosine schedule, but constant — monotone, a multiple of the ELBO — on VDM's straight line.

What the network predicts (ε, x or v) is a separate choice: ‖ε − ε̂‖² = c·‖target − output‖² with c = 1, SNR or
α² (:func:`bench.diffusion.continuous.eps_error_scale`), so a weighting is the same objective whatever the
prediction; :func:`min_snr_factor` writes min-SNR's factor on each prediction's own error, the form its paper gives.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.diffusion.continuous import NoiseSchedule, eps_error_scale
from bench.errors import BenchError, check_choice

HYPER_DEFAULTS = {"min_snr_gamma": 5.0, "sigmoid_bias": 0.0, "edm_mean": 2.4, "edm_std": 2.4}
SYMBOLS = {"min_snr_gamma": "γ", "sigmoid_bias": "b", "edm_mean": "μ", "edm_std": "s"}  # as WEIGHTINGS' formulas
EDM_SIGMA_DATA = 0.5  # EDM's σ_data: its loss weight (σ² + σ_data²)/(σ σ_data)² on the x-error
TABLE_MAX_ROWS = 100_000


@dataclass(frozen=True)
class WeightingKind:
    """One member of the family as `bench weightings` lists it."""

    formula: str  # w(λ), in words a reader checks against the papers
    monotone: str  # "yes", "no", or "with the schedule" (read on it: is_monotone)
    source: str
    hyper: tuple[str, ...] = ()  # the RunConfig fields it reads


WEIGHTINGS: dict[str, WeightingKind] = {
    "elbo": WeightingKind("1", "yes", "the continuous-time ELBO's diffusion term L_∞ (VDM)"),
    "eps": WeightingKind("p(λ), the schedule's density (cosine: sech(λ/2)/2π)", "with the schedule",
                         "ε-MSE at uniform t, DDPM's L_simple"),
    "v": WeightingKind("p(λ)·(1 + e^{−λ}) (cosine: ∝ e^{−λ/2})", "with the schedule",
                       "v-MSE at uniform t (Salimans & Ho 2022)"),
    "min-snr": WeightingKind("p(λ)·min(1, γ_snr·e^{−λ})", "with the schedule",
                             "min-SNR-γ (Hang et al. 2023): min(SNR, γ_snr) on the x-error", ("min_snr_gamma",)),
    "edm": WeightingKind("N(λ; μ, s²)·(e^{−λ} + σ_d²)/σ_d², σ_d = 0.5", "no",
                         "EDM (Karras et al. 2022): lognormal σ, μ = 2.4, s = 2.4", ("edm_mean", "edm_std")),
    "edm-monotonic": WeightingKind("EDM's w held at its peak for λ below the peak", "yes",
                                   "Kingma & Gao 2023: EDM made non-increasing", ("edm_mean", "edm_std")),
    "sigmoid": WeightingKind("sigmoid(b − λ)", "yes", "Kingma & Gao 2023, bias b", ("sigmoid_bias",)),
    "table": WeightingKind("w(λ) read from a CSV (columns lambda,w), linear between rows, flat beyond", "read",
                           "a user's table", ("weighting_table",)),
}


@dataclass(frozen=True)
class Weighting:
    """w(λ) of one member with its hyper-parameters; ``weighting(lam, density)`` with density = p(λ) of the
    training schedule at each λ."""

    name: str
    params: dict = field(default_factory=dict)
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, lam: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        return self.fn(lam, density)

    def short(self) -> str:
        """The name with the hyper-parameters that differ from their defaults, e.g. ``min-snr γ=3``."""
        hyper = [f"{SYMBOLS[k]}={v:g}" for k, v in self.params.items() if k in SYMBOLS and v != HYPER_DEFAULTS[k]]
        if "weighting_table" in self.params:
            hyper.append(Path(self.params["weighting_table"]).name)
        return " ".join([self.name, *hyper])

    def describe(self) -> str:
        """e.g. ``min-snr(min_snr_gamma=5): p(λ)·min(1, γ_snr·e^{−λ})``."""
        hyper = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({hyper}): {WEIGHTINGS[self.name].formula}" if hyper else \
            f"{self.name}: {WEIGHTINGS[self.name].formula}"


def _edm(lam: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    normal = torch.exp(-0.5 * ((lam - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return normal * (torch.exp(-lam) + EDM_SIGMA_DATA**2) / EDM_SIGMA_DATA**2


def edm_peak(mean: float, std: float) -> float:
    """The λ where EDM's weighting is largest (below μ, since d log w/dλ = −(λ − μ)/s² − 1/(1 + σ_d² e^λ) < 0 from
    μ on): the best of a grid over [μ − 40s, μ], refined by bisection on that derivative within its two cells."""
    c = EDM_SIGMA_DATA**2
    grid = torch.linspace(mean - 40 * std, mean, 200_001, dtype=torch.float64)
    i = int(_edm(grid, mean, std).argmax())
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    for _ in range(60):
        mid = (lo + hi) / 2
        rising = -(mid - mean) / std**2 - 1 / (1 + c * math.exp(mid)) > 0
        lo, hi = (mid, hi) if rising else (lo, mid)
    return (lo + hi) / 2


def read_weighting_table(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, w) float64 from a CSV with a header row ``lambda,w``: λ strictly increasing, w finite and >= 0, at least
    two rows. Read as text (csv), never unpickled; BenchError naming the row on anything else."""
    path = Path(path).expanduser()
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise BenchError(f"weighting table {path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise BenchError(f"weighting table {path}: not a text CSV file") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["lambda", "w"]:
        raise BenchError(f"weighting table {path}: the first row must be the header lambda,w")
    body = [(n, r) for n, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]  # n: the file's row
    if not 2 <= len(body) <= TABLE_MAX_ROWS:
        raise BenchError(f"weighting table {path}: needs 2 to {TABLE_MAX_ROWS:,} rows of lambda,w, has {len(body)}")
    values = []
    for n, row in body:
        try:
            lam, w = (float(c) for c in row)
        except ValueError:
            raise BenchError(f"weighting table {path}, row {n}: expected two numbers lambda,w, got {row}") from None
        if not (math.isfinite(lam) and math.isfinite(w) and w >= 0):
            raise BenchError(f"weighting table {path}, row {n}: lambda must be finite and w finite and >= 0, "
                             f"got {lam}, {w}")
        values.append((lam, w))
    table = torch.tensor(values, dtype=torch.float64)
    falls = (table[1:, 0] <= table[:-1, 0]).nonzero()
    if len(falls):
        n, row = body[int(falls[0]) + 1]
        raise BenchError(f"weighting table {path}, row {n}: lambda must increase strictly from row to row, "
                         f"got {row[0].strip()} after {values[int(falls[0])][0]:g}")
    return table[:, 0].contiguous(), table[:, 1].contiguous()


def _interpolate(lam: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear w between the table's rows, flat beyond its ends."""
    xs, ys = xs.to(lam.device, lam.dtype), ys.to(lam.device, lam.dtype)
    x = lam.clamp(xs[0], xs[-1])
    i = torch.searchsorted(xs, x.detach().contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def build_weighting(name: str, *, min_snr_gamma: float = HYPER_DEFAULTS["min_snr_gamma"],
                    sigmoid_bias: float = HYPER_DEFAULTS["sigmoid_bias"], edm_mean: float = HYPER_DEFAULTS["edm_mean"],
                    edm_std: float = HYPER_DEFAULTS["edm_std"], weighting_table: str | None = None) -> Weighting:
    """The weighting ``name`` (a key of :data:`WEIGHTINGS`) with its hyper-parameters; BenchError on a bad one."""
    check_choice("weighting", name, tuple(WEIGHTINGS))
    hyper = {"min_snr_gamma": min_snr_gamma, "sigmoid_bias": sigmoid_bias, "edm_mean": edm_mean, "edm_std": edm_std}
    for key in WEIGHTINGS[name].hyper:
        if key != "weighting_table" and not math.isfinite(hyper[key]):
            raise BenchError(f"{key} must be a finite number, got {hyper[key]}")
    if name == "min-snr" and not min_snr_gamma > 0:
        raise BenchError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    if name in ("edm", "edm-monotonic") and not edm_std > 0:
        raise BenchError(f"edm_std must be > 0, got {edm_std}")
    if name == "table" and not weighting_table:
        raise BenchError("--weighting table needs --weighting-table FILE.csv (columns lambda,w)")
    if name != "table" and weighting_table:
        raise BenchError(f"--weighting-table is read by --weighting table only, not {name!r}")
    params = {k: hyper[k] for k in WEIGHTINGS[name].hyper if k != "weighting_table"}
    if name == "elbo":
        fn = lambda lam, p: torch.ones_like(lam)  # noqa: E731
    elif name == "eps":
        fn = lambda lam, p: p  # noqa: E731
    elif name == "v":
        fn = lambda lam, p: p * (1 + torch.exp(-lam))  # noqa: E731
    elif name == "min-snr":
        fn = lambda lam, p: p * torch.clamp(min_snr_gamma * torch.exp(-lam), max=1.0)  # noqa: E731
    elif name == "edm":
        fn = lambda lam, p: _edm(lam, edm_mean, edm_std)  # noqa: E731
    elif name == "edm-monotonic":
        peak = edm_peak(edm_mean, edm_std)
        fn = lambda lam, p: _edm(torch.clamp(lam, min=peak), edm_mean, edm_std)  # noqa: E731
    elif name == "sigmoid":
        fn = lambda lam, p: torch.sigmoid(sigmoid_bias - lam)  # noqa: E731
    else:
        xs, ys = read_weighting_table(weighting_table)
        params = {"weighting_table": str(weighting_table), "rows": len(xs)}
        fn = lambda lam, p: _interpolate(lam, xs, ys)  # noqa: E731
    return Weighting(name, params, fn)


def min_snr_factor(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min-SNR-γ's factor on a ``prediction``'s own squared error, as Hang et al. write it: min(SNR, γ)/SNR on the
    ε-error, min(SNR, γ) on the x-error, min(SNR, γ)/(SNR + 1) on the v-error (not min(SNR + 1, γ)/(SNR + 1), a
    known mistake). All three are the one ε-weighting min(1, γ/SNR)."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise BenchError(f"prediction must be eps, x or v, got {prediction!r}")


def schedule_weights(weighting: Weighting, schedule: NoiseSchedule, t: torch.Tensor, prediction: str,
                     q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ(t), the factor on the prediction's squared error) of each t [B]: ½·factor·‖target − output‖² is the
    weighted loss's integrand. factor = w(λ)/q(λ)·c with λ = −γ(t), q the sampling density of λ (None: the
    schedule's own, 1/γ'(t), so w/q = w·γ') and c from :func:`eps_error_scale`. In ``t``'s dtype, no graph
    (the schedule is fixed)."""
    with torch.no_grad():
        gamma, slope = schedule.gamma_and_slope(t)
        gamma, slope = gamma.detach(), slope.detach()
    lam = -gamma
    w = weighting(lam, 1 / slope)
    ratio = w * slope if q is None else w / q.to(w.dtype)
    return gamma, ratio * eps_error_scale(prediction, gamma)


def check_weights(weighting: Weighting, schedule: NoiseSchedule, prediction: str, points: int = 1025) -> None:
    """Refuse, in one line, a weighting whose loss weight is not finite somewhere on [0, 1] with this schedule and
    prediction (e.g. ε-prediction where SNR(1) = 0: its weight γ'(1) is infinite), before any step is taken."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    gamma, factor = schedule_weights(weighting, schedule, t, prediction)
    bad = ~torch.isfinite(factor) | (factor < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise BenchError(
            f"weighting {weighting.name!r} with --prediction {prediction} gives the loss weight {float(factor[i])} "
            f"at t = {float(t[i]):.4g} (γ = {float(gamma[i]):.4g}): not a finite, non-negative number; "
            + ("with zero SNR at t = 1 ε-prediction is undefined there: use --prediction v, or a finite --gamma-max"
               if prediction == "eps" and not math.isfinite(float(gamma[-1]))
               else "choose another weighting, prediction or end points"))


def is_monotone(weighting: Weighting, schedule: NoiseSchedule, points: int = 2049) -> bool:
    """Whether w(λ) is non-increasing in λ over the schedule's range (non-decreasing in t), read on ``points`` t,
    to a relative 1e-9: the condition for L_w to be an ELBO of noise-augmented data."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    with torch.no_grad():
        gamma, slope = schedule.gamma_and_slope(t)
    w = weighting(-gamma.detach(), 1 / slope.detach())
    return bool((w[1:] >= w[:-1] - 1e-9 * w.abs().max()).all())


class AdaptiveSchedule:
    """Kingma & Gao's adaptive noise schedule: λ drawn from a piecewise-constant density over ``bins`` equal bins of
    [λ_min, λ_max], proportional to an EMA (``decay``) of the mean weighted integrand ½w(λ)‖ε − ε̂‖² seen in each
    bin, mixed with ``floor`` of the uniform density so that no bin starves; each sample's loss is weighted by
    w(λ)/q(λ), so the objective stays L_w and only its variance changes. Until a bin has been seen its EMA is the
    mean of the seen ones (all bins equal at the start: uniform in λ). The draws come from the generator given,
    the global batch at once, so every rank draws the same; :meth:`update` takes the global batch's values."""

    def __init__(self, lam_min: float, lam_max: float, bins: int = 64, decay: float = 0.99, floor: float = 0.1):
        if not lam_min < lam_max or bins < 1 or not 0 <= decay < 1 or not 0 < floor <= 1:
            raise BenchError(f"adaptive schedule: needs lam_min < lam_max, bins >= 1, decay in [0, 1) and floor in "
                             f"(0, 1], got {lam_min}, {lam_max}, {bins}, {decay}, {floor}")
        self.lam_min, self.lam_max, self.bins, self.decay, self.floor = lam_min, lam_max, bins, decay, floor
        self.ema = torch.full((bins,), math.nan, dtype=torch.float64)
        self.updates = 0

    @property
    def width(self) -> float:
        return (self.lam_max - self.lam_min) / self.bins

    def probabilities(self) -> torch.Tensor:
        """Each bin's probability [bins] (float64, sums to 1)."""
        seen = torch.isfinite(self.ema)
        m = torch.where(seen, self.ema, self.ema[seen].mean() if bool(seen.any()) else torch.ones(()))
        m = m.clamp(min=0)
        shape = m / m.sum() if float(m.sum()) > 0 else torch.full_like(m, 1 / self.bins)
        return (1 - self.floor) * shape + self.floor / self.bins

    def density(self, lam: torch.Tensor) -> torch.Tensor:
        """q(λ) at each λ (per unit λ)."""
        k = ((lam.detach().cpu().double() - self.lam_min) / self.width).floor().long().clamp(0, self.bins - 1)
        return (self.probabilities()[k] / self.width).to(lam.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ [n], q(λ) [n]) float64 on the CPU: a stratified draw (one uniform per batch shifted by b/n, as VDM's
        low-discrepancy t) pushed through the inverse CDF of the piecewise-constant density."""
        device = generator.device if generator is not None else None
        u = torch.rand((), generator=generator, dtype=torch.float64, device=device).cpu()
        u = torch.remainder(u + torch.arange(n, dtype=torch.float64) / n, 1.0)
        p = self.probabilities()
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)])
        cdf[-1] = 1.0
        k = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, self.bins - 1)
        within = ((u - cdf[k]) / p[k]).clamp(0, 1)
        lam = self.lam_min + (k.double() + within) * self.width
        return lam, p[k] / self.width

    def update(self, lam: torch.Tensor, integrand: torch.Tensor) -> None:
        """Fold one step's λ [n] and integrands ½w(λ)‖ε − ε̂‖² [n] (any unit, the same every step) into the EMA."""
        lam, value = lam.detach().cpu().double(), integrand.detach().cpu().double()
        k = ((lam - self.lam_min) / self.width).floor().long().clamp(0, self.bins - 1)
        sums = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, k, value)
        counts = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, k, torch.ones_like(value))
        seen = counts > 0
        means = sums[seen] / counts[seen]
        old = self.ema[seen]
        self.ema[seen] = torch.where(torch.isfinite(old), self.decay * old + (1 - self.decay) * means, means)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"ema": self.ema.clone(), "updates": self.updates, "range": [self.lam_min, self.lam_max],
                "bins": self.bins}

    def load_state_dict(self, state: dict) -> None:
        if state.get("bins") != self.bins or list(state.get("range", [])) != [self.lam_min, self.lam_max]:
            raise BenchError(f"the checkpoint's adaptive schedule has {state.get('bins')} bins over "
                             f"{state.get('range')}, this run's {self.bins} over {[self.lam_min, self.lam_max]}: "
                             "resume with the checkpoint's config")
        self.ema = state["ema"].to(torch.float64).clone()
        self.updates = int(state["updates"])
