"""How a training step draws its timestep t (0-based index) and the weight that keeps the
one-sample bound estimate unbiased (docs/MATH.md, "Training objectives")."""

from __future__ import annotations

import torch


class UniformSampler:
    """t uniform on 0..T−1; weight 1 (the estimate T·L_t needs no correction)."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Return (t long [B], weight float32 [B]) where weight = 1/(T p_t)."""
        t = torch.randint(0, self.T, (batch_size,), generator=generator, device="cpu").to(device)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """iDDPM importance sampling: p_t ∝ √E[L_t²] over the last ``history`` values of each L_t,
    mixed with ``uniform_prob`` of the uniform law; uniform until every t has ``history`` values."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(T)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(T, history, dtype=torch.float64)  # last values of L_t per t
        self.loss_counts = torch.zeros(T, dtype=torch.long)  # how many values each row holds (≤ history)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 [T]."""
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = torch.sqrt((self.loss_history**2).mean(dim=1))
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weight = (1.0 / (self.T * p[t])).to(torch.float32)
        return t.to(device), weight.to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push the per-example L_t values (any unit, same for all t) into each t's history."""
        for ti, loss in zip(t.tolist(), losses.detach().to("cpu", torch.float64).tolist()):
            count = int(self.loss_counts[ti])
            if count == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, count] = loss
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = state["loss_history"].clone()
        self.loss_counts = state["loss_counts"].clone()
