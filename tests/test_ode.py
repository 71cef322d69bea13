"""The probability-flow NLL (bench/diffusion/ode.py) against closed forms: Gaussian data whose exact score is known,
the dequantised case, the Hutchinson estimator's mean and variance, the discrete network index, the split
over ranks, and bad options."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import GaussianOracle, gaussian_grid_data

from bench import BenchError, Runtime, Schedule
from bench.diffusion.ode import (
    FlowDiverged,
    OdeOptions,
    VpSde,
    draw_probes,
    flow_nll,
    flow_nll_nats,
    nll_ode,
    score_and_quadratic,
)
from bench.diffusion.variant import eps_mean
from bench.nets.unet import build_network
from variants import get_variant

TESTS = Path(__file__).parent
LN2 = math.log(2)


class GaussianScore:
    """The exact score of x(s) when x(0) ~ N(0, Σ), in continuous time: x(s) ~ N(0, V(s)) with
    V(s) = ᾱ(s)Σ + (1 − ᾱ(s))I, so ∇log p_s(x) = −V(s)⁻¹x. Its probability flow is linear,
    x(1) = V(1)^½ V(s_0)^−½ x(s_0), so the flow's NLL has a closed form (:meth:`flow_nll_nats`)."""

    def __init__(self, sde: VpSde, cov: np.ndarray, shape: tuple[int, ...]):
        self.sde, self.shape = sde, shape
        self.lam, self.Q = np.linalg.eigh(cov)
        self.cov = cov

    def _v(self, s: float) -> np.ndarray:
        ab = math.exp(self.sde.log_alphas_cumprod(s))
        return ab * self.lam + 1 - ab

    def __call__(self, x: torch.Tensor, s: float) -> torch.Tensor:
        Q = torch.as_tensor(self.Q, dtype=x.dtype)
        inv = torch.as_tensor(1 / self._v(s), dtype=x.dtype)
        flat = x.flatten(1)
        return -(((flat @ Q) * inv) @ Q.T).view_as(x)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        z = np.random.default_rng(seed).standard_normal((n, len(self.lam)))
        return torch.as_tensor((z * np.sqrt(self.lam)) @ self.Q.T).view(n, *self.shape)

    def flow_nll_nats(self, x: torch.Tensor, s0: float) -> torch.Tensor:
        """−log p(x) in nats [N] of the flow model: N(0, I) at s = 1 carried back to s_0 by the exact score."""
        c = np.sqrt(self._v(1.0) / self._v(s0))
        y = (x.flatten(1).numpy() @ self.Q) * c  # x(1) in the eigenbasis
        D = len(c)
        return torch.as_tensor(0.5 * (y**2).sum(1) + 0.5 * D * math.log(2 * math.pi) - np.log(c).sum())

    def data_nll_nats(self, x: torch.Tensor) -> torch.Tensor:
        """−log N(x; 0, Σ) in nats [N], the data's own law."""
        y = x.flatten(1).numpy() @ self.Q
        return torch.as_tensor(0.5 * (y**2 / self.lam).sum(1) + 0.5 * np.log(2 * math.pi * self.lam).sum())


def random_cov(D: int, seed: int) -> np.ndarray:
    """A correlated covariance with eigenvalues spread over [0.05, 0.6] (data on the [−1, 1] scale)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    return (Q * np.linspace(0.05, 0.6, D)) @ Q.T


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), x.std().item() / math.sqrt(x.numel())


SHAPE = (2, 2, 2)  # D = 8


@pytest.fixture(scope="module")
def sde():
    return VpSde(Schedule.linear(T=1000))


# ----------------------------------------------------------------------------- the continuous-time process
@pytest.mark.parametrize("sched",
                         [Schedule.linear(T=1000), Schedule.cosine(T=100), Schedule.from_betas([0.1, 0.5, 0.2, 0.9])],
                         ids=["linear", "cosine", "explicit"])
def test_vp_sde_has_the_chains_marginals_at_every_step(sched):
    sde, T = VpSde(sched), sched.T
    log_ab = torch.log(sched.alphas_cumprod).numpy()
    assert sde.log_alphas_cumprod(0.0) == 0.0
    np.testing.assert_allclose([sde.log_alphas_cumprod((i + 1) / T) for i in range(T)], log_ab, rtol=1e-12, atol=1e-14)
    s = np.linspace(0, 1, 20 * T + 1)
    beta = np.array([sde.beta(v) for v in s])
    assert (beta >= 0).all()
    # β is −d log ᾱ/ds: its integral over a step is that step's −log(1 − β_t) (trapezoid on a fine grid).
    rate = -torch.log1p(-sched.betas).numpy()
    steps = np.add.reduceat((beta[1:] + beta[:-1]) / 2 * np.diff(s), np.arange(0, 20 * T, 20))
    np.testing.assert_allclose(steps, rate, rtol=2e-3)
    # β interpolates the step rates T·(−log(1 − β_t)) ≈ T β_t: the first at s = 0, the last at s = 1.
    assert sde.beta(0.0) == pytest.approx(T * rate[0]) and sde.beta(1.0) == pytest.approx(T * rate[-1])
    # The network is called at the grid point nearest s, within its trained indices 0..T−1.
    assert [sde.index(v) for v in (0.0, 0.4 / T, 1 / T, 1.6 / T, (T - 0.4) / T, 1.0)] == [0, 0, 0, 1, T - 1, T - 1]


# ----------------------------------------------------------------------------- Gaussian data, continuous
def test_gaussian_flow_nll_equals_the_exact_gaussian_nll(sde):
    """Continuous samples of N(0, Σ) (Σ correlated, so a probe does not give the trace exactly) under the
    exact score: the estimate per image is the flow's closed-form NLL up to the probe's noise, and the
    flow's NLL is the data's Gaussian NLL up to the prior's mismatch (ᾱ(1) ≈ 4·10⁻⁵)."""
    D = int(np.prod(SHAPE))
    score = GaussianScore(sde, random_cov(D, seed=1), SHAPE)
    x = score.sample(128, seed=2)
    options = OdeOptions(probes=4)
    result = flow_nll(score, sde, x, options, seed=7, runtime=Runtime(batch_size=128))
    flow_bits = score.flow_nll_nats(x, options.eps) / (D * LN2)
    data_bits = score.data_nll_nats(x) / (D * LN2)
    assert (flow_bits - data_bits).abs().max().item() < 2e-4
    gap, se = mean_and_se(result.total - flow_bits)
    print(f"flow NLL {result.total.mean().item():.5f} vs exact {data_bits.mean().item():.5f} bits/dim, "
          f"estimate − flow {gap:.2e} ± {se:.1e}, stderr {result.stderr:.4f}, NFE {result.nfe[0].item():.0f}")
    assert 0 < se < 0.02  # the probes' noise is there, and small
    assert abs(gap) < 4 * se
    assert 0.6 < result.stderr_draws / se < 1.6  # the draws' stderr is the size of the estimate's real error
    entropy = (0.5 * np.log(2 * math.pi * math.e * score.lam).sum()) / (D * LN2)  # E[−log N(x; 0, Σ)]
    assert abs(result.total.mean().item() - entropy) < 4 * result.stderr  # stderr covers the images too
    assert result.summary()["nll_ode"] == pytest.approx(result.total.mean().item())
    assert "bpd" not in result.summary()
    assert "continuous data" in result.method and "RK45" in result.method and "rtol=1e-05" in result.method


def test_exact_divergence_gives_the_closed_form_up_to_the_tolerances(sde):
    """The probes √D e_1..√D e_D (E[v vᵀ] = I) averaged over one shared solve give the exact trace: the
    estimator then equals the flow's closed-form NLL to the solver's tolerance."""
    D = int(np.prod(SHAPE))
    score = GaussianScore(sde, random_cov(D, seed=3), SHAPE)
    x = score.sample(3, seed=4)
    rows = x.repeat_interleave(D, dim=0)
    probes = (math.sqrt(D) * torch.eye(D, dtype=torch.float64)).repeat(3, 1).view(3 * D, *SHAPE)
    nats, nfe = flow_nll_nats(score, sde, rows, probes, OdeOptions(rtol=1e-8, atol=1e-8))
    exact = score.flow_nll_nats(x, 1e-5)
    # rtol 1e-8 is the solver's local tolerance; its global error over the solve reached 1.04e-6 relative on
    # one CPU (the BLAS's reduction order moves it), so the check allows 5e-6.
    np.testing.assert_allclose(nats.view(3, D).mean(1).numpy(), exact.numpy(), rtol=5e-6)
    assert nfe > 0


# ----------------------------------------------------------------------------- dequantised 8-bit data
def test_dequantised_nll_matches_its_closed_form_and_the_discrete_nll(sde):
    """8-bit images of N(0, 0.3²) pixels under the exact score of N(0, 0.3² I): with z = g + (w − ½)h (g the
    grid point, h = 2/255 the bin width), E_w[−log p(z)] = Σ_d ½log 2π − log c + ½c²(g_d² + h²/12) with
    c² = v(1)/v(s_0) the flow's scale, and bits/dim add log₂(1/h) = log₂ 127.5. Rademacher probes give the
    trace of this isotropic Jacobian exactly, so the only noise is the dequantisation's. The result is
    also the discrete NLL of the binned Gaussian (what the bound's decoder uses) up to the Jensen gap
    h²c²/24 per dimension: a different offset (score_sde's +7 for its [0, 1) grid) would miss by 0.0056."""
    S, D, K = 0.3, 16, 4
    images, discrete_bits = gaussian_grid_data(48, S, shape=(1, 4, 4), seed=5)
    score = GaussianScore(sde, np.eye(D) * S**2, (1, 4, 4))
    options = OdeOptions(probes=K)
    result = flow_nll(score, sde, images, options, seed=11, runtime=Runtime(batch_size=48))
    c2 = (score._v(1.0) / score._v(options.eps))[0]
    h = 2 / 255
    g = images.double().flatten(1) / 127.5 - 1
    per_dim = 0.5 * math.log(2 * math.pi) - 0.5 * math.log(c2) + 0.5 * c2 * (g**2 + h**2 / 12)
    closed = (per_dim.sum(1) + D * math.log(127.5)) / (D * LN2)
    gap, se = mean_and_se(result.total - closed)
    print(f"dequantised NLL {result.total.mean().item():.5f}, closed form {closed.mean().item():.5f}, "
          f"discrete {discrete_bits.mean().item():.5f} bits/dim; estimate − closed {gap:.1e} ± {se:.1e}, "
          f"stderr_draws {result.stderr_draws:.1e}")
    assert abs(gap) < 4 * se
    assert 0.6 < result.stderr_draws / se < 1.6  # the draws' stderr is the size of the estimate's real error
    jensen = closed - discrete_bits
    assert (jensen > 0).all() and jensen.max().item() < 1e-4
    assert abs(result.total.mean().item() - discrete_bits.mean().item()) < 4 * se + 1e-4
    assert result.draws.shape == (48, K) and torch.allclose(result.total, result.draws.mean(1))
    assert "uniform dequantisation" in result.method and "4 rademacher probes" in result.method


# ----------------------------------------------------------------------------- the Hutchinson estimator
@pytest.mark.parametrize("probe_type", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_a_fixed_linear_map(probe_type):
    """vᵀAv over the module's probes averages to tr A, with the estimator's known variance: 2‖S‖²_F for
    Gaussian probes and 2(‖S‖²_F − Σ S_ii²) for Rademacher ones (S = (A + Aᵀ)/2)."""
    shape, n = (1, 2, 3), 4000
    A = torch.as_tensor(np.random.default_rng(0).standard_normal((6, 6)))
    probes = draw_probes(3, 0, n, shape, probe_type)
    x = torch.randn(n, *shape, dtype=torch.float64)
    value, quad = score_and_quadratic(lambda y, s: (y.flatten(1) @ A.T).view_as(y), x, 0.5, probes)
    assert torch.allclose(value, (x.flatten(1) @ A.T).view_as(x))
    Sym = (A + A.T) / 2
    var = 2 * ((Sym**2).sum() - (probe_type == "rademacher") * (Sym.diagonal() ** 2).sum()).item()
    mean, se = mean_and_se(quad)
    assert abs(mean - A.trace().item()) < 4 * math.sqrt(var / n)
    assert quad.var().item() == pytest.approx(var, rel=0.15)
    assert se > 0


@pytest.mark.parametrize("probe_type", ["rademacher", "gaussian"])
def test_ode_nll_is_unbiased_over_probes(sde, probe_type):
    """Many probes per image: each image's mean estimate is the flow's closed-form NLL within its draws'
    standard error, and the draws do vary (the trace is not given exactly by any one probe)."""
    D, K = int(np.prod(SHAPE)), 150
    score = GaussianScore(sde, random_cov(D, seed=6), SHAPE)
    x = score.sample(4, seed=7)
    result = flow_nll(score, sde, x, OdeOptions(probe_type=probe_type, probes=K), seed=1, runtime=Runtime(batch_size=4))
    exact = score.flow_nll_nats(x, 1e-5) / (D * LN2)
    within = result.draws.std(dim=1) / math.sqrt(K)
    assert (within > 1e-3).all()
    assert ((result.total - exact).abs() < 4 * within).all()
    # The images' draws together: the mean over images within the reported stderr_draws.
    assert abs((result.total - exact).mean().item()) < 4 * result.stderr_draws


# ----------------------------------------------------------------------------- the network path
class MuFromEps(torch.nn.Module):
    """A μ-network made from an ε-network: it outputs μ̃_t(x_t, x̂_0(ε)), the mean that ε implies."""

    def __init__(self, eps_net, sched):
        super().__init__()
        self.eps_net, self.sched = eps_net, sched

    def forward(self, x, t):
        return eps_mean(self.eps_net(x, t), self.sched, x, t, clip_x0=False)[0]


@pytest.mark.parametrize("name", ["simple", "elbo-learned", "mu-elbo"])
def test_network_score_at_its_nearest_step_is_close_to_the_exact_flow(sde, name):
    """The optimal ε-network of tests/oracle.py, called at integer steps only, gives nearly the NLL of the
    exact continuous-time score (same data, same draws), whichever output its variant reads: ε, ε with a
    learned-variance half, or μ̃."""
    S, D = 0.3, 16
    sched = sde.sched
    variant = get_variant(name)
    model = GaussianOracle(sched, S, variant.var_type)
    if variant.mean_type == "mu":
        model = MuFromEps(model, sched)
    images, _ = gaussian_grid_data(8, S, shape=(1, 4, 4), seed=8)
    options = OdeOptions(probes=2)
    net = nll_ode(model, variant, sched, images, options, seed=2, runtime=Runtime(batch_size=8))
    exact = flow_nll(GaussianScore(sde, np.eye(D) * S**2, (1, 4, 4)), sde, images, options, seed=2,
                     runtime=Runtime(batch_size=8))
    assert (net.total - exact.total).abs().max().item() < 2e-3
    assert net.nfe[0].item() > exact.nfe[0].item()  # the steps' jumps in the network index cost solver steps


def test_untrained_unet_runs_and_is_left_in_its_mode():
    torch.manual_seed(0)
    variant = get_variant("hybrid")
    net = build_network("tiny", 1, variant.out_channels(1), 8).train()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    result = nll_ode(net, variant, Schedule.linear(T=40), images, OdeOptions(probes=2), runtime=Runtime(batch_size=2))
    assert net.training
    assert torch.isfinite(result.draws).all() and result.total.shape == (3,)
    assert result.nfe[:2].eq(result.nfe[0]).all() and (result.nfe > 0).all()  # one solve per batch of 2
    summary = result.summary()
    assert set(summary) == {"nll_ode", "nll_ode_stderr", "nll_ode_nfe", "nll_ode_stderr_draws"}
    with torch.inference_mode():  # the divergence needs autograd whatever mode the caller is in
        again = nll_ode(net, variant, Schedule.linear(T=40), images, OdeOptions(probes=2),
                        runtime=Runtime(batch_size=2))
    assert torch.equal(again.draws, result.draws)


# ----------------------------------------------------------------------------- noise and ranks
def test_draws_are_keyed_by_image_and_batches_are_independent(sde):
    """An image's numbers depend on (seed, its index) and on the images sharing its batch only through the
    solver's step choice (within tolerance); the same batches give the same numbers bit for bit."""
    D = int(np.prod(SHAPE))
    score = GaussianScore(sde, random_cov(D, seed=9), SHAPE)
    x = score.sample(6, seed=10)
    options = OdeOptions(probe_type="gaussian", probes=2)
    a = flow_nll(score, sde, x, options, seed=4, runtime=Runtime(batch_size=3))
    assert torch.equal(a.draws[:3], flow_nll(score, sde, x[:3], options, seed=4, runtime=Runtime(batch_size=3)).draws)
    b = flow_nll(score, sde, x, options, seed=4, runtime=Runtime(batch_size=6))
    assert (a.draws - b.draws).abs().max().item() < 1e-3
    c = flow_nll(score, sde, x, options, seed=5, runtime=Runtime(batch_size=3))
    assert (a.draws - c.draws).abs().min().item() > 0


WORKER = """
import sys
import numpy as np
import torch
from bench.runtime import dist
from bench.diffusion.ode import OdeOptions, VpSde, flow_nll
from bench.diffusion.schedule import Schedule
from bench.runtime.context import Runtime

d, _ = dist.setup("cpu")
sde = VpSde(Schedule.linear(T=100, scale_to_T=True))
x = torch.as_tensor(np.random.default_rng(0).standard_normal((10, 1, 2, 2)) * 0.4)

def score(y, s):
    ab = float(np.exp(sde.log_alphas_cumprod(s)))
    return -y / (ab * 0.16 + 1 - ab) + 0.1 * torch.tanh(y)  # nonlinear: Hutchinson's noise is real

options = OdeOptions(probe_type="gaussian", probes=3)
shared = flow_nll(score, sde, x, options, seed=6, runtime=Runtime(batch_size=3, dist=d))
if d.main:
    alone = flow_nll(score, sde, x, options, seed=6, runtime=Runtime(batch_size=3))
    torch.save({"world": d.world, "shared": shared.draws, "shared_nfe": shared.nfe,
                "alone": alone.draws, "alone_nfe": alone.nfe}, sys.argv[1])
dist.teardown()
"""


def test_two_ranks_split_the_images_as_one_process_does(tmp_path):
    """torchrun, 2 ranks (gloo): 10 images in batches of 3 are 4 batches, 2 per rank; each rank solves its
    own, and the gathered draws and NFE equal one process's bit for bit."""
    worker, out = tmp_path / "ode_worker.py", tmp_path / "out.pt"
    worker.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), "BENCH_DIST_TIMEOUT": "120"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(worker), str(out)], env=env, check=True, capture_output=True, timeout=180)
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    assert got["shared"].shape == (10, 3)
    assert torch.equal(got["shared"], got["alone"])
    assert torch.equal(got["shared_nfe"], got["alone_nfe"])


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("kwargs, message", [
    ({"rtol": 0}, "rtol must be a number > 0"),
    ({"atol": -1e-5}, "atol must be a number > 0"),
    ({"rtol": float("nan")}, "rtol must be a number > 0"),
    ({"probes": 0}, "probes (draws per image) must be an integer >= 1"),
    ({"probes": 1.5}, "probes (draws per image) must be an integer >= 1"),
    ({"eps": 0.0}, "eps must lie in (0, 1)"),
    ({"eps": 1.0}, "eps must lie in (0, 1)"),
    ({"probe_type": "normal"}, "unknown probe type 'normal'; choose one of: rademacher, gaussian"),
    ({"method": "BDF"}, "unknown ODE solver 'BDF'; choose one of: RK45, RK23, DOP853"),
])
def test_bad_options_are_one_error_line(kwargs, message):
    with pytest.raises(BenchError) as err:
        OdeOptions(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_data_is_one_error_line(sde):
    score = GaussianScore(sde, np.eye(4) * 0.1, (1, 2, 2))
    for data, message in [(torch.zeros(3, 4, dtype=torch.float64), "shape [N, C, H, W]"),
                          (torch.zeros(2, 1, 2, 2, dtype=torch.int32), "uint8 images or floating points")]:
        with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
            flow_nll(score, sde, data)
    with pytest.raises(BenchError, match="batch_size must be an integer >= 1"):
        flow_nll(score, sde, torch.zeros(2, 1, 2, 2, dtype=torch.float64), runtime=Runtime(batch_size=0))
    with pytest.raises(BenchError, match="uint8 images"):
        nll_ode(GaussianOracle(sde.sched, 0.3, "fixed_small"), get_variant("simple"), sde.sched,
                torch.zeros(2, 1, 2, 2))


def test_a_non_finite_score_stops_the_solve_with_one_line(sde):
    def broken(x, s):
        return x * float("nan")

    with pytest.raises(FlowDiverged, match="the flow's drift is not finite at s = ") as err:
        flow_nll(broken, sde, torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    assert "\n" not in str(err.value) and isinstance(err.value, BenchError)


def test_a_flow_that_blows_up_midway_is_a_diverged_flow(sde):
    def exploding(x, s):  # a tame score at the start, overflowing past s = 0.3 (as a bad network's can)
        return -x if s < 0.3 else x * float("inf")

    with pytest.raises(FlowDiverged, match="along the flow"):
        flow_nll(exploding, sde, torch.zeros(2, 1, 2, 2, dtype=torch.float64) + 0.1)
