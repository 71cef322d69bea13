"""The feature extractors FID, KID, precision/recall and IS are computed in, one per dataset.

* RGB data (``cifar10``): torch-fidelity's ``inception-v3-compat``, layer ``"2048"`` (IS: ``"logits_unbiased"``).
  Weights come from ``fid_weights`` (``--fid-weights PATH``), else torch-fidelity's file in the torch hub cache
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

:func:`extractor_for` picks a dataset's extractor (:class:`Extractor`: its name, layers and weights file);
:func:`build_extractor` builds the torch-fidelity network, its weights read without pickle.

Importing torch-fidelity takes seconds (it loads torchvision's models and ``torch._dynamo``), so it is
imported only when an extractor is first needed: the two network classes, :class:`DigitsFeatureExtractor`
and ``_InceptionV3WeightsOnly``, are this module's methods put on torch-fidelity's base classes then
(:func:`_torch_fidelity_class`), and are read as module attributes as if defined here.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.data.datasets import DIGITS_N_TEST, DIGITS_SPLIT_SEED, load_dataset
from bench.errors import BenchError, first_line
from bench.runtime.files import file_digest, write_atomically

if TYPE_CHECKING:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's layer for IS: 1008 logits without the fc bias
URL_INCEPTION_V3 = (  # torch-fidelity's (feature_extractor_inceptionv3.URL_INCEPTION_V3; a test checks they agree)
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = os.path.basename(URL_INCEPTION_V3)
DIGITS_EXTRACTOR_PREFIX = "digits-classifier"
DIGITS_FEATURE_LAYER = "64"
DIGITS_LOGITS_LAYER = "logits"
DIGITS_CLASSIFIER_FILE = Path(__file__).with_name("digits_classifier.npz")  # shipped with the package
DIGITS_CLASSIFIER_SHA256 = "634ef1526a6c79f4dabcd92e7bd0053ed73bc93a6d31792456ce4ecade7260b9"
DIGITS_TRAIN_SEED = 0
DIGITS_TRAIN_EPOCHS = 15
DIGITS_TRAIN_BATCH = 50


class FidUnavailable(BenchError):
    """The Inception weights FID needs are not available (offline, none given); FID is skipped."""


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
    from sklearn.datasets import load_digits  # heavy: only training and the accuracy check need it

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
    return file_digest(Path(path))


def digits_classifier_file() -> Path:
    """The shipped digits classifier, after checking its sha256; BenchError if the file is not the one
    the package was released with (a damaged or edited install)."""
    path = DIGITS_CLASSIFIER_FILE
    if not path.is_file():
        raise BenchError(f"the digits classifier {path} is missing from the installed package: reinstall elbo-bench")
    digest = file_digest(path)
    if digest != DIGITS_CLASSIFIER_SHA256:
        raise BenchError(f"the digits classifier {path} has sha256 {digest[:16]}…, not the released "
                         f"{DIGITS_CLASSIFIER_SHA256[:16]}…: its FIDs would not compare with anyone's; "
                         "reinstall elbo-bench")
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


# The methods of DigitsFeatureExtractor, which puts them on torch-fidelity's FeatureExtractorBase.
class _DigitsFeatureExtractorMethods:
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
            f"Inception weights {path} are not a readable torch file ({type(exc).__name__}: {first_line(exc)}); "
            f"{official}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BenchError(f"Inception weights {path} do not hold a state dict (names -> tensors); {official}")
    return state


# The methods of _InceptionV3WeightsOnly, which puts them on torch-fidelity's FeatureExtractorInceptionV3.
class _InceptionV3WeightsOnlyMethods:
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


_ON_TORCH_FIDELITY = {  # network class: its methods here, the torch-fidelity class (torch_fidelity.NAME) they go on
    "DigitsFeatureExtractor": (_DigitsFeatureExtractorMethods, "FeatureExtractorBase"),
    "_InceptionV3WeightsOnly": (_InceptionV3WeightsOnlyMethods, "FeatureExtractorInceptionV3"),
}


@functools.cache
def _torch_fidelity_class(name: str) -> type[FeatureExtractorBase]:
    """The network class ``name`` of :data:`_ON_TORCH_FIDELITY`: its methods on torch-fidelity's class, made once."""
    import torch_fidelity  # heavy: torch-fidelity loads torchvision's models and torch._dynamo

    methods, base = _ON_TORCH_FIDELITY[name]
    return type(name, (methods, getattr(torch_fidelity, base)),
                {"__module__": __name__, "__qualname__": name, "__doc__": methods.__doc__})


def __getattr__(name: str) -> type[FeatureExtractorBase]:
    """``DigitsFeatureExtractor`` and ``_InceptionV3WeightsOnly``, made on first use (importing torch-fidelity)."""
    if name in _ON_TORCH_FIDELITY:
        return _torch_fidelity_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- the extractor of a dataset


class Extractor(NamedTuple):
    """A dataset's feature extractor: name, FID layer, IS logits layer, weights file, its hash8, its network."""

    name: str
    layer: str
    logits: str
    weights: Path
    hash8: str
    network: type[FeatureExtractorBase]


def extractor_for(dataset: str, channels: int, fid_weights: str | Path | None) -> Extractor:
    """The feature extractor of a dataset (see the module docstring)."""
    if dataset == "digits":
        weights = digits_classifier_file()
        return Extractor(digits_extractor_name(), DIGITS_FEATURE_LAYER, DIGITS_LOGITS_LAYER, weights,
                         DIGITS_CLASSIFIER_SHA256[:8], _torch_fidelity_class("DigitsFeatureExtractor"))
    if channels == 3:
        weights = inception_weights_path(fid_weights)
        return Extractor(INCEPTION_EXTRACTOR, INCEPTION_FEATURE_LAYER, INCEPTION_LOGITS_LAYER, weights,
                         file_digest(weights)[:8], _torch_fidelity_class("_InceptionV3WeightsOnly"))
    raise BenchError(f"FID: no feature extractor for dataset {dataset!r} ({channels} channels)")


def build_extractor(ext: Extractor, layers: list[str], dev: torch.device) -> FeatureExtractorBase:
    """The feature extractor ``ext`` producing ``layers``, weights loaded with ``weights_only=True``, on ``dev``."""
    return ext.network(ext.name, layers, feature_extractor_weights_path=ext.weights).to(dev)
