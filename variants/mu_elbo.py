"""DDPM Table 2 baseline: L_vlb with the network predicting μ̃ directly, fixed variance."""

from bench.diffusion.variant import Loss, Variant


class MuElbo(Variant):
    name = "mu-elbo"
    objective = "L_vlb: one-sample T·L_t (bits/dim), t uniform, network outputs μ_θ"
    mean_type = "mu"
    var_type = "fixed_small"

    def loss(self, model, sched, x0, generator=None):
        t, weight, _, x_t, out = self.draw(model, sched, x0, generator)
        vb = sched.T * self.vb_bits(out, sched, x0, x_t, t) * weight
        return Loss(vb, t, {"vb": vb})
