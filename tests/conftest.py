"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

# A suite started as a background job of a script (`.ci/run &`, `nohup … &`) inherits SIGINT ignored, and every
# process a test starts would inherit it too, so the tests that stop `bench ui`, `bench dashboard` and `bench server`
# with Ctrl-C would find them deaf to it. A handled signal is reset to the default in a child it execs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def write_cifar10_folder(root: Path, n_train_per_batch: int, n_test: int, seed: int = 0) -> Path:
    """Write a small fake CIFAR-10 in the true on-disk format under ``root/cifar-10-batches-py``.

    Each of ``data_batch_1..5`` (``n_train_per_batch`` images) and ``test_batch`` (``n_test``) is a
    pickled dict with ``b"batch_label"``, ``b"labels"``, ``b"data"`` (uint8 ``[n, 3072]``, row-major
    CHW) and ``b"filenames"``; ``batches.meta`` holds the label names.  Pixel values are random.
    Returns the folder path.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{i}", f"training batch {i} of 5", n_train_per_batch) for i in range(1, 6)]
    names.append(("test_batch", "testing batch 1 of 1", n_test))
    for fname, label, n in names:
        batch = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"{fname}_{j:05d}.png".encode() for j in range(n)],
        }
        with (folder / fname).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"num_cases_per_batch": n_train_per_batch,
        b"label_names": [
            s.encode()
            for s in (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            )
        ],
        b"num_vis": 3072,
    }
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``cifar-10-batches-py`` (5 x 4 train images, 3 test images)."""
    root = tmp_path / "data"
    write_cifar10_folder(root, n_train_per_batch=4, n_test=3, seed=0)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine is 2 shared cores: one intra-op thread avoids oversubscription stalls in tests that
    start many tiny runs (used by test_run.py and test_study.py)."""
    saved, saved_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # an explicit choice: the runs' core sharing (bench.runtime.cores) keeps it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
    if saved_env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = saved_env


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An initialised, empty MLflow store, made once per session and only copied (creating its tables costs
    seconds, ~8 s of fsyncs on a busy disk; concurrent first use races)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store_template")
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments(max_results=1)
    return folder / "mlflow.db"


@pytest.fixture
def extractor_calls(monkeypatch) -> list[int]:
    """A spy on the digits feature extractor: the batch sizes it is called with (it still runs)."""
    import bench.metrics.extractors as extractors_mod

    seen: list[int] = []
    forward = extractors_mod.DigitsFeatureExtractor.forward

    def counting_forward(self, x: torch.Tensor):
        seen.append(int(x.shape[0]))
        return forward(self, x)

    monkeypatch.setattr(extractors_mod.DigitsFeatureExtractor, "forward", counting_forward)
    return seen


@pytest.fixture
def chromium() -> str:
    """The headless Chromium binary; the test skips without one (and fails under CI=true: tools.missing)."""
    from tools import need_chromium

    return need_chromium()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session (tests/postgres.py): ``create_database()``
    gives a fresh empty database's URL. Stopped and removed at the end; the tests skip, saying why, where
    no PostgreSQL server programs are installed (and fail under CI=true: tools.missing)."""
    from postgres import throwaway_cluster, unavailable
    from tools import missing

    why = unavailable()
    if why:
        missing(why)
    with throwaway_cluster() as cluster:
        yield cluster
