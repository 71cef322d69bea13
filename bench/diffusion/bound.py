"""The variational bound in bits/dim: exactly (every t), or estimated with K network calls per image.

One evaluator for every variant: it goes through ``variant.p_mean_variance`` (the reverse process
the variant defines) and :func:`bench.diffusion.variant.vb_term_nats`, so numbers are comparable across
variants. The network output is cast to float64 before the bound's terms are formed.

Two conventions, from the same network outputs (they differ only after the network call):
``clip_x0=True`` (the default) is the protocol of DDPM (``calc_bpd_loop``) and iDDPM (``image_nll.py``,
``clip_denoised=True``): x̂_0 is clipped to [−1, 1] inside the reverse step, the same step the
sampler draws with; its metrics are ``bpd``, ``bpd/prior``, ``bpd/vb``, ``bpd/decoder``.
``clip_x0=False`` is the bound of the unclipped reverse process as trained: ``bpd_unclipped…``.
Every result carries the other convention in ``.other``, so both are always logged.

Noise is a function of (seed, image index, t) alone, so results do not depend on the batch size or
on how (image, t) pairs are grouped into batches. Under torch.distributed (``runtime.dist``) the batches are cut
into one contiguous block per rank and the per-pair terms gathered, so every rank gets the result one
process would compute, from the same batches (bit-equal where the kernels are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.diffusion.gaussian import bits_per_dim_from_nats, to_data_scale
from bench.diffusion.schedule import Schedule
from bench.diffusion.streams import Stream
from bench.diffusion.variant import Variant, prior_nats, vb_term_nats
from bench.errors import BenchError
from bench.runtime.context import LOCAL, Runtime, default_precision, evaluating
from bench.runtime.dist import Dist
from bench.runtime.progress import progress_of


@dataclass
class BoundResult:
    """The exact bound per image, in bits/dim. ``total = prior + vb + decoder``.

    ``vb`` is Σ_{t≥2} L_{t−1}; ``per_t`` [T] is the mean of L_t over the images (index 0 is the
    decoder L_0, index i ≥ 1 is the KL term at paper time t = i + 1).
    """

    total: torch.Tensor  # [N] float64, bits/dim
    prior: torch.Tensor  # [N]
    vb: torch.Tensor  # [N]
    decoder: torch.Tensor  # [N]
    per_t: torch.Tensor  # [T]
    method: str = "exact"
    clip_x0: bool = True  # the convention: x̂_0 clipped to [−1, 1] in the reverse step (DDPM/iDDPM), or not
    other: BoundResult | None = None  # the same bound under the other convention, from the same network calls

    def name(self, prefix: str = "bpd") -> str:
        """The metric name of this convention: ``prefix`` (clipped, the papers' protocol) or ``prefix_unclipped``."""
        return prefix if self.clip_x0 else f"{prefix}_unclipped"

    def _own_summary(self, prefix: str) -> dict[str, float]:
        name = self.name(prefix)
        return {
            name: self.total.mean().item(),
            f"{name}/prior": self.prior.mean().item(),
            f"{name}/vb": self.vb.mean().item(),
            f"{name}/decoder": self.decoder.mean().item(),
        }

    def summary(self, prefix: str = "bpd") -> dict[str, float]:
        """Means over the images under both conventions, keyed by the metric names the suite logs:
        ``bpd``, ``bpd/vb``… (clipped) and ``bpd_unclipped``, ``bpd_unclipped/vb``… (``prefix`` replaces
        ``bpd``, e.g. ``bpd_estimate`` for the training-time estimate)."""
        out = self._own_summary(prefix)
        if self.other is not None:
            out.update(self.other._own_summary(prefix))
        return out


@dataclass
class EstimateResult(BoundResult):
    """An unbiased estimate of the bound per image with its Monte Carlo standard error.

    ``stderr`` is the standard error of ``total.mean()`` as an estimate of the exact bound on these
    images (from two independent stratified replicates per image). ``stderr_images`` is
    ``total.std() / √N``: it adds the spread between images, for comparing models on the data law.
    """

    stderr: float = math.nan
    stderr_images: float = math.nan
    calls_per_image: int = 0
    per_t: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    strata: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [S + 1] index edges (paper t = index + 1)
    per_stratum: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [S] mean L_t over each stratum's t

    def binned_per_t(self, T: int) -> torch.Tensor:
        """The per-t curve [T] as far as the estimate sees it: the decoder L_0 at index 0, and over each
        stratum its estimated mean L_t (unbiased: each call draws its t uniformly within the stratum)."""
        out = torch.full((T,), math.nan, dtype=torch.float64)
        out[0] = self.decoder.mean()
        for s, value in enumerate(self.per_stratum.tolist()):
            out[int(self.strata[s]) : int(self.strata[s + 1])] = value
        return out

    def _own_summary(self, prefix: str) -> dict[str, float]:
        return {**super()._own_summary(prefix), f"{self.name(prefix)}_stderr": self.stderr}


# --------------------------------------------------------------------- helpers
def _check_inputs(images: torch.Tensor, sched: Schedule, batch_size: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise BenchError(f"images must be a uint8 tensor [N, C, H, W] with pixels 0..255, got {got}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise BenchError(f"images must have shape [N, C, H, W] with N >= 1, got {list(images.shape)}")
    if not isinstance(sched, Schedule):
        raise BenchError(f"sched must be a bench.Schedule, got {type(sched).__name__}")
    if batch_size < 1:
        raise BenchError(f"batch_size must be >= 1, got {batch_size}")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait for the device (pinned, asynchronous copy)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _my_batches(pairs: int, batch_size: int, dist: Dist) -> range:
    """The batch starts this rank evaluates: its contiguous block of whole batches."""
    mine = dist.block(pairs, unit=batch_size)
    return range(mine.start, mine.stop, batch_size)


def _gather_pairs(local: torch.Tensor, pairs: int, batch_size: int, dist: Dist) -> torch.Tensor:
    """Every rank's [2, its pairs] terms (see :func:`_my_batches`) as the whole [2, pairs], on every rank."""
    return dist.gather(local.T.contiguous(), pairs, unit=batch_size).T


@torch.no_grad()
def _terms(model, variant: Variant, sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
           dtype: torch.dtype | None = None):
    """L_t in nats per (image, t) pair, summed over dims, from one network call under both conventions:
    [2, B] (row 0 with x̂_0 clipped to [−1, 1], row 1 unclipped), in ``dtype`` (None: the device's
    :func:`default_precision`, float64 where it has it)."""
    x_t = sched.q_sample(x0, t, noise)
    out = model(x_t, t)
    dtype = dtype or default_precision(x0.device)
    x0d, x_td, outd = x0.to(dtype), x_t.to(dtype), out.to(dtype)
    return torch.stack([vb_term_nats(variant.p_mean_variance(outd, sched, x_td, t, clip_x0=clip), sched, x0d, x_td, t)
                        for clip in (True, False)])


def _paired(first: BoundResult, second: BoundResult, clip_x0: bool) -> BoundResult:
    """The result under ``clip_x0`` with the other convention attached (``first`` is the clipped one)."""
    main, other = (first, second) if clip_x0 else (second, first)
    main.other = other
    return main


def _prior_bits(sched: Schedule, images: torch.Tensor) -> torch.Tensor:
    x0 = to_data_scale(images).to(torch.float64)
    return bits_per_dim_from_nats(prior_nats(sched, x0), x0[0].numel())


@torch.no_grad()
def _pairs_nats(model, variant: Variant, sched: Schedule, images: torch.Tensor, t: torch.Tensor,
                image_noise: Callable[[int], torch.Tensor], runtime: Runtime, what: str) -> torch.Tensor:
    """L_t in nats of every (image, t) pair under both conventions, float64 [2, N, K] on the CPU (row 0 with x̂_0
    clipped, row 1 unclipped): the one evaluator of the exact bound and the estimate.

    ``t`` long [N, K]: image i's K timesteps (0-based), its pairs in that order; the pairs are taken image-major,
    ``runtime.batch_size`` at a time. ``image_noise(i)`` [K, C, H, W]: image i's noise, one per pair, called once
    per image (when its first pair comes). ``model(x_t, t)`` is called in eval mode; its training mode is restored
    afterwards. ``runtime`` (resolved): each rank of ``runtime.dist`` evaluates its contiguous block of whole
    batches, and every rank gets all the terms. ``what``: the progress bar's name.
    """
    N, K = t.shape
    batch_size, device, dist = runtime.batch_size, runtime.device, runtime.dist
    starts = _my_batches(N * K, batch_size, dist)
    local = torch.zeros(2, len(dist.block(N * K, unit=batch_size)), dtype=runtime.precision, device=device)
    flat_t = t.reshape(-1)
    noise_image, noise_cache = -1, None
    with evaluating(model):
        for start in progress_of(starts, len(starts), runtime.label(what), "batch", runtime.shows_progress):
            pairs = torch.arange(start, min(start + batch_size, N * K))
            idx, k = pairs // K, pairs % K
            noise = torch.empty(len(pairs), *images.shape[1:])
            for i in idx.unique().tolist():
                if i != noise_image:
                    noise_image, noise_cache = i, image_noise(i)
                rows = idx == i
                noise[rows] = noise_cache[k[rows]]
            x0 = to_data_scale(images[idx])
            at = start - starts.start
            local[:, at : at + len(pairs)] = _terms(model, variant, sched, to_device(x0, device),
                                                    to_device(flat_t[pairs], device), to_device(noise, device),
                                                    runtime.precision)
    return _gather_pairs(local, N * K, batch_size, dist).cpu().double().view(2, N, K)


# --------------------------------------------------------------------- exact
def bits_per_dim(
    model,
    variant: Variant,
    sched: Schedule,
    images: torch.Tensor,
    *,
    seed: int = 0,
    clip_x0: bool = True,
    runtime: Runtime = LOCAL,
) -> BoundResult:
    """The bound −log p_θ(x_0) ≤ L_T + Σ_{t≥2} L_{t−1} + L_0 per image, every t evaluated.

    ``images`` uint8 [N, C, H, W]. All N·T (image, t) pairs are batched ``runtime.batch_size`` (default 512)
    at a time (image-major order), each with its own noise, drawn from the image's stream
    (:attr:`Stream.BOUND_NOISE`). ``model(x_t, t)`` is called in eval mode; its training mode is restored
    afterwards. ``clip_x0``: the convention of the result (see the module docstring); ``.other`` holds the
    other one. ``runtime.dist``: the ranks that share the work (each evaluates a block of the batches; all
    get the result).
    """
    runtime = runtime.resolve(model, batch_size=512)
    _check_inputs(images, sched, runtime.batch_size)
    N, T = images.shape[0], sched.T
    D = images[0].numel()

    def image_noise(i: int) -> torch.Tensor:  # [T, C, H, W]: one per t
        return torch.randn(T, *images.shape[1:], generator=Stream.BOUND_NOISE.generator(seed, i))

    nats = _pairs_nats(model, variant, sched, images, torch.arange(T).repeat(N, 1), image_noise, runtime,
                       f"exact bits/dim, {N} images x {T} t")
    prior = _prior_bits(sched, images)
    results = []
    for row, clip in ((0, True), (1, False)):
        bits = bits_per_dim_from_nats(nats[row], D)
        decoder, vb = bits[:, 0], bits[:, 1:].sum(dim=1)
        results.append(BoundResult(total=prior + vb + decoder, prior=prior, vb=vb, decoder=decoder,
                                   per_t=bits.mean(dim=0), clip_x0=clip))
    return _paired(*results, clip_x0)


# --------------------------------------------------------------------- estimated
def strata_edges(T: int, strata: int) -> torch.Tensor:
    """Boundaries of ``strata`` contiguous groups of the indices 1..T−1 (paper t = 2..T), denser at
    small t, where L_t changes fastest; every group non-empty. Returns long [strata + 1]."""
    if not 1 <= strata <= T - 1:
        raise BenchError(f"the estimator needs 1 <= strata <= T - 1 = {T - 1}, got {strata}")
    edges = [1]
    for k in range(1, strata):
        quad = 1 + round((T - 1) * (k / strata) ** 2)
        edges.append(min(max(quad, edges[-1] + 1), T - (strata - k)))  # keep every stratum non-empty
    edges.append(T)
    return torch.tensor(edges)


def estimate_bits_per_dim(
    model,
    variant: Variant,
    sched: Schedule,
    images: torch.Tensor,
    calls_per_image: int = 33,
    *,
    seed: int = 0,
    clip_x0: bool = True,
    runtime: Runtime = LOCAL,
) -> EstimateResult:
    """An unbiased estimate of :func:`bits_per_dim`'s total with ``calls_per_image`` network calls.

    One call evaluates the decoder L_0 exactly; the other K − 1 form two independent stratified
    replicates of Σ_{t≥2} L_{t−1}, each drawing one t uniformly within each of S = (K − 1) // 2
    strata (:func:`strata_edges`) and weighting it by the stratum's size. The per-image estimate is
    the replicates' mean, and their difference gives the Monte Carlo standard error.
    ``clip_x0``: the convention of the result (see the module docstring); ``.other`` holds the other one.
    The pairs go as in :func:`bits_per_dim` (``runtime.batch_size``, default 512, at a time; ``runtime.dist``).
    """
    runtime = runtime.resolve(model, batch_size=512)
    _check_inputs(images, sched, runtime.batch_size)
    S = (calls_per_image - 1) // 2
    if S < 1:
        raise BenchError("calls_per_image must be >= 3 (one decoder call, two stratified replicates), "
                         f"got {calls_per_image}")
    edges = strata_edges(sched.T, S)
    sizes = (edges[1:] - edges[:-1]).to(torch.float64)
    N, K = images.shape[0], 1 + 2 * S
    D = images[0].numel()
    # Per image: t for the decoder, then replicate A's S strata, then replicate B's; its stream (ESTIMATE) draws
    # the strata's uniforms first, then the noise of its K calls (drawn when its batch comes).
    ts = torch.empty(N, K, dtype=torch.long)
    for i in range(N):
        u = torch.rand(2, S, generator=Stream.ESTIMATE.generator(seed, i), dtype=torch.float64)
        within = (u * sizes).floor().long().clamp(max=(sizes.long() - 1))
        ts[i, 0] = 0
        ts[i, 1:] = (edges[:-1] + within).reshape(-1)

    def image_noise(i: int) -> torch.Tensor:  # [K, C, H, W]: one per call
        g = Stream.ESTIMATE.generator(seed, i)
        torch.rand(2, S, generator=g, dtype=torch.float64)  # the strata's draws come first in the stream
        return torch.randn(K, *images.shape[1:], generator=g)

    nats = _pairs_nats(model, variant, sched, images, ts, image_noise, runtime,
                       f"estimated bits/dim, {N} images x {K} calls")
    prior = _prior_bits(sched, images)
    results = [_estimate(bits_per_dim_from_nats(nats[row], D), sizes, prior, clip, edges)
               for row, clip in ((0, True), (1, False))]
    return _paired(*results, clip_x0)


def _estimate(bits: torch.Tensor, sizes: torch.Tensor, prior: torch.Tensor, clip_x0: bool,
              edges: torch.Tensor) -> EstimateResult:
    """The estimate from the per-call terms ``bits`` [N, K] (decoder, replicate A's strata, replicate B's)."""
    N, S = bits.shape[0], len(sizes)
    decoder = bits[:, 0]
    rep_a = (bits[:, 1 : 1 + S] * sizes).sum(dim=1)
    rep_b = (bits[:, 1 + S :] * sizes).sum(dim=1)
    vb = (rep_a + rep_b) / 2
    total = prior + vb + decoder
    # Var((A+B)/2 | x) = E[(A−B)²]/4 per image; the mean over N images divides by N².
    stderr = math.sqrt(((rep_a - rep_b) ** 2 / 4).sum().item()) / N
    stderr_images = (total.std().item() / math.sqrt(N)) if N > 1 else math.nan
    return EstimateResult(
        total=total, prior=prior, vb=vb, decoder=decoder, method="estimate", clip_x0=clip_x0,
        stderr=stderr, stderr_images=stderr_images, calls_per_image=bits.shape[1],
        strata=edges, per_stratum=(bits[:, 1 : 1 + S] + bits[:, 1 + S :]).mean(dim=0) / 2,
    )
