"""The continuous-time bound of a continuous-time model (VDM) in bits/dim, estimated with stratified t per image.

−log P(x) ≤ prior + decoder + diffusion, every term in nats per image (docs/MATH.md; VDM, Kingma et al. 2021):

- prior: KL(q(z_1 | x) ‖ N(0, I)), exact at γ(1) (:func:`bench.diffusion.continuous.prior_nats`);
- decoder: −log p(x | z_0) with z_0 ~ q(z_0 | x), VDM's 256-way decoder on the 8-bit bins k/127.5 − 1
  (:func:`bench.diffusion.continuous.decoder_nats`), a normalised distribution over the 256 values of a pixel, so
  the bound is on −log P of the 8-bit image;
- diffusion: L_∞ = ½ E_{t, ε}[γ'(t) ‖ε − ε̂(z_t; t)‖²] (``T=None``), or the finite-T form
  L_T = (T/2) E_{i, ε}[expm1(γ(t) − γ(s)) ‖ε − ε̂(z_t; t)‖²] with t = i/T, s = (i − 1)/T, i ∈ 1..T.

Per image the estimate takes two independent stratified replicates of S (image, t) pairs each. L_∞: stratum k of
[0, 1] is [k/S, (k + 1)/S), and its t = (k + u)/S with u ~ U(0, 1). L_T: the steps 1..T are cut into S contiguous
groups (as equal as can be) and each group's step is drawn uniformly within it, weighted by the group's share of
the T steps; when S ≥ T every step is taken exactly once per replicate (S = T pairs, no draw of the step). Each
pair has its own noise ε; the same ε gives z_0 = α₀x + σ₀ε, so each pair also yields one decoder draw, and a
replicate's decoder term is the mean of its S draws. The per-image estimate is the mean of the two replicates;
their difference gives the Monte Carlo standard error (as :func:`bench.diffusion.bound.estimate_bits_per_dim`).

``along="line"`` spreads the t of L_∞ along the straight line between the schedule's end points instead of along the
schedule itself: the same expectation (L_∞ depends on the schedule only through γ(0) and γ(1), and the network is
conditioned on γ, so as a function of (z, γ) it is the same denoiser), with γ'(t) constant, which on a curved
schedule (the continuous cosine's γ' grows as cosh(γ/2)) cuts the Monte Carlo error many times over. The ruler
(``bench.training.ruler``) measures every L_∞ so; L_T keeps the schedule's own steps (its value depends on them).

The network is called as ``model(z_t, t)`` (t float in [0, 1]), so an autocast wrapper applies to it; γ, γ', α, σ
and the three terms are formed in ``runtime.precision`` (float64, float32 on MPS) with autocast off, never in
bfloat16. Unlike the discrete-time bound there is no clipped/unclipped pair of conventions: the continuous-time
reverse process has no x̂_0 clipping inside the bound, so a result carries one convention and no ``.other``.

Draws are keyed by (seed, image index) on :attr:`Stream.CONTINUOUS`, so results do not depend on the batch size,
on how pairs are grouped or on the ranks; under torch.distributed (``runtime.dist``) each rank evaluates a
contiguous block of whole batches and the per-pair terms are gathered, as the discrete-time bound does.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from bench.diffusion.bound import to_device
from bench.diffusion.continuous import (
    FixedLinear,
    alpha_sigma_squared,
    decoder_nats,
    diffusion_nats,
    find_denoiser,
    finite_diffusion_nats,
    prior_nats,
)
from bench.diffusion.gaussian import bits_per_dim_from_nats, to_data_scale
from bench.diffusion.ode import network_dtype
from bench.diffusion.streams import Stream
from bench.errors import BenchError
from bench.runtime.context import LOCAL, Runtime, evaluating
from bench.runtime.progress import progress_of

DECODER_CHUNK = 1 << 24  # logits per piece of the 256-way decoder ([pairs, D, 256]), to bound its memory


@dataclass
class ContinuousResult:
    """The continuous-time bound per image in bits/dim, ``total = prior + diffusion + decoder``, estimated.

    ``stderr``: the standard error of ``total.mean()`` over images and Monte Carlo together (``total.std()/√N``,
    NaN for one image): for comparing models on the data law. ``stderr_mc``: the Monte Carlo part alone, these
    images held fixed (from the two replicates per image). ``per_t`` [S] is the mean diffusion integrand in
    bits/dim over each stratum (over images and both replicates), between ``per_t_edges`` [S + 1] in t ∈ [0, 1]:
    ½γ'(t)‖ε − ε̂‖² for L_∞, (T/2)·expm1(γ_t − γ_s)‖ε − ε̂‖² for L_T, so that
    Σ_k (edges[k+1] − edges[k])·per_t[k] = ``diffusion.mean()``. ``T``: None for L_∞, else the finite T.
    ``t_per_image``: the pairs per image actually evaluated (2S). There is one convention (no clipped/unclipped
    pair: the continuous-time bound clips nothing), so unlike :class:`bench.diffusion.bound.BoundResult` it has no
    ``.other``."""

    total: torch.Tensor  # [N] float64, bits/dim
    prior: torch.Tensor  # [N]
    diffusion: torch.Tensor  # [N]
    decoder: torch.Tensor  # [N]
    stderr: float
    stderr_mc: float
    t_per_image: int
    T: int | None
    method: str  # what was estimated and how, in words (the bpd_method)
    per_t_edges: torch.Tensor  # [S + 1] float64 t-bin edges in [0, 1]
    per_t: torch.Tensor  # [S] float64 bits/dim, the mean diffusion integrand per bin

    def summary(self, prefix: str = "bpd") -> dict[str, float]:
        """Means over the images: ``prefix``, ``prefix/prior``, ``prefix/diffusion``, ``prefix/decoder``,
        ``prefix_stderr`` and ``prefix_stderr_mc``."""
        return {
            prefix: self.total.mean().item(),
            f"{prefix}/prior": self.prior.mean().item(),
            f"{prefix}/diffusion": self.diffusion.mean().item(),
            f"{prefix}/decoder": self.decoder.mean().item(),
            f"{prefix}_stderr": self.stderr,
            f"{prefix}_stderr_mc": self.stderr_mc,
        }


# --------------------------------------------------------------------- the terms of a batch of pairs
def _decoder_in_pieces(x: torch.Tensor, z0: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """:func:`decoder_nats` [B], a few rows at a time so that its [rows, D, 256] logits stay near DECODER_CHUNK."""
    rows = max(1, DECODER_CHUNK // (x[0].numel() * 256))
    return torch.cat([decoder_nats(x[i : i + rows], z0[i : i + rows], gamma_0) for i in range(0, len(x), rows)])


def bound_terms_nats(model, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     T: int | None = None) -> dict[str, torch.Tensor]:
    """The continuous-time bound's three terms of each example in nats: {"prior", "decoder", "diffusion"} [B],
    in ``x``'s dtype (float32 or float64), differentiable (a learned schedule gets its gradient through γ(t),
    γ'(t), γ(0) and γ(1)).

    ``x`` [B, C, H, W] on the model's scale (k/127.5 − 1 for 8-bit data), ``t`` [B] in [0, 1], ``eps`` [B, C, H, W]
    the noise of z_t = α_t x + σ_t ε and of the decoder's z_0 = α₀ x + σ₀ ε. ``T`` None: the diffusion term is
    L_∞'s integrand ½γ'(t)‖ε − ε̂‖²; else L_T's (T/2)·expm1(γ(t) − γ(t − 1/T))‖ε − ε̂‖² (t = i/T, i ∈ 1..T).
    The network runs as ``model(z_t, t)`` in its parameters' dtype; everything else with autocast off."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        raise BenchError(f"the continuous-time bound's terms need float32 or float64 data, got {x.dtype}")
    schedule = find_denoiser(model).schedule
    dtype, device = x.dtype, x.device
    t, eps = t.to(dtype), eps.to(dtype)
    with torch.autocast(device.type, enabled=False):
        gamma, slope = schedule.gamma_and_slope(t)
        ends = schedule.gamma(torch.tensor([0.0, 1.0], dtype=dtype, device=device))
        a2, s2 = alpha_sigma_squared(gamma.reshape(-1, *([1] * (x.dim() - 1))))
        z_t = a2.sqrt() * x + s2.sqrt() * eps
    eps_hat = model(z_t.to(network_dtype(model)), t)
    with torch.autocast(device.type, enabled=False):
        if T is None:
            diffusion = diffusion_nats(eps, eps_hat, slope)
        else:
            diffusion = finite_diffusion_nats(eps, eps_hat, gamma, schedule.gamma(t - 1.0 / T), T)
        a2_0, s2_0 = alpha_sigma_squared(ends[0])
        decoder = _decoder_in_pieces(x, a2_0.sqrt() * x + s2_0.sqrt() * eps, ends[0])
        return {"prior": prior_nats(x, ends[1]), "decoder": decoder, "diffusion": diffusion}


# --------------------------------------------------------------------- the plan: which t each pair takes
def _strata(S: int, T: int | None) -> tuple[int, torch.Tensor]:
    """(pairs per replicate, the strata's edges [pairs + 1]): in t for L_∞ (k/S), in steps for L_T (0..T)."""
    if T is None:
        return S, torch.arange(S + 1, dtype=torch.float64) / S
    pairs = min(S, T)
    return pairs, torch.tensor([round(k * T / pairs) for k in range(pairs + 1)], dtype=torch.float64)


def _times(u: torch.Tensor, edges: torch.Tensor, T: int | None) -> torch.Tensor:
    """The t of each pair from its stratum's uniform ``u`` [..., S]: (k + u)/S, or i/T with step i drawn uniformly
    in stratum k's steps edges[k] + 1..edges[k + 1]."""
    lo, hi = edges[:-1], edges[1:]
    if T is None:
        return lo + u * (hi - lo)
    step = lo + 1 + torch.minimum((u * (hi - lo)).floor(), hi - lo - 1)
    return step / T


def _data(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] pixels on the model's scale, or floating points as given (the oracle's tests), float64."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BenchError(f"images must be a tensor [N, C, H, W] with N >= 1, got {shape}")
    if images.dtype == torch.uint8:
        return to_data_scale(images).to(torch.float64)
    if not images.is_floating_point():
        raise BenchError(f"images must be uint8 pixels (or floating points on the model's scale), got {images.dtype}")
    return images.to(torch.float64)


ALONG = ("schedule", "line")  # where the t of L_∞ are spread: along the model's schedule, or the line between its ends


@contextmanager
def along_line(model):
    """The model's schedule replaced, inside the block, by the straight line between its end points (the schedule is
    put back after it, whatever happens)."""
    den = find_denoiser(model)
    own = den.schedule
    start, end = own.endpoints()
    den.schedule = FixedLinear(start, end)
    try:
        yield
    finally:
        den.schedule = own


def _describe(T: int | None, pairs: int, N: int, precision: torch.dtype, every_step: bool, along: str) -> str:
    what = "L_∞ (VDM), ½ γ'(t)‖ε − ε̂‖²" if T is None else f"L_T, T = {T}, (T/2) expm1(γ_t − γ_s)‖ε − ε̂‖²"
    how = ("every step once per replicate" if every_step
           else "one t uniform in each of the replicate's strata" if T is None
           else "one step uniform in each of the replicate's strata of steps")
    if along == "line":
        how += ", t along the line between the schedule's γ(0) and γ(1) (the same expectation as along the schedule)"
    # no ';' inside: a tag's first ';' ends its method part (reports show that part)
    return (f"continuous-time bound {what}, Monte Carlo: 2×{pairs} stratified t per image ({how}), {N} images, "
            f"decoder: VDM's 256-way on the 8-bit bins k/127.5 − 1 with one z_0 per pair, prior exact at γ(1), "
            f"terms in {str(precision).removeprefix('torch.')}")


# --------------------------------------------------------------------- the evaluator
def continuous_bound(model, images: torch.Tensor, *, t_per_image: int = 32, T: int | None = None, seed: int = 0,
                     runtime: Runtime = LOCAL, along: str = "schedule") -> ContinuousResult:
    """The continuous-time bound (``T=None``: L_∞) or its finite-T form (``T``) per image, in bits/dim, estimated
    with ``t_per_image`` (even, >= 2) network calls per image in two stratified replicates (module docstring).

    ``images`` uint8 [N, C, H, W] (or floating points on the model's scale: then the decoder reads each value's
    nearest bin, and only the prior and diffusion terms mean what they say). ``model``: anything that holds a
    :class:`bench.diffusion.continuous.ContinuousDenoiser` (its schedule gives γ), called in eval mode, its
    training mode restored afterwards. Pairs go ``runtime.batch_size`` (default 1024) at a time, image-major;
    ``runtime.dist``: each rank evaluates its block of whole batches and all get the result. ``along``: "schedule",
    or "line" for L_∞ with t along the line between the schedule's end points (module docstring)."""
    if along not in ALONG or (along == "line" and T is not None):
        raise BenchError(f"along must be one of {', '.join(ALONG)} ('line' only for L_∞, T None), got {along!r}")
    with along_line(model) if along == "line" else nullcontext():
        return _bound(model, images, t_per_image, T, seed, runtime, along)


def _bound(model, images: torch.Tensor, t_per_image: int, T: int | None, seed: int, runtime: Runtime,
           along: str) -> ContinuousResult:
    runtime = runtime.resolve(model, batch_size=1024)
    if isinstance(t_per_image, bool) or not isinstance(t_per_image, int) or t_per_image < 2 or t_per_image % 2:
        raise BenchError(f"t_per_image must be an even number >= 2 (two replicates), got {t_per_image!r}")
    if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise BenchError(f"T must be None (the continuous-time bound) or an integer >= 1, got {T!r}")
    if runtime.batch_size < 1:
        raise BenchError(f"batch_size must be >= 1, got {runtime.batch_size}")
    find_denoiser(model)  # a DDPM network is refused before any work
    x = _data(images)
    N, shape, D = x.shape[0], x.shape[1:], x[0].numel()
    S, edges = _strata(t_per_image // 2, T)
    K = 2 * S
    ts = torch.empty(N, K, dtype=torch.float64)
    for i in range(N):  # the stream (CONTINUOUS) draws the strata's uniforms first, then the noise of the K pairs
        ts[i] = _times(torch.rand(2, S, generator=Stream.CONTINUOUS.generator(seed, i), dtype=torch.float64),
                       edges, T).reshape(-1)

    def image_noise(i: int) -> torch.Tensor:  # [K, C, H, W] float64: one per pair
        g = Stream.CONTINUOUS.generator(seed, i)
        torch.rand(2, S, generator=g, dtype=torch.float64)
        return torch.randn(K, *shape, generator=g, dtype=torch.float64)

    nats = _pairs_nats(model, x, ts, image_noise, T, runtime, f"continuous bound, {N} images x {K} t")
    bits = bits_per_dim_from_nats(nats, D)  # [N, K, 2]: diffusion, decoder
    weights = (edges[1:] - edges[:-1]) / (edges[-1] - edges[0])  # each stratum's share of [0, 1] or of the T steps
    diffusion_reps = (bits[:, :, 0].view(N, 2, S) * weights).sum(dim=2)  # [N, 2]
    decoder_reps = bits[:, :, 1].view(N, 2, S).mean(dim=2)
    with torch.no_grad():  # γ(1) where the schedule's parameters are, in the runtime's precision
        gamma_1 = find_denoiser(model).schedule.gamma(torch.ones((), dtype=runtime.precision, device=runtime.device))
    prior = bits_per_dim_from_nats(prior_nats(x, gamma_1.cpu().double()), D)
    reps = diffusion_reps + decoder_reps  # the prior is exact: it adds nothing to the replicates' difference
    diffusion, decoder = diffusion_reps.mean(dim=1), decoder_reps.mean(dim=1)
    total = prior + diffusion + decoder
    return ContinuousResult(
        total=total, prior=prior, diffusion=diffusion, decoder=decoder,
        stderr=total.std().item() / math.sqrt(N) if N > 1 else math.nan,
        stderr_mc=math.sqrt(((reps[:, 0] - reps[:, 1]) ** 2 / 4).sum().item()) / N,  # Var((A+B)/2) = E(A−B)²/4
        t_per_image=K, T=T, method=_describe(T, S, N, runtime.precision, T is not None and S == T, along),
        per_t_edges=edges / (T or 1), per_t=bits[:, :, 0].view(N, 2, S).mean(dim=(0, 1)),
    )


@torch.no_grad()
def _pairs_nats(model, x: torch.Tensor, ts: torch.Tensor, image_noise, T: int | None, runtime: Runtime,
                what: str) -> torch.Tensor:
    """The diffusion and decoder terms of every (image, t) pair in nats, float64 [N, K, 2] on the CPU: the pairs
    image-major, ``runtime.batch_size`` at a time, each rank of ``runtime.dist`` its contiguous block of whole
    batches (gathered on every rank). ``image_noise(i)`` [K, C, H, W] is called once per image."""
    N, K = ts.shape
    P, batch_size, device, dist = N * K, runtime.batch_size, runtime.device, runtime.dist
    mine = dist.block(P, unit=batch_size)
    starts = range(mine.start, mine.stop, batch_size)
    local = torch.zeros(len(mine), 2, dtype=runtime.precision, device=device)
    flat_t = ts.reshape(-1)
    noise_image, noise_cache = -1, None
    with evaluating(model):
        for start in progress_of(starts, len(starts), runtime.label(what), "batch", runtime.shows_progress):
            pairs = torch.arange(start, min(start + batch_size, P))
            idx, k = pairs // K, pairs % K
            noise = torch.empty(len(pairs), *x.shape[1:], dtype=torch.float64)
            for i in idx.unique().tolist():
                if i != noise_image:
                    noise_image, noise_cache = i, image_noise(i)
                rows = idx == i
                noise[rows] = noise_cache[k[rows]]
            terms = bound_terms_nats(model, to_device(x[idx], device).to(runtime.precision),
                                     to_device(flat_t[pairs], device), to_device(noise, device), T)
            at = start - mine.start
            local[at : at + len(pairs)] = torch.stack([terms["diffusion"], terms["decoder"]], dim=1).detach()
    return dist.gather(local, P, unit=batch_size).cpu().double().view(N, K, 2)
