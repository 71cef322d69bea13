"""Image datasets as uint8 tensors with fixed train/test splits.

Every loader returns a contiguous ``torch.uint8`` tensor of shape ``[N, C, H, W]``; the split
for each dataset is fixed, so two runs (on any machine) see exactly the same images.

* ``digits`` (the default, embedded): scikit-learn's bundled ``load_digits()`` — 1797 grey 8x8
  images with integer values 0..16.  Each value ``v`` becomes ``numpy.rint(v * 255 / 16)``
  (round half to even).  ``v * 255 / 16`` has a fractional part of exactly ``.5`` only for
  ``v = 8`` (127.5), which rounds to the even 128, so the map is 0->0, 8->128, 16->255.
  Split: ``numpy.random.default_rng(0).permutation(1797)``; the first 1500 indices of that
  permutation are ``train`` and the last 297 are ``test``.  Never downloads anything.
* ``cifar10``: the real CIFAR-10 read from the standard ``cifar-10-batches-py`` folder
  (``data_batch_1`` .. ``data_batch_5`` = train, 50000 images; ``test_batch`` = test, 10000).
  The pickles are read directly, so any folder in the true on-disk format works.  The data root
  is the ``data_dir`` argument, else ``$BENCH_DATA_DIR``, else ``~/.cache/elbo-bench/data``;
  the files must be at ``<root>/cifar-10-batches-py/<batch>``.  The pickles are read with a
  restricted unpickler that builds only what a CIFAR-10 batch holds (builtin containers and scalars,
  bytes and numpy arrays: the globals ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype``, and ``_codecs.encode`` restricted to latin-1, which is how
  Python 3 writes bytes at pickle protocol 2); a file naming any other global is refused with a
  :class:`~bench.errors.BenchError` before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

from bench.errors import BenchError, check_choice

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_TEST_BATCH",
    "CIFAR10_TRAIN_BATCHES",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "DIGITS_N_TEST",
    "DIGITS_SPLIT_SEED",
    "SPLITS",
    "DatasetInfo",
    "load_dataset",
    "resolve_data_root",
]

SPLITS: tuple[str, ...] = ("train", "test")

DIGITS_SPLIT_SEED = 0
DIGITS_N_TEST = 297

DATA_DIR_ENV = "BENCH_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/elbo-bench/data")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_ROW = 3 * 32 * 32

Loader = Callable[[str, str | os.PathLike[str] | None, bool], torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of :data:`DATASETS`: image geometry plus the function that loads a split."""

    name: str
    channels: int
    image_size: int
    description: str
    loader: Loader


def _digits_uint8(values: np.ndarray) -> np.ndarray:
    """Map scikit-learn digit intensities 0..16 to uint8 by ``rint(v * 255 / 16)`` (half to even)."""
    return np.rint(values * 255.0 / 16.0).astype(np.uint8)


def _load_digits(split: str, data_dir: str | os.PathLike[str] | None, download: bool) -> torch.Tensor:
    """Load the fixed ``split`` of scikit-learn's digits as uint8 ``[N, 1, 8, 8]``."""
    del data_dir, download  # bundled with scikit-learn: no folder, no download
    from sklearn.datasets import load_digits  # heavy: scikit-learn, for digits only

    images = np.asarray(load_digits().images)  # float64 [1797, 8, 8], integer values 0..16
    n = images.shape[0]
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    idx = perm[: n - DIGITS_N_TEST] if split == "train" else perm[n - DIGITS_N_TEST :]
    out = _digits_uint8(images[idx])[:, None, :, :]
    return torch.from_numpy(np.ascontiguousarray(out))


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$BENCH_DATA_DIR`` if set, else the cache default."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


class _ForeignGlobal(pickle.UnpicklingError):
    """A CIFAR-10 pickle named a global outside :data:`_CIFAR10_GLOBALS`; the message is ``module.name``."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as a protocol-2 pickle uses it: Python 3 pickles ``bytes`` as ``encode(str, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _ForeignGlobal(f"_codecs.encode(<{type(text).__name__}>, {encoding!r})")
    return text.encode("latin-1")


# Everything a CIFAR-10 batch may name: numpy arrays as pickled by numpy 1.x (the official files,
# Python 2) and numpy 2, plus bytes as Python 3 writes them at protocol 2 (tests/conftest.py's folders).
_CIFAR10_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_CIFAR10_GLOBALS`, so a crafted batch cannot call anything else."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR10_GLOBALS.get((module, name))
        if found is None:
            raise _ForeignGlobal(f"{module}.{name}")
        return found


def _read_cifar10_batch(path: Path) -> np.ndarray:
    """Read one CIFAR-10 pickle and return its images as uint8 ``[n, 3, 32, 32]``."""
    if not path.is_file():
        raise BenchError(f"CIFAR-10 batch file {path} is missing; the folder is incomplete")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _ForeignGlobal as exc:
        raise BenchError(
            f"CIFAR-10 batch file {path} refers to {exc}, which no CIFAR-10 batch holds; refusing to unpickle it "
            f"(it could run code): replace {path.parent} with the official {CIFAR10_FOLDER} (e.g. --download)"
        ) from exc
    except Exception as exc:  # garbage bytes raise many different errors
        raise BenchError(
            f"CIFAR-10 batch file {path} is not a readable pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict) or b"data" not in batch:
        raise BenchError(f"CIFAR-10 batch file {path} is malformed: expected a dict with a b'data' key")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise BenchError(
            f"CIFAR-10 batch file {path} is malformed: b'data' must be a uint8 array, got {kind}"
        )
    if data.size == 0 or data.size % _CIFAR10_ROW != 0:
        raise BenchError(
            f"CIFAR-10 batch file {path} is malformed: b'data' has {data.size} values, "
            f"not a positive multiple of {_CIFAR10_ROW} (3x32x32)"
        )
    n = data.size // _CIFAR10_ROW
    labels = batch.get(b"labels")
    if labels is not None and len(labels) != n:
        raise BenchError(f"CIFAR-10 batch file {path} is malformed: {n} images but {len(labels)} labels")
    return data.reshape(n, 3, 32, 32)


def _download_cifar10(root: Path) -> None:
    """Fetch CIFAR-10 into ``root`` with torchvision (which verifies checksums); BenchError if that fails."""
    try:
        import torchvision.datasets  # heavy: only to download CIFAR-10

        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as exc:
        raise BenchError(
            f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}); when offline, copy "
            f"the {CIFAR10_FOLDER} folder into {root} or point --data-dir/{DATA_DIR_ENV} at a folder holding it"
        ) from exc


def _load_cifar10(split: str, data_dir: str | os.PathLike[str] | None, download: bool) -> torch.Tensor:
    """Load CIFAR-10 ``split`` from ``<root>/cifar-10-batches-py`` as uint8 ``[N, 3, 32, 32]``."""
    root = resolve_data_root(data_dir)
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise BenchError(
                f"CIFAR-10 not found: looked for {folder} (expected files {folder / 'data_batch_1'} .. "
                f"data_batch_5 and {CIFAR10_TEST_BATCH}); fix: set --data-dir or {DATA_DIR_ENV} to a folder "
                f"containing {CIFAR10_FOLDER}, or pass download=True / --download when online"
            )
        _download_cifar10(root)
        if not folder.is_dir():
            raise BenchError(f"CIFAR-10 download into {root} did not produce {folder}")
    names = CIFAR10_TRAIN_BATCHES if split == "train" else (CIFAR10_TEST_BATCH,)
    parts = [_read_cifar10_batch(folder / name) for name in names]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return torch.from_numpy(np.ascontiguousarray(out))


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        channels=1,
        image_size=8,
        description="scikit-learn's bundled 8x8 digits (1500 train / 297 test, seeded split); no download",
        loader=_load_digits,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        channels=3,
        image_size=32,
        description="CIFAR-10 32x32 RGB (50000 train / 10000 test) from <data-dir>/cifar-10-batches-py",
        loader=_load_cifar10,
    ),
}


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> torch.Tensor:
    """Load a fixed split of a registered dataset as a contiguous uint8 tensor ``[N, C, H, W]``.

    Args:
        name: a key of :data:`DATASETS` (``"digits"`` or ``"cifar10"``).
        split: ``"train"`` or ``"test"``.
        data_dir: data root for on-disk datasets (ignored by ``digits``); defaults to
            ``$BENCH_DATA_DIR``, else ``~/.cache/elbo-bench/data``.
        download: for ``cifar10`` only, download through torchvision when the folder is missing.

    Raises:
        BenchError: unknown name or split, missing or malformed files, or a failed download.
    """
    check_choice("dataset", name, sorted(DATASETS))
    check_choice("split", split, SPLITS)
    info = DATASETS[name]
    x = info.loader(split, data_dir, download)
    expected = (info.channels, info.image_size, info.image_size)
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise BenchError(
            f"dataset {name!r} loaded as {x.dtype} {tuple(x.shape)}, expected uint8 [N, {expected}]"
        )
    return x.contiguous()
