"""Faults and bad input end a command in one line (``error: …``), exit status 2, no traceback, and nothing
half-written: a full disk during a run (the run is FAILED and resumes), values too large to allocate, a
checkpoint whose config or weights do not fit, a samples file whose member is a raw pickle. A refused
command creates no MLflow store and prints no MLflow log lines before its error."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import bench.training.checkpoint as checkpoint_mod
from bench.cli.main import cli
from bench.nets.unet import build_network
from bench.training.checkpoint import load_checkpoint, save_checkpoint
from bench.training.config import RunConfig
from variants import get_variant

REPO = Path(__file__).resolve().parents[1]
TINY = ["--T", "40", "--batch-size", "16", "--log-every", "2", "--eval-every", "0", "--checkpoint-every", "2",
        "--final-eval", "estimate", "--final-eval-images", "8", "--eval-calls", "3", "--sample-grid", "4",
        "--sample-steps", "10", "--fid-samples", "0", "--no-system-metrics", "--no-log-model", "--experiment", "faults"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "BENCH_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def refused(home: Path, *args) -> str:
    """``bench ARGS`` in a fresh process under BENCH_HOME=home: it must exit 2 with one line on stderr, no
    traceback and no MLflow store. Returns that line."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    env.update(BENCH_HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "bench", *map(str, args)], env=env, cwd=home, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "INFO" not in done.stdout + done.stderr
    assert not (home / "mlflow.db").exists()
    return done.stderr.strip()


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_during_a_run_is_one_line_the_run_failed_and_it_resumes(home, monkeypatch, store_template):
    shutil.copyfile(store_template, home / "mlflow.db")
    saves = []
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):  # the first checkpoint (step 2) fits, the second does not
        saves.append(getattr(f, "name", f))
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", disk_fills_up)
    res = CliRunner().invoke(cli, ["run", "--steps", "4", *TINY])
    assert res.exit_code == 2, res.output
    [ckpt] = home.glob("checkpoints/*/last.pt")
    assert "Traceback" not in res.stderr
    [line] = [line for line in res.stderr.splitlines() if "error" in line.lower()]  # after the progress bars
    assert line == res.stderr.splitlines()[-1]
    assert line.startswith(f"error: cannot write {ckpt}: no space left on device (")
    assert line.endswith(" free there); free some space (the previous file is intact), then resume")
    assert not list(ckpt.parent.glob(".*.tmp"))  # the temp file of the failed write is gone
    assert load_checkpoint(ckpt)["step"] == 2
    c = MlflowClient(f"sqlite:///{home}/mlflow.db")
    [run] = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FAILED" and "no space left on device" in run.data.tags["failure_reason"]
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    res = CliRunner().invoke(cli, ["run", "--resume", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert c.get_run(run.info.run_id).info.status == "FINISHED"
    assert load_checkpoint(ckpt)["step"] == 4


# ----------------------------------------------------------------------------- values too large
@pytest.mark.parametrize("args, message", [
    (["--T", "100000000000", "--dry-run"], "error: T must be at most 100,000, got 100,000,000,000"),
    (["--T", "1e11", "--dry-run"], "error: Invalid value for '--T': '1e11' is not a valid integer."),
    (["--batch-size", "1000000000"], "error: batch_size must be at most 65,536, got 1,000,000,000"),
    (["--batch-size", "1e9"], "error: Invalid value for '--batch-size': '1e9' is not a valid integer."),
    (["--fid-samples", "10000000000"], "error: fid_samples must be at most 1,000,000, got 10,000,000,000"),
])
def test_values_too_large_to_allocate_are_refused_up_front(home, args, message):
    assert refused(home, "run", *args).startswith(message)


# ----------------------------------------------------------------------------- checkpoints that do not fit
def _checkpoint(home: Path, config: dict, weights: dict) -> Path:
    """A checkpoint as `bench run` writes it, with the given config and weights."""
    return save_checkpoint(home / "bad" / "last.pt", {
        "config": config, "step": 2, "model": weights, "ema": weights, "optimizer": {}, "rng": {},
        "run_id": "0" * 32, "tracking_uri": f"sqlite:///{home}/mlflow.db"})


def test_a_checkpoint_whose_config_has_an_unknown_key_is_refused_in_one_line(home):
    config = {**RunConfig(T=40).to_dict(), "warp_drive": True}
    net = build_network("tiny", 1, 1, 8)
    path = _checkpoint(home, config, net.state_dict())
    for args in (["eval", path], ["run", "--resume", path]):
        assert refused(home, *args) == (f"error: checkpoint {path}: its config has unknown key(s) warp_drive; it was "
                                        "written by another version of elbo-bench or altered, so it cannot be read as "
                                        "a RunConfig")


def test_a_checkpoint_whose_weights_have_other_shapes_is_refused_in_one_line(home):
    config = RunConfig(T=40, sample_steps=10, variant="simple", fid_samples=0, final_eval="estimate", eval_calls=3,
                       final_eval_images=8).to_dict()
    net = build_network("tiny", 1, get_variant("hybrid").out_channels(1), 8)  # 2 output channels, simple has 1
    path = _checkpoint(home, config, net.state_dict())
    for args, what in ((["eval", path], "EMA weights"), (["run", "--resume", path], "weights")):
        line = refused(home, *args)
        assert line.startswith(f"error: the checkpoint's {what} do not fit the network its config builds (")
        assert "size mismatch for conv_out.weight" in line


# ----------------------------------------------------------------------------- a samples file holding a pickle
def test_a_samples_file_whose_member_is_a_raw_pickle_is_refused_in_one_line(home):
    path = home / "planted.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("samples.npy", pickle.dumps({"not": "an array"}))
    assert refused(home, "fid", path, "--dataset", "digits") == (
        f"error: samples file {path}: 'samples' is not a numpy array (raw bytes: a pickle, say); refusing it")
