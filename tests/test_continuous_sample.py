"""Sampling and the probability-flow ODE of continuous-time models (bench.diffusion.continuous_sample), and the
project's discrete schedules read as continuous γ(t) (LinearBetaReading, CosineReading).

The oracle: data x ~ N(μ, s²) per dimension, whose optimal ε̂*(z, t) = σ_t (z − α_t μ)/(α_t² s² + σ_t²) is known
at every t; its score −ε̂*/σ_t is the exact score of q(z_t) = N(α_t μ, α_t² s² + σ_t²).
"""

from __future__ import annotations

import math

import pytest
import torch
from nets import nonzero_network
from torch import nn

from bench.diffusion.continuous import (
    VDM_GAMMA_MIN,
    ContinuousDenoiser,
    CosineReading,
    FixedLinear,
    LinearBetaReading,
    MonotoneNet,
    alpha_sigma_squared,
    bin_centres,
)
from bench.diffusion.continuous_sample import (
    GammaSde,
    continuous_score,
    decode_pixels,
    describe_continuous_sampler,
    nll_ode_continuous,
    reverse_chain,
    sample_continuous,
    step_table,
)
from bench.diffusion.ode import OdeOptions, VpSde, flow_nll
from bench.diffusion.schedule import Schedule
from bench.errors import BenchError
from bench.runtime.context import Runtime

MU, S = 0.1, 0.3  # the oracle's data law N(μ, s²) per dimension
VDM_GAMMA0 = VDM_GAMMA_MIN  # γ(0) of FixedLinear


class GaussianDenoiser(ContinuousDenoiser):
    """The optimal ε̂ for data N(μ, s²) under ``schedule``; records the dtypes it is called with."""

    def __init__(self, schedule, mu: float = MU, s: float = S):
        super().__init__(nn.Identity(), schedule)
        self.mu, self.s, self.seen = mu, s, []

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gamma = self.schedule.gamma(t)
        self.seen.append((z.dtype, t.dtype, gamma.dtype))
        a2, s2 = alpha_sigma_squared(gamma.to(torch.float64).view(-1, 1, 1, 1))
        return (s2.sqrt() * (z - a2.sqrt() * self.mu) / (a2 * self.s**2 + s2)).to(z.dtype)


def _discrete_gamma(sched: Schedule) -> torch.Tensor:
    """The chain's −log SNR at each step, float64 [T]."""
    ab = sched.alphas_cumprod
    return torch.log1p(-ab) - torch.log(ab)


# --------------------------------------------------------------------- the discrete schedules read as γ(t)
def test_linear_reading_meets_the_chain_at_every_step():
    reading = LinearBetaReading()
    T = reading.T
    chain = _discrete_gamma(Schedule.linear(T, 1e-4, 0.02))
    gamma = reading.gamma(torch.arange(T, dtype=torch.float64) / (T - 1))  # step i at t = (i − 1)/(T − 1)
    err = (gamma - chain).abs()
    assert err[0] < 1e-8  # γ(0) is x_1's: −9.2102
    assert err[-1] < 1e-3  # γ(1) is x_T's up to Σβ³/3 (measured 6.8e-4 of 10.1177)
    assert err.max() < 1e-3
    assert float(gamma[0]) == pytest.approx(-9.210240, abs=1e-5)
    # score_sde's plain VP-SDE form T(a u + ½(β_end − β_start)u²) would be 0.095 off at the first step
    plain = math.log(math.expm1(1000 * (1e-4 / 1000 + 0.5 * 0.0199 / 1000**2)))
    assert abs(plain - float(chain[0])) > 0.09


def test_cosine_reading_meets_the_chain_at_its_ends_and_every_unclipped_step():
    reading = CosineReading()
    chain = _discrete_gamma(Schedule.cosine(1000))
    ends = reading.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ends, chain[[0, -1]], rtol=0, atol=1e-9)
    assert float(ends[1]) == pytest.approx(19.8359, abs=1e-4)  # the clipped last step's ᾱ_T = 2.4e-9
    i = torch.arange(1, 1000, dtype=torch.float64)  # u = i/T, all but the clipped last step
    t = (i / 1000 - reading.u0) / reading.span
    assert torch.allclose(reading.gamma(t), chain[:-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("reading", [LinearBetaReading(), CosineReading(), LinearBetaReading(T=100),
                                     CosineReading(T=10)], ids=["linear", "cosine", "linear-100", "cosine-10"])
def test_readings_increase_their_slope_is_the_finite_difference_and_float32_keeps_the_digits(reading):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    gamma, slope = reading.gamma_and_slope(t)
    assert (gamma.diff() > 0).all() and (slope > 0).all()
    inner = t[1:-1]
    h = 1e-6
    fd = (reading.gamma(inner + h) - reading.gamma(inner - h)) / (2 * h)
    assert torch.allclose(slope[1:-1], fd, rtol=1e-6, atol=0)
    g32 = reading.gamma(t.float())
    assert g32.dtype == torch.float32 and torch.isfinite(g32).all()
    assert torch.allclose(g32.double(), reading.gamma(t.float().double()), rtol=1e-6, atol=1e-5)  # t's own value
    assert not list(reading.parameters())
    with pytest.raises(BenchError, match="float32 or float64"):
        reading.gamma(t.bfloat16())


# --------------------------------------------------------------------- ancestral sampling
def _chain_law(schedule, steps: int) -> tuple[float, float]:
    """The exact law N(m, v) of z_0/α_0 per dimension under ``steps`` steps of the sampler with the oracle, from
    z_1 ~ N(0, 1): each step is linear in z_t, z_s = A z_t + B + noise."""
    table = step_table(schedule, steps)
    a2, s2 = alpha_sigma_squared(schedule.gamma(table.times))
    k = s2[1:].sqrt() / (a2[1:] * S**2 + s2[1:])  # ε̂* = k (z − α μ)
    A = table.scale * (1 - table.eps_coef * k)
    B = table.scale * table.eps_coef * k * a2[1:].sqrt() * MU
    m, v = 0.0, 1.0
    for j in reversed(range(steps)):
        m, v = float(A[j]) * m + float(B[j]), float(A[j]) ** 2 * v + float(table.noise_std[j]) ** 2
    a0 = math.sqrt(float(a2[0]))
    return m / a0, v / a0**2


def test_step_coefficients_are_the_posterior_q_zs_given_zt_and_x_hat():
    """The table's c-form against q(z_s | z_t, x) written with α_{t|s}, σ_{t|s}² directly (ELBO-FAMILY's
    conventions) and x = x̂ = (z_t − σ_t ε̂)/α_t."""
    sched = LinearBetaReading()
    table = step_table(sched, 10)
    a2, s2 = alpha_sigma_squared(sched.gamma(table.times))
    a2s, s2s, a2t, s2t = a2[:-1], s2[:-1], a2[1:], s2[1:]
    a_ts2 = a2t / a2s  # α_{t|s}²
    s_ts2 = s2t - a_ts2 * s2s  # σ_{t|s}²
    coef_z = a_ts2.sqrt() * s2s / s2t  # of z_t in the posterior mean
    coef_x = a2s.sqrt() * s_ts2 / s2t  # of x
    assert torch.allclose(table.scale, coef_z + coef_x / a2t.sqrt(), rtol=1e-9)
    assert torch.allclose(table.scale * table.eps_coef, coef_x * s2t.sqrt() / a2t.sqrt(), rtol=1e-9)
    assert torch.allclose(table.noise_std**2, s_ts2 * s2s / s2t, rtol=1e-9)
    assert table.gamma_0 == pytest.approx(float(sched.gamma(torch.tensor(0.0, dtype=torch.float64))))


def test_many_steps_draw_the_data_law_and_samples_have_the_chains_exact_moments():
    sched = FixedLinear()
    target = (MU, S**2 + math.exp(VDM_GAMMA0))  # z_0/α_0 ~ N(μ, s² + σ_0²/α_0²) under q
    m_inf, v_inf = _chain_law(sched, 4000)
    assert m_inf == pytest.approx(target[0], rel=1e-3) and v_inf == pytest.approx(target[1], rel=3e-3)
    m, v = _chain_law(sched, 100)
    assert v == pytest.approx(0.08225, rel=1e-3)  # 100 steps fall 9% short of s²: the step ignores Var(x | z_t)
    model = GaussianDenoiser(sched)
    g = torch.Generator().manual_seed(0)

    def normal():
        return torch.randn(1024, 1, 4, 4, generator=g)

    x = reverse_chain(model, normal(), step_table(sched, 100), normal)
    x = x.double() / math.sqrt(1 / (1 + math.exp(VDM_GAMMA0)))  # z_0/α_0
    n = x.numel()
    assert abs(x.mean().item() - m) < 4 * math.sqrt(v / n)
    assert abs(x.var().item() - v) < 4 * v * math.sqrt(2 / n)


def test_the_sampler_returns_8_bit_pixels_with_the_data_moments_in_eval_mode():
    sched = LinearBetaReading()
    model = GaussianDenoiser(sched).train()
    m, v = _chain_law(sched, 100)
    pixels = sample_continuous(model, 1024, (1, 4, 4), 100, seed=3, runtime=Runtime(batch_size=512))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1024, 1, 4, 4)
    assert model.training  # restored
    x = pixels.double() / 127.5 - 1
    n = x.numel()
    v_q = v + (2 / 255) ** 2 / 12  # plus the bin's rounding
    assert abs(x.mean().item() - m) < 4 * math.sqrt(v_q / n)
    assert abs(x.var().item() - v_q) < 4 * v_q * math.sqrt(2 / n)


def test_the_decoder_returns_the_bin_whose_centre_z0_sits_on():
    g0 = VDM_GAMMA0
    z0 = (bin_centres(torch.float64) * math.sqrt(1 / (1 + math.exp(g0)))).view(1, 1, 16, 16).float()
    u = torch.rand(z0.shape, generator=torch.Generator().manual_seed(0))
    k = decode_pixels(z0, g0, u)
    assert k.dtype == torch.uint8
    assert torch.equal(k.flatten().long(), torch.arange(256))
    # between two centres the decoder splits by the uniform: p(k) = 1 − p(k + 1) at the midpoint, γ(0) = −5
    mid = torch.full((1, 1, 1, 1), (bin_centres(torch.float64)[100] + 1 / 255).item() * math.sqrt(1 / (1 + math.e**-5)))
    picks = [int(decode_pixels(mid, -5.0, torch.full_like(mid, u))) for u in (0.0, 0.3, 0.7, 0.999)]
    assert picks[0] < 100 < picks[-1] and picks == sorted(picks)


def test_samples_are_keyed_by_seed_block_and_batch_size():
    """Sample j depends on (seed, j, batch size) only: another n or a rerun gives it again; another batch size
    (other blocks, other streams) or another seed gives other draws of the same law."""
    model = GaussianDenoiser(CosineReading())

    def draw(n, batch_size, seed=0):
        return sample_continuous(model, n, (1, 4, 4), 8, seed=seed, runtime=Runtime(batch_size=batch_size))

    four = draw(4, 2)
    assert torch.equal(draw(2, 2), four[:2])
    assert torch.equal(draw(3, 2), four[:3])  # a short last block draws its noise as a full one, keeps its rows
    assert torch.equal(draw(4, 2), four)
    assert not torch.equal(draw(4, 4), four)
    assert not torch.equal(draw(4, 2, seed=1), four)
    assert not torch.equal(four[0], four[2])  # blocks have their own streams


def test_the_sampler_works_in_float32_and_float64_only():
    model = GaussianDenoiser(FixedLinear())
    sample_continuous(model, 2, (1, 4, 4), 3)
    assert model.seen and all(d in (torch.float32, torch.float64) for seen in model.seen for d in seen)
    table = step_table(model.schedule, 3)
    assert all(x.dtype == torch.float64 for x in (table.times, table.scale, table.eps_coef, table.noise_std))
    with pytest.raises(BenchError, match="float32 or float64"):
        step_table(model.schedule, 3, dtype=torch.bfloat16)
    with pytest.raises(BenchError, match="steps >= 1"):
        sample_continuous(model, 2, (1, 4, 4), 0)
    with pytest.raises(BenchError, match="not a continuous-time model"):
        sample_continuous(nn.Conv2d(1, 1, 1), 2, (1, 4, 4), 3)


def test_describe_continuous_sampler_names_the_steps_and_the_decoder():
    assert describe_continuous_sampler(250) == ("ancestral, 250 steps of the continuous-time model "
                                                "(p(z_s|z_t) = q(z_s|z_t, x̂)), x ~ p(x|z_0) from the 256-way decoder")


# --------------------------------------------------------------------- the probability-flow ODE of γ(t)
def _flow_closed_form(sched, points: torch.Tensor, eps: float) -> torch.Tensor:
    """bits/dim the flow computes for the oracle: its map is affine per dimension, x(1) = α_1 μ + √(v_1/v_ε)
    (x − α_ε μ), v = α² s² + σ², so −log N(x(1); 0, I) − log |dx(1)/dx|, whose exact part −log q_ε(x) is off by
    the prior's mismatch log q_1(x(1)) − log N(x(1); 0, I) (q_1 ≠ N(0, I) at γ(1) = 5)."""
    a2, s2 = alpha_sigma_squared(sched.gamma(torch.tensor([eps, 1.0], dtype=torch.float64)))
    v = a2 * S**2 + s2
    x1 = a2[1].sqrt() * MU + (v[1] / v[0]).sqrt() * (points - a2[0].sqrt() * MU)
    nats = (0.5 * x1**2 + 0.5 * math.log(2 * math.pi) - 0.5 * torch.log(v[1] / v[0])).flatten(1).sum(1)
    return nats / (points[0].numel() * math.log(2))


@pytest.mark.parametrize("sched", [FixedLinear(), CosineReading()], ids=["vdm-fixed", "cosine"])
def test_flow_nll_of_gaussian_points_under_the_exact_score_is_the_closed_form(sched):
    model = GaussianDenoiser(sched)
    points = MU + S * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = nll_ode_continuous(model, points, runtime=Runtime(batch_size=3))
    expected = _flow_closed_form(sched, points, OdeOptions().eps)
    assert torch.allclose(res.total, expected, rtol=0, atol=1e-4)  # the solver's tolerance (measured 2.3e-5)
    assert "the model's own γ(t)" in res.method and "continuous data" in res.method
    # batch-size independence: each image's probes are its own, only the shared solver steps differ
    again = nll_ode_continuous(model, points, runtime=Runtime(batch_size=2))
    assert torch.allclose(again.total, res.total, rtol=0, atol=1e-4)


def test_gamma_sde_beta_is_the_rate_of_minus_log_alpha_squared():
    sched = CosineReading()
    sde = GammaSde(sched)
    for s in (1e-5, 0.3, 0.9, 0.999):
        h = 1e-6
        g = sched.gamma(torch.tensor([s - h, s + h], dtype=torch.float64))
        minus_log_a2 = torch.nn.functional.softplus(g)  # −log sigmoid(−γ)
        assert sde.beta(s) == pytest.approx(float(minus_log_a2.diff() / (2 * h)), rel=1e-6)
    assert sde.index(0.25) == 250
    assert sde.describe() == "VP-SDE of the model's own γ(t) (γ(0) = -10.09, γ(1) = 19.84)"


def test_the_continuous_score_runs_in_float32_or_float64_only():
    model = GaussianDenoiser(FixedLinear())
    score = continuous_score(model)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a2, s2 = alpha_sigma_squared(torch.tensor(VDM_GAMMA0 + 18.3 * 0.5, dtype=torch.float64))
    expected = -(x - a2.sqrt() * MU) / (a2 * S**2 + s2)
    assert torch.allclose(score(x, 0.5), expected, rtol=1e-5)  # the network runs in float32
    with pytest.raises(BenchError, match="float32 or float64"):
        score(x.bfloat16(), 0.5)
    with pytest.raises(BenchError, match="float32 or float64"):
        nll_ode_continuous(model, torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
                           runtime=Runtime(precision=torch.bfloat16))


def test_the_ddpm_flows_method_string_is_unchanged():
    sde = VpSde(Schedule.linear())
    assert sde.describe() == "VP-SDE of linear(T=1000, 0.0001..0.02)"
    assert VpSde(Schedule.cosine(4000)).describe() == "VP-SDE of cosine(T=4000, s=0.008)"

    def score(x, s):
        return -x

    res = flow_nll(score, sde, torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    assert res.method == ("probability-flow ODE NLL (not the bound), VP-SDE of linear(T=1000, 0.0001..0.02), "
                          "continuous data, scipy solve_ivp RK45, rtol=1e-05, atol=1e-05, s0=1e-05, "
                          "1 rademacher probe per image")


def test_through_a_real_network_with_a_learned_schedule_samples_are_keyed_and_the_score_reads_it():
    """A nonzero tiny U-Net with Fourier features and VDM's monotone schedule: the sampler's blocks are keyed as
    with the oracle, the score reads the network and the schedule."""
    torch.manual_seed(0)
    model = ContinuousDenoiser(nonzero_network("tiny", 5, 1, 8), MonotoneNet(width=16), fourier=True)
    four = sample_continuous(model, 4, (1, 8, 8), 4, runtime=Runtime(batch_size=2))
    three = sample_continuous(model, 3, (1, 8, 8), 4, runtime=Runtime(batch_size=2))
    assert torch.equal(three[:2], four[:2])  # a full block is the same computation
    # the short last block has the same noise, but a network on 1 row rounds apart from one on 2 in the last bits
    assert (three[2].int() - four[2].int()).abs().max() <= 1
    assert len(four.unique()) > 20  # the network's output reaches the pixels
    # the flow's score: −ε̂/σ_s, the network in float32 on float64 points (its flow is stiff untrained: not solved)
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        eps_hat = model(z.float(), torch.full((2,), 0.3, dtype=torch.float64)).double()
        sigma = torch.sigmoid(model.schedule.gamma(torch.tensor(0.3, dtype=torch.float64))).sqrt()
    assert torch.allclose(continuous_score(model)(z, 0.3), -eps_hat / sigma, rtol=1e-6, atol=1e-6)
    g0, g1 = model.schedule.endpoints()
    assert GammaSde(model.schedule).describe().endswith(f"(γ(0) = {g0:.4g}, γ(1) = {g1:.4g})")
