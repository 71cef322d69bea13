"""Files from outside (CIFAR-10 batches, the FID cache, Inception weights) must never run code when read.

Each crafted file would create a marker directory if it were unpickled without restriction; every
test asserts that the marker is absent and, where the file is refused, that the error is one line.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data.datasets import load_dataset
from bench.errors import BenchError
from bench.metrics.extractors import (
    INCEPTION_WEIGHTS_FILENAME,
    FidUnavailable,
    digits_classifier_file,
    digits_extractor_name,
)
from bench.metrics.fid import compute_fid


class _Mkdir:
    """Unpickles as ``os.mkdir(path)``: the smallest stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


class _Eval:
    """Unpickles as ``eval(source)`` (module ``builtins``)."""

    def __init__(self, path: Path) -> None:
        self.source = f"__import__('os').mkdir({str(path)!r})"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, (self.source,)


class _Rot13:
    """Unpickles as ``_codecs.encode('...', 'rot13')``: an allowed global, called in a way CIFAR never does."""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return codecs.encode, ("payload", "rot13")


def _one_line_error(info: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize(("payload", "named"), [(_Mkdir, "posix.mkdir"), (_Eval, "builtins.eval")])
def test_crafted_cifar_batch_does_not_run(cifar10_root, tmp_path, protocol, payload, named):
    marker = tmp_path / "pwned"
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    with batch.open("wb") as f:
        pickle.dump({b"data": payload(marker), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(BenchError) as info:
        load_dataset("cifar10", "train", data_dir=cifar10_root)
    assert not marker.exists()
    msg = _one_line_error(info)
    assert str(batch) in msg and named.split(".")[-1] in msg and "refusing" in msg


def test_allowed_global_misused_is_refused(cifar10_root):
    batch = cifar10_root / "cifar-10-batches-py" / "test_batch"
    with batch.open("wb") as f:
        pickle.dump({b"data": _Rot13()}, f, protocol=2)
    with pytest.raises(BenchError) as info:
        load_dataset("cifar10", "test", data_dir=cifar10_root)
    assert "rot13" in _one_line_error(info)


def _py2_numpy1_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official files were: Python 2 cPickle protocol 2, numpy 1.x.

    Strings are SHORT_BINSTRING/BINSTRING (no ``_codecs.encode``), the array is rebuilt by
    ``numpy.core.multiarray._reconstruct`` with ``numpy.ndarray`` and ``numpy.dtype`` globals.
    """
    n, row = data.shape

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        + b"(K\x01" + b"J" + struct.pack("<i", n) + b"M" + struct.pack("<H", row) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"data") + array + s(
        b"labels") + label_list + b"u."


def test_official_python2_numpy1_format_still_loads(cifar10_root):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    raw = _py2_numpy1_batch(data, [1, 2, 3])
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    assert np.array_equal(pickle.loads(raw, encoding="bytes")[b"data"], data)  # the helper is a true pickle
    (cifar10_root / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    test = load_dataset("cifar10", "test", data_dir=cifar10_root)
    assert np.array_equal(test.numpy(), data.reshape(3, 3, 32, 32))


def test_numpy2_protocol2_format_still_loads(cifar10_root):
    """conftest's folders: numpy 2 (``numpy._core``) and Python 3 bytes (``_codecs.encode``, latin-1)."""
    raw = (cifar10_root / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw and b"_codecs" in raw
    expected = pickle.loads(raw, encoding="bytes")[b"data"]
    assert np.array_equal(load_dataset("cifar10", "test", data_dir=cifar10_root).numpy(),
                          expected.reshape(-1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------- FID cache


@pytest.fixture(scope="module")
def classifier() -> Path:
    """The digits classifier shipped with the package."""
    return digits_classifier_file()


def _digits_sets() -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("digits", "test")[:40], load_dataset("digits", "train")[:200]


def _plant(cache: Path, classifier: Path, reference: torch.Tensor, marker: Path, npz_kind: str) -> list[Path]:
    """Malicious files under every name the reference's cache entry has had (torch-fidelity ``.pt``, ours ``.npz``)."""
    (cache / "fidelity").mkdir(parents=True)
    extractor = digits_extractor_name()  # digits-classifier-<hash8>
    ref8 = hashlib.sha256(reference.numpy().tobytes()).hexdigest()[:8]
    name = f"digits-train-n{reference.shape[0]}-{ref8}-{extractor}-64"
    folder = cache / "fidelity"
    planted = [folder / f"{name}-{extractor}-features-64.pt", folder / f"{name}-{extractor}-stat-fid-64.pt"]
    for path in planted:
        torch.save(_Mkdir(marker), path)
    npz = folder / f"{name}.npz"
    if npz_kind == "object-array":
        evil = np.array([_Mkdir(marker)], dtype=object)
        np.savez(npz, features=evil, mu=evil, sigma=evil)
    else:
        npz.write_bytes(pickle.dumps(_Mkdir(marker)))
    return [*planted, npz]


@pytest.mark.parametrize("npz_kind", ["object-array", "plain-pickle"])
def test_planted_fid_cache_does_not_run(classifier, tmp_path, npz_kind):
    samples, reference = _digits_sets()
    marker = tmp_path / "pwned"
    planted = _plant(tmp_path / "cache", classifier, reference, marker, npz_kind)
    with pytest.warns(UserWarning, match="unreadable.*recomputing"):
        res = compute_fid(samples, "digits", reference, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    clean = compute_fid(samples, "digits", reference, cache_dir=tmp_path / "clean")
    assert res.metrics == pytest.approx(clean.metrics)
    with np.load(planted[-1], allow_pickle=False) as z:  # the planted entry was replaced by a good one
        assert z["features"].shape == (200, 64)


def test_mismatched_fid_cache_is_recomputed(classifier, tmp_path):
    samples, reference = _digits_sets()
    first = compute_fid(samples, "digits", reference, cache_dir=tmp_path)
    (entry,) = (tmp_path / "fidelity").glob("*.npz")
    np.savez(entry, features=np.zeros((3, 64), np.float32), mu=np.zeros(64, np.float32), sigma=np.eye(64))
    with pytest.warns(UserWarning, match="does not hold 200 feature rows"):
        again = compute_fid(samples, "digits", reference, cache_dir=tmp_path)
    assert again.metrics == pytest.approx(first.metrics)


# ---------------------------------------------------------------------------------------------- Inception weights


def _inception_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))


def test_malicious_fid_weights_do_not_run(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"fc.weight": _Mkdir(marker)}, bad)
    samples, reference = _inception_inputs()
    with pytest.raises(BenchError) as info:
        compute_fid(samples, "cifar10", reference, cache_dir=tmp_path / "cache", fid_weights=bad)
    assert not marker.exists()
    msg = _one_line_error(info)
    assert str(bad) in msg and "mkdir" in msg and "refusing" in msg and INCEPTION_WEIGHTS_FILENAME in msg
    assert not isinstance(info.value, FidUnavailable)


def test_malicious_weights_in_hub_cache_do_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    planted = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    planted.parent.mkdir(parents=True)
    torch.save({"fc.weight": _Mkdir(marker)}, planted)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    samples, reference = _inception_inputs()
    with pytest.raises(BenchError) as info:
        compute_fid(samples, "cifar10", reference, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert str(planted) in _one_line_error(info)


def test_unreadable_fid_weights_are_one_line(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file at all")
    samples, reference = _inception_inputs()
    with pytest.raises(BenchError) as info:
        compute_fid(samples, "cifar10", reference, cache_dir=tmp_path / "cache", fid_weights=bad)
    assert str(bad) in _one_line_error(info)
