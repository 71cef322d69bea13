"""How a training step draws its timestep t (0-based index) and the weight that keeps the
one-sample bound estimate unbiased (docs/MATH.md, "Training objectives").

Both samplers keep the training step free of host synchronisation on a GPU: t is drawn on the device
(unless a generator pins the stream to its own device), the importance law switches from uniform with
``torch.where`` rather than a Python ``if``, and the loss history is updated by tensor operations on
the device it lives on.
"""

from __future__ import annotations

import torch

from bench.errors import BenchError


class UniformSampler:
    """t uniform on 0..T−1; weight 1 (the estimate T·L_t needs no correction)."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Return (t long [B], weight float32 [B]) on ``device``, where weight = 1/(T p_t).

        Without a generator t is drawn on ``device`` from its default stream; a generator's stream is
        drawn on the generator's own device and moved, so its numbers do not depend on ``device``."""
        t = _draw_on(device, generator,
                     lambda on: torch.randint(0, self.T, (batch_size,), generator=generator, device=on))
        return t, torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """iDDPM importance sampling: p_t ∝ √E[L_t²] over the last ``history`` values of each L_t,
    mixed with ``uniform_prob`` of the uniform law; uniform until every t has ``history`` values.

    The history lives on one device (CPU at first): :meth:`update` moves it to the losses' device,
    :meth:`to` moves it explicitly. :meth:`state_dict` is always on the CPU.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(T)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(T, history, dtype=torch.float64)  # last values of L_t per t, oldest first
        self.loss_counts = torch.zeros(T, dtype=torch.long)  # how many values each row holds (≤ history)

    def to(self, device: torch.device | str) -> LossSecondMomentSampler:
        """Keep the history on ``device``; returns self."""
        self.loss_history = self.loss_history.to(device)
        self.loss_counts = self.loss_counts.to(device)
        return self

    def warmed_up(self) -> bool:
        """Whether every t has ``history`` values (a host sync on a GPU: not for the training step)."""
        return bool(self._warmed_up())

    def _warmed_up(self) -> torch.Tensor:
        return (self.loss_counts == self.history).all()

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 [T], on the history's device."""
        uniform = torch.full((self.T,), 1.0 / self.T, dtype=torch.float64, device=self.loss_history.device)
        p = torch.sqrt((self.loss_history**2).mean(dim=1))
        p = p / p.sum()  # NaN before any loss is seen; torch.where below never picks it then
        p = p * (1 - self.uniform_prob) + self.uniform_prob / self.T
        return torch.where(self._warmed_up(), p, uniform)

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        p = self.probabilities()

        def draw(on: torch.device) -> torch.Tensor:
            return torch.multinomial(p.to(on), batch_size, replacement=True, generator=generator)

        t = _draw_on(device, generator, draw)
        weight = (1.0 / (self.T * p.to(t.device)[t])).to(torch.float32)
        return t, weight

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push the per-example L_t values (any unit, same for all t) into each t's history, in batch
        order: a t drawn k times in the batch receives its k values oldest first, and each row keeps
        its last ``history`` values. No Python loop over the batch and no host sync."""
        device, H = losses.device, self.history
        self.to(device)
        t = t.to(device)
        values = losses.detach().to(torch.float64).reshape(-1)
        order = torch.argsort(t, stable=True)  # grouped by t, batch order kept within a group
        t_sorted, v_sorted = t[order], values[order]
        # values arriving per t (not bincount: on a GPU it reads t's min and max back to the host)
        new = torch.zeros(self.T, dtype=torch.long, device=device).index_add_(0, t, torch.ones_like(t))
        first = torch.cumsum(new, 0) - new  # where each t's group starts in t_sorted
        rank = torch.arange(len(t_sorted), device=device) - first[t_sorted]  # 0-based place within its group
        # Row t is (its `count` old values) ++ (its `new` values), trimmed to the last H: everything moves
        # left by `shift`, old values first, then the new ones; a new value with a negative slot falls off.
        count = self.loss_counts
        shift = (count + new - H).clamp(min=0)
        source = (torch.arange(H, device=device) + shift[:, None]).clamp(max=H - 1)  # clamped slots get new values
        rows = torch.cat([self.loss_history.gather(1, source), self.loss_history.new_zeros(self.T, 1)], dim=1)
        slot = count[t_sorted] + rank - shift[t_sorted]
        rows[t_sorted, torch.where(slot >= 0, slot, H)] = v_sorted  # dropped values land in the spare column H
        self.loss_history = rows[:, :H].contiguous()
        self.loss_counts = (count + new).clamp(max=H)

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.to("cpu", copy=True),
                "loss_counts": self.loss_counts.to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        history, counts = state["loss_history"], state["loss_counts"]
        if tuple(history.shape) != (self.T, self.history) or tuple(counts.shape) != (self.T,):
            raise BenchError(f"importance-sampler state of shape {list(history.shape)} does not fit T = {self.T} "
                             f"with {self.history} values per t")
        device = self.loss_history.device
        self.loss_history = history.to(device, torch.float64, copy=True)
        self.loss_counts = counts.to(device, torch.long, copy=True)


def _draw_on(device: torch.device | str, generator: torch.Generator | None, draw) -> torch.Tensor:
    """``draw(on)`` on ``device``, or on the generator's device when one is given, returned on ``device``."""
    on = torch.device(device) if generator is None else generator.device
    return draw(on).to(device)
