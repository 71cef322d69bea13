"""Saved samples: the ``.npz`` files generated images are kept in, to be scored again (``bench fid``).

:func:`save_samples` writes uint8 ``[N, C, H, W]`` under key ``"samples"`` of an ``.npz`` (and the dataset
they imitate under ``"dataset"``); :func:`load_samples` reads it back (``allow_pickle=False``);
:func:`samples_dataset` says which dataset a file's images are scored against.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.data.datasets import DATASETS
from bench.errors import BenchError, check_choice, first_line, reraised
from bench.runtime.files import write_atomically

SAMPLES_KEY = "samples"  # the array's name in a saved-samples .npz
DATASET_KEY = "dataset"  # the dataset the samples imitate, a 0-d unicode array beside them (files written since)


def check_images(x: object, what: str, dataset: str, shape: tuple[int, int, int]) -> torch.Tensor:
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
    with reraised(lambda exc: f"{what} is not a readable .npz of plain arrays "
                              f"({type(exc).__name__}: {first_line(exc)}); "
                              "refusing it (pickled objects could run code)", OSError, ValueError, KeyError, EOFError,
                  zipfile.BadZipFile):
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy
            raise BenchError(expected)
        with loaded as z:
            if SAMPLES_KEY not in z.files:
                raise BenchError(expected)
            arr = z[SAMPLES_KEY]
    if not isinstance(arr, np.ndarray):  # a member that is no .npy (a raw pickle, say) is handed back as bytes
        raise BenchError(f"{what}: {SAMPLES_KEY!r} is not a numpy array (raw bytes: a pickle, say); refusing it")
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise BenchError(f"{what}: {SAMPLES_KEY!r} must be uint8 [N, C, H, W], got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(np.ascontiguousarray(arr))
    if dataset is not None:
        check_choice("dataset", dataset, sorted(DATASETS))
        info = DATASETS[dataset]
        check_images(images, f"samples in {path}", dataset, (info.channels, info.image_size, info.image_size))
    return images
