"""DDPM Table 2 baseline: the unweighted ‖μ̃_t(x_t, x_0) − μ_θ(x_t, t)‖² (mean over dims)."""

from bench.diffusion.gaussian import mean_flat
from bench.diffusion.variant import Loss, Variant


class MuMse(Variant):
    name = "mu-mse"
    objective = "‖μ̃_t − μ_θ‖² (mean over dims), unweighted, t uniform"
    mean_type = "mu"
    var_type = "fixed_small"

    def loss(self, model, sched, x0, generator=None):
        t, _, _, x_t, out = self.draw(model, sched, x0, generator)
        mse = mean_flat((sched.q_posterior_mean(x0, x_t, t) - out) ** 2)
        return Loss(mse, t, {"mse": mse})
