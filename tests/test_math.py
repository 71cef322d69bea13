"""Closed forms of the diffusion math (docs/MATH.md), each against an independent computation."""

import math

import pytest
import torch
from torch.special import ndtr

from bench import BenchError, Schedule, load_dataset
from bench.diffusion.gaussian import (
    bits_per_dim_from_nats,
    discretized_gaussian_log_likelihood,
    normal_kl,
    to_data_scale,
)
from bench.diffusion.variant import prior_nats


def test_linear_schedule_endpoints_and_scaling():
    s = Schedule.linear(T=1000, beta_start=1e-4, beta_end=0.02)
    assert s.T == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    scaled = Schedule.linear(T=250, scale_to_T=True)
    assert scaled.betas[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert scaled.betas[-1].item() == pytest.approx(0.08, rel=1e-12)


def test_alphas_cumprod_and_posterior_variance_match_a_plain_loop():
    s = Schedule.linear(T=50, beta_start=1e-3, beta_end=0.2)
    prod, prev = 1.0, 1.0
    for i, beta in enumerate(s.betas.tolist()):
        prev, prod = prod, prod * (1 - beta)
        assert s.alphas_cumprod[i].item() == pytest.approx(prod, rel=1e-12)
        assert s.alphas_cumprod_prev[i].item() == pytest.approx(prev, rel=1e-12)
        assert s.posterior_variance[i].item() == pytest.approx(beta * (1 - prev) / (1 - prod), rel=1e-12, abs=0)
    # β̃_1 = 0 exactly; the clipped log uses β̃_2 there.
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    assert s.log_betas_decoder[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    assert s.log_betas_decoder[5].item() == pytest.approx(math.log(s.betas[5].item()))


def test_cosine_schedule_matches_its_defining_formula():
    T, off = 100, 0.008
    s = Schedule.cosine(T=T, s=off)

    def f(t):
        return math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2

    for t in (1, 10, 50, 90):  # paper time t is array index t − 1
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_index_zero_is_paper_time_one():
    s = Schedule.linear(T=10, beta_start=0.01, beta_end=0.1)
    x = torch.zeros(2, 1, 1, 1)
    t = torch.tensor([0, 9])
    got = Schedule.gather(s.betas, t, x).flatten()
    assert got.tolist() == pytest.approx([0.01, 0.1])
    assert got.dtype == torch.float32


def test_posterior_equals_gaussian_conditioning():
    """μ̃, β̃ from docs/MATH.md against Bayes' rule for q(x_{t−1} | x_0) · q(x_t | x_{t−1})."""
    s = Schedule.linear(T=20, beta_start=1e-3, beta_end=0.3)
    x0 = torch.tensor([[0.3], [-0.7]], dtype=torch.float64).view(2, 1, 1, 1)
    x_t = torch.tensor([[1.1], [0.2]], dtype=torch.float64).view(2, 1, 1, 1)
    for i in (1, 7, 19):
        t = torch.full((2,), i)
        abp, a, b = s.alphas_cumprod_prev[i].item(), s.alphas[i].item(), s.betas[i].item()
        precision = 1 / (1 - abp) + a / b
        var = 1 / precision
        mean = var * (math.sqrt(abp) * x0 / (1 - abp) + math.sqrt(a) * x_t / b)
        assert torch.allclose(s.q_posterior_mean(x0, x_t, t), mean, rtol=1e-10)
        assert s.posterior_variance[i].item() == pytest.approx(var, rel=1e-10)


def test_q_sample_has_the_marginal_moments():
    s = Schedule.linear(T=100, scale_to_T=True)
    x0 = torch.full((200_000, 1, 1, 1), 0.5)
    t = torch.full((200_000,), 40)
    x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    ab = s.alphas_cumprod[40].item()
    n = len(x0)  # tolerances: 5 standard errors of the sample mean and variance
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=5 * math.sqrt((1 - ab) / n))
    assert x_t.var().item() == pytest.approx(1 - ab, rel=5 * math.sqrt(2 / n))


def test_predict_x0_inverts_q_sample():
    s = Schedule.cosine(T=100)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.arange(0, 80, 10)
    assert torch.allclose(s.predict_x0_from_eps(s.q_sample(x0, t, eps), t, eps), x0, atol=1e-4)


def test_normal_kl_against_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10)
    assert normal_kl(m1, lv1, m1, lv1).abs().max().item() < 1e-12


@pytest.mark.parametrize("mean,log_var",
                         [(0.0, -4.0), (0.37, -9.0), (-0.99, -2.0), (0.999, -12.0), (0.2, 3.0), (5.0, -6.0)])
def test_discretized_likelihood_sums_to_one_over_a_pixels_256_bins(mean, log_var):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(grid, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(log_var, dtype=torch.float64))
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_against_direct_cdf_difference():
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean, std = 0.1, 0.2

    def cdf(z):
        return ndtr(torch.as_tensor((z - mean) / std))

    direct = cdf(grid + 1 / 255) - cdf(grid - 1 / 255)
    direct[0], direct[-1] = cdf(grid[0] + 1 / 255), 1 - cdf(grid[-1] - 1 / 255)
    got = discretized_gaussian_log_likelihood(grid, torch.tensor(mean, dtype=grid.dtype),
                                              torch.tensor(2 * math.log(std), dtype=grid.dtype))
    assert torch.allclose(got.exp(), direct, rtol=1e-9, atol=1e-15)


def test_prior_term_is_about_1e5_bits_per_dim_for_the_linear_schedule():
    s = Schedule.linear(T=1000)
    x0 = to_data_scale(load_dataset("digits", split="test")).double()
    prior = bits_per_dim_from_nats(prior_nats(s, x0), x0[0].numel())
    ab = s.alphas_cumprod[-1].item()
    # Closed form per dim: ½(ᾱ x² − log(1 − ᾱ) − ᾱ), then nats → bits.
    expect = 0.5 * (ab * x0**2 - math.log(1 - ab) - ab).flatten(1).mean(1) / math.log(2)
    assert torch.allclose(prior, expect, rtol=1e-9)
    assert 1e-6 < prior.mean().item() < 5e-5


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: Schedule.from_betas([0.1, 1.0]), r"\(0, 1\)"),
        (lambda: Schedule.from_betas([0.0, 0.1]), r"\(0, 1\)"),
        (lambda: Schedule.from_betas([0.1, float("nan")]), "NaN"),
        (lambda: Schedule.from_betas([0.1]), "T >= 2"),
        (lambda: Schedule.linear(T=1), "T >= 2"),
        (lambda: Schedule.linear(T=100, beta_start=0.02, beta_end=1e-4), "beta_start < beta_end"),
        (lambda: Schedule.cosine(T=100, s=-1.0), "positive"),
    ],
)
def test_invalid_schedules_are_refused(build, match):
    with pytest.raises(BenchError, match=match):
        build()


def test_schedule_spec_round_trips():
    for s in (Schedule.linear(T=300, scale_to_T=True), Schedule.cosine(T=200, s=0.01),
              Schedule.from_betas([0.1, 0.2, 0.3])):
        again = Schedule.from_spec(s.spec)
        assert torch.equal(again.betas, s.betas)
