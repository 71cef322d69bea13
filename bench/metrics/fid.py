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

:func:`score_samples` scores a saved-samples file (:mod:`bench.metrics.samples`; ``bench fid SAMPLES.npz``, its
dataset as the file records it, else ``--dataset D``).  The feature extractor of each dataset (Inception for
RGB data, the shipped digits classifier for ``digits``) is :mod:`bench.metrics.extractors`'s.

torch-fidelity is imported by the functions that use it, not with this module: importing it takes seconds
(torchvision's models, ``torch._dynamo``), which every ``bench`` command would pay.  :func:`compute_fid` has it
imported by :func:`~bench.metrics.extractors.extractor_for`, before it limits the BLAS threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset

from bench.data.datasets import DATASETS, load_dataset
from bench.errors import BenchError, first_line, reraised
from bench.metrics.extractors import build_extractor, extractor_for
from bench.metrics.samples import check_images, load_samples
from bench.runtime.devices import resolve_device
from bench.runtime.files import write_atomically

if TYPE_CHECKING:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

KID_MAX_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
FIDELITY_SUBDIR = "fidelity"
ISC_SPLITS = 10  # DDPM Table 1 and torch-fidelity's default isc_splits
ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed: samples are shuffled before splitting
NOISE_SEED = 0  # fid_ref_noise images: numpy default_rng(NOISE_SEED)
NOISE_MEAN, NOISE_STD = 127.5, 64.0  # pixel values of the noise, before clipping to [0, 255]
NOISE_CHUNK = 1000  # images drawn at a time (50k CIFAR-sized images in float64 would be 1.2 GB)
_CACHE_KEYS = ("features", "mu", "sigma")

_KEY_FID = "frechet_inception_distance"  # torch-fidelity's metric_fid.KEY_METRIC_FID (a test checks they agree)
_METRIC_KEYS = {
    _KEY_FID: "fid",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
}


@dataclass
class FidResult:
    """Metrics (``fid``; ``kid``, ``kid_std``, ``precision``, ``recall``, ``isc``, ``isc_std``,
    ``fid_ref_test``, ``fid_ref_noise`` where computed) and the tags that say how."""

    metrics: dict[str, float]
    tags: dict[str, str]


# ---------------------------------------------------------------- FID


class _Images(Dataset):
    """A uint8 ``[N, C, H, W]`` tensor as a torch Dataset of ``[C, H, W]`` images."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _features(net: FeatureExtractorBase, images: torch.Tensor, batch_size: int, cuda: bool) -> dict[str, torch.Tensor]:
    """Features ``{layer: [N, D]}`` (float32, CPU) of uint8 images, batched by torch-fidelity in this process."""
    from torch_fidelity.utils import get_featuresdict_from_dataset  # heavy: torch-fidelity loads torchvision's models

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
    from torch_fidelity.metric_fid import (
        fid_featuresdict_to_statistics,  # heavy: torch-fidelity loads torchvision's models
    )

    cached = _read_reference_cache(path, int(reference.shape[0]))
    if cached is not None:
        return cached
    feats = _features(net, reference, batch_size, cuda)[layer]
    stats = fid_featuresdict_to_statistics({layer: feats}, layer)
    write_atomically(path, lambda f: np.savez(f, features=feats.numpy(), mu=stats["mu"], sigma=stats["sigma"]))
    return feats, stats


def _fid_against(feats: torch.Tensor, layer: str, stats2: dict[str, np.ndarray]) -> dict[str, float]:
    """torch-fidelity's FID of features ``[N, D]`` against reference statistics."""
    from torch_fidelity.metric_fid import (  # heavy: torch-fidelity loads torchvision's models
        fid_featuresdict_to_statistics,
        fid_statistics_to_metric,
    )

    return dict(fid_statistics_to_metric(fid_featuresdict_to_statistics({layer: feats}, layer), stats2, False))


def _metrics(
    feats1: torch.Tensor,
    layer: str,
    reference: tuple[torch.Tensor, dict[str, np.ndarray]],
    options: dict[str, object],
) -> dict[str, float]:
    """torch-fidelity's FID (plus KID / PRC when ``options`` asks) from the samples' and reference features."""
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric  # heavy: torch-fidelity loads torchvision's models
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric  # heavy: as above

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
    from torch_fidelity.metric_isc import isc_features_to_metric  # heavy: torch-fidelity loads torchvision's models

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
    test = check_images(test_images[:m], "test images", dataset, shape)
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
    samples = check_images(samples, "samples", dataset, shape)
    reference = check_images(reference, "reference", dataset, shape)
    if batch_size < 1:
        raise BenchError(f"FID batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        raise BenchError(f"FID device {str(dev)!r} is not usable here; use 'cpu' or an available CUDA device")

    cache = Path(cache_dir)
    ext = extractor_for(dataset, info.channels, fid_weights)
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
    with reraised(lambda exc: f"FID with {ext.name} (weights {ext.weights}) failed: "
                              f"{type(exc).__name__}: {first_line(exc)}",
                  RuntimeError, ValueError, OSError, EOFError, chain=True):  # e.g. a weights file of the wrong shape
        with context:
            net = build_extractor(ext, [layer, ext.logits] if isc else [layer], dev)
            ref = _reference_features(net, layer, reference, ref_cache, batch_size, cuda)
            feats = _features(net, samples, batch_size, cuda)
            raw = _metrics(feats[layer], layer, ref, options)
            metrics = {key: float(raw[k]) for k, key in _METRIC_KEYS.items() if k in raw}
            if isc:
                metrics.update(inception_score(feats[ext.logits]))
            if reference_points:
                def score(images: torch.Tensor) -> float:
                    return float(_fid_against(_features(net, images, batch_size, cuda)[layer], layer, ref[1])[_KEY_FID])

                points, ref_tags = _reference_points(dataset, n1, test_images, ref_cache, score)
                metrics.update(points)
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
