"""elbo-bench: which way of training a DDPM is best, by which measure.

The public API: schedules, the exact bound and its estimator (with the Runtime they run in), datasets, networks;
continuous-time models (VDM): their noise schedules γ(t), the model wrapper, their bound and sampler.
"""

from bench.data.datasets import DATASETS, load_dataset
from bench.diffusion.bound import BoundResult, EstimateResult, bits_per_dim, estimate_bits_per_dim
from bench.diffusion.continuous import (
    ContinuousDenoiser,
    CosineReading,
    FixedLinear,
    LearnedEndpoints,
    LinearBetaReading,
    MonotoneNet,
)
from bench.diffusion.continuous_bound import ContinuousResult, continuous_bound
from bench.diffusion.continuous_sample import nll_ode_continuous, sample_continuous
from bench.diffusion.schedule import Schedule
from bench.errors import BenchError
from bench.nets.unet import NETWORK_PRESETS, UNet, build_network
from bench.runtime.context import Runtime

__all__ = [
    "DATASETS",
    "NETWORK_PRESETS",
    "BenchError",
    "BoundResult",
    "ContinuousDenoiser",
    "ContinuousResult",
    "CosineReading",
    "EstimateResult",
    "FixedLinear",
    "LearnedEndpoints",
    "LinearBetaReading",
    "MonotoneNet",
    "Runtime",
    "Schedule",
    "UNet",
    "bits_per_dim",
    "build_network",
    "continuous_bound",
    "estimate_bits_per_dim",
    "load_dataset",
    "nll_ode_continuous",
    "sample_continuous",
]
