"""FID, KID and precision/recall of generated images, computed through torch-fidelity.

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

Feature extractors:

* RGB data (``cifar10``): torch-fidelity's ``inception-v3-compat``, layer ``"2048"``.  Weights come
  from ``fid_weights`` (``--fid-weights PATH``), else torch-fidelity's file in the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``), else
  torch-fidelity's download URL; when all fail (offline) :class:`FidUnavailable` is raised.  No
  other network is ever substituted.  The weights are read with ``torch.load(weights_only=True)``
  (torch-fidelity itself would use ``weights_only=False``), so a file holding anything but a state
  dict of tensors is refused with a :class:`~bench.errors.BenchError` before any of it runs.
* ``digits`` (grey 8x8): a small CNN classifier trained deterministically on the digits train split
  (labels from scikit-learn's ``load_digits().target`` in :mod:`bench.data`'s split order), saved as
  ``<cache_dir>/digits-classifier-<hash8>.pt`` (``hash8``: first 8 hex digits of the file's sha256)
  and read with ``torch.load(weights_only=True)``; the extractor is named ``digits-classifier-<hash8>``
  and its 64-d penultimate layer (``"64"``) feeds FID, KID and precision/recall.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from bench.data import DATASETS, DIGITS_N_TEST, DIGITS_SPLIT_SEED, load_dataset
from bench.errors import BenchError

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_WEIGHTS_FILENAME = os.path.basename(URL_INCEPTION_V3)
DIGITS_EXTRACTOR_PREFIX = "digits-classifier"
DIGITS_FEATURE_LAYER = "64"
DIGITS_TRAIN_SEED = 0
DIGITS_TRAIN_EPOCHS = 15
DIGITS_TRAIN_BATCH = 50
KID_MAX_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
FIDELITY_SUBDIR = "fidelity"
_CACHE_KEYS = ("features", "mu", "sigma")

_METRIC_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
}


class FidUnavailable(BenchError):
    """The Inception weights FID needs are not available (offline, none given); FID is skipped."""


@dataclass
class FidResult:
    """Metrics (``fid``; ``kid``, ``kid_std``, ``precision``, ``recall`` where computed) and tags."""

    metrics: dict[str, float]
    tags: dict[str, str]


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` (and its folder) through a temp file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's text (user-facing errors are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    """Digit labels (int64) of a split, in the order :func:`bench.data.load_dataset` returns images."""
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


def ensure_digits_classifier(cache_dir: str | Path) -> Path:
    """Path of the cached digits classifier ``<cache_dir>/digits-classifier-<hash8>.pt``.

    A file whose name matches its own sha256 is reused; otherwise the classifier is trained (a few
    seconds) and written atomically under its hash name.
    """
    cache = Path(cache_dir)
    for path in sorted(cache.glob(f"{DIGITS_EXTRACTOR_PREFIX}-*.pt")):
        if path.stem == f"{DIGITS_EXTRACTOR_PREFIX}-{_sha256_file(path)[:8]}":
            return path
    buf = io.BytesIO()  # not torch.save(path): the archive would embed the (random) temp file name
    torch.save(_train_digits_classifier(), buf)
    data = buf.getvalue()
    path = cache / f"{DIGITS_EXTRACTOR_PREFIX}-{hashlib.sha256(data).hexdigest()[:8]}.pt"
    _write_atomically(path, lambda f: f.write(data))
    return path


def _load_digits_net(path: str | Path) -> _DigitsNet:
    """A :class:`_DigitsNet` in eval mode with the weights of ``path``."""
    net = _DigitsNet()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.requires_grad_(False).eval()


def digits_classifier_accuracy(cache_dir: str | Path) -> float:
    """Accuracy of the cached (or newly trained) digits classifier on the digits test split."""
    net = _load_digits_net(ensure_digits_classifier(cache_dir))
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
            f"Inception weights {path} are not a readable torch file ({type(exc).__name__}: {_first_line(exc)}); {official}"
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


def _extractor_for(
    dataset: str, channels: int, cache: Path, fid_weights: str | Path | None
) -> tuple[str, str, Path, str]:
    """``(extractor name, feature layer, weights file, first 8 hex digits of its sha256)`` for a dataset."""
    if dataset == "digits":
        weights = ensure_digits_classifier(cache)
        hash8 = weights.stem.rsplit("-", 1)[-1]
        return f"{DIGITS_EXTRACTOR_PREFIX}-{hash8}", DIGITS_FEATURE_LAYER, weights, hash8
    if channels == 3:
        weights = inception_weights_path(fid_weights)
        return INCEPTION_EXTRACTOR, INCEPTION_FEATURE_LAYER, weights, _sha256_file(weights)[:8]
    raise BenchError(f"FID: no feature extractor for dataset {dataset!r} ({channels} channels)")


def _build_extractor(name: str, layer: str, weights: Path, dev: torch.device) -> FeatureExtractorBase:
    """The feature extractor ``name`` producing ``layer``, weights loaded with ``weights_only=True``, on ``dev``."""
    cls = DigitsFeatureExtractor if name.startswith(DIGITS_EXTRACTOR_PREFIX) else _InceptionV3WeightsOnly
    return cls(name, [layer], feature_extractor_weights_path=weights).to(dev)


def _features(net: FeatureExtractorBase, layer: str, images: torch.Tensor, batch_size: int, cuda: bool) -> torch.Tensor:
    """Features ``[N, D]`` (float32, CPU) of uint8 images, batched by torch-fidelity in this process."""
    return get_featuresdict_from_dataset(_Images(images), net, batch_size, cuda, True, False)[layer]


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
        warnings.warn(f"FID cache {path} is unreadable ({type(exc).__name__}: {_first_line(exc)}); recomputing it",
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
    feats = _features(net, layer, reference, batch_size, cuda)
    stats = fid_featuresdict_to_statistics({layer: feats}, layer)
    _write_atomically(path, lambda f: np.savez(f, features=feats.numpy(), mu=stats["mu"], sigma=stats["sigma"]))
    return feats, stats


def _metrics(
    net: FeatureExtractorBase,
    layer: str,
    samples: torch.Tensor,
    reference: tuple[torch.Tensor, dict[str, np.ndarray]],
    options: dict[str, object],
) -> dict[str, float]:
    """torch-fidelity's FID (plus KID / PRC when ``options`` asks) from the samples and reference features."""
    feats1 = _features(net, layer, samples, int(options["batch_size"]), bool(options["cuda"]))
    feats2, stats2 = reference
    fd1, fd2 = {layer: feats1}, {layer: feats2}
    raw = dict(fid_statistics_to_metric(fid_featuresdict_to_statistics(fd1, layer), stats2, False))
    if options["kid"]:
        raw.update(kid_featuresdict_to_metric(fd1, fd2, layer, **options))
    if options["prc"]:
        raw.update(prc_featuresdict_to_metric(fd1, fd2, layer, **options))
    return raw


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
    batch_size: int = 256,
    reference_split: str = "train",
) -> FidResult:
    """FID (plus KID and precision/recall) of ``samples`` against ``reference`` via torch-fidelity.

    Args:
        samples: generated images, uint8 ``[N, C, H, W]`` with the dataset's geometry.
        dataset: a key of :data:`bench.data.DATASETS`; picks the extractor (see module docstring).
        reference: real images of the same geometry (usually the train split).
        cache_dir: where the digits classifier and the reference-feature cache (``fidelity/*.npz``) live.
        device: ``"cpu"`` or a CUDA device.
        fid_weights: Inception weights file for RGB data (``--fid-weights``).
        kid: also compute KID (subset size ``min(1000, N_samples, N_reference)``).
        prc: also compute precision/recall (k = 3; skipped when a set has fewer than 4 images).
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
    extractor, layer, weights, hash8 = _extractor_for(dataset, info.channels, cache, fid_weights)
    n1, n2 = int(samples.shape[0]), int(reference.shape[0])
    ref_hash8 = hashlib.sha256(reference.numpy().tobytes()).hexdigest()[:8]
    extractor_id = extractor if extractor.endswith(hash8) else f"{extractor}-{hash8}"
    ref_cache = cache / FIDELITY_SUBDIR / f"{dataset}-{reference_split}-n{n2}-{ref_hash8}-{extractor_id}-{layer}.npz"
    options: dict[str, object] = {  # torch-fidelity's keyword arguments for KID and PRC, plus ours
        "kid": kid,
        "prc": prc and min(n1, n2) > PRC_NEIGHBORHOOD,
        "kid_subset_size": min(KID_MAX_SUBSET_SIZE, n1, n2),
        "prc_neighborhood": PRC_NEIGHBORHOOD,
        "prc_batch_size": 1000,
        "save_cpu_ram": True,  # PRC distances in blocks
        "cuda": dev.type == "cuda",
        "batch_size": batch_size,
        "verbose": False,
    }
    # one BLAS thread on the CPU: numpy's pool would fight torch's OpenMP pool for the same cores
    context = torch.cuda.device(dev) if dev.type == "cuda" else threadpool_limits(limits=1, user_api="blas")
    try:
        with context:
            net = _build_extractor(extractor, layer, weights, dev)
            ref = _reference_features(net, layer, reference, ref_cache, batch_size, dev.type == "cuda")
            raw = _metrics(net, layer, samples, ref, options)
    except BenchError:
        raise
    except (RuntimeError, ValueError, OSError, EOFError) as exc:  # e.g. a weights file of the wrong shape
        raise BenchError(
            f"FID with {extractor} (weights {weights}) failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    metrics = {key: float(raw[k]) for k, key in _METRIC_KEYS.items() if k in raw}
    tags = {
        "fid_extractor": extractor,
        "fid_weights": hash8,
        "fid_reference": f"{dataset} {reference_split} split, {n2} images",
        "fid_samples": str(n1),
        "fid_feature_layer": layer,
    }
    return FidResult(metrics=metrics, tags=tags)
