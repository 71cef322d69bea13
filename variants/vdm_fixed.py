"""VDM's continuous-time bound L_∞ with a fixed noise schedule (VDM's line γ(t) from −13.3 to 5.0 by default)."""

from bench.diffusion.vdm import ContinuousVariant


class VdmFixed(ContinuousVariant):
    name = "vdm-fixed"
    objective = "L_∞ (continuous-time bound, VDM) with a fixed schedule γ(t); decoder + prior + ½γ'(t)‖ε−ε̂‖²"
