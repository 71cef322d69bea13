"""The shared trainer: RunConfig, checkpoints, opening and resuming a run, the step loop, evaluation,
what is recorded, signals, the grid's bookkeeping.

May import: every layer below (errors, runtime, diffusion, nets, data, variants, metrics, tracking).
"""
