"""iDDPM's L_vlb with importance-sampled t and a learned-range variance.

t is drawn with p_t ∝ √E[L_t²] (last 10 values of each L_t, 0.1% uniform mixed in; uniform until
every t has 10 values), and the sampled term is weighted by 1/(T p_t), so the estimate of Σ_t L_t
stays unbiased.
"""

from bench.diffusion.gaussian import mean_flat
from bench.diffusion.timesteps import LossSecondMomentSampler
from bench.diffusion.variant import Loss, Variant


class ElboLearned(Variant):
    name = "elbo-learned"
    objective = "L_vlb with importance-sampled t (iDDPM): L_t/p_t in bits/dim"
    mean_type = "eps"
    var_type = "learned_range"
    timestep_sampler = LossSecondMomentSampler

    def loss(self, model, sched, x0, generator=None):
        t, weight, noise, x_t, out = self.draw(model, sched, x0, generator)
        L_t = self.vb_bits(out, sched, x0, x_t, t)
        self.record(sched, t, L_t)
        vb = sched.T * L_t * weight
        return Loss(vb, t, {"vb": vb, "mse": mean_flat((noise - out[:, : x0.shape[1]]) ** 2).detach()})
