"""Tests for bench.data.datasets: the embedded digits split and the on-disk CIFAR-10 reader."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bench.data.datasets import DATASETS, DatasetInfo, load_dataset, resolve_data_root
from bench.errors import BenchError

# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_raw() -> np.ndarray:
    return np.asarray(load_digits().images)  # float64 [1797, 8, 8], values 0..16


@pytest.fixture(scope="module")
def digits_splits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _rows(x: torch.Tensor | np.ndarray) -> list[bytes]:
    a = x.numpy() if isinstance(x, torch.Tensor) else x
    return [r.tobytes() for r in np.asarray(a, dtype=np.uint8).reshape(len(a), -1)]


def test_digits_shapes_dtype_and_layout(digits_splits):
    train, test = digits_splits
    assert train.shape == (1500, 1, 8, 8)
    assert test.shape == (297, 1, 8, 8)
    for x in (train, test):
        assert x.dtype == torch.uint8
        assert x.is_contiguous()


def test_digits_value_range(digits_splits):
    both = torch.cat(digits_splits)
    assert int(both.min()) == 0
    assert int(both.max()) == 255


def test_digits_splits_partition_the_full_set(digits_splits, digits_raw):
    train, test = digits_splits
    train_rows, test_rows = set(_rows(train)), set(_rows(test))
    assert len(train_rows) == 1500 and len(test_rows) == 297  # no image repeated within a split
    assert train_rows.isdisjoint(test_rows)
    # every one of the 1797 images (all distinct) lands in exactly one split
    full = np.rint(digits_raw * 255 / 16).astype(np.uint8)
    assert Counter(_rows(train)) + Counter(_rows(test)) == Counter(_rows(full))


def test_digits_deterministic_across_calls(digits_splits):
    train, test = digits_splits
    assert torch.equal(load_dataset("digits", "train"), train)
    assert torch.equal(load_dataset("digits", split="test"), test)


def test_digits_split_is_the_documented_seeded_permutation(digits_splits, digits_raw):
    train, test = digits_splits
    perm = np.random.default_rng(0).permutation(1797)
    # first test image / last train image are the raw images at those permutation slots
    for loaded, raw_idx in (
        (train[0], perm[0]),
        (train[-1], perm[1499]),
        (test[0], perm[1500]),
        (test[-1], perm[-1]),
    ):
        expect = np.rint(digits_raw[raw_idx] * 255 / 16).astype(np.uint8)
        assert np.array_equal(loaded[0].numpy(), expect)


def test_digits_exact_uint8_mapping(digits_splits, digits_raw):
    """v -> rint(v*255/16): only v=8 is a tie (127.5) and goes to the even 128."""
    train, _ = digits_splits
    perm = np.random.default_rng(0).permutation(1797)
    raw_train = digits_raw[perm[:1500]].astype(int)  # [1500, 8, 8] integers 0..16
    got = train[:, 0].numpy().astype(int)
    table = {
        0: 0,
        1: 16,
        2: 32,
        3: 48,
        4: 64,
        5: 80,
        6: 96,
        7: 112,
        8: 128,
        9: 143,
        10: 159,
        11: 175,
        12: 191,
        13: 207,
        14: 223,
        15: 239,
        16: 255,
    }
    for v, expected in table.items():
        mask = raw_train == v
        assert mask.any(), f"value {v} absent from the train split"
        assert set(np.unique(got[mask]).tolist()) == {expected}, f"{v} should map to {expected}"
    # a few individual pixels, including the end points and the tie
    for v in (0, 8, 16):
        i, y, x = np.argwhere(raw_train == v)[0]
        assert got[i, y, x] == table[v]


def test_digits_ignores_data_dir_and_download(tmp_path, digits_splits):
    x = load_dataset("digits", "test", data_dir=tmp_path / "nowhere", download=True)
    assert torch.equal(x, digits_splits[1])
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_entries_match_loaded_shapes(digits_splits):
    assert sorted(DATASETS) == ["cifar10", "digits"]
    for key, info in DATASETS.items():
        assert isinstance(info, DatasetInfo)
        assert info.name == key
        assert info.description
    d = DATASETS["digits"]
    assert (d.channels, d.image_size) == (1, 8)
    assert tuple(digits_splits[0].shape[1:]) == (d.channels, d.image_size, d.image_size)
    c = DATASETS["cifar10"]
    assert (c.channels, c.image_size) == (3, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.channels = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["mnist", "Digits", "", "cifar-10"])
def test_unknown_dataset_names_choices(name):
    with pytest.raises(BenchError) as exc:
        load_dataset(name)
    msg = str(exc.value)
    assert repr(name) in msg and "cifar10" in msg and "digits" in msg


@pytest.mark.parametrize("name", ["digits", "cifar10"])
@pytest.mark.parametrize("split", ["val", "Train", "all", ""])
def test_unknown_split_names_choices(name, split, tmp_path):
    with pytest.raises(BenchError) as exc:
        load_dataset(name, split, data_dir=tmp_path)
    msg = str(exc.value)
    assert repr(split) in msg and "train" in msg and "test" in msg


# ---------------------------------------------------------------------------------------------- cifar10


def _raw(root: Path, name: str) -> np.ndarray:
    with (root / "cifar-10-batches-py" / name).open("rb") as f:
        return pickle.load(f, encoding="bytes")[b"data"]


def _chw_from_rows(data: np.ndarray) -> np.ndarray:
    """Build [n, 3, 32, 32] by explicit index arithmetic data[i, c*1024 + y*32 + x] (no reshape)."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return data[:, c * 1024 + y * 32 + x]


def test_cifar10_shapes_and_dtypes(cifar10_root):
    train = load_dataset("cifar10", "train", data_dir=cifar10_root)
    test = load_dataset("cifar10", "test", data_dir=str(cifar10_root))
    assert train.shape == (20, 3, 32, 32)
    assert test.shape == (3, 3, 32, 32)
    for x in (train, test):
        assert x.dtype == torch.uint8
        assert x.is_contiguous()


def test_cifar10_pixels_round_trip_chw(cifar10_root):
    test = load_dataset("cifar10", "test", data_dir=cifar10_root).numpy()
    data = _raw(cifar10_root, "test_batch")
    assert np.array_equal(test, _chw_from_rows(data))
    # spot checks of [i, c, y, x] == data[i, c*1024 + y*32 + x]
    for i, c, y, x in [(0, 0, 0, 0), (1, 2, 31, 31), (2, 1, 5, 17), (0, 2, 30, 1)]:
        assert test[i, c, y, x] == data[i, c * 1024 + y * 32 + x]


def test_cifar10_train_concatenates_batches_in_order(cifar10_root):
    train = load_dataset("cifar10", "train", data_dir=cifar10_root).numpy()
    expected = np.concatenate([_chw_from_rows(_raw(cifar10_root, f"data_batch_{i}")) for i in range(1, 6)])
    assert np.array_equal(train, expected)
    assert not np.array_equal(train[:4], train[4:8])  # batches differ, so order matters


def test_cifar10_env_var_is_honoured(cifar10_root, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(cifar10_root))
    assert resolve_data_root() == cifar10_root
    test = load_dataset("cifar10", "test")
    assert np.array_equal(test.numpy(), _chw_from_rows(_raw(cifar10_root, "test_batch")))


def test_cifar10_data_dir_overrides_env_var(cifar10_root, monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "empty"))
    assert load_dataset("cifar10", "test", data_dir=cifar10_root).shape == (3, 3, 32, 32)
    with pytest.raises(BenchError):
        load_dataset("cifar10", "test")


def test_cifar10_default_root_is_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_root() == tmp_path / ".cache" / "elbo-bench" / "data"
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "test")
    assert str(tmp_path / ".cache" / "elbo-bench" / "data" / "cifar-10-batches-py") in str(exc.value)


def test_cifar10_missing_folder_offline_message(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: calls.append((a, k)))
    root = tmp_path / "nothing-here"
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "train", data_dir=root)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "BENCH_DATA_DIR" in msg and "--data-dir" in msg and "--download" in msg
    assert calls == []  # download=False never touches torchvision


def test_cifar10_download_failure_is_a_bench_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "test", data_dir=tmp_path / "root", download=True)
    msg = str(exc.value)
    assert "download" in msg and "network is unreachable" in msg and str(tmp_path / "root") in msg
    assert isinstance(exc.value.__cause__, OSError)


def test_cifar10_download_then_reads_folder(tmp_path, cifar10_root, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, train=True, download=False, **kwargs):
        calls.append((root, train, download))
        shutil.copytree(cifar10_root / "cifar-10-batches-py", Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    target = tmp_path / "fresh"
    test = load_dataset("cifar10", "test", data_dir=target, download=True)
    assert calls == [(str(target), True, True)]
    assert np.array_equal(test.numpy(), _chw_from_rows(_raw(cifar10_root, "test_batch")))
    load_dataset("cifar10", "train", data_dir=target, download=True)  # folder now present: no new download
    assert len(calls) == 1


def test_cifar10_corrupt_batch_names_the_file(cifar10_root):
    bad = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"\x00garbage, not a pickle\xff" * 10)
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "train", data_dir=cifar10_root)
    assert "data_batch_3" in str(exc.value)
    # the test split does not read the corrupt train batch
    assert load_dataset("cifar10", "test", data_dir=cifar10_root).shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({b"labels": [0]}, "b'data'"),
        ([1, 2, 3], "b'data'"),
        ({b"data": np.zeros((2, 3000), dtype=np.uint8)}, "3072"),
        ({b"data": np.zeros((2, 3072), dtype=np.int64)}, "uint8"),
        ({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}, "labels"),
    ],
)
def test_cifar10_malformed_batch_says_what_is_wrong(cifar10_root, payload, fragment):
    with (cifar10_root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "test", data_dir=cifar10_root)
    assert "test_batch" in str(exc.value) and fragment in str(exc.value)


def test_cifar10_missing_batch_file_is_named(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(BenchError) as exc:
        load_dataset("cifar10", "train", data_dir=cifar10_root, download=True)
    assert "data_batch_5" in str(exc.value) and "missing" in str(exc.value)


def test_cifar10_accepts_flat_data_array(cifar10_root):
    """A 1-D b'data' whose length is a multiple of 3072 is read as consecutive images."""
    data = _raw(cifar10_root, "test_batch")
    with (cifar10_root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": data.reshape(-1), b"labels": [0, 1, 2]}, f, protocol=2)
    test = load_dataset("cifar10", "test", data_dir=cifar10_root)
    assert np.array_equal(test.numpy(), _chw_from_rows(data))
