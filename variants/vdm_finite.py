"""VDM's finite-T bound L_T = (T/2)·E_i[expm1(γ(t_i) − γ(t_{i−1}))‖ε − ε̂‖²] (+ decoder + prior), t_i = i/T.

Each of its T terms is DDPM's KL with the true posterior's variance (``elbo`` with β̃); L_2T ≤ L_T for the same
network, and L_∞ (``vdm-fixed``) is their limit. T is the config's ``T``; the schedule is fixed by default, or
learned with a learned ``--gamma-schedule``.
"""

from bench.diffusion.vdm import ContinuousVariant


class VdmFinite(ContinuousVariant):
    name = "vdm-finite"
    objective = "L_T (VDM's finite-T bound, T steps of a continuous schedule γ(t)); decoder + prior + L_T"
    finite = True
