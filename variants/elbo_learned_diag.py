"""DDPM Table 2 row: L_vlb with ε-prediction and a learned diagonal Σ (log σ² output directly)."""

from variants.elbo import Elbo


class ElboLearnedDiag(Elbo):
    name = "elbo-learned-diag"
    objective = "L_vlb: one-sample T·L_t (bits/dim), t uniform, network outputs log σ²"
    mean_type = "eps"
    var_type = "learned"
