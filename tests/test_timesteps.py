"""The timestep samplers: the vectorised importance-sampler update against the per-example loop it
replaces, its state, its weights, and the numbers a CPU run draws (unchanged by the rewrite)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench.diffusion.timesteps import LossSecondMomentSampler, UniformSampler
from bench.errors import BenchError


# ----------------------------------------------------------------------------- the reference
class LoopSampler:
    """The sampler as it was written before vectorising: one Python step per example."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.loss_history = torch.zeros(T, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(T, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = torch.sqrt((self.loss_history**2).mean(dim=1))
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size: int, generator: torch.Generator):
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).to(torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for ti, loss in zip(t.tolist(), losses.detach().to("cpu", torch.float64).tolist()):
            count = int(self.loss_counts[ti])
            if count == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, count] = loss
                self.loss_counts[ti] += 1


def random_batch(g: torch.Generator, T: int, max_batch: int, crowd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose t often repeat (drawn from ``crowd`` of the T values), losses of mixed scale."""
    n = int(torch.randint(1, max_batch + 1, (1,), generator=g))
    pool = torch.randperm(T, generator=g)[:crowd]
    t = pool[torch.randint(0, len(pool), (n,), generator=g)]
    losses = torch.rand(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 3, (n,), generator=g)
    return t, losses


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Fail on the tensor→Python conversions that are host syncs on a GPU (bool, item, tolist, int, float)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read back to Python")

    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


# ----------------------------------------------------------------------------- update
@pytest.mark.parametrize(("T", "history", "max_batch", "crowd"), [
    (5, 3, 12, 2),  # one batch often holds more than `history` values of one t
    (7, 10, 24, 7),
    (50, 10, 64, 50),
    (6, 1, 8, 3),
])
def test_vectorised_update_equals_the_loop_through_the_warm_up(T, history, max_batch, crowd):
    g = torch.Generator().manual_seed(T * 100 + history)
    fast, slow = LossSecondMomentSampler(T, history), LoopSampler(T, history)
    warmed_at = None
    for i in range(300):
        t, losses = random_batch(g, T, max_batch, crowd if i % 3 else T)
        fast.update(t, losses.to(torch.float32) if i % 2 else losses)
        slow.update(t, losses.to(torch.float32) if i % 2 else losses)
        assert torch.equal(fast.loss_counts, slow.loss_counts), i
        assert torch.equal(fast.loss_history, slow.loss_history), i
        assert fast.warmed_up() == slow.warmed_up()
        assert torch.equal(fast.probabilities(), slow.probabilities()), i
        if warmed_at is None and slow.warmed_up():
            warmed_at = i
    assert warmed_at is not None and warmed_at > 0  # the run crossed the warm-up transition
    assert fast.loss_history.dtype == torch.float64 and fast.loss_counts.dtype == torch.long


def test_update_keeps_what_the_loop_keeps_beyond_a_short_row():
    """Slots past a row's count are left alone, as the loop leaves them (a loaded state may hold anything)."""
    T, H = 4, 5
    state = {"loss_history": torch.arange(T * H, dtype=torch.float64).view(T, H) + 0.5,
             "loss_counts": torch.tensor([0, 2, 5, 4])}
    fast, slow = LossSecondMomentSampler(T, H), LoopSampler(T, H)
    fast.load_state_dict(state)
    slow.loss_history, slow.loss_counts = state["loss_history"].clone(), state["loss_counts"].clone()
    t, losses = torch.tensor([1, 3, 3, 0, 1]), torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    fast.update(t, losses)
    slow.update(t, losses)
    assert torch.equal(fast.loss_history, slow.loss_history)
    assert torch.equal(fast.loss_counts, slow.loss_counts)
    assert fast.loss_history[1].tolist() == [5.5, 6.5, -1.0, -5.0, 9.5]  # slot 4 untouched
    assert fast.loss_history[3].tolist() == [16.5, 17.5, 18.5, -2.0, -3.0]  # shifted once past full


def test_update_and_sample_read_nothing_back_to_python(monkeypatch):
    s = LossSecondMomentSampler(T=8, history=2)
    g = torch.Generator().manual_seed(0)
    with no_host_reads(monkeypatch):
        for _ in range(20):
            t, w = s.sample(16, torch.device("cpu"))
            s.update(t, torch.rand(16, generator=g) * (t + 1))
            s.sample(16, torch.device("cpu"), g)
    assert s.warmed_up()


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    s = LossSecondMomentSampler(T=9, history=4)
    for _ in range(12):
        s.update(*random_batch(g, 9, 10, 5))
    state = s.state_dict()
    assert set(state) == {"loss_history", "loss_counts"}
    assert state["loss_history"].shape == (9, 4) and state["loss_history"].dtype == torch.float64
    assert state["loss_counts"].shape == (9,) and state["loss_counts"].dtype == torch.long
    assert state["loss_history"].device.type == "cpu"
    fresh = LossSecondMomentSampler(T=9, history=4)
    fresh.load_state_dict(state)
    state["loss_history"].zero_()  # the sampler keeps its own copy
    assert torch.equal(fresh.loss_history, s.loss_history) and torch.equal(fresh.loss_counts, s.loss_counts)
    for _ in range(10):
        batch = random_batch(g, 9, 10, 5)
        s.update(*batch)
        fresh.update(*batch)
        assert torch.equal(fresh.probabilities(), s.probabilities())
        assert torch.equal(s.sample(32, torch.device("cpu"), torch.Generator().manual_seed(1))[0],
                           fresh.sample(32, torch.device("cpu"), torch.Generator().manual_seed(1))[0])


def test_load_state_dict_refuses_a_state_of_another_shape():
    with pytest.raises(BenchError, match="T = 5"):
        LossSecondMomentSampler(T=5).load_state_dict(LossSecondMomentSampler(T=6).state_dict())


# ----------------------------------------------------------------------------- sample
def warmed(T: int = 6, history: int = 3, seed: int = 0) -> tuple[LossSecondMomentSampler, LoopSampler]:
    g = torch.Generator().manual_seed(seed)
    fast, slow = LossSecondMomentSampler(T, history), LoopSampler(T, history)
    for _ in range(history):
        losses = torch.rand(T, generator=g, dtype=torch.float64) * torch.arange(1, T + 1)
        fast.update(torch.arange(T), losses)
        slow.update(torch.arange(T), losses)
    assert fast.warmed_up()
    return fast, slow


def test_sample_weights_are_one_over_T_p_and_the_draws_are_unchanged():
    fast, slow = warmed()
    t, w = fast.sample(4000, torch.device("cpu"), torch.Generator().manual_seed(5))
    t_ref, w_ref = slow.sample(4000, torch.Generator().manual_seed(5))
    assert torch.equal(t, t_ref) and torch.equal(w, w_ref)  # the same numbers as the loop version drew
    p = fast.probabilities()
    assert t.dtype == torch.long and w.dtype == torch.float32
    assert torch.equal(w, (1.0 / (fast.T * p[t])).to(torch.float32))
    counts = torch.bincount(t, minlength=fast.T).double() / len(t)
    assert torch.allclose(counts, p, atol=0.03)  # drawn from p


def test_sample_is_uniform_with_unit_weight_before_the_warm_up():
    s = LossSecondMomentSampler(T=10, history=2)
    s.update(torch.arange(9), torch.ones(9))  # t = 9 has no value yet
    assert not s.warmed_up()
    assert torch.equal(s.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    t, w = s.sample(500, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(w, torch.ones(500))
    assert torch.equal(t, torch.multinomial(torch.full((10,), 0.1, dtype=torch.float64), 500, replacement=True,
                                            generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("seeded", [False, True])
def test_uniform_sampler_draws_the_same_cpu_numbers_as_before(seeded):
    """Before: ``torch.randint(0, T, (B,), generator=generator, device="cpu").to(device)``."""
    T, B = 1000, 64
    if seeded:
        t, w = UniformSampler(T).sample(B, torch.device("cpu"), torch.Generator().manual_seed(7))
        expect = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(7), device="cpu")
    else:
        torch.manual_seed(7)
        t, w = UniformSampler(T).sample(B, torch.device("cpu"))
        torch.manual_seed(7)
        expect = torch.randint(0, T, (B,), device="cpu")
    assert torch.equal(t, expect)
    assert torch.equal(w, torch.ones(B)) and w.dtype == torch.float32


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_update_and_sample_never_synchronise_and_match_the_cpu():
    dev = torch.device("cuda")
    fast, slow = LossSecondMomentSampler(T=20, history=3), LossSecondMomentSampler(T=20, history=3)
    g = torch.Generator().manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(40):
            t_cpu, losses = random_batch(g, 20, 30, 8)
            t, losses_dev = t_cpu.to(dev, non_blocking=True), losses.to(dev, non_blocking=True)
            fast.update(t, losses_dev)
            drawn, weight = fast.sample(128, dev)
            UniformSampler(20).sample(128, dev)
            slow.update(t_cpu, losses)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert drawn.device.type == "cuda" and weight.device.type == "cuda"
    assert fast.loss_history.device.type == "cuda"
    assert torch.equal(fast.loss_history.cpu(), slow.loss_history)
    assert torch.equal(fast.loss_counts.cpu(), slow.loss_counts)
