"""The run configuration: the single home of every default.

``RunConfig`` holds the generic defaults; ``DATASET_DEFAULTS`` the per-dataset ones (digits: a budget
that finishes on 2 CPU cores; cifar10: the DDPM paper's setup). The CLI, a TOML file, Optuna
(``dataclasses.replace``) and the tests all fill the same dataclass; MLflow logs it flattened and a
checkpoint stores it, so a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.errors import BenchError
from bench.diffusion.schedule import Schedule
from bench.runtime.urls import masked

SCHEDULES = ("linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
FINAL_EVALS = ("exact", "estimate")
# Upper bounds that refuse, in one line, a value that could only end in an allocation failure.
MAX_T = 100_000  # diffusion steps (the schedule's tables and the exact bound grow with T)
MAX_BATCH = 65_536  # images or (image, t) pairs in one network call
MAX_SAMPLES = 1_000_000  # images generated for FID or a grid


@dataclass(frozen=True)
class RunConfig:
    # what is trained
    variant: str = "simple"  # a name from variants.VARIANTS
    variance: str | None = None  # 'small' (β̃) or 'large' (β) for fixed-variance variants; None = β̃
    dataset: str = "digits"  # a name from bench.data.datasets.DATASETS
    data_dir: str | None = None  # data root for file-backed datasets (else $BENCH_DATA_DIR)
    download: bool = False  # allow downloading a dataset that is missing
    network: str = "tiny"  # a preset from bench.nets.unet.NETWORK_PRESETS
    # noise schedule
    schedule: str = "linear"  # 'linear' or 'cosine'
    T: int = 1000  # diffusion steps
    beta_start: float = 1e-4  # linear β_1
    beta_end: float = 0.02  # linear β_T
    cosine_s: float = 0.008  # cosine offset s
    # optimisation
    steps: int = 3000  # optimiser steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear learning-rate warmup, steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_decay: float = 0.995  # EMA of the weights, per step; evaluation and sampling use the EMA
    ema_warmup: bool = True  # the EMA's decay at update n is min(ema_decay, (1+n)/(10+n)) (bench.nets.ema.warmup_decay)
    hflip: bool = False  # random horizontal flips of training images
    seed: int = 0  # seeds weights, batches, noise, evaluation and sampling
    # evaluation and samples
    log_every: int = 50  # steps between logged loss means
    eval_every: int = 1000  # steps between estimated-bpd evaluations (0 = only at the end)
    eval_images: int = 128  # test images for the training-time estimate
    eval_calls: int = 33  # network calls per image for the estimate
    final_eval: str = "exact"  # bound on the whole test split at the end: 'exact' or 'estimate'
    final_eval_images: int = 0  # test images for the final bound (0 = the whole split)
    eval_batch_size: int = 1024  # (image, t) pairs per network call in evaluation
    final_eval_ode: bool = False  # also the NLL under the probability-flow ODE (nll_ode, not a bound) at the end
    ode_images: int = 0  # test images for nll_ode (0 = the final bound's)
    ode_method: str = "RK45"  # the ODE solver: a scipy solve_ivp method (bench.diffusion.ode.SOLVERS)
    ode_rtol: float = 1e-5  # the ODE solver's relative tolerance
    ode_atol: float = 1e-5  # the ODE solver's absolute tolerance
    ode_probes: int = 1  # Hutchinson probes (each with its own dequantisation draw) per image
    ode_probe_type: str = "rademacher"  # 'rademacher' or 'gaussian' probes
    ode_batch_size: int = 64  # images solved together as one ODE (they share its adaptive steps)
    fid_samples: int = 1000  # samples for FID at the end (0 = no FID)
    sample_steps: int = 250  # sampler steps (< T = strided, iDDPM respacing; 0 = all T)
    sample_grid: int = 64  # images in each logged sample grid
    fid_weights: str | None = None  # Inception weights file for RGB FID (else torch hub cache / download)
    log_model: bool = True  # log the EMA network as an MLflow LoggedModel at the end (its torch.export: 5-15 s on a CPU core)
    # system
    device: str = "auto"  # 'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...
    precision: str = "auto"  # 'auto' (bf16 autocast on cuda, fp32 elsewhere), 'fp32' or 'bf16'
    compile: bool = False  # torch.compile the network
    channels_last: bool | None = None  # NHWC memory layout for the network and its inputs (None = on cuda)
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    system_metrics: bool = True  # CPU/GPU utilisation and memory, logged through MLflow's system metrics
    # tracking
    experiment: str = "elbo-bench"  # MLflow experiment
    run_name: str | None = None  # MLflow run name (default: variant-dataset-seed)
    tracking_uri: str | None = None  # MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite under BENCH_HOME)

    # ----------------------------------------------------------------- derived
    def build_schedule(self) -> Schedule:
        if self.schedule == "linear":
            return Schedule.linear(T=self.T, beta_start=self.beta_start, beta_end=self.beta_end)
        return Schedule.cosine(T=self.T, s=self.cosine_s)

    @property
    def default_run_name(self) -> str:
        var = f"[{self.variance}]" if self.variance else ""
        return self.run_name or f"{self.variant}{var}-{self.dataset}-seed{self.seed}"

    def ode_options(self):
        """The probability-flow NLL's solver and estimator options (bench.diffusion.ode.OdeOptions)."""
        from bench.diffusion.ode import OdeOptions

        return OdeOptions(rtol=self.ode_rtol, atol=self.ode_atol, method=self.ode_method, probe_type=self.ode_probe_type,
                          probes=self.ode_probes)

    def to_dict(self) -> dict:
        return asdict(self)

    def redacted(self) -> RunConfig:
        """This config as it is shown and stored (MLflow params, config.json, checkpoints, --dry-run): the
        tracking URI's password masked (bench.runtime.urls.masked). A run resumed from a record gets the real URI
        again from --tracking-uri or $MLFLOW_TRACKING_URI (bench.tracking.store.recorded_store)."""
        return self if self.tracking_uri is None else dataclasses.replace(self, tracking_uri=masked(self.tracking_uri))

    def validate(self) -> RunConfig:
        """Refuse nonsense before anything is started; returns self."""
        from bench.data.datasets import DATASETS
        from bench.nets.unet import NETWORK_PRESETS
        from variants import get_variant

        _check_types(self)
        get_variant(self.variant, self.variance)
        if self.dataset not in DATASETS:
            raise BenchError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
        if self.network not in NETWORK_PRESETS:
            raise BenchError(f"unknown network {self.network!r}; choose one of: {', '.join(sorted(NETWORK_PRESETS))}")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("final_eval", self.final_eval, FINAL_EVALS)
        for name in ("steps", "batch_size", "log_every", "eval_images", "eval_batch_size", "sample_grid", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "final_eval_images", "ode_images", "fid_samples", "sample_steps", "seed"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        for name, most in (("T", MAX_T), ("batch_size", MAX_BATCH), ("eval_batch_size", MAX_BATCH),
                           ("ode_batch_size", MAX_BATCH), ("sample_grid", MAX_SAMPLES), ("fid_samples", MAX_SAMPLES)):
            _at_most(name, getattr(self, name), most)
        if self.eval_calls < 3:
            raise BenchError(f"eval_calls must be >= 3, got {self.eval_calls}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BenchError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise BenchError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise BenchError("grad_clip and weight_decay must be >= 0")
        sched = self.build_schedule()  # raises on an invalid schedule
        if self.sample_steps > sched.T:
            raise BenchError(f"sample_steps ({self.sample_steps}) cannot exceed T ({sched.T}); use 0 for all T steps")
        if self.sample_steps == 1:
            raise BenchError("sample_steps must be 0 (all T) or at least 2")
        self.ode_options()  # raises on bad solver options
        _positive_int("ode_batch_size", self.ode_batch_size)
        if self.fid_weights is not None and not Path(self.fid_weights).expanduser().is_file():
            raise BenchError(f"--fid-weights {self.fid_weights}: no such file")
        return self


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(config: RunConfig) -> None:
    """Each field holds a value of its declared type (a TOML file can hold anything)."""
    for f in fields(config):
        value = getattr(config, f.name)
        declared = str(f.type).replace(" ", "").split("|")
        if value is None and "None" in declared:
            continue
        allowed = tuple(t for name in declared if name in _TYPES for t in _TYPES[name])
        is_bool = isinstance(value, bool)
        if not isinstance(value, allowed) or (is_bool and bool not in allowed):
            want = " or ".join(n for n in declared if n != "None") + (" (or unset)" if "None" in declared else "")
            raise BenchError(f"{f.name} must be {want}, got {value!r} ({type(value).__name__})")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BenchError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _at_most(name: str, value, most: int) -> None:
    if isinstance(value, int) and value > most:
        raise BenchError(f"{name} must be at most {most:,}, got {value:,}")


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")


DATASET_DEFAULTS: dict[str, dict] = {
    # Training, the exact test-split bound, samples and FID in 8 to 15 minutes on 2 CPU cores (README: How long things take).
    "digits": {},
    # Ho et al. 2020, CIFAR-10: 35.7M-parameter U-Net, Adam 2e-4 with 5000 warmup steps, clip 1.0,
    # EMA 0.9999, random flips, batch 128, 800k steps; FID on 50k samples.
    "cifar10": {
        "network": "ddpm-cifar10",
        "steps": 800_000,
        "batch_size": 128,
        "lr": 2e-4,
        "warmup_steps": 5000,
        "grad_clip": 1.0,
        "ema_decay": 0.9999,
        "hflip": True,
        "eval_every": 10_000,
        "eval_images": 1000,
        "eval_batch_size": 512,
        "fid_samples": 50_000,
        "sample_steps": 0,
        "checkpoint_every": 10_000,
    },
}

FIELD_NAMES = tuple(f.name for f in fields(RunConfig))


def read_toml(path: str | Path) -> dict:
    """Config values from a TOML file (top-level keys are RunConfig field names)."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BenchError(f"config file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise BenchError(f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys are RunConfig fields")
    return values


def make_config(dataset: str = "digits", **overrides) -> RunConfig:
    """RunConfig for ``dataset``: generic defaults, then the dataset's, then ``overrides``
    (None values are ignored, so unset CLI options leave defaults alone)."""
    values = {**DATASET_DEFAULTS.get(dataset, {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise BenchError(f"unknown config key(s): {', '.join(unknown)}")
    return dataclasses.replace(RunConfig(dataset=dataset), **values).validate()


def flatten(config: RunConfig) -> dict[str, str]:
    """The config as MLflow params (str values, None shown as '', the tracking URI's password masked)."""
    return {f"config.{k}": "" if v is None else str(v) for k, v in config.redacted().to_dict().items()}
