"""The runtime layer: processes and ranks, CPU cores, file locks, URLs, progress lines.

May import: bench.errors.
"""
