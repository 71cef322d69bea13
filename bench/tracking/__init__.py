"""MLflow: the store, run provenance, liveness of runs, the run logger, the figures it logs.

May import: bench.errors, bench.runtime.
"""
