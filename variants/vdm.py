"""VDM (Kingma et al. 2021): the continuous-time bound L_∞ with the noise schedule learned by the bound.

The schedule's end points γ(0), γ(1) are trained by the whole bound (they enter the decoder, the prior and, through
γ'(t), the diffusion term); with ``--gamma-schedule learned-net`` so is the shape of VDM's monotone network, as in
VDM's public code (the paper's variance-minimising training of the shape is not implemented).
"""

from bench.diffusion.vdm import ContinuousVariant


class Vdm(ContinuousVariant):
    name = "vdm"
    objective = "L_∞ (continuous-time bound, VDM) with a learned schedule γ(t); decoder + prior + ½γ'(t)‖ε−ε̂‖²"
    learns_schedule = True
