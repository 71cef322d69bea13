"""The evaluators' random streams, by name: every draw of the bound, the estimate, sampling and the flow NLL
comes from a generator keyed by (seed, index, stream), so a number depends on the seed and its image (or
block of samples) alone, never on the batch size, the ranks or what ran before.

A stream's number is part of the results: another number is another stream, and every result drawn from it
changes. Distinct keys give independent streams (numpy's ``SeedSequence``).
"""

from __future__ import annotations

import enum

import numpy as np
import torch


def keyed_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator (on ``device``) seeded from a tuple of integers: independent streams for distinct keys."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


class Stream(enum.IntEnum):
    """One stream per use; its generator for one (seed, index) is ``Stream.X.generator(seed, index)``."""

    BOUND_NOISE = 0  # the exact bound, per image: the noise of its T pairs (key (seed, image): the first stream)
    ESTIMATE = 1  # the bound estimate, per image: its strata's uniforms (which t), then the noise of its K calls
    SAMPLES = 2  # sampling, per block of batch_size samples: x_T, then each reverse step's noise
    DEQUANTISATION = 3  # the flow NLL, per image: the uniform dequantisation noise w
    PROBES = 4  # the flow NLL, per image: the Hutchinson probes v
    CONTINUOUS = 5  # the continuous-time bound, per image: its strata's uniforms (which t), then its pairs' noise

    def generator(self, seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """This stream's generator for (``seed``, ``index``) on ``device``: keyed (seed, index, number), except
        BOUND_NOISE, keyed (seed, index) as it was before streams had numbers."""
        key = (seed, index) if self is Stream.BOUND_NOISE else (seed, index, int(self))
        return keyed_generator(*key, device=device)
