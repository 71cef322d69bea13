"""The weighted-ELBO family (Kingma & Gao 2023): ½ ∫ w(λ) E‖ε − ε̂‖² dλ for the weighting chosen with --weighting
(elbo, eps, v, min-snr, edm, edm-monotonic, sigmoid, or a table; `bench weightings` lists them), the network's
output chosen with --prediction (eps, x or v), λ sampled by the fixed schedule γ(t) or, with --adaptive-schedule,
by Kingma & Gao's adaptive importance sampler. Measured by the continuous-time bound L_∞ like VDM's models.
"""

from bench.diffusion.weighted import WeightedVariant


class Weighted(WeightedVariant):
    name = "weighted"
    objective = "L_w = ½ E[w(λ)/q(λ)·‖ε − ε̂‖²] (weighted ELBO family, Kingma & Gao 2023); w from --weighting"
