"""FID, KID, precision/recall and Inception Score of generated images, computed through torch-fidelity.

:func:`compute_fid` runs ``samples`` ("generated", torch-fidelity's input1) and ``reference``
("real", input2) through the feature extractor with torch-fidelity's own batching
(``get_featuresdict_from_dataset``) and hands the features to torch-fidelity's metric functions
(``fid_statistics_to_metric``, ``kid_featuresdict_to_metric``, ``prc_featuresdict_to_metric``): the
numbers are those ``torch_fidelity.calculate_metrics`` gives, but torch-fidelity's file cache (which
reads ``.pt`` files with ``torch.load(weights_only=False)``, so a planted file would run code) is
never used.  Instead the reference features (float32 ``[N, D]``) and FID statistics (``mu`` float32
``[D]``, ``sigma`` float64 ``[D, D]``) are cached by this module as
``<cache_dir>/fidelity/<name>.npz``, written atomically and read with ``numpy.load(allow_pickle=False)``
(a format that cannot run code); ``<name>`` is made of the dataset, split, size and content hash of
the reference, the extractor name, its weights hash and the feature layer, so they are computed once.
A cache file that is unreadable or does not match is recomputed and replaced, with a warning.

Inception Score (``isc``, ``isc_std``) is torch-fidelity's ``isc_features_to_metric`` on the samples'
logits: 10 splits (DDPM Table 1, torch-fidelity's default) after torch-fidelity's seeded shuffle.

Reference points put a run's FID on a scale: ``fid_ref_test`` is the FID of the dataset's test split
(its first ``min(n, N_test)`` images; tag ``fid_ref_test_samples``) and ``fid_ref_noise`` that of
``n`` Gaussian-noise images (:func:`gaussian_noise_images`), both against the same reference, where
``n`` is the run's sample count (FID is biased upward at small ``n``, so the count matters).  They are
computed once per (reference cache entry, ``n``, test images) and cached beside the reference as
small JSON files (``{"fid": ..., "samples": ...}``), which cannot run code either.

Samples are saved for re-scoring by :func:`save_samples` (uint8 ``[N, C, H, W]`` under key
``"samples"`` of an ``.npz``) and read back by :func:`load_samples` (``allow_pickle=False``);
:func:`score_samples` scores such a file (``bench fid SAMPLES.npz``, its dataset as the file records it, else
``--dataset D``).  These live here, with the metrics, because they are one pipeline: the file is what the metrics were computed from.

Feature extractors:

* RGB data (``cifar10``): torch-fidelity's ``inception-v3-compat``, layer ``"2048"`` (IS: ``"logits_unbiased"``).  Weights come
  from ``fid_weights`` (``--fid-weights PATH``), else torch-fidelity's file in the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``), else
  torch-fidelity's download URL; when all fail (offline) :class:`FidUnavailable` is raised.  No
  other network is ever substituted.  The weights are read with ``torch.load(weights_only=True)``
  (torch-fidelity itself would use ``weights_only=False``), so a file holding anything but a state
  dict of tensors is refused with a :class:`~bench.errors.BenchError` before any of it runs.
* ``digits`` (grey 8x8): a small CNN classifier trained once on the digits train split (labels from
  scikit-learn's ``load_digits().target`` in :mod:`bench.data.datasets`'s split order) and shipped with the package
  as ``bench/metrics/digits_classifier.npz`` (its tensors as plain arrays, read with ``allow_pickle=False``).  Its
  sha256 is fixed here (:data:`DIGITS_CLASSIFIER_SHA256`) and checked at every load, so every machine
  scores digits FIDs in the same feature space; the extractor is named ``digits-classifier-<hash8>``
  and its 64-d penultimate layer (``"64"``) feeds FID, KID and precision/recall.  Its 10 class
  logits (``"logits"``) give an analogue of the Inception Score, tagged ``isc_extractor`` and
  ``isc_note``: it is not comparable with Inception IS (at most 10, the number of classes).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from bench.training.checkpoint import write_atomically
from bench.data.datasets import DATASETS, DIGITS_N_TEST, DIGITS_SPLIT_SEED, load_dataset
from bench.errors import BenchError, first_line
from bench.runtime.devices import resolve_device

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's layer for IS: 1008 logits without the fc bias
INCEPTION_WEIGHTS_FILENAME = os.path.basename(URL_INCEPTION_V3)
DIGITS_EXTRACTOR_PREFIX = "digits-classifier"
DIGITS_FEATURE_LAYER = "64"
DIGITS_LOGITS_LAYER = "logits"
DIGITS_CLASSIFIER_FILE = Path(__file__).with_name("digits_classifier.npz")  # shipped with the package
DIGITS_CLASSIFIER_SHA256 = "634ef1526a6c79f4dabcd92e7bd0053ed73bc93a6d31792456ce4ecade7260b9"
DIGITS_TRAIN_SEED = 0
DIGITS_TRAIN_EPOCHS = 15
DIGITS_TRAIN_BATCH = 50
KID_MAX_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
FIDELITY_SUBDIR = "fidelity"
ISC_SPLITS = 10  # DDPM Table 1 and torch-fidelity's default isc_splits
ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed: samples are shuffled before splitting
NOISE_SEED = 0  # fid_ref_noise images: numpy default_rng(NOISE_SEED)
NOISE_MEAN, NOISE_STD = 127.5, 64.0  # pixel values of the noise, before clipping to [0, 255]
NOISE_CHUNK = 1000  # images drawn at a time (50k CIFAR-sized images in float64 would be 1.2 GB)
SAMPLES_KEY = "samples"  # the array's name in a saved-samples .npz
DATASET_KEY = "dataset"  # the dataset the samples imitate, a 0-d unicode array beside them (files written since)
_CACHE_KEYS = ("features", "mu", "sigma")

_METRIC_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
}


class FidUnavailable(BenchError):
    """The Inception weights FID needs are not available (offline, none given); FID is skipped."""


@dataclass
class FidResult:
    """Metrics (``fid``; ``kid``, ``kid_std``, ``precision``, ``recall``, ``isc``, ``isc_std``,
    ``fid_ref_test``, ``fid_ref_noise`` where computed) and the tags that say how."""

    metrics: dict[str, float]
    tags: dict[str, str]


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- digits classifier


class _DigitsNet(nn.Module):
    """Small CNN for 8x8 grey digits: two convs, a 128-unit and a 64-unit hidden layer, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)
        # Features are divided by their RMS on the train split, so x·y/d is O(1) as for Inception's
        # features: KID's cubic kernel (x·y/d + 1)³ is then not dominated by a few huge values.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """64-d penultimate features (unit RMS on the train split) of uint8 images ``[B, 1, 8, 8]``."""
        return self.body(x.to(torch.float32) / 127.5 - 1.0) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.body(x.to(torch.float32) / 127.5 - 1.0))


def _digits_labels(split: str) -> torch.Tensor:
    """Digit labels (int64) of a split, in the order :func:`bench.data.datasets.load_dataset` returns images."""
    from sklearn.datasets import load_digits

    target = np.asarray(load_digits().target)
    n = target.shape[0]
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    idx = perm[: n - DIGITS_N_TEST] if split == "train" else perm[n - DIGITS_N_TEST :]
    return torch.from_numpy(target[idx].astype(np.int64))


def _train_digits_classifier() -> dict[str, torch.Tensor]:
    """Train :class:`_DigitsNet` on the digits train split: fixed seed, one CPU thread, Adam."""
    x, y = load_dataset("digits", "train"), _digits_labels("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order, so the weights (and their hash) repeat
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DIGITS_TRAIN_SEED)
            net = _DigitsNet()
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            gen = torch.Generator().manual_seed(DIGITS_TRAIN_SEED)
            for _ in range(DIGITS_TRAIN_EPOCHS):
                order = torch.randperm(x.shape[0], generator=gen)
                for start in range(0, x.shape[0], DIGITS_TRAIN_BATCH):
                    idx = order[start : start + DIGITS_TRAIN_BATCH]
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            net.feature_scale.fill_(net.features(x).pow(2).mean().sqrt().item())
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_digits_classifier(path: str | Path) -> str:
    """Train the digits classifier and write its tensors to ``path`` as an ``.npz``; returns its sha256.

    How ``bench/metrics/digits_classifier.npz`` was made (then its hash was put in :data:`DIGITS_CLASSIFIER_SHA256`).
    Training is deterministic on one machine, but other CPUs and torch builds round differently, which is
    why the weights are shipped rather than trained where they are used.
    """
    arrays = {k: v.numpy() for k, v in _train_digits_classifier().items()}
    write_atomically(Path(path), lambda f: np.savez(f, **arrays))
    return _sha256_file(Path(path))


def digits_classifier_file() -> Path:
    """The shipped digits classifier, after checking its sha256; BenchError if the file is not the one
    the package was released with (a damaged or edited install)."""
    path = DIGITS_CLASSIFIER_FILE
    if not path.is_file():
        raise BenchError(f"the digits classifier {path} is missing from the installed package: reinstall elbo-bench")
    digest = _sha256_file(path)
    if digest != DIGITS_CLASSIFIER_SHA256:
        raise BenchError(f"the digits classifier {path} has sha256 {digest[:16]}…, not the released "
                         f"{DIGITS_CLASSIFIER_SHA256[:16]}…: its FIDs would not compare with anyone's; reinstall elbo-bench")
    return path


def digits_extractor_name() -> str:
    """``digits-classifier-<hash8>``: the name FIDs on digits are tagged with (``fid_extractor``)."""
    return f"{DIGITS_EXTRACTOR_PREFIX}-{DIGITS_CLASSIFIER_SHA256[:8]}"


def _load_digits_net(path: str | Path) -> _DigitsNet:
    """A :class:`_DigitsNet` in eval mode with the weights of the ``.npz`` at ``path`` (no pickle)."""
    net = _DigitsNet()
    try:
        with np.load(path, allow_pickle=False) as f:
            state = {k: torch.from_numpy(f[k].copy()) for k in f.files}
        net.load_state_dict(state)
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as err:
        raise BenchError(f"cannot read the digits classifier {path}: {first_line(err)}") from None
    return net.requires_grad_(False).eval()


def digits_classifier_accuracy() -> float:
    """Accuracy of the shipped digits classifier on the digits test split."""
    net = _load_digits_net(digits_classifier_file())
    x, y = load_dataset("digits", "test"), _digits_labels("test")
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).to(torch.float64).mean())


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around the digits classifier; features ``"64"`` and ``"logits"``.

    Built (as torch-fidelity builds extractors) as ``cls(name, features_list, feature_extractor_weights_path=...)``;
    takes uint8 ``[B, 1, 8, 8]`` batches.
    """

    def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
        super().__init__(name, features_list)
        weights = kwargs.get("feature_extractor_weights_path")
        if weights is None:
            raise BenchError(f"feature extractor {name!r} needs feature_extractor_weights_path")
        self.net = _load_digits_net(str(weights))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The requested features, in ``features_list`` order, as float32."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 1:
            raise BenchError(f"digits extractor expects uint8 [B, 1, H, W], got {x.dtype} {tuple(x.shape)}")
        feats = self.net.features(x)
        out = {DIGITS_FEATURE_LAYER: feats, "logits": self.net(x)} if "logits" in self.features_list else {
            DIGITS_FEATURE_LAYER: feats}
        return tuple(out[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (DIGITS_FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else DIGITS_FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


# ---------------------------------------------------------------- Inception weights


def inception_weights_path(fid_weights: str | Path | None = None) -> Path:
    """The Inception weights file: ``fid_weights``, else the torch hub cache, else a download.

    Raises:
        BenchError: ``fid_weights`` is given but is not a file.
        FidUnavailable: no file in the hub cache and the download failed (e.g. offline).
    """
    if fid_weights is not None:
        path = Path(fid_weights).expanduser()
        if not path.is_file():
            raise BenchError(f"--fid-weights {path}: no such file (expected {INCEPTION_WEIGHTS_FILENAME})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    if not path.is_file():
        try:  # torch-fidelity's own download, to where it would put the file itself
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except Exception as exc:  # URLError, OSError, HTTP errors, ...: all mean "not available"
            raise FidUnavailable(
                f"FID skipped: torch-fidelity's Inception weights are not available ({type(exc).__name__}: "
                f"{exc}); put {INCEPTION_WEIGHTS_FILENAME} (from {URL_INCEPTION_V3}) at {path} "
                f"or pass --fid-weights PATH"
            ) from exc
    return path


def _weights_only_detail(exc: BaseException) -> str:
    """The one informative line of a ``torch.load(weights_only=True)`` error (its text is a page long)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
    return lines[0] if lines else type(exc).__name__


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception state dict in ``path``, read with ``torch.load(weights_only=True)``.

    Only tensors and plain containers can come out of such a load, so a crafted file cannot run code.

    Raises:
        BenchError: the file is not a readable state dict of tensors (one line, naming the file).
    """
    official = f"use torch-fidelity's official {INCEPTION_WEIGHTS_FILENAME} ({URL_INCEPTION_V3})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for anything beyond tensors
        raise BenchError(
            f"Inception weights {path} are not a plain state dict of tensors ({_weights_only_detail(exc)}); "
            f"refusing to load them, since that could run code: {official}"
        ) from exc
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise BenchError(
            f"Inception weights {path} are not a readable torch file ({type(exc).__name__}: {first_line(exc)}); {official}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BenchError(f"Inception weights {path} do not hold a state dict (names -> tensors); {official}")
    return state


class _InceptionV3WeightsOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` network whose weights file is read with ``weights_only=True``.

    torch-fidelity's constructor calls ``torch.load(feature_extractor_weights_path, weights_only=False)``;
    here it is handed an in-memory copy of the state dict that :func:`load_inception_state_dict`
    already read safely (tensors only, re-serialised by ``torch.save``), never the user's file.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | Path,
                 **kwargs: object) -> None:
        buf = io.BytesIO()
        torch.save(load_inception_state_dict(feature_extractor_weights_path), buf)
        buf.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buf, **kwargs)


# ---------------------------------------------------------------- FID


class _Images(Dataset):
    """A uint8 ``[N, C, H, W]`` tensor as a torch Dataset of ``[C, H, W]`` images."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _check_images(x: object, what: str, dataset: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """``x`` on the CPU, after checking it is a uint8 ``[N >= 2, *shape]`` tensor; BenchError if not."""
    if not isinstance(x, torch.Tensor):
        raise BenchError(f"FID {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise BenchError(f"FID {what} must be uint8 images 0..255, got dtype {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise BenchError(f"FID {what} for {dataset!r} must be uint8 [N, {shape}], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise BenchError(f"FID {what} needs at least 2 images, got {x.shape[0]}")
    return x.detach().cpu().contiguous()


class _Extractor(NamedTuple):
    """A dataset's feature extractor: name, FID layer, IS logits layer, weights file, its hash8."""

    name: str
    layer: str
    logits: str
    weights: Path
    hash8: str


def _extractor_for(dataset: str, channels: int, cache: Path, fid_weights: str | Path | None) -> _Extractor:
    """The feature extractor of a dataset (see the module docstring)."""
    if dataset == "digits":
        weights = digits_classifier_file()
        return _Extractor(digits_extractor_name(), DIGITS_FEATURE_LAYER, DIGITS_LOGITS_LAYER, weights,
                          DIGITS_CLASSIFIER_SHA256[:8])
    if channels == 3:
        weights = inception_weights_path(fid_weights)
        return _Extractor(INCEPTION_EXTRACTOR, INCEPTION_FEATURE_LAYER, INCEPTION_LOGITS_LAYER, weights,
                          _sha256_file(weights)[:8])
    raise BenchError(f"FID: no feature extractor for dataset {dataset!r} ({channels} channels)")


def _build_extractor(ext: _Extractor, layers: list[str], dev: torch.device) -> FeatureExtractorBase:
    """The feature extractor ``ext`` producing ``layers``, weights loaded with ``weights_only=True``, on ``dev``."""
    cls = DigitsFeatureExtractor if ext.name.startswith(DIGITS_EXTRACTOR_PREFIX) else _InceptionV3WeightsOnly
    return cls(ext.name, layers, feature_extractor_weights_path=ext.weights).to(dev)


def _features(net: FeatureExtractorBase, images: torch.Tensor, batch_size: int, cuda: bool) -> dict[str, torch.Tensor]:
    """Features ``{layer: [N, D]}`` (float32, CPU) of uint8 images, batched by torch-fidelity in this process."""
    return get_featuresdict_from_dataset(_Images(images), net, batch_size, cuda, True, False)


def _valid_cache(arrays: dict[str, object], n: int) -> bool:
    """Whether cached arrays are ``n`` float32 feature rows with float32 ``mu`` and float64 ``sigma`` to match."""
    feats, mu, sigma = (arrays[k] for k in _CACHE_KEYS)
    if not all(isinstance(a, np.ndarray) for a in (feats, mu, sigma)) or feats.ndim != 2:
        return False
    d = feats.shape[1]
    return (feats.shape[0] == n and feats.dtype == np.float32 and mu.shape == (d,) and mu.dtype == np.float32
            and sigma.shape == (d, d) and sigma.dtype == np.float64)


def _read_reference_cache(path: Path, n: int) -> tuple[torch.Tensor, dict[str, np.ndarray]] | None:
    """Cached reference ``(features, {"mu", "sigma"})`` from ``path``, or None (missing, unreadable, mismatched).

    ``numpy.load(allow_pickle=False)`` reads only raw arrays: a planted file cannot run code.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"FID cache {path} is unreadable ({type(exc).__name__}: {first_line(exc)}); recomputing it",
                      stacklevel=3)
        return None
    if not _valid_cache(arrays, n):
        warnings.warn(f"FID cache {path} does not hold {n} feature rows with their statistics; recomputing it",
                      stacklevel=3)
        return None
    return torch.from_numpy(arrays["features"]), {"mu": arrays["mu"], "sigma": arrays["sigma"]}


def _reference_features(
    net: FeatureExtractorBase, layer: str, reference: torch.Tensor, path: Path, batch_size: int, cuda: bool
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Reference features and FID statistics, from the ``.npz`` cache at ``path`` or computed and cached there."""
    cached = _read_reference_cache(path, int(reference.shape[0]))
    if cached is not None:
        return cached
    feats = _features(net, reference, batch_size, cuda)[layer]
    stats = fid_featuresdict_to_statistics({layer: feats}, layer)
    write_atomically(path, lambda f: np.savez(f, features=feats.numpy(), mu=stats["mu"], sigma=stats["sigma"]))
    return feats, stats


def _fid_against(feats: torch.Tensor, layer: str, stats2: dict[str, np.ndarray]) -> dict[str, float]:
    """torch-fidelity's FID of features ``[N, D]`` against reference statistics."""
    return dict(fid_statistics_to_metric(fid_featuresdict_to_statistics({layer: feats}, layer), stats2, False))


def _metrics(
    feats1: torch.Tensor,
    layer: str,
    reference: tuple[torch.Tensor, dict[str, np.ndarray]],
    options: dict[str, object],
) -> dict[str, float]:
    """torch-fidelity's FID (plus KID / PRC when ``options`` asks) from the samples' and reference features."""
    feats2, stats2 = reference
    fd1, fd2 = {layer: feats1}, {layer: feats2}
    raw = _fid_against(feats1, layer, stats2)
    if options["kid"]:
        raw.update(kid_featuresdict_to_metric(fd1, fd2, layer, **options))
    if options["prc"]:
        raw.update(prc_featuresdict_to_metric(fd1, fd2, layer, **options))
    return raw


def inception_score(logits: torch.Tensor, splits: int = ISC_SPLITS) -> dict[str, float]:
    """Inception Score ``exp(E_x KL(p(y|x) ‖ p(y)))`` of class logits ``[N, K]``: mean and std over splits.

    torch-fidelity's ``isc_features_to_metric`` (float64 softmax; rows shuffled with its default seed
    2020, then cut into ``splits`` contiguous chunks, p(y) the mean within each chunk); ``splits`` is
    lowered to ``N`` when there are fewer rows.  Returns ``{"isc": mean, "isc_std": std}`` (numpy's
    population std over the splits, as torch-fidelity).
    """
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise BenchError(f"inception_score needs logits [N >= 1, K], got {tuple(logits.shape)}")
    raw = isc_features_to_metric(logits.detach().cpu(), splits=min(splits, int(logits.shape[0])), shuffle=True,
                                 rng_seed=ISC_SHUFFLE_SEED)
    return {_METRIC_KEYS[k]: float(v) for k, v in raw.items()}


def gaussian_noise_images(n: int, shape: tuple[int, int, int], seed: int = NOISE_SEED) -> torch.Tensor:
    """``n`` uint8 images ``[n, *shape]`` of i.i.d. pixels N(127.5, 64²), rounded and clipped to [0, 255].

    Drawn from ``numpy.random.default_rng(seed)`` ``NOISE_CHUNK`` images at a time (a fixed stream).
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, *shape), dtype=np.uint8)
    for start in range(0, n, NOISE_CHUNK):
        block = rng.normal(NOISE_MEAN, NOISE_STD, size=(min(NOISE_CHUNK, n - start), *shape))
        out[start : start + block.shape[0]] = np.clip(np.rint(block), 0, 255)
    return torch.from_numpy(out)


def _read_point(path: Path, n: int) -> float | None:
    """A cached reference FID (``{"fid": float, "samples": n}``) from ``path``, or None (missing or bad: warned)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"FID reference point {path} is unreadable ({type(exc).__name__}); recomputing it", stacklevel=4)
        return None
    fid = data.get("fid") if isinstance(data, dict) else None
    if not isinstance(fid, float) or not math.isfinite(fid) or data.get("samples") != n:
        warnings.warn(f"FID reference point {path} does not hold a finite FID of {n} images; recomputing it",
                      stacklevel=4)
        return None
    return fid


def _reference_point(path: Path, images: Callable[[], torch.Tensor], n: int, score: Callable[[torch.Tensor], float]
                     ) -> float:
    """The FID of ``images()`` (``n`` of them) by ``score``, cached as JSON at ``path`` (computed when missing)."""
    fid = _read_point(path, n)
    if fid is None:
        fid = score(images())
        write_atomically(path, lambda f: f.write(json.dumps({"fid": fid, "samples": n}).encode()))
    return fid


def _reference_points(
    dataset: str,
    n: int,
    test_images: torch.Tensor | None,
    ref_cache: Path,
    score: Callable[[torch.Tensor], float],
) -> tuple[dict[str, float], dict[str, str]]:
    """``fid_ref_noise`` and ``fid_ref_test`` (metrics) with their tags, at sample count ``n``.

    The test split is ``test_images`` or else ``load_dataset(dataset, "test")``; when that cannot be
    loaded (e.g. CIFAR-10 not under ``$BENCH_DATA_DIR``) ``fid_ref_test`` is skipped with tag
    ``fid_ref_test_skipped``.
    """
    info = DATASETS[dataset]
    shape = (info.channels, info.image_size, info.image_size)
    stem = ref_cache.with_suffix("")
    metrics = {"fid_ref_noise": _reference_point(
        Path(f"{stem}-refnoise-n{n}-seed{NOISE_SEED}.json"), lambda: gaussian_noise_images(n, shape), n, score)}
    tags = {"fid_ref_noise_images": f"{n} images, pixels N({NOISE_MEAN:g}, {NOISE_STD:g}²) rounded, clipped to "
                             f"[0, 255], seed {NOISE_SEED}"}
    if test_images is None:
        try:
            test_images = load_dataset(dataset, "test")
        except BenchError as err:
            tags["fid_ref_test_skipped"] = f"test split not loadable: {first_line(err)}"[:500]
            return metrics, tags
    m = min(n, int(test_images.shape[0]))
    test = _check_images(test_images[:m], "test images", dataset, shape)
    test8 = hashlib.sha256(test.numpy().tobytes()).hexdigest()[:8]
    metrics["fid_ref_test"] = _reference_point(Path(f"{stem}-reftest-n{m}-{test8}.json"), lambda: test, m, score)
    tags["fid_ref_test_samples"] = str(m)
    return metrics, tags


def compute_fid(
    samples: torch.Tensor,
    dataset: str,
    reference: torch.Tensor,
    *,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    fid_weights: str | Path | None = None,
    kid: bool = True,
    prc: bool = True,
    isc: bool = True,
    reference_points: bool = True,
    test_images: torch.Tensor | None = None,
    batch_size: int = 256,
    reference_split: str = "train",
) -> FidResult:
    """FID (plus KID, precision/recall, IS and the reference points) of ``samples`` against ``reference``.

    Args:
        samples: generated images, uint8 ``[N, C, H, W]`` with the dataset's geometry.
        dataset: a key of :data:`bench.data.datasets.DATASETS`; picks the extractor (see module docstring).
        reference: real images of the same geometry (usually the train split).
        cache_dir: where the digits classifier and the reference-feature cache (``fidelity/*``) live.
        device: ``"cpu"`` or a CUDA device.
        fid_weights: Inception weights file for RGB data (``--fid-weights``).
        kid: also compute KID (subset size ``min(1000, N_samples, N_reference)``).
        prc: also compute precision/recall (k = 3; skipped when a set has fewer than 4 images).
        isc: also compute the Inception Score (``isc``, ``isc_std``; the digits classifier's analogue on digits).
        reference_points: also give ``fid_ref_test`` and ``fid_ref_noise`` at ``N`` samples (cached).
        test_images: the dataset's test split for ``fid_ref_test`` (default: ``load_dataset(dataset, "test")``).
        batch_size: images per feature-extractor batch.
        reference_split: the split ``reference`` came from, for the tag and the cache name.

    Raises:
        BenchError: bad inputs, an unknown dataset, a missing ``fid_weights`` file or a failed run.
        FidUnavailable: RGB data, no ``fid_weights`` and the Inception weights cannot be had offline.
    """
    info = DATASETS.get(dataset)
    if info is None:
        raise BenchError(f"FID: unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
    shape = (info.channels, info.image_size, info.image_size)
    samples = _check_images(samples, "samples", dataset, shape)
    reference = _check_images(reference, "reference", dataset, shape)
    if batch_size < 1:
        raise BenchError(f"FID batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        raise BenchError(f"FID device {str(dev)!r} is not usable here; use 'cpu' or an available CUDA device")

    cache = Path(cache_dir)
    ext = _extractor_for(dataset, info.channels, cache, fid_weights)
    layer, cuda = ext.layer, dev.type == "cuda"
    n1, n2 = int(samples.shape[0]), int(reference.shape[0])
    ref_hash8 = hashlib.sha256(reference.numpy().tobytes()).hexdigest()[:8]
    extractor_id = ext.name if ext.name.endswith(ext.hash8) else f"{ext.name}-{ext.hash8}"
    ref_cache = cache / FIDELITY_SUBDIR / f"{dataset}-{reference_split}-n{n2}-{ref_hash8}-{extractor_id}-{layer}.npz"
    options: dict[str, object] = {  # torch-fidelity's keyword arguments for KID and PRC, plus ours
        "kid": kid,
        "prc": prc and min(n1, n2) > PRC_NEIGHBORHOOD,
        "kid_subset_size": min(KID_MAX_SUBSET_SIZE, n1, n2),
        "prc_neighborhood": PRC_NEIGHBORHOOD,
        "prc_batch_size": 1000,
        "save_cpu_ram": True,  # PRC distances in blocks
        "cuda": cuda,
        "batch_size": batch_size,
        "verbose": False,
    }
    # one BLAS thread on the CPU: numpy's pool would fight torch's OpenMP pool for the same cores
    context = torch.cuda.device(dev) if cuda else threadpool_limits(limits=1, user_api="blas")
    ref_tags: dict[str, str] = {}
    try:
        with context:
            net = _build_extractor(ext, [layer, ext.logits] if isc else [layer], dev)
            ref = _reference_features(net, layer, reference, ref_cache, batch_size, cuda)
            feats = _features(net, samples, batch_size, cuda)
            raw = _metrics(feats[layer], layer, ref, options)
            metrics = {key: float(raw[k]) for k, key in _METRIC_KEYS.items() if k in raw}
            if isc:
                metrics.update(inception_score(feats[ext.logits]))
            if reference_points:
                def score(images: torch.Tensor) -> float:
                    return float(_fid_against(_features(net, images, batch_size, cuda)[layer], layer, ref[1])[KEY_METRIC_FID])

                points, ref_tags = _reference_points(dataset, n1, test_images, ref_cache, score)
                metrics.update(points)
    except BenchError:
        raise
    except (RuntimeError, ValueError, OSError, EOFError) as exc:  # e.g. a weights file of the wrong shape
        raise BenchError(
            f"FID with {ext.name} (weights {ext.weights}) failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    tags = {
        "fid_extractor": ext.name,
        "fid_weights": ext.hash8,
        "fid_reference": f"{dataset} {reference_split} split, {n2} images",
        "fid_samples": str(n1),
        "fid_feature_layer": layer,
        **ref_tags,
    }
    if isc:
        tags.update({"isc_extractor": ext.name, "isc_layer": ext.logits, "isc_splits": str(min(ISC_SPLITS, n1))})
        if dataset == "digits":
            tags["isc_note"] = ("IS analogue from the digits classifier's 10 logits (at most 10); "
                                "not comparable with Inception IS")
    return FidResult(metrics=metrics, tags=tags)


# ---------------------------------------------------------------- saved samples


def save_samples(images: torch.Tensor | np.ndarray, path: str | Path, dataset: str | None = None) -> Path:
    """Write uint8 images ``[N, C, H, W]`` to the ``.npz`` file ``path`` (array ``"samples"``), atomically;
    with ``dataset``, the name of the dataset they imitate too (array ``"dataset"``, a unicode string, which
    ``allow_pickle=False`` reads), so that ``bench fid`` needs no ``--dataset``.

    The file is exactly ``path`` (no ``.npz`` is appended); :func:`load_samples` reads it back.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise BenchError(f"save_samples needs uint8 images [N, C, H, W], got {arr.dtype} {arr.shape}")
    arrays = {SAMPLES_KEY: np.ascontiguousarray(arr)} | ({DATASET_KEY: np.array(dataset, dtype=str)} if dataset else {})
    path = Path(path)
    write_atomically(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def samples_dataset(path: str | Path, dataset: str | None = None) -> str:
    """The dataset a saved-samples file's images are scored against: ``dataset`` (``--dataset``) or the one the
    file records (:func:`save_samples`); refused in one line when neither names one or when they disagree."""
    what = f"samples file {path}"
    if not Path(path).is_file():
        raise BenchError(f"{what}: no such file")
    recorded = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):  # else a bare .npy: load_samples refuses it
            with loaded as z:
                value = z[DATASET_KEY] if DATASET_KEY in z.files else None
            if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim == 0:
                recorded = str(value)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # load_samples says what is wrong with the file
    if dataset is None and recorded is None:
        raise BenchError(f"{what} does not record its dataset (written before it did, or by another tool); "
                         f"give --dataset ({', '.join(sorted(DATASETS))})")
    if dataset is not None and recorded is not None and dataset != recorded:
        raise BenchError(f"--dataset {dataset}, but {what} holds samples of {recorded}; "
                         f"leave out --dataset or give --dataset {recorded}")
    return dataset or recorded


def load_samples(path: str | Path, dataset: str | None = None) -> torch.Tensor:
    """uint8 samples ``[N, C, H, W]`` from an ``.npz`` written by :func:`save_samples`.

    Read with ``numpy.load(allow_pickle=False)``: an object array or a pickle is refused before any of
    it runs.  With ``dataset``, the images must have its geometry and there must be at least 2.

    Raises:
        BenchError: (one line) the file is missing, not such an ``.npz``, or holds anything else.
    """
    path = Path(path)
    what = f"samples file {path}"
    if not path.is_file():
        raise BenchError(f"{what}: no such file")
    expected = f"{what}: expected an .npz holding a uint8 array {SAMPLES_KEY!r} (as save_samples writes)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy
            raise BenchError(expected)
        with loaded as z:
            if SAMPLES_KEY not in z.files:
                raise BenchError(expected)
            arr = z[SAMPLES_KEY]
    except BenchError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BenchError(f"{what} is not a readable .npz of plain arrays ({type(exc).__name__}: {first_line(exc)}); "
                         "refusing it (pickled objects could run code)") from None
    if not isinstance(arr, np.ndarray):  # a member that is no .npy (a raw pickle, say) is handed back as bytes
        raise BenchError(f"{what}: {SAMPLES_KEY!r} is not a numpy array (raw bytes: a pickle, say); refusing it")
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise BenchError(f"{what}: {SAMPLES_KEY!r} must be uint8 [N, C, H, W], got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(np.ascontiguousarray(arr))
    if dataset is not None:
        info = DATASETS.get(dataset)
        if info is None:
            raise BenchError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
        _check_images(images, f"samples in {path}", dataset, (info.channels, info.image_size, info.image_size))
    return images


def score_samples(
    path: str | Path,
    dataset: str,
    *,
    cache_dir: str | Path,
    data_dir: str | Path | None = None,
    fid_weights: str | Path | None = None,
    device: str = "auto",
) -> FidResult:
    """:func:`compute_fid` of a saved-samples file against the dataset's train split (``bench fid``).

    ``device="auto"`` is CUDA when present.  Adds tag ``fid_samples_file``.
    """
    samples = load_samples(path, dataset)
    dev = resolve_device(device)
    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    res = compute_fid(samples, dataset, train, cache_dir=cache_dir, device=dev, fid_weights=fid_weights,
                      test_images=test)
    res.tags["fid_samples_file"] = str(Path(path).resolve())
    return res
