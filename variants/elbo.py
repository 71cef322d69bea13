"""The full variational bound L_vlb with the discretised decoder, ε-prediction, fixed variance."""

from bench.diffusion.gaussian import mean_flat
from bench.diffusion.variant import Loss, Variant


class Elbo(Variant):
    name = "elbo"
    objective = "L_vlb: one-sample T·L_t (bits/dim), t uniform, discretised decoder at t = 1"
    mean_type = "eps"
    var_type = "fixed_small"

    def loss(self, model, sched, x0, generator=None):
        t, weight, noise, x_t, out = self.draw(model, sched, x0, generator)
        vb = sched.T * self.vb_bits(out, sched, x0, x_t, t) * weight
        return Loss(vb, t, {"vb": vb, "mse": mean_flat((noise - out[:, : x0.shape[1]]) ** 2).detach()})
