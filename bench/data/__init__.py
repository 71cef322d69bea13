"""The datasets: digits (embedded), MNIST, CIFAR-10, read from their true on-disk formats.

May import: bench.errors, bench.runtime.
"""
