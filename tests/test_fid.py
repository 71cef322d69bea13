"""FID / KID / precision-recall / IS through torch-fidelity (bench.metrics.fid, bench.metrics.extractors); CPU only,
no network."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn

import bench.metrics.extractors as extractors_mod
import bench.metrics.fid as fid_mod
from bench.data.datasets import load_dataset
from bench.errors import BenchError
from bench.metrics.extractors import (
    INCEPTION_WEIGHTS_FILENAME,
    FidUnavailable,
    digits_classifier_accuracy,
    extractor_for,
    inception_weights_path,
)
from bench.metrics.fid import FidResult, compute_fid

FID_KEYS = {"fid", "kid", "kid_std", "precision", "recall"}
ALL_KEYS = FID_KEYS | {"isc", "isc_std", "fid_ref_test", "fid_ref_noise"}


def _uint8(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Uniform random uint8 images ``[n, c, size, size]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir for the reference statistics (the digits classifier ships with the package)."""
    return tmp_path_factory.mktemp("fid-digits")


@pytest.fixture(scope="module")
def digits_train() -> torch.Tensor:
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def digits_fids(digits_cache: Path, digits_train: torch.Tensor) -> dict[str, FidResult]:
    """Held-out test split, uniform noise and the train split itself, each against the train split."""
    sets = {
        "heldout": load_dataset("digits", "test"),
        "noise": _uint8(297, 1, 8, seed=0),
        "self": digits_train,
    }
    return {k: compute_fid(v, "digits", digits_train, cache_dir=digits_cache) for k, v in sets.items()}


def test_digits_fid_separates_heldout_noise_and_self(digits_fids: dict[str, FidResult]) -> None:
    heldout, noise, same = (digits_fids[k].metrics for k in ("heldout", "noise", "self"))
    for m in (heldout, noise, same):
        assert set(m) == ALL_KEYS and all(math.isfinite(v) for v in m.values())
    assert 0.0 < heldout["fid"] < 200.0
    assert noise["fid"] > 10.0 * heldout["fid"]
    assert abs(same["fid"]) < 1e-3 * heldout["fid"]
    assert heldout["precision"] > 0.8 and heldout["recall"] > 0.8
    assert noise["precision"] < 0.5 and noise["recall"] < 0.5
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert noise["kid"] > 10.0 * abs(heldout["kid"])


def test_digits_tags(digits_fids: dict[str, FidResult], digits_cache: Path) -> None:
    hash8 = hashlib.sha256(extractors_mod.DIGITS_CLASSIFIER_FILE.read_bytes()).hexdigest()[:8]
    assert not list(digits_cache.glob("digits-classifier-*"))  # nothing trained or cached per machine
    tags = digits_fids["heldout"].tags
    assert tags["fid_extractor"] == f"digits-classifier-{hash8}" == "digits-classifier-634ef152"
    assert tags["fid_reference"] == "digits train split, 1500 images"
    assert tags["fid_samples"] == "297" and tags["fid_feature_layer"] == "64"


def test_shipped_digits_classifier_accuracy() -> None:
    assert digits_classifier_accuracy() > 0.95


@pytest.mark.parametrize("damage", ["edited", "missing", "planted pickle"])
def test_a_digits_classifier_other_than_the_released_one_is_refused(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each machine trained its own classifier before, so digits FIDs did not compare across machines. The
    shipped file's sha256 is checked at every load: an edited, missing or replaced file is one clear error."""
    bad = tmp_path / "digits_classifier.npz"
    if damage == "edited":
        data = bytearray(extractors_mod.DIGITS_CLASSIFIER_FILE.read_bytes())
        data[-100] ^= 1
        bad.write_bytes(bytes(data))
    elif damage == "planted pickle":
        bad.write_bytes(pickle.dumps({"weights": 1}))
    monkeypatch.setattr(extractors_mod, "DIGITS_CLASSIFIER_FILE", bad)
    with pytest.raises(BenchError, match="reinstall elbo-bench"):
        compute_fid(load_dataset("digits", "test")[:10], "digits", load_dataset("digits", "train")[:10],
                    cache_dir=tmp_path)


def test_cache_reuses_classifier_and_reference_stats(
    digits_cache: Path, digits_train: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    extractor_calls: list[int],
) -> None:
    def no_training() -> None:
        raise AssertionError("the shipped classifier should be used")

    monkeypatch.setattr(extractors_mod, "_train_digits_classifier", no_training)
    seen = extractor_calls  # batch sizes the digits extractor sees from here on
    seen.clear()
    samples = load_dataset("digits", "test")[:100]
    first = compute_fid(samples, "digits", digits_train, cache_dir=tmp_path, batch_size=512)
    assert sum(seen) == 100 + 1500 + 100 + 100  # samples, reference, then the reference points: noise, test split
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "fidelity").iterdir()}
    (cached,) = (p for p in files if p.suffix == ".npz")  # features and FID statistics of the reference, no pickles
    assert sorted(p.name.removeprefix(cached.stem) for p in files if p != cached) == [  # the reference points
        "-refnoise-n100-seed0.json", f"-reftest-n100-{hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:8]}.json"]
    assert (cached.name.startswith("digits-train-n1500-")
            and cached.name.endswith(f"-{extractors_mod.digits_extractor_name()}-64.npz"))
    with np.load(cached, allow_pickle=False) as z:
        assert sorted(z.files) == ["features", "mu", "sigma"]
        assert z["features"].shape == (1500, 64) and z["sigma"].shape == (64, 64)
    seen.clear()
    second = compute_fid(samples, "digits", digits_train, cache_dir=tmp_path, batch_size=512)
    assert sum(seen) == 100  # only the samples went through the network
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fidelity").iterdir()} == files
    assert second.metrics == pytest.approx(first.metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fidelity"]


@pytest.mark.parametrize("n", [2, 3])
def test_small_sample_counts(digits_cache: Path, digits_train: torch.Tensor, n: int) -> None:
    res = compute_fid(load_dataset("digits", "test")[:n], "digits", digits_train, cache_dir=digits_cache)
    assert set(res.metrics) == ALL_KEYS - {"precision", "recall"}  # KID subset shrunk to n; PRC needs > 3
    assert res.tags["isc_splits"] == str(n) and res.tags["fid_ref_test_samples"] == str(n)
    assert all(math.isfinite(v) for v in res.metrics.values())


def test_only_fid(digits_cache: Path, digits_train: torch.Tensor) -> None:
    res = compute_fid(digits_train[:50], "digits", digits_train, cache_dir=digits_cache, kid=False, prc=False,
                      isc=False, reference_points=False)
    assert set(res.metrics) == {"fid"} and res.metrics["fid"] > 0.0


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception network with random (He-normal) weights, saved as a state dict."""
    with pytest.MonkeyPatch.context() as mp:  # build the network without loading any weights
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):  # keep activations O(1) through the depth
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_path_with_random_weights(random_inception_weights: Path, tmp_path: Path) -> None:
    samples, reference = _uint8(6, 3, 32, seed=1), _uint8(8, 3, 32, seed=2)
    reference[:, 0] //= 2  # a different distribution from the samples
    kw = {"cache_dir": tmp_path, "fid_weights": random_inception_weights}
    res = compute_fid(samples, "cifar10", reference, test_images=_uint8(3, 3, 32, seed=3), **kw)
    assert set(res.metrics) == ALL_KEYS and 1.0 <= res.metrics["isc"] <= 1008.0
    assert res.tags["isc_layer"] == "logits_unbiased" and res.tags["fid_ref_test_samples"] == "3"
    assert math.isfinite(res.metrics["fid"]) and res.metrics["fid"] > 0.0
    assert res.tags["fid_extractor"] == "inception-v3-compat" and res.tags["fid_feature_layer"] == "2048"
    assert res.tags["fid_samples"] == "6" and res.tags["fid_reference"] == "cifar10 train split, 8 images"
    same = compute_fid(reference.clone(), "cifar10", reference, reference_points=False, **kw)
    assert abs(same.metrics["fid"]) < 1e-3 * res.metrics["fid"]
    assert same.metrics["precision"] == 1.0 and same.metrics["recall"] == 1.0


def test_offline_without_weights_raises_fid_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FidUnavailable, match="--fid-weights") as info:
        compute_fid(_uint8(4, 3, 32, 0), "cifar10", _uint8(4, 3, 32, 1), cache_dir=tmp_path / "cache")
    assert INCEPTION_WEIGHTS_FILENAME in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_weights_found_in_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download"))
    cached = tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    cached.parent.mkdir()
    cached.write_bytes(b"weights")
    assert inception_weights_path() == cached
    with pytest.raises(BenchError, match="no such file") as info:
        inception_weights_path(tmp_path / "missing.pth")
    assert not isinstance(info.value, FidUnavailable)


@pytest.mark.parametrize(
    ("samples", "dataset", "reference", "match"),
    [
        (_uint8(4, 1, 8, 0).float(), "digits", _uint8(4, 1, 8, 1), "dtype"),
        (_uint8(4, 3, 8, 0), "digits", _uint8(4, 1, 8, 1), "samples"),
        (_uint8(4, 3, 32, 0), "cifar10", _uint8(4, 1, 32, 1), "reference"),
        (_uint8(1, 1, 8, 0), "digits", _uint8(4, 1, 8, 1), "at least 2"),
        (_uint8(4, 1, 8, 0), "mnist", _uint8(4, 1, 8, 1), "unknown dataset"),
    ],
)
def test_bad_input(
    samples: torch.Tensor, dataset: str, reference: torch.Tensor, match: str, tmp_path: Path
) -> None:
    with pytest.raises(BenchError, match=match):
        compute_fid(samples, dataset, reference, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_weights_file_is_a_bench_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-inception.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(BenchError, match="inception-v3-compat"):
        compute_fid(_uint8(4, 3, 32, 0), "cifar10", _uint8(4, 3, 32, 1), cache_dir=tmp_path, fid_weights=bad)


def test_bench_commands_do_not_import_torch_fidelity() -> None:
    """Importing torch-fidelity takes seconds (torchvision's models, torch._dynamo): only FID work pays for it."""
    code = "import bench.cli.main, sys; print('torch_fidelity' in sys.modules, 'torchvision' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_the_names_written_out_here_are_torch_fidelitys() -> None:
    """The URL and metric keys this package spells out (to leave torch-fidelity unimported) are torch-fidelity's own."""
    import torch_fidelity.metric_fid as tf_fid

    assert extractors_mod.URL_INCEPTION_V3 == tf_inception.URL_INCEPTION_V3
    assert INCEPTION_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"
    assert fid_mod._KEY_FID == tf_fid.KEY_METRIC_FID
    assert set(fid_mod._METRIC_KEYS) == {
        torch_fidelity.KEY_METRIC_FID, torch_fidelity.KEY_METRIC_KID_MEAN, torch_fidelity.KEY_METRIC_KID_STD,
        torch_fidelity.KEY_METRIC_PRECISION, torch_fidelity.KEY_METRIC_RECALL, torch_fidelity.KEY_METRIC_ISC_MEAN,
        torch_fidelity.KEY_METRIC_ISC_STD}


def test_the_networks_are_made_once_on_torch_fidelitys_classes() -> None:
    digits, inception = extractors_mod.DigitsFeatureExtractor, extractors_mod._InceptionV3WeightsOnly
    assert issubclass(digits, torch_fidelity.FeatureExtractorBase) and digits.__name__ == "DigitsFeatureExtractor"
    assert issubclass(inception, tf_inception.FeatureExtractorInceptionV3)
    assert digits.__module__ == "bench.metrics.extractors" and digits.__doc__.startswith("torch-fidelity extractor")
    assert extractor_for("digits", 1, None).network is digits is extractors_mod.DigitsFeatureExtractor
    with pytest.raises(AttributeError, match="no attribute 'DigitsExtractor'"):
        _ = extractors_mod.DigitsExtractor
