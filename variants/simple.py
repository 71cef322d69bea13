"""L_simple: the unweighted ε-MSE of DDPM; the variance is fixed (β̃ by default, β if asked)."""

from bench.diffusion.gaussian import mean_flat
from bench.diffusion.variant import Loss, Variant


class Simple(Variant):
    name = "simple"
    objective = "L_simple: E‖ε − ε_θ(x_t, t)‖² (mean over dims), t uniform"
    mean_type = "eps"
    var_type = "fixed_small"

    def loss(self, model, sched, x0, generator=None):
        t, _, noise, _, out = self.draw(model, sched, x0, generator)
        mse = mean_flat((noise - out) ** 2)
        return Loss(mse, t, {"mse": mse})
