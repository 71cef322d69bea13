"""MLflow: where runs are stored, and the few calls the trainer makes (batched, by run id).

Embedded default: MLflow's SQLite store ``mlflow.db`` in BENCH_HOME (the working directory when
unset), artifacts in ``mlartifacts/`` beside it. Any MLflow tracking URI works instead
(``--tracking-uri`` or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError

HOME_ENV = "BENCH_HOME"


def bench_home() -> Path:
    """Where the embedded store, checkpoints and caches live: $BENCH_HOME, else the working directory."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd()).expanduser().resolve()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else ``sqlite:///<BENCH_HOME>/mlflow.db``."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{bench_home() / 'mlflow.db'}"


@contextmanager
def _quick_http():
    """Fail fast (no retries, short timeout) while checking that a server answers."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(uri: str | None = None):
    """An MlflowClient on the resolved URI, checked to answer before anything is written."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quick_http():
            c = MlflowClient(tracking_uri=uri)
            c.search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many types for a store it cannot reach
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot reach the MLflow tracking store {uri!r} ({first}); check --tracking-uri") from None
    return c


def experiment_id(c, name: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a local store) when missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:///"):
        location = (Path(c.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it in between: use theirs
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    """The source's git commit (with '-dirty' when changed), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "mlflow", "optuna", "torch-fidelity"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


class RunLogger:
    """Batched logging into one MLflow run."""

    def __init__(self, c, run_id: str):
        self.client, self.run_id = c, run_id

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def dataset(self, images, name: str, context: str) -> None:
        """The training data as an MLflow dataset input (a digest of the pixels, not a copy)."""
        import mlflow.data
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource({"loader": f"bench.data.load_dataset({name!r}, split={context!r})"})
        ds = mlflow.data.from_numpy(images.numpy(), source=source, name=f"{name}-{context}")
        inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception:  # two runs registering the same dataset at once: the second finds it on a retry
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, datasets=inputs)

    def image(self, array, key: str, step: int) -> None:
        self.client.log_image(self.run_id, array, key=key, step=step)

    def figure(self, fig, path: str) -> None:
        self.client.log_figure(self.run_id, fig, path)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
