"""The run configuration: the single home of every default.

``RunConfig`` holds the generic defaults; ``DATASET_DEFAULTS`` the per-dataset ones (digits: a budget
that finishes on 2 CPU cores; cifar10: the DDPM paper's setup). The CLI, a TOML file, Optuna
(``dataclasses.replace``) and the tests all fill the same dataclass; MLflow logs it flattened and a
checkpoint stores it, so a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from bench.data.datasets import DATASETS
from bench.diffusion.continuous import PREDICTIONS, VDM_GAMMA_MAX, VDM_GAMMA_MIN, ContinuousDenoiser, NoiseSchedule
from bench.diffusion.ode import PROBE_TYPES, SOLVERS, OdeOptions
from bench.diffusion.schedule import Schedule
from bench.diffusion.variant import FIXED_VARIANCES, Variant
from bench.diffusion.vdm import GAMMA_SCHEDULES, build_noise_schedule
from bench.diffusion.weighting import WEIGHTINGS, Weighting, build_weighting, check_weights
from bench.errors import BenchError, check_choice
from bench.nets.unet import NETWORK_PRESETS, build_network
from bench.runtime.urls import masked
from variants import VARIANTS, get_variant

SCHEDULES = ("linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
FINAL_EVALS = ("exact", "estimate")
# Upper bounds that refuse, in one line, a value that could only end in an allocation failure.
MAX_T = 100_000  # diffusion steps (the schedule's tables and the exact bound grow with T)
MAX_BATCH = 65_536  # images or (image, t) pairs in one network call
MAX_SAMPLES = 1_000_000  # images generated for FID or a grid
IMPORTED = "imported"  # the network of a published model read by bench eval --from (built from its own file)


def _field(default, help: str, **cli) -> Any:
    """A RunConfig field: its default, and what ``bench run --FIELD`` says of it (``help``; the default is added
    to it by the CLI, per dataset where DATASET_DEFAULTS differ). ``cli`` holds what else the option needs:
    ``choices`` (a tuple, in the order the help lists them) and ``path`` ('file' or 'dir'); a bool field is a
    ``--FIELD/--no-FIELD`` switch. The CLI's options are made from these alone (bench.cli.options)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RunConfig:
    # what is trained
    variant: str = _field("simple", "Objective variant (see `bench variants`).", choices=tuple(sorted(VARIANTS)))
    variance: str | None = _field(
        None, "Fixed reverse variance of fixed-Σ variants: β̃_t (small) or β_t (large); unset means small.",
        choices=tuple(FIXED_VARIANCES))
    dataset: str = _field("digits", "Dataset: digits (embedded) or cifar10 (download or --data-dir).",
                          choices=tuple(sorted(DATASETS)))
    data_dir: str | None = _field(None, "Data root for file-backed datasets (unset: $BENCH_DATA_DIR).", path="dir")
    download: bool = _field(False, "Download a missing dataset (needs internet).")
    network: str = _field("tiny", "U-Net preset (ddpm-cifar10: DDPM's 35.7M network).",
                          choices=tuple(sorted(NETWORK_PRESETS)))
    # noise schedule
    schedule: str = _field("linear", "Noise schedule.", choices=SCHEDULES)
    T: int = _field(1000, "Diffusion steps T.")
    beta_start: float = _field(1e-4, "Linear schedule: β_1.")
    beta_end: float = _field(0.02, "Linear schedule: β_T.")
    cosine_s: float = _field(0.008, "Cosine schedule: offset s.")
    gamma_schedule: str = _field(
        "auto", "Continuous-time variants: the noise schedule γ(t) = −log SNR(t). fixed: VDM's line from --gamma-min "
        "to --gamma-max; linear-beta, cosine: the --schedule's β read in continuous time (x_1 at t = 0, x_T at t = 1); "
        "cosine-ends: the continuous cosine from --gamma-min to --gamma-max; learned-ends: a line whose end points are "
        "learned; learned-net: VDM's monotone network. auto: learned-ends for vdm, cosine-ends for weighted, fixed "
        "otherwise.", choices=GAMMA_SCHEDULES)
    gamma_min: float = _field(VDM_GAMMA_MIN, "Continuous-time variants: γ(0), the log of 1/SNR at t = 0 (a learned "
                              "schedule's start).")
    gamma_max: float = _field(VDM_GAMMA_MAX, "Continuous-time variants: γ(1) (a learned schedule's start).")
    fourier_features: bool = _field(False, "Continuous-time variants: the network also sees sin and cos of 2ⁿ·2π·z_t "
                                    "(n = 6, 7; VDM's Fourier features).")
    prediction: str = _field("eps", "Continuous-time variants: what the network outputs, ε, x or v = αε − σx "
                             "(converted exactly to ε̂ for the bound, the sampler and the ODE).", choices=PREDICTIONS)
    weighting: str = _field("eps", "Variant weighted: the weighting w(λ) of the ε-error over λ = log SNR "
                            "(see `bench weightings`).", choices=tuple(WEIGHTINGS))
    min_snr_gamma: float = _field(5.0, "Weighting min-snr: the SNR clip γ (min(SNR, γ) on the x-error).")
    sigmoid_bias: float = _field(0.0, "Weighting sigmoid: the bias b of sigmoid(b − λ).")
    edm_mean: float = _field(2.4, "Weightings edm, edm-monotonic: the mean of EDM's normal density over λ "
                             "(−2·P_mean).")
    edm_std: float = _field(2.4, "Weightings edm, edm-monotonic: its standard deviation over λ (2·P_std).")
    weighting_table: str | None = _field(None, "Weighting table: a CSV with the header lambda,w (linear between rows, "
                                         "flat beyond).", path="file")
    adaptive_schedule: bool = _field(False, "Variant weighted: draw λ from Kingma & Gao's adaptive schedule (an EMA "
                                     "of the weighted loss in λ-bins), each sample weighted by w/q: the same "
                                     "objective, lower variance.")
    # optimisation
    steps: int = _field(3000, "Optimiser steps.")
    batch_size: int = _field(128, "Images per optimiser step (the global batch, whatever the number of processes).")
    lr: float = _field(1e-3, "AdamW peak learning rate.")
    warmup_steps: int = _field(100, "Steps of linear learning-rate warmup to the peak (0: none).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    grad_clip: float = _field(1.0, "Largest global gradient norm (0: no clipping).")
    ema_decay: float = _field(0.995, "Per-step decay of the weights' EMA, which evaluation and sampling use.")
    ema_warmup: bool = _field(  # bench.nets.ema.warmup_decay
        True, "Warm the EMA's decay up: update n uses min(--ema-decay, (1+n)/(10+n)), so a short run's EMA is not its "
              "initial network (0.995 is reached after 1,790 updates).")
    hflip: bool = _field(False, "Random horizontal flips of training images.")
    seed: int = _field(0, "Seed of weights, batches, noise, evaluation and sampling.")
    # evaluation and samples
    log_every: int = _field(50, "Steps between logged training-loss means.")
    eval_every: int = _field(1000, "Steps between training-time bpd estimates and sample grids (0: only at the end).")
    eval_images: int = _field(128, "Test images in the training-time bpd estimate.")
    eval_calls: int = _field(33, "Network calls per image in a bpd estimate (>= 3).")
    final_eval: str = _field("exact", "Final bound on the test split: exact (all T terms) or the unbiased estimate.",
                             choices=FINAL_EVALS)
    final_eval_images: int = _field(0, "Test images in the final bound (0: the whole split).")
    eval_batch_size: int = _field(1024, "(image, t) pairs per network call in evaluation.")
    final_eval_ode: bool = _field(
        False, "Also the NLL under the probability-flow ODE at the end (nll_ode: a likelihood estimate, not a bound; "
        "slow: hundreds of network calls per image).")
    ode_images: int = _field(0, "Test images for nll_ode (0: the final bound's).")
    ode_method: str = _field("RK45", "The ODE solver (scipy solve_ivp).", choices=SOLVERS)
    ode_rtol: float = _field(1e-5, "The ODE solver's relative tolerance.")
    ode_atol: float = _field(1e-5, "The ODE solver's absolute tolerance.")
    ode_probes: int = _field(1, "Hutchinson probes per image, each with its own dequantisation draw.")
    ode_probe_type: str = _field("rademacher", "Law of the Hutchinson probes.", choices=PROBE_TYPES)
    ode_batch_size: int = _field(64, "Images solved together as one ODE (they share its adaptive steps).")
    fid_samples: int = _field(1000, "Samples scored by FID against the train split (0: no FID).")
    sample_steps: int = _field(250, "Ancestral sampler steps (fewer than T: strided; 0: all T; continuous-time "
                               "variants: any number, 0 meaning T).")  # iDDPM respacing
    sample_grid: int = _field(64, "Images in each logged sample grid.")
    fid_weights: str | None = _field(
        None, "Inception weights file for RGB FID (unset: torch-fidelity's cache, downloaded when missing).",
        path="file")
    log_model: bool = _field(True, "Log the EMA network as an MLflow model at the end (a LoggedModel; its torch.export "
                                   "takes 5-15 s on a CPU core); the checkpoint holds the weights either way.")
    # system
    device: str = _field("auto", "auto (cuda when present), cpu, cuda or cuda:N.")
    precision: str = _field("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere.", choices=PRECISIONS)
    compile: bool = _field(False, "torch.compile the network.")
    channels_last: bool | None = _field(None, "NHWC memory layout for the network (unset: on CUDA only).")
    checkpoint_every: int = _field(1000, "Steps between checkpoints (one is always written at the end).")
    system_metrics: bool = _field(True, "Log CPU/GPU utilisation and memory through MLflow's system metrics.")
    # tracking
    experiment: str = _field("elbo-bench", "MLflow experiment (unset: $MLFLOW_EXPERIMENT_NAME, else the default).")
    run_name: str | None = _field(None, "MLflow run name (unset: VARIANT-DATASET-seedN).")
    tracking_uri: str | None = _field(
        None, "MLflow tracking URI (unset: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in BENCH_HOME).")

    # ----------------------------------------------------------------- derived
    def build_variant(self) -> Variant:
        """The variant this config trains, a weighted one with its weighting and adaptive schedule."""
        if not VARIANTS[self.variant].weighted:
            return get_variant(self.variant, self.variance)
        return get_variant(self.variant, self.variance, weighting=self.build_weighting(),
                           adaptive=self.adaptive_schedule)

    def build_weighting(self) -> Weighting:
        return build_weighting(self.weighting, min_snr_gamma=self.min_snr_gamma, sigmoid_bias=self.sigmoid_bias,
                               edm_mean=self.edm_mean, edm_std=self.edm_std, weighting_table=self.weighting_table)

    def build_noise_schedule(self, variant: Variant) -> NoiseSchedule:
        """The continuous-time γ(t) a continuous-time ``variant`` trains with (gamma_schedule resolved for it)."""
        return build_noise_schedule(variant.gamma_schedule(self.gamma_schedule), self.gamma_min, self.gamma_max,
                                    T=self.T, beta_start=self.beta_start, beta_end=self.beta_end,
                                    cosine_s=self.cosine_s)

    def build_model(self, variant: Variant, channels: int, size: int) -> torch.nn.Module:
        """The network ``variant`` trains on images [C, size, size]: the U-Net preset, or for a continuous-time
        variant the U-Net conditioned on γ(t) with the schedule inside it (ContinuousDenoiser)."""
        if self.network == IMPORTED:
            raise BenchError("an imported model's network is built from its own file: bench eval FILE --from FORMAT")
        if not variant.continuous:
            return build_network(self.network, channels, variant.out_channels(channels), size)
        inputs = ContinuousDenoiser.in_channels(channels, self.fourier_features)
        return ContinuousDenoiser(build_network(self.network, inputs, channels, size),
                                  self.build_noise_schedule(variant), self.fourier_features, self.prediction)

    def build_schedule(self) -> Schedule:
        if self.schedule == "linear":
            return Schedule.linear(T=self.T, beta_start=self.beta_start, beta_end=self.beta_end)
        return Schedule.cosine(T=self.T, s=self.cosine_s)

    @property
    def default_run_name(self) -> str:
        var = f"[{self.variance}]" if self.variance else ""
        return self.run_name or f"{self.variant}{var}-{self.dataset}-seed{self.seed}"

    def ode_options(self) -> OdeOptions:
        """The probability-flow NLL's solver and estimator options."""
        return OdeOptions(rtol=self.ode_rtol, atol=self.ode_atol, method=self.ode_method,
                          probe_type=self.ode_probe_type, probes=self.ode_probes)

    def to_dict(self) -> dict:
        return asdict(self)

    def redacted(self) -> RunConfig:
        """This config as it is shown and stored (MLflow params, config.json, checkpoints, --dry-run): the
        tracking URI's password masked (bench.runtime.urls.masked). A run resumed from a record gets the real URI
        again from --tracking-uri or $MLFLOW_TRACKING_URI (bench.tracking.store.recorded_store)."""
        return self if self.tracking_uri is None else dataclasses.replace(self, tracking_uri=masked(self.tracking_uri))

    def validate(self) -> RunConfig:
        """Refuse nonsense before anything is started; returns self."""
        _check_types(self)
        variant = self.build_variant()
        check_choice("dataset", self.dataset, sorted(DATASETS))
        if self.network != IMPORTED:
            check_choice("network", self.network, sorted(NETWORK_PRESETS))
        check_choice("schedule", self.schedule, SCHEDULES, field=True)
        check_choice("precision", self.precision, PRECISIONS, field=True)
        check_choice("final_eval", self.final_eval, FINAL_EVALS, field=True)
        self._validate_continuous(variant)
        for name in ("steps", "batch_size", "log_every", "eval_images", "eval_batch_size", "sample_grid",
                     "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "final_eval_images", "ode_images", "fid_samples", "sample_steps",
                     "seed"):
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
        if self.sample_steps > sched.T and not variant.continuous:
            raise BenchError(f"sample_steps ({self.sample_steps}) cannot exceed T ({sched.T}); use 0 for all T steps")
        if self.sample_steps == 1:
            raise BenchError("sample_steps must be 0 (all T) or at least 2")
        self.ode_options()  # raises on bad solver options
        _positive_int("ode_batch_size", self.ode_batch_size)
        if self.fid_weights is not None and not Path(self.fid_weights).expanduser().is_file():
            raise BenchError(f"--fid-weights {self.fid_weights}: no such file")
        return self


    def _validate_continuous(self, variant: Variant) -> None:
        if not variant.weighted:
            defaults = RunConfig()
            given = [f"--{n.replace('_', '-')}" for n in WEIGHTED_FIELDS if getattr(self, n) != getattr(defaults, n)]
            if given:
                raise BenchError(f"{', '.join(given)}: for --variant weighted (the weighted-ELBO family), "
                                 f"not {self.variant!r}")
        if not variant.continuous:
            if self.gamma_schedule != "auto" or self.fourier_features or self.prediction != "eps":
                raise BenchError(f"--gamma-schedule, --fourier-features and --prediction are for continuous-time "
                                 f"variants ({', '.join(n for n, v in sorted(VARIANTS.items()) if v.continuous)}), "
                                 f"not {self.variant!r}")
            return
        check_choice("prediction", self.prediction, PREDICTIONS, field=True)
        for name in ("gamma_min", "gamma_max"):
            if not math.isfinite(getattr(self, name)):
                raise BenchError(f"{name} must be a finite number, got {getattr(self, name)}")
        schedule = self.build_noise_schedule(variant)  # raises on a schedule it cannot train with, or bad end points
        if variant.weighted:
            check_weights(variant.weighting, schedule, self.prediction)


# the fields only a weighted variant reads (any other refuses a value other than the default)
WEIGHTED_FIELDS = ("weighting", "min_snr_gamma", "sigmoid_bias", "edm_mean", "edm_std", "weighting_table",
                   "adaptive_schedule")
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


def _at_most(name: str, value, most: int) -> None:
    if isinstance(value, int) and value > most:
        raise BenchError(f"{name} must be at most {most:,}, got {value:,}")


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")


DATASET_DEFAULTS: dict[str, dict] = {
    # Training, the exact test-split bound, samples and FID in 8 to 15 minutes on 2 CPU cores
    # (README: How long things take).
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


def read_toml(path: str | Path | None) -> dict:
    """Config values from a TOML file (top-level keys are RunConfig field names); none without a file."""
    if path is None:
        return {}
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


def assemble_config(given: dict, file_values: dict | None = None, own: Callable[[str], dict] | None = None,
                    dataset: str = "digits") -> RunConfig:
    """The RunConfig a command resolves (`bench run`, each run of `bench grid`, each trial of `bench study`), each
    source above the one before: RunConfig's defaults, the dataset's (DATASET_DEFAULTS), the command's own
    (``own(dataset)``), $MLFLOW_EXPERIMENT_NAME (the experiment), a TOML file's values (read_toml), then ``given``
    (the command's options; None is not given). The dataset is the given one, else the file's, else ``dataset``."""
    file_values = file_values or {}
    given = {k: v for k, v in given.items() if v is not None}
    dataset = given.get("dataset") or file_values.get("dataset") or dataset
    env = {"experiment": os.environ["MLFLOW_EXPERIMENT_NAME"]} if os.environ.get("MLFLOW_EXPERIMENT_NAME") else {}
    return make_config(**{**(own(dataset) if own else {}), **env, **file_values, **given, "dataset": dataset})


def flatten(config: RunConfig) -> dict[str, str]:
    """The config as MLflow params (str values, None shown as '', the tracking URI's password masked)."""
    return {f"config.{k}": "" if v is None else str(v) for k, v in config.redacted().to_dict().items()}
