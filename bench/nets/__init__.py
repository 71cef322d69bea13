"""The networks: the DDPM U-Net and its exponential moving average.

May import: bench.errors, bench.runtime.
"""
