"""DDPM Table 2 row: L_vlb with the network predicting μ̃ directly and a learned diagonal Σ (log σ² output
directly); FID 23.69 on CIFAR-10 in the paper."""

from variants.mu_elbo import MuElbo


class MuElboLearnedDiag(MuElbo):
    name = "mu-elbo-learned-diag"
    objective = "L_vlb: one-sample T·L_t (bits/dim), t uniform, network outputs μ_θ and log σ²"
    mean_type = "mu"
    var_type = "learned"
