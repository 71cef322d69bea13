"""The diffusion layer: noise schedules (discrete, and continuous-time γ(t)), Gaussian algebra, the Variant base,
timestep samplers, the exact bound and its estimate, ancestral sampling, the probability-flow ODE, the evaluators'
named random streams.

May import: bench.errors, bench.runtime.
"""
