"""Continuous-time noise schedules γ(t) (bench.diffusion.continuous): end points, monotonicity, the slope γ'(t)
against finite differences, gradients that reach a learned schedule through γ'(t), the low-discrepancy times."""

from __future__ import annotations

import pytest
import torch

from bench.diffusion.continuous import (
    VDM_GAMMA_MAX,
    VDM_GAMMA_MIN,
    FixedLinear,
    LearnedEndpoints,
    MonotoneNet,
    alpha_sigma_squared,
    low_discrepancy_times,
)
from bench.errors import BenchError

GRID = torch.linspace(0, 1, 257, dtype=torch.float64)


def _schedules():
    torch.manual_seed(0)
    return [FixedLinear(), LearnedEndpoints(-10.0, 6.0), MonotoneNet(width=64).double()]


def test_vdms_fixed_schedule_has_its_published_end_points_and_slope():
    sched = FixedLinear()
    assert sched.endpoints() == (VDM_GAMMA_MIN, VDM_GAMMA_MAX) == (-13.3, 5.0)
    gamma, slope = sched.gamma_and_slope(GRID)
    assert torch.allclose(slope, torch.full_like(GRID, 18.3), rtol=0, atol=1e-12)
    a2, s2 = alpha_sigma_squared(gamma)
    assert torch.allclose(a2 + s2, torch.ones_like(GRID), rtol=0, atol=1e-15)  # variance preserving
    assert torch.allclose(torch.log(s2 / a2), gamma, rtol=0, atol=1e-9)  # γ = −log SNR


@pytest.mark.parametrize("index", range(3), ids=["fixed", "endpoints", "monotone-net"])
def test_every_schedule_increases_and_its_slope_is_the_finite_difference(index):
    sched = _schedules()[index]
    gamma, slope = sched.gamma_and_slope(GRID)
    assert (gamma[1:] > gamma[:-1]).all() and (slope > 0).all()
    h = 1e-6
    inner = GRID[1:-1]
    fd = (sched.gamma(inner + h) - sched.gamma(inner - h)) / (2 * h)
    assert torch.allclose(slope[1:-1].detach(), fd.detach(), rtol=1e-6, atol=1e-6)


def test_the_monotone_network_stays_monotone_whatever_its_weights():
    torch.manual_seed(1)
    sched = MonotoneNet(width=32).double()
    with torch.no_grad():
        for p in sched.parameters():
            p.copy_(torch.randn_like(p) * 3)  # negative weights included: they are taken in absolute value
    gamma = sched.gamma(GRID)
    assert (gamma[1:] >= gamma[:-1]).all()


def test_the_monotone_network_starts_near_the_fixed_line():
    torch.manual_seed(2)
    start, end = MonotoneNet(width=1024).double().endpoints()
    assert abs(start - VDM_GAMMA_MIN) < 0.1 and abs(end - VDM_GAMMA_MAX) < 0.1  # l3(φ)/1024 is small at the start


@pytest.mark.parametrize("index", [1, 2], ids=["endpoints", "monotone-net"])
def test_a_loss_weighted_by_the_slope_trains_the_schedule_through_it(index):
    sched = _schedules()[index]
    t = low_discrepancy_times(16, torch.Generator().manual_seed(0))
    _, slope = sched.gamma_and_slope(t)
    slope.sum().backward()  # a loss that depends on γ'(t) only: every gradient comes through the slope
    shaping = {"w"} if index == 1 else {"l1.weight", "l2.weight", "l2.bias", "l3.weight"}  # what γ' depends on
    for name, p in sched.named_parameters():
        if name in shaping:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # a pure offset of γ (b, l1's and l3's biases) does not change its slope
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_learned_end_points_move_under_training():
    sched = LearnedEndpoints()
    opt = torch.optim.SGD(sched.parameters(), lr=0.1)
    before = sched.endpoints()
    for _ in range(3):
        opt.zero_grad()
        t = low_discrepancy_times(8, torch.Generator().manual_seed(0))
        gamma, slope = sched.gamma_and_slope(t)
        (gamma.square().mean() + slope.mean()).backward()
        opt.step()
    after = sched.endpoints()
    assert after[0] != before[0] and after[1] != before[1] and after[0] < after[1]


def test_low_discrepancy_times_put_one_time_in_each_interval():
    B = 32
    t = low_discrepancy_times(B, torch.Generator().manual_seed(3))
    assert t.dtype == torch.float64 and ((t >= 0) & (t < 1)).all()
    assert sorted((t * B).floor().long().tolist()) == list(range(B))
    again = low_discrepancy_times(B, torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
    with pytest.raises(BenchError, match="at least one time"):
        low_discrepancy_times(0)


def test_half_precision_time_and_reversed_end_points_are_refused():
    with pytest.raises(BenchError, match="float32 or float64"):
        FixedLinear().gamma(torch.zeros(3, dtype=torch.bfloat16))
    for schedule in (FixedLinear, LearnedEndpoints, MonotoneNet):
        with pytest.raises(BenchError, match="gamma_min < gamma_max"):
            schedule(5.0, -13.3)
    gamma32 = FixedLinear().gamma(torch.zeros(2, dtype=torch.float32))
    assert gamma32.dtype == torch.float32
