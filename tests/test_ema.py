"""The weights' EMA (bench.nets.ema): its warm-up pinned numerically against the closed form, the cap reached where
min(decay, (1+n)/(10+n)) says and then the flat decay's update to the bit, and a restored EMA continuing as the
uninterrupted one. (Whole runs resumed bit-exactly: tests/test_run.py, "exact resume".)"""

from __future__ import annotations

import math

import pytest
import torch

from bench.nets.ema import Ema, horizon, initial_share, warmup_decay
from bench.training.checkpoint import load_checkpoint, save_checkpoint


def _share_of_initial_weights(decay: float, updates: int, warmup: bool) -> float:
    """Train a 1-parameter "network" whose weight starts at 1 and is 0 after every step: the EMA's weight is then
    the initial network's share in it."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(net.weight)
    ema = Ema(net, decay, warmup)
    torch.nn.init.zeros_(net.weight)
    for n in range(updates):
        ema.update_parameters(net, n)
    return ema.module.weight.item()


def test_the_warm_up_leaves_no_initial_network_after_200_steps_where_a_flat_decay_leaves_37_percent():
    flat = _share_of_initial_weights(0.995, 200, warmup=False)
    assert flat == pytest.approx(0.995 ** 200, rel=1e-5) and flat == pytest.approx(0.367, abs=1e-3)  # issue 19
    assert _share_of_initial_weights(0.995, 30, warmup=False) == pytest.approx(0.860, abs=1e-3)  # a study's 30 steps
    # with the warm-up: Π_{n<N} (1+n)/(10+n) = 9!·N!/(N+9)!
    for updates, bound in ((1, 0.1 + 1e-7), (3, 0.0046), (30, 1e-6), (200, 1e-15)):
        closed = math.factorial(9) * math.factorial(updates) / math.factorial(updates + 9)
        share = _share_of_initial_weights(0.995, updates, warmup=True)
        assert share == pytest.approx(closed, rel=1e-4) and share < bound
        assert initial_share(0.995, updates) == pytest.approx(closed, rel=1e-12)
    assert initial_share(0.995, 200, warmup=False) == pytest.approx(0.995 ** 200, rel=1e-12)
    assert (horizon(0.995, warmup=False), horizon(0.995)) == (919, 3)  # steps to bring the initial share under 1%


def test_the_decay_ramps_as_1_plus_n_over_10_plus_n_and_stays_at_its_cap():
    net = torch.nn.Linear(1, 1, bias=False)
    for n in (0, 1, 9, 90, 1000, 1789, 1790, 1791, 50_000):
        torch.nn.init.ones_(net.weight)
        ema = Ema(net, 0.995)
        torch.nn.init.zeros_(net.weight)
        ema.update_parameters(net, n)  # from 1 towards 0: what is left is the decay
        expected = min(0.995, (1 + n) / (10 + n))
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6), n
        assert warmup_decay(0.995, n) == expected
    assert [n for n in range(1789, 1792) if warmup_decay(0.995, n) == 0.995] == [1790, 1791]  # capped from 1,790
    assert min(n for n in range(100_000) if warmup_decay(0.9999, n) == 0.9999) == 89_990  # cifar10's 0.9999


@pytest.mark.parametrize("n, same", [(1790, True), (5000, True), (1789, False), (100, False)])
def test_a_capped_update_is_the_flat_decays_to_the_bit(n, same):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    warm, flat = Ema(net, 0.995), Ema(net, 0.995, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    warm.update_parameters(net, n)
    flat.update_parameters(net, n)
    assert all(torch.equal(a, b) for a, b in zip(warm.module.parameters(), flat.module.parameters())) == same


def test_an_ema_restored_from_its_state_dict_continues_bit_exactly():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    steps = [{k: torch.randn_like(v) for k, v in net.state_dict().items()} for _ in range(12)]
    straight = Ema(net, 0.995)
    saved = None
    for n, weights in enumerate(steps):
        net.load_state_dict(weights)
        straight.update_parameters(net, n)
        if n == 4:
            saved = {k: v.clone() for k, v in straight.state_dict().items()}
    resumed = Ema(torch.nn.Linear(4, 3), 0.995)
    resumed.load_state_dict(saved)
    for n, weights in enumerate(steps[5:], start=5):
        net.load_state_dict(weights)
        resumed.update_parameters(net, n)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert resumed.n_averaged.item() == 13


def test_a_checkpoint_from_before_the_warm_up_resumes_without_it(tmp_path):
    from bench.training.config import RunConfig

    config = RunConfig().to_dict()
    del config["ema_warmup"]
    state = {"config": config, "step": 1, "model": {}, "ema": {}, "optimizer": {}, "rng": {}, "run_id": "r",
             "tracking_uri": "sqlite:///x.db"}
    save_checkpoint(tmp_path / "old.pt", state)
    assert RunConfig(**load_checkpoint(tmp_path / "old.pt")["config"]).ema_warmup is False
    save_checkpoint(tmp_path / "new.pt", {**state, "config": RunConfig().to_dict()})
    assert RunConfig(**load_checkpoint(tmp_path / "new.pt")["config"]).ema_warmup is True
