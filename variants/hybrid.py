"""iDDPM's L_hybrid = L_simple + λ·L_vlb with λ = 0.001 and a learned-range variance.

The L_vlb term sees the mean through a stop-gradient, so it trains the variance only; the mean
is trained by L_simple alone.
"""

import torch

from bench.diffusion.gaussian import mean_flat
from bench.diffusion.variant import HYBRID_LAMBDA, Loss, Variant


class Hybrid(Variant):
    name = "hybrid"
    objective = "L_hybrid: L_simple + 0.001·L_vlb, stop-gradient on the mean in L_vlb"
    mean_type = "eps"
    var_type = "learned_range"

    def loss(self, model, sched, x0, generator=None):
        t, _, noise, x_t, out = self.draw(model, sched, x0, generator)
        C = x0.shape[1]
        eps, v = out[:, :C], out[:, C:]
        mse = mean_flat((noise - eps) ** 2)
        vb = sched.T * self.vb_bits(torch.cat([eps.detach(), v], dim=1), sched, x0, x_t, t)
        return Loss(mse + HYBRID_LAMBDA * vb, t, {"mse": mse, "vb": vb})
