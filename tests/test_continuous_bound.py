"""The continuous-time bound's evaluator (bench.diffusion.continuous_bound) against an analytic oracle.

For data x ~ N(μ, s² I) the optimal denoiser of z_t = α x + σ ε is ε̂* = σ(z − αμ)/(α²s² + σ²)
(tests/oracle.py, :class:`GaussianContinuousOracle`), and every expected term has a closed form. The tests pin the
estimate to those forms within its standard error, L_T to its own closed form for T = 1..16 (falling toward L_∞),
one step of L_T to the discrete-time `elbo` β̃ KL term on the same schedule and noise, the invariance of the
expected bound to the schedule's shape between fixed end points (with different estimator variances), gradients
that reach a learned schedule through γ'(t), and results that do not depend on the batch size.
"""

from __future__ import annotations

import math

import pytest
import torch
from nets import nonzero_network
from oracle import (
    GaussianContinuousOracle,
    PowerSchedule,
    continuous_diffusion_closed_form,
    continuous_diffusion_given_x,
    finite_diffusion_closed_form,
    finite_diffusion_given_x,
    gaussian_grid_data,
)

from bench.diffusion.continuous import (
    ContinuousDenoiser,
    FixedLinear,
    LearnedEndpoints,
    MonotoneNet,
    NoiseSchedule,
    low_discrepancy_times,
)
from bench.diffusion.continuous_bound import ContinuousResult, bound_terms_nats, continuous_bound
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import vb_term_nats
from bench.errors import BenchError
from bench.runtime.context import Runtime
from variants.elbo import Elbo

G0, G1, S, MU = -6.0, 4.0, 0.5, 0.1  # the oracle's schedule end points and data law N(μ, s²)
SHAPE = (1, 4, 4)
D = 16
LN2 = math.log(2)


def _gaussian_points(n: int = 64, seed: int = 0) -> torch.Tensor:
    """n continuous (not quantised) points of N(μ, s² I), float64 [n, 1, 4, 4]."""
    return MU + S * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _oracle(schedule: NoiseSchedule | None = None) -> GaussianContinuousOracle:
    return GaussianContinuousOracle(schedule or FixedLinear(G0, G1), MU, S)


def _linear(t: float) -> float:
    return G0 + (G1 - G0) * t


def _stderr(x: torch.Tensor) -> float:
    return x.std().item() / math.sqrt(len(x))


# --------------------------------------------------------------------- a. the estimate against its closed form
def test_the_diffusion_estimate_equals_its_closed_form_within_its_standard_error():
    """E[L_∞] = ½ E_t[γ'(t) E‖ε − ε̂*‖²] with the optimal per-dimension error Var(ε | z_t) = α²s²/(α²s² + σ²)
    = s²/(s² + e^γ) (σ²/α² = e^γ), so, substituting γ = γ(t),
    E[L_∞] = ½ D ∫_{γ₀}^{γ₁} s²/(s² + e^γ) dγ = ½ D [γ − log(s² + e^γ)]_{γ₀}^{γ₁}
           = ½ D [log(1 + s² e^{−γ₀}) − log(1 + s² e^{−γ₁})],
    the expectation over x ~ N(μ, s² I) and ε together: the spread of the per-image estimate covers both."""
    x = _gaussian_points(256)
    result = continuous_bound(_oracle(), x, t_per_image=32)
    closed = continuous_diffusion_closed_form(G0, G1, S, D) / (D * LN2)
    estimate, stderr = result.diffusion.mean().item(), _stderr(result.diffusion)
    assert abs(estimate - closed) < 3 * stderr, (estimate, closed, stderr)
    assert 0 < stderr < 0.01 * closed  # the check has teeth: 3 standard errors are 2% of the value
    # sharper: E_ε[L_∞ | x] of these very images (continuous_diffusion_given_x), within the Monte Carlo error alone
    gap = result.diffusion - continuous_diffusion_given_x(x, G0, G1, MU, S) / (D * LN2)
    assert abs(gap.mean().item()) < 3 * _stderr(gap) < 0.02 * closed, (gap.mean(), _stderr(gap))
    assert isinstance(result, ContinuousResult) and result.T is None and result.t_per_image == 32
    assert "L_∞" in result.method and "2×16 stratified t" in result.method and "256 images" in result.method
    # the per-t curve integrates to the diffusion term
    widths = result.per_t_edges[1:] - result.per_t_edges[:-1]
    assert result.per_t_edges[0] == 0 and result.per_t_edges[-1] == 1 and len(result.per_t) == 16
    assert math.isclose((widths * result.per_t).sum().item(), estimate, rel_tol=1e-12)


def test_the_prior_is_exact_and_the_summary_carries_every_term():
    """KL(N(α₁x, σ₁²) ‖ N(0, 1)) = ½ [α₁²x² + σ₁² − log σ₁² − 1] per dimension, α₁² = 1/(1 + e^{γ₁}),
    log σ₁² = γ₁ − log(1 + e^{γ₁}), summed over the image and divided by D ln 2."""
    x = _gaussian_points(8)
    result = continuous_bound(_oracle(), x, t_per_image=4)
    a2, log_s2 = 1 / (1 + math.exp(G1)), G1 - math.log1p(math.exp(G1))
    per_dim = 0.5 * (a2 * x**2 + math.exp(log_s2) - log_s2 - 1)
    assert torch.allclose(result.prior, per_dim.flatten(1).sum(1) / (D * LN2), rtol=1e-12, atol=0)
    assert torch.allclose(result.total, result.prior + result.diffusion + result.decoder, rtol=1e-14, atol=0)
    summary = result.summary("bpd")
    assert set(summary) == {"bpd", "bpd/prior", "bpd/diffusion", "bpd/decoder", "bpd_stderr", "bpd_stderr_mc"}
    assert summary["bpd"] == pytest.approx(summary["bpd/prior"] + summary["bpd/diffusion"] + summary["bpd/decoder"])
    assert summary["bpd_stderr"] == result.stderr > 0 and summary["bpd_stderr_mc"] == result.stderr_mc > 0


def _decoder_expectation(k: torch.Tensor, gamma_0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of −log p(c_k | z_0) over z_0 = α₀c_k + σ₀ε for each bin k, by the trapezoid rule over
    ε ∈ [−9, 9]: p(c_k | z) = N(z; α₀c_k, σ₀²)/Σ_j N(z; α₀c_j, σ₀²), the decoder VDM defines, written here
    in z-space rather than through the evaluator's logits."""
    a0, s0 = math.sqrt(1 / (1 + math.exp(gamma_0))), math.sqrt(1 / (1 + math.exp(-gamma_0)))
    eps = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    c = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    z = a0 * c[k].unsqueeze(-1) + s0 * eps  # [K, E]
    log_q = -0.5 * ((z.unsqueeze(-1) - a0 * c) / s0) ** 2  # [K, E, 256]
    nll = -(log_q.gather(-1, k.view(-1, 1, 1).expand(-1, len(eps), 1)).squeeze(-1) - log_q.logsumexp(-1))
    w = torch.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi) * (eps[1] - eps[0])
    w[0] /= 2
    w[-1] /= 2
    mean = (nll * w).sum(-1)
    return mean, (nll**2 * w).sum(-1) - mean**2


def test_the_decoder_term_equals_its_numerical_expectation():
    images, _ = gaussian_grid_data(16, 0.5, shape=SHAPE)
    gamma_0 = -6.0  # σ₀/α₀ = e^{−3} ≈ 0.05, several bins wide: a decoder term far from zero
    result = continuous_bound(_oracle(FixedLinear(gamma_0, G1)), images, t_per_image=32)
    bins, where = images.flatten().long().unique(return_inverse=True)
    mean, var = _decoder_expectation(bins, gamma_0)
    expected = mean[where].view(16, -1).sum(1) / (D * LN2)  # [N] bits/dim
    # each image's decoder term is the mean of its 32 draws (one per pair); pixels' draws are independent
    stderr = math.sqrt((var[where].sum() / 32).item()) / 16 / (D * LN2)
    assert expected.mean() > 0.5  # bits/dim: a term worth checking
    assert abs(result.decoder.mean().item() - expected.mean().item()) < 3 * stderr, (result.decoder.mean(), expected)


# --------------------------------------------------------------------- b. L_T falls toward L_∞
def test_finite_T_bounds_equal_their_closed_form_and_fall_toward_the_continuous_one():
    """For the same (optimal) denoiser, E[L_T] = Σ_{i=1..T} ½ expm1(γ(i/T) − γ((i−1)/T)) · D s²/(s² + e^{γ(i/T)})
    (each step's KL is ½ expm1(γ_t − γ_s)‖ε − ε̂‖², its expected error s²/(s² + e^{γ_t}) per dimension). In SNR
    v = e^{−γ} that is Σ (v_s − v_t)·h(v_t) with h(v) = s²/(1 + s² v) decreasing in v: an upper Riemann sum of
    L_∞ = ∫ h dv, so L_2T ≤ L_T and L_T → L_∞. With t_per_image/2 ≥ T every step is taken once per replicate."""
    x = _gaussian_points()
    oracle = _oracle()
    continuous = continuous_diffusion_closed_form(G0, G1, S, D)
    closed = [finite_diffusion_closed_form(_linear, T, S, D) for T in (1, 2, 4, 8, 16, 1024)]
    assert all(a > b for a, b in zip(closed, closed[1:])) and closed[-1] > continuous
    assert closed[-1] - continuous < 0.01 * continuous
    estimates = []
    for T, form in zip((1, 2, 4, 8, 16), closed):
        result = continuous_bound(oracle, x, t_per_image=32, T=T)
        assert result.T == T and result.t_per_image == 2 * min(16, T)
        estimate, stderr = result.diffusion.mean().item(), _stderr(result.diffusion)
        assert abs(estimate - form / (D * LN2)) < 3 * stderr, (T, estimate, form / (D * LN2), stderr)
        gap = result.diffusion - finite_diffusion_given_x(x, _linear, T, MU, S) / (D * LN2)
        assert abs(gap.mean().item()) < 3 * _stderr(gap), (T, gap.mean(), _stderr(gap))
        estimates.append(estimate)
    estimates.append(continuous_bound(oracle, x, t_per_image=32).diffusion.mean().item())
    assert all(a > b for a, b in zip(estimates, estimates[1:])), estimates  # L_1 > L_2 > … > L_16 > L_∞


def test_a_finite_T_with_fewer_pairs_than_steps_stratifies_the_steps():
    x = _gaussian_points()
    result = continuous_bound(_oracle(), x, t_per_image=16, T=64)
    form = finite_diffusion_closed_form(_linear, 64, S, D) / (D * LN2)
    assert result.t_per_image == 16 and len(result.per_t) == 8
    assert torch.allclose(result.per_t_edges, torch.arange(9, dtype=torch.float64) / 8)
    assert abs(result.diffusion.mean().item() - form) < 3 * _stderr(result.diffusion)


# --------------------------------------------------------------------- c. one step of L_T is elbo's β̃ KL term
@pytest.mark.parametrize("schedule", [FixedLinear(), FixedLinear(G0, G1)], ids=["vdm", "short"])
def test_a_finite_step_equals_the_discrete_elbo_term_on_the_same_schedule_and_noise(schedule):
    """A discrete schedule with ᾱ_i = sigmoid(−γ(i/T)) at paper time i (β_i = 1 − ᾱ_i/ᾱ_{i−1}, ᾱ_0 = 1): its
    step at 0-based index j ≥ 1 (paper t = j + 1) is the continuous step s = j/T → t = (j + 1)/T, so with the same
    x, ε and ε̂ its KL with β̃ (the `elbo` variant: ε mean, fixed small variance) is L_T's term / T. (Index 0 is the
    decoder in discrete time, and ᾱ_0 = 1 there but α²(0) < 1 here: no step to compare.)"""
    T = 10
    gammas = schedule.gamma(torch.arange(T + 1, dtype=torch.float64) / T)
    alphas_cumprod = torch.sigmoid(-gammas[1:])
    sched = Schedule.from_betas(1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64),
                                                                 alphas_cumprod[:-1]]))
    assert torch.allclose(sched.alphas_cumprod, alphas_cumprod, rtol=1e-12, atol=0)
    oracle = GaussianContinuousOracle(schedule, MU, S)
    g = torch.Generator().manual_seed(4)
    j = torch.arange(1, T)  # 0-based discrete indices 1..T−1
    x = MU + S * torch.randn(len(j), *SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(len(j), *SHAPE, generator=g, dtype=torch.float64)
    t = (j + 1).double() / T
    ours = bound_terms_nats(oracle, x, t, eps, T=T)["diffusion"] / T
    z_t = sched.q_sample(x, j, eps)
    eps_hat = oracle(z_t, t)
    theirs = Elbo().p_mean_variance(eps_hat, sched, z_t, j)
    from_elbo = vb_term_nats(theirs, sched, x, z_t, j)
    assert torch.allclose(ours, from_elbo, rtol=1e-6, atol=0), (ours, from_elbo)
    assert (ours > 0).all()


# --------------------------------------------------------------------- d. the schedule's shape between its end points
def test_two_shapes_with_the_same_end_points_give_the_same_bound_and_different_variances():
    """E[L_∞] = ½ D ∫_{γ₀}^{γ₁} s²/(s² + e^γ) dγ whatever γ does between γ₀ and γ₁ (the substitution γ = γ(t));
    the shape only sets where in γ the t's fall, so the estimator's variance changes. γ = γ₀ + Δt³ spends its t at
    small γ, where the integrand γ'·error is small; γ₁ − Δ(1 − t)³ rushes through small γ, where it is large."""
    x = _gaussian_points()
    closed = continuous_diffusion_closed_form(G0, G1, S, D) / (D * LN2)
    schedules = {"linear": FixedLinear(G0, G1), "slow start": PowerSchedule(G0, G1),
                 "fast start": PowerSchedule(G0, G1, flipped=True)}
    assert all(schedule.endpoints() == (G0, G1) for schedule in schedules.values())
    results = {name: continuous_bound(_oracle(schedule), x, t_per_image=32) for name, schedule in schedules.items()}
    given = continuous_diffusion_given_x(x, G0, G1, MU, S) / (D * LN2)  # the same for every shape
    variance = {}
    for name, result in results.items():
        estimate, stderr = result.diffusion.mean().item(), _stderr(result.diffusion)
        assert abs(estimate - closed) < 3 * stderr, (name, estimate, closed, stderr)
        gap = result.diffusion - given  # the Monte Carlo error of each image's estimate alone
        assert abs(gap.mean().item()) < 3 * _stderr(gap), (name, gap.mean(), _stderr(gap))
        variance[name] = gap.var().item()
    # measured here, (bits/dim)² per image: linear 0.057, slow start 0.052, fast start 0.141
    assert variance["fast start"] > 2 * max(variance["linear"], variance["slow start"]), variance
    assert results["fast start"].stderr_mc > results["linear"].stderr_mc  # what the evaluator reports
    # along="line" (the ruler's L_∞): a curved schedule's model measured with its t on the line between its ends is
    # the linear schedule's estimate, draw for draw; the model keeps its own schedule
    model = _oracle(schedules["fast start"])
    on_line = continuous_bound(model, x, t_per_image=32, along="line")
    assert torch.allclose(on_line.total, results["linear"].total, rtol=1e-9, atol=0)
    assert "t along the line between" in on_line.method and model.schedule is schedules["fast start"]


# --------------------------------------------------------------------- e. the learned schedule
class _Zero(torch.nn.Module):
    """ε̂ = 0 whatever z_t: then L_∞'s integrand is ½γ'(t)‖ε‖², a function of the schedule through γ'(t) alone."""

    def forward(self, x, cond):
        return torch.zeros_like(x)


def test_the_diffusion_term_reaches_a_learned_schedule_through_its_slope():
    """With ε̂ = 0 the term is ½|w|‖ε‖² for γ = b + |w|t: d/dw = ½ Σ‖ε‖² exactly, d/db = 0; both would be zero
    if the evaluator's terms detached γ'(t)."""
    schedule = LearnedEndpoints(G0, G1).double()
    model = ContinuousDenoiser(_Zero(), schedule)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, *SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, *SHAPE, generator=g, dtype=torch.float64)
    bound_terms_nats(model, x, low_discrepancy_times(8, g), eps)["diffusion"].sum().backward()
    assert torch.allclose(schedule.w.grad, 0.5 * (eps**2).sum(), rtol=1e-12, atol=0)
    assert schedule.b.grad is None or schedule.b.grad == 0


@pytest.mark.parametrize("schedule", ["endpoints", "monotone-net"])
def test_the_full_bound_moves_a_learned_schedules_end_points_and_keeps_it_monotone(schedule):
    torch.manual_seed(0)
    sched = LearnedEndpoints(-8.0, 4.0) if schedule == "endpoints" else MonotoneNet(-8.0, 4.0, width=16)
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), sched)
    images, _ = gaussian_grid_data(8, 0.5, shape=(1, 8, 8))
    x = images.float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = sched.endpoints()
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        opt.zero_grad()
        t = low_discrepancy_times(8, g, torch.float32)
        terms = bound_terms_nats(model, x, t, torch.randn(x.shape, generator=g))
        loss = (terms["prior"] + terms["decoder"] + terms["diffusion"]).mean()
        assert all(v.dtype == torch.float32 for v in terms.values())
        loss.backward()
        opt.step()
    after = sched.endpoints()
    assert after[0] != before[0] and after[1] != before[1], (before, after)
    grid = sched.gamma(torch.linspace(0, 1, 1001, dtype=torch.float64)).detach()
    assert (grid[1:] > grid[:-1]).all()


# --------------------------------------------------------------------- f. determinism, refusals
@pytest.mark.parametrize("T", [None, 4, 64])
def test_the_result_does_not_depend_on_the_batch_size(T):
    x = _gaussian_points(6)
    one = continuous_bound(_oracle(), x, t_per_image=8, T=T, seed=3, runtime=Runtime(batch_size=5))
    two = continuous_bound(_oracle(), x, t_per_image=8, T=T, seed=3, runtime=Runtime(batch_size=48))
    for name in ("total", "prior", "diffusion", "decoder", "per_t"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    other_seed = continuous_bound(_oracle(), x, t_per_image=8, T=T, seed=4)
    assert not torch.equal(one.diffusion, other_seed.diffusion)


def test_a_tiny_network_runs_through_the_evaluator_on_uint8_images():
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), FixedLinear())
    images, _ = gaussian_grid_data(3, 0.5, shape=(1, 8, 8))
    model.train()
    result = continuous_bound(model, images, t_per_image=4, runtime=Runtime(batch_size=5))
    assert model.training  # its mode restored
    assert result.total.dtype == torch.float64 and torch.isfinite(result.total).all() and result.decoder.min() > 0
    again = continuous_bound(model, images, t_per_image=4, runtime=Runtime(batch_size=12))
    assert torch.allclose(result.total, again.total, rtol=1e-6, atol=0)


def test_bad_arguments_and_a_ddpm_network_are_refused():
    x = _gaussian_points(2)
    for t_per_image in (0, 3, 2.0):
        with pytest.raises(BenchError, match="even number"):
            continuous_bound(_oracle(), x, t_per_image=t_per_image)
    with pytest.raises(BenchError, match="T must be None"):
        continuous_bound(_oracle(), x, T=0)
    for along, T in (("curve", None), ("line", 10)):
        with pytest.raises(BenchError, match="along must be one of schedule, line"):
            continuous_bound(_oracle(), x, along=along, T=T)
    with pytest.raises(BenchError, match="not a continuous-time model"):
        continuous_bound(nonzero_network("tiny", 1, 1, 8), torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(BenchError, match="uint8 pixels"):
        continuous_bound(_oracle(), torch.zeros(1, *SHAPE, dtype=torch.long))
