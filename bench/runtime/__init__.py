"""The runtime layer: where and how work runs — ranks (dist), CPU cores, devices and precision, file locks,
atomic files, the evaluators' Runtime (context), progress lines, URLs with their secrets masked.

May import: bench.errors.
"""
