"""Where a run came from: the user, the source and its git commit, the library versions, the machine's load.

The run's MLflow source tags (:func:`source_tags`), its ``version.*`` params (:func:`versions`) and MLflow's
``system/*`` metrics while it trains (:func:`system_metrics`).
"""

from __future__ import annotations

import getpass
import subprocess
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.tracking.store import quiet_logger


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


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: who ran it, from what, at which git commit (when known)."""
    from mlflow.utils import mlflow_tags  # heavy: mlflow loads only where a run is recorded

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {mlflow_tags.MLFLOW_USER: user, mlflow_tags.MLFLOW_SOURCE_NAME: "elbo-bench",
            mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags["git_dirty"] = str(commit.endswith("-dirty")).lower()  # uncommitted changes to tracked files
    return tags


@contextmanager
def system_metrics(uri: str, run_id: str, resume: bool = False):
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, and per GPU
    utilisation and memory through NVML) for the run while the block runs, sampled every 10 s
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` changes it). Stopped before the run is closed."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # heavy: as above

    with quiet_logger("mlflow.system_metrics"):  # its start and stop notices, at every run
        monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        try:
            yield monitor
        finally:
            monitor.finish()


def versions() -> dict[str, str]:
    """``version.<package>`` of torch, mlflow, optuna and torch-fidelity ("not installed" when missing)."""
    out = {}
    for pkg in ("torch", "mlflow", "optuna", "torch-fidelity"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out
