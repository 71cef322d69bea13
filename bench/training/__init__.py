"""The shared trainer: RunConfig (config), checkpoints (checkpoint), opening and resuming a run (run), what a run
holds and changes (state), the step loop (loop), evaluation (evaluation), what is recorded (record), Ctrl-C and
SIGTERM (signals), the grid's bookkeeping (grid).

May import: every layer below (errors, runtime, diffusion, nets, data, variants, metrics, tracking).
"""
