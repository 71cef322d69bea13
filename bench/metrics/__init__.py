"""The sample-quality metrics: FID, KID, IS, precision/recall, their feature extractors and sample files.

May import: bench.errors, bench.runtime, bench.data.
"""
