"""Inception Score (and the digits classifier's analogue), the FID reference points, saved samples and
``bench fid`` (bench.metrics.fid, bench.metrics.samples, bench.cli.main); CPU only, no network.  The CIFAR-10 check
against torch-fidelity's published FID runs only where real CIFAR-10 and the real Inception weights are present."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bench.metrics.extractors as extractors_mod
import bench.metrics.fid as fid_mod
from bench.cli.main import cli
from bench.data.datasets import CIFAR10_FOLDER, load_dataset
from bench.errors import BenchError
from bench.metrics.extractors import INCEPTION_WEIGHTS_FILENAME, digits_classifier_file, digits_extractor_name
from bench.metrics.fid import compute_fid, gaussian_noise_images, inception_score
from bench.metrics.samples import load_samples, samples_dataset, save_samples
from bench.runtime.files import file_digest


class _Mkdir:
    """Unpickles as ``os.mkdir(path)``: the smallest stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def classifier() -> Path:
    """The digits classifier shipped with the package."""
    return digits_classifier_file()


@pytest.fixture
def cache(classifier: Path, tmp_path: Path) -> Path:
    """An empty cache folder (the digits classifier ships with the package)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def train() -> torch.Tensor:
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def test_split() -> torch.Tensor:
    return load_dataset("digits", "test")


# ---------------------------------------------------------------------------------------------- Inception Score


def _split_is_numpy(logits: np.ndarray, splits: int, seed: int = 2020) -> tuple[float, float]:
    """Reference: rows permuted by RandomState(seed), cut into ``splits`` chunks, IS = exp(E KL(p(y|x) || p(y)))."""
    x = logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64)
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    n = len(x)
    for i in range(splits):
        lp = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(lp)
        log_py = np.log(p.mean(axis=0))
        scores.append(math.exp(float((p * (lp - log_py)).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_a_numpy_reference() -> None:
    logits = np.random.default_rng(0).normal(0.0, 3.0, size=(997, 7))  # 997: splits of unequal size
    mean, std = _split_is_numpy(logits, 10)
    got = inception_score(torch.from_numpy(logits).float())
    assert got["isc"] == pytest.approx(mean, rel=1e-5) and got["isc_std"] == pytest.approx(std, rel=1e-4)
    assert 1.0 < got["isc"] < 7.0
    few = inception_score(torch.from_numpy(logits[:6]).float())  # fewer rows than splits: one row per split
    assert few == {"isc": pytest.approx(1.0), "isc_std": pytest.approx(0.0, abs=1e-9)}


def test_inception_score_closed_form_and_invariances() -> None:
    labels = torch.arange(1000) % 10
    confident = 1e3 * torch.nn.functional.one_hot(labels, 10).double()
    # confident predictions: IS of a split is exp(H(class frequencies in that split)), at most 10
    perm = torch.from_numpy(np.random.RandomState(2020).permutation(1000))
    freqs = [torch.bincount(labels[perm][i * 100 : (i + 1) * 100], minlength=10).double() / 100 for i in range(10)]
    expected = np.mean([math.exp(-(f[f > 0] * f[f > 0].log()).sum().item()) for f in freqs])
    got = inception_score(confident)
    assert got["isc"] == pytest.approx(expected, rel=1e-9) and 9.0 < got["isc"] <= 10.0
    assert inception_score(torch.zeros(100, 10))["isc"] == pytest.approx(1.0)  # p(y|x) = p(y): no information
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifted = logits + torch.randn(300, 1, dtype=torch.float64)  # softmax ignores a per-row constant
    assert inception_score(shifted) == pytest.approx(inception_score(logits), rel=1e-9)
    with pytest.raises(BenchError, match="logits"):
        inception_score(torch.zeros(10))


def test_digits_is_analogue(classifier: Path, cache: Path, train: torch.Tensor, test_split: torch.Tensor) -> None:
    res = compute_fid(test_split, "digits", train, cache_dir=cache, kid=False, prc=False, reference_points=False)
    net = extractors_mod._load_digits_net(classifier)
    with torch.no_grad():
        direct = inception_score(net(test_split))
    assert res.metrics["isc"] == pytest.approx(direct["isc"], rel=1e-6)
    assert res.metrics["isc_std"] == pytest.approx(direct["isc_std"], rel=1e-5)
    assert 7.0 < res.metrics["isc"] <= 10.0  # a >90%-accurate classifier on balanced digits
    small_batches = compute_fid(test_split, "digits", train, cache_dir=cache, kid=False, prc=False,
                                reference_points=False, batch_size=7)
    assert small_batches.metrics == pytest.approx(res.metrics, rel=1e-5)  # batch-size independence
    noise = compute_fid(gaussian_noise_images(297, (1, 8, 8)), "digits", train, cache_dir=cache, kid=False,
                        prc=False, reference_points=False)
    assert noise.metrics["isc"] < res.metrics["isc"] - 2.0
    assert res.tags["isc_extractor"] == res.tags["fid_extractor"] == digits_extractor_name()
    assert res.tags["isc_layer"] == "logits" and res.tags["isc_splits"] == "10"
    assert "not comparable with Inception IS" in res.tags["isc_note"]


# ---------------------------------------------------------------------------------------------- reference points


def test_gaussian_noise_images() -> None:
    a = gaussian_noise_images(2500, (1, 8, 8))
    assert a.dtype == torch.uint8 and a.shape == (2500, 1, 8, 8)
    assert torch.equal(a, gaussian_noise_images(2500, (1, 8, 8)))  # seeded
    assert torch.equal(a[:7], gaussian_noise_images(7, (1, 8, 8)))  # chunking does not change the stream
    x = a.double()
    assert abs(x.mean().item() - 127.5) < 1.0 and 55.0 < x.std().item() < 64.0  # clipping trims the tails


def test_digits_reference_points_are_ordered_exact_and_cached(
    cache: Path, train: torch.Tensor, test_split: torch.Tensor, extractor_calls: list[int]
) -> None:
    seen = extractor_calls  # batch sizes the digits extractor sees from here on
    seen.clear()
    samples = gaussian_noise_images(1000, (1, 8, 8), seed=5)
    first = compute_fid(samples, "digits", train, cache_dir=cache, kid=False, prc=False)
    assert sum(seen) == 1000 + 1500 + 1000 + 297  # samples, reference, noise, the whole test split (297 < 1000)
    ref_test, ref_noise = first.metrics["fid_ref_test"], first.metrics["fid_ref_noise"]
    assert 0.0 < ref_test and 10.0 * ref_test < ref_noise
    assert first.tags["fid_ref_test_samples"] == "297" and first.tags["fid_ref_noise_images"].startswith("1000 images")
    # the same numbers as scoring those images directly
    kw = {"cache_dir": cache, "kid": False, "prc": False, "isc": False, "reference_points": False}
    assert ref_test == pytest.approx(compute_fid(test_split, "digits", train, **kw).metrics["fid"], rel=1e-9)
    noise = gaussian_noise_images(1000, (1, 8, 8))
    assert ref_noise == pytest.approx(compute_fid(noise, "digits", train, **kw).metrics["fid"], rel=1e-9)

    seen.clear()
    second = compute_fid(samples.flip(0).contiguous(), "digits", train, cache_dir=cache, kid=False, prc=False)
    assert sum(seen) == 1000  # only the samples: reference features and both points came from the cache
    assert (second.metrics["fid_ref_test"], second.metrics["fid_ref_noise"]) == (ref_test, ref_noise)

    seen.clear()
    at_297 = compute_fid(samples[:297], "digits", train, cache_dir=cache, kid=False, prc=False)
    assert sum(seen) == 297 + 297  # samples and a new noise point; the test point (297 images) is shared
    assert at_297.metrics["fid_ref_test"] == ref_test and at_297.metrics["fid_ref_noise"] != ref_noise
    points = sorted(p.name for p in (cache / "fidelity").glob("*.json"))
    assert len(points) == 3 and sum("-refnoise-" in p for p in points) == 2


def test_bad_reference_point_is_recomputed(cache: Path, train: torch.Tensor, test_split: torch.Tensor) -> None:
    first = compute_fid(test_split[:50], "digits", train, cache_dir=cache, kid=False, prc=False, isc=False)
    (noise_point,) = (cache / "fidelity").glob("*-refnoise-*.json")
    noise_point.write_bytes(pickle.dumps(_Mkdir(cache / "pwned")))
    with pytest.warns(UserWarning, match=r"unreadable \(UnicodeDecodeError\); recomputing"):
        again = compute_fid(test_split[:50], "digits", train, cache_dir=cache, kid=False, prc=False, isc=False)
    assert again.metrics == pytest.approx(first.metrics) and not (cache / "pwned").exists()
    noise_point.write_text(json.dumps({"fid": 1.0, "samples": 49}))
    with pytest.warns(UserWarning, match="finite FID of 50 images"):
        again = compute_fid(test_split[:50], "digits", train, cache_dir=cache, kid=False, prc=False, isc=False)
    assert again.metrics == pytest.approx(first.metrics)


def test_reference_test_point_skipped_when_the_test_split_is_missing(
    cache: Path, train: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise BenchError("CIFAR-10 not found: nowhere")

    monkeypatch.setattr(fid_mod, "load_dataset", missing)
    res = compute_fid(train[:20], "digits", train, cache_dir=cache, kid=False, prc=False, isc=False)
    assert "fid_ref_test" not in res.metrics and "fid_ref_noise" in res.metrics
    assert res.tags["fid_ref_test_skipped"] == "test split not loadable: CIFAR-10 not found: nowhere"


# --------------------------------------------------------------------------------------------- saved samples, bench fid


def _bench(home: Path, *args: str):
    return CliRunner().invoke(cli, list(args), env={"BENCH_HOME": str(home), "BENCH_DATA_DIR": None})


def test_save_and_load_samples_round_trip(tmp_path: Path) -> None:
    images = gaussian_noise_images(5, (3, 4, 4))
    path = save_samples(images, tmp_path / "s.npz")
    assert path == tmp_path / "s.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    with np.load(path, allow_pickle=False) as z:
        assert z.files == ["samples"] and z["samples"].dtype == np.uint8
    assert torch.equal(load_samples(path), images)
    with pytest.raises(BenchError, match=r"must be uint8 \[N, \(1, 8, 8\)\]"):
        load_samples(path, "digits")
    with pytest.raises(BenchError, match="uint8 images"):
        save_samples(images.float(), tmp_path / "f.npz")


def test_a_samples_file_records_its_dataset_and_bench_fid_holds_to_it(tmp_path: Path) -> None:
    images = gaussian_noise_images(3, (1, 8, 8))
    path = save_samples(images, tmp_path / "s.npz", "digits")
    with np.load(path, allow_pickle=False) as z:  # plain arrays: read without unpickling anything
        assert sorted(z.files) == ["dataset", "samples"] and str(z["dataset"]) == "digits"
    assert torch.equal(load_samples(path, "digits"), images)
    assert samples_dataset(path) == "digits" and samples_dataset(path, "digits") == "digits"
    older = save_samples(images, tmp_path / "old.npz")  # a file from before datasets were recorded
    assert samples_dataset(older, "digits") == "digits"
    home = tmp_path / "home"
    for args, message in [([str(path), "--dataset", "cifar10"],
                           f"error: --dataset cifar10, but samples file {path} holds samples of digits; leave out "
                           "--dataset or give --dataset digits"),
                          ([str(older)], f"error: samples file {older} does not record its dataset (written before it "
                                         "did, or by another tool); give --dataset (cifar10, digits)"),
                          ([str(tmp_path / "none.npz")], f"error: samples file {tmp_path / 'none.npz'}: no such file")]:
        result = _bench(home, "fid", *args)
        assert result.exit_code == 2 and result.stderr.strip().splitlines() == [message], result.output
    assert not home.exists()  # refused before anything was computed or cached


def test_bench_fid_reproduces_the_score_of_saved_samples(
    classifier: Path, cache: Path, train: torch.Tensor, test_split: torch.Tensor, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    samples = torch.cat([test_split[:150], gaussian_noise_images(50, (1, 8, 8))])  # a middling "model"
    expected = compute_fid(samples, "digits", train, cache_dir=cache)  # as a run scores them (another cache)
    save_samples(samples, tmp_path / "samples.npz", "digits")  # as a run saves them: the file names its dataset
    result = _bench(home, "fid", str(tmp_path / "samples.npz"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    printed = dict(re.findall(r"^  (\S+)\s+(\S.*)$", result.stdout, flags=re.M))
    assert set(expected.metrics) <= set(printed)
    for key, value in expected.metrics.items():
        assert float(printed[key]) == pytest.approx(value, rel=1e-5, abs=1e-9), key
    for key, value in expected.tags.items():
        assert printed[key] == value, key
    assert printed["fid_samples_file"] == str((tmp_path / "samples.npz").resolve())
    assert result.stdout.startswith(f"{tmp_path / 'samples.npz'}: 200 digits samples\n")


def _npz_with_object_array(path: Path, marker: Path) -> None:
    np.savez(path, samples=np.array([_Mkdir(marker)], dtype=object))


def _plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Mkdir(marker)))


def _bare_npy(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros((2, 1, 8, 8), np.uint8))


def _float_samples(path: Path, marker: Path) -> None:
    np.savez(path, samples=np.zeros((2, 1, 8, 8), np.float32))


def _wrong_key(path: Path, marker: Path) -> None:
    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8))


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (_npz_with_object_array, "not a readable .npz of plain arrays"),
        (_plain_pickle, "not a readable .npz of plain arrays"),
        (_bare_npy, "expected an .npz"),
        (_float_samples, "must be uint8"),
        (_wrong_key, "expected an .npz"),
    ],
)
def test_bench_fid_refuses_bad_files_without_running_them(tmp_path: Path, write, match: str) -> None:
    marker, bad = tmp_path / "pwned", tmp_path / "bad.npz"
    write(bad, marker)
    result = _bench(tmp_path / "home", "fid", str(bad), "--dataset", "digits")
    assert result.exit_code == 2 and not marker.exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: samples file") and match in result.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was written


def test_bench_fid_missing_file(tmp_path: Path) -> None:
    result = _bench(tmp_path, "fid", str(tmp_path / "nope.npz"), "--dataset", "digits")
    assert result.exit_code == 2 and result.stderr == f"error: samples file {tmp_path / 'nope.npz'}: no such file\n"


# ---------------------------------------------------------------------------------------------- CIFAR-10, real weights

CIFAR10_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "test_batch": "40351d587109b95175f43aff81a1287e"}
INCEPTION_SHA256_PREFIX = "6726825d"  # torch-fidelity's file name carries its hash
WEIGHTS_ENV = "BENCH_FID_WEIGHTS"


def _real_cifar10_root() -> Path | str:
    """The data root holding the official CIFAR-10 batches, or why not (a skip reason)."""
    root = os.environ.get("BENCH_DATA_DIR")
    if not root:
        return "BENCH_DATA_DIR is not set (it must hold the official cifar-10-batches-py)"
    for name, md5 in CIFAR10_MD5.items():
        path = Path(root) / CIFAR10_FOLDER / name
        if not path.is_file():
            return f"no {path}"
        if hashlib.md5(path.read_bytes()).hexdigest() != md5:
            return f"{path} is not the official CIFAR-10 file (md5 differs)"
    return Path(root)


def _real_inception_weights() -> Path | str:
    """torch-fidelity's Inception weights from ${WEIGHTS_ENV} or the torch hub cache, or why not."""
    candidates = [Path(p) for p in (os.environ.get(WEIGHTS_ENV),) if p]
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME)
    for path in candidates:
        if path.is_file() and file_digest(path).startswith(INCEPTION_SHA256_PREFIX):
            return path
    return f"no {INCEPTION_WEIGHTS_FILENAME} (sha256 {INCEPTION_SHA256_PREFIX}…) at ${WEIGHTS_ENV} or {candidates[-1]}"


def test_cifar10_train5k_vs_test5k_matches_torch_fidelity(tmp_path: Path) -> None:
    """torch-fidelity's tests/precision/test_metric_fid_fidelity.py: the first 5000 train and the first
    5000 test images of CIFAR-10 have FID 10.3233274 (Inception on 10k images: minutes on a CPU)."""
    root, weights = _real_cifar10_root(), _real_inception_weights()
    if isinstance(root, str):
        pytest.skip(f"real CIFAR-10 needed: {root}")
    if isinstance(weights, str):
        pytest.skip(f"real Inception weights needed: {weights}")
    train5k = load_dataset("cifar10", "train", root)[:5000]
    test5k = load_dataset("cifar10", "test", root)[:5000]
    res = compute_fid(test5k, "cifar10", train5k, cache_dir=tmp_path, fid_weights=weights, kid=False, prc=False,
                      isc=False, reference_points=False, device="cuda" if torch.cuda.is_available() else "cpu")
    assert res.metrics["fid"] == pytest.approx(10.3233274, abs=1e-3)


# ---------------------------------------------------------------------------------------------- the report


def test_bpd_vs_fid_draws_the_reference_lines() -> None:
    import pandas as pd

    from reports.figures import bpd_vs_fid

    runs = pd.DataFrame({
        "status": ["FINISHED"] * 3 + ["FAILED"], "variant": ["simple", "simple", "elbo", "elbo"],
        "dataset": ["digits"] * 4, "bpd": [1.1, 1.2, 1.0, 9.0], "fid": [2.0, 3.0, 5.0, 99.0],
        "fid_ref_test": [0.38, 0.38, 0.38, 7.0], "fid_ref_noise": [20.3, 20.3, 20.3, 7.0],
        "fid_samples": ["1000"] * 4, "fid_ref_test_samples": ["297"] * 4,
    })
    (ax,) = bpd_vs_fid(runs).axes
    lines = {ln.get_label(): ln.get_ydata()[0] for ln in ax.get_lines()}
    assert lines == {"test split vs train (n=297)": 0.38, "Gaussian noise vs train (n=1000)": 20.3}
    assert ax.get_yscale() == "log"  # 0.38 .. 20.3 spans more than 30x: linear would squash the runs together
    (ax,) = bpd_vs_fid(runs.drop(columns=["fid_ref_test", "fid_ref_noise"])).axes  # runs from before the points
    assert ax.get_lines() == [] and ax.get_yscale() == "linear"
