"""End-to-end tests of ``bench run`` / ``bench eval`` / ``bench variants`` through the real CLI.

Every run is tiny (T = 40, a handful of steps, 8 test images) and writes only under pytest's
``tmp_path`` (``BENCH_HOME``); MLflow is read back from the embedded SQLite store there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli.main import cli
from bench.training.config import make_config

BENCH = Path(sys.executable).with_name("bench")
EXPERIMENT = "elbo-bench"
STEPS = 6
LOG_EVERY = 2
EVAL_EVERY = 4
T = 40
TINY = [
    "--T", str(T), "--steps", str(STEPS), "--batch-size", "16", "--log-every", str(LOG_EVERY),
    "--eval-every", str(EVAL_EVERY), "--eval-images", "8", "--final-eval-images", "8", "--fid-samples", "0",
    "--sample-steps", "10", "--no-log-model",  # the LoggedModel's export takes seconds: logged where it is checked
]
WITH_MODEL = [*TINY, "--log-model"]
VARIANT_NAMES = {"simple", "elbo", "hybrid", "elbo-learned", "elbo-learned-diag", "mu-elbo", "mu-elbo-learned-diag",
                 "mu-mse", "vdm", "vdm-fixed", "vdm-finite", "weighted"}
RUN_LINE = re.compile(r"^run ([0-9a-f]{32}): (FINISHED|FAILED|KILLED) at step (\d+)$", re.M)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)




@pytest.fixture
def home(tmp_path, store_template) -> Path:
    """BENCH_HOME with an existing (empty) embedded store, as after a first run."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return tmp_path


def invoke(home: Path, args: list[str], **kwargs):
    """``bench <args>`` in-process with BENCH_HOME=home and no ambient MLflow URI."""
    env = {"BENCH_HOME": str(home), "MLFLOW_TRACKING_URI": None, "BENCH_DATA_DIR": None}
    return CliRunner().invoke(cli, args, env=env, **kwargs)


def describe(result) -> str:
    import traceback

    tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info and result.exception else ""
    return f"exit {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-3000:]}\n{tb}"


def said(name: str, value: float, stdout: str) -> bool:
    """Whether the summary's row ``name`` gives ``value`` (to 4 decimals)."""
    return re.search(rf"^ *{re.escape(name)} +{value:.4f}( |$)", stdout, re.M) is not None


def run_ok(home: Path, args: list[str], exit_code: int = 0) -> tuple[str, object]:
    """Run ``bench run <args>``; expect ``exit_code`` (0: success); return (run id, click result)."""
    result = invoke(home, ["run", *args])
    assert result.exit_code == exit_code, describe(result)
    m = RUN_LINE.search(result.stdout)
    assert m, describe(result)
    return m.group(1), result


def client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")


def experiment_runs(home: Path):
    c = client(home)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def count_run_rows(home: Path) -> int:
    """Run rows in the embedded store (0 when no store was created)."""
    db = home / "mlflow.db"
    if not db.exists():
        return 0
    with closing(sqlite3.connect(db)) as con:
        try:
            return con.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def bench_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "BENCH_DATA_DIR")}
    env["BENCH_HOME"] = str(home)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_for_interrupt(proc, stderr_file: Path, timeout: float = 60) -> int:
    """Wait for the run to stop after SIGINT.  A SIGINT that lands while the interpreter runs a
    weakref/GC callback is swallowed ("Exception ignored in ... KeyboardInterrupt", a known weakness
    reported separately); then the signal is sent again so this test checks the KILLED/resume path."""
    started = time.monotonic()
    resent = 0
    while time.monotonic() - started < timeout:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        text = stderr_file.read_text(errors="replace")
        if "interrupted" in text.splitlines():
            continue  # the handler runs: checkpoint, tags, KILLED
        swallowed = text.count("Exception ignored") > resent and "KeyboardInterrupt" in text
        if swallowed or (resent == 0 and time.monotonic() - started > 15):
            resent += 1
            proc.send_signal(signal.SIGINT)
    raise AssertionError(f"bench run did not stop within {timeout}s of SIGINT")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny finished digits run shared by the read-only checks."""
    home = tmp_path_factory.mktemp("tiny_home")
    run_id, result = run_ok(home, WITH_MODEL)
    return home, run_id, result


# ----------------------------------------------------------------------------- 1. end to end
def test_run_end_to_end_records_everything(tiny_run):
    from mlflow.artifacts import download_artifacts

    from bench.nets.unet import build_network, count_parameters

    home, run_id, result = tiny_run
    assert f"run {run_id}: FINISHED at step {STEPS}" in result.stdout
    assert f"checkpoints/{run_id}/last.pt" in result.stdout

    c = client(home)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in experiment_runs(home)] == [run_id]

    p = run.data.params
    assert p["config.variant"] == "simple"
    assert p["config.seed"] == "0"
    assert p["config.T"] == str(T)
    assert p["config.steps"] == str(STEPS)
    assert p["variant.mean_type"] == "eps"
    assert p["variant.var_type"] == "fixed_small"
    assert p["schedule.kind"] == "linear"
    assert int(p["network.parameters"]) == count_parameters(build_network("tiny", 1, 1, 8)) > 0
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", p["code_version"]), p["code_version"]
    assert p["version.torch"] == version("torch")
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == p["code_version"].removesuffix("-dirty")
    assert tags["mlflow.source.name"] == "elbo-bench" and tags["mlflow.user"]
    note = tags["mlflow.note.content"]  # the run's description: what was trained, how it was measured, the result
    assert note.startswith("**simple[small]** trained on **digits**") and f"{STEPS} steps of AdamW" in note
    assert "exact bound" in note and "8 test images" in note and "No FID" in note
    assert note.count("**Result**") == 1 and f"at step {STEPS}, bpd " in note

    loss = history(c, run_id, "loss")
    assert [s for s, _ in loss] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert len(loss) == STEPS // LOG_EVERY
    assert all(math.isfinite(v) and v > 0 for _, v in loss)
    # for L_simple the objective is the ε-MSE itself
    assert [v for _, v in history(c, run_id, "loss/mse")] == pytest.approx([v for _, v in loss], rel=1e-9)
    # the loss by quarter of t: each quarter's mean, and together they average to the loss
    quarters = [dict(history(c, run_id, f"loss_q{q}")) for q in range(4)]
    for step, value in loss:
        present = [qs[step] for qs in quarters if step in qs]
        assert present and min(present) <= value <= max(present)
    ips = history(c, run_id, "images_per_sec")
    assert [s for s, _ in ips] == [s for s, _ in loss] and all(v > 0 for _, v in ips)

    final = {k: dict(history(c, run_id, k))[STEPS] for k in ("bpd", "bpd/prior", "bpd/vb", "bpd/decoder")}
    assert all(math.isfinite(v) for v in final.values())
    assert final["bpd"] == pytest.approx(final["bpd/prior"] + final["bpd/vb"] + final["bpd/decoder"], abs=1e-6)
    assert said("bpd", final["bpd"], result.stdout)
    assert sorted(s for s, _ in history(c, run_id, "bpd")) == [STEPS]  # `bpd` is the final number only
    assert sorted(s for s, _ in history(c, run_id, "bpd_estimate")) == [EVAL_EVERY]  # the training-time estimate
    assert "bpd_stderr" not in run.data.metrics  # the final bound is exact: no Monte Carlo error
    stderr_hist = history(c, run_id, "bpd_estimate_stderr")
    assert [s for s, _ in stderr_hist] == [EVAL_EVERY]
    assert stderr_hist[0][1] > 0 and math.isfinite(stderr_hist[0][1])
    assert dict(history(c, run_id, "bpd_estimate_images")) == {EVAL_EVERY: 8}
    assert run.data.tags["bpd_method"].startswith(f"exact (all {T} t, 8 test images); "), run.data.tags["bpd_method"]
    assert "bpd_unclipped" in run.data.tags["bpd_method"]
    # both conventions from the same network calls: the clipped protocol and the unclipped bound
    unclipped = {k: dict(history(c, run_id, k))[STEPS] for k in ("bpd_unclipped", "bpd_unclipped/vb",
                                                                 "bpd_unclipped/decoder", "bpd_unclipped/prior")}
    assert unclipped["bpd_unclipped/prior"] == final["bpd/prior"]
    assert unclipped["bpd_unclipped"] == pytest.approx(
        unclipped["bpd_unclipped/prior"] + unclipped["bpd_unclipped/vb"] + unclipped["bpd_unclipped/decoder"], abs=1e-6)
    assert unclipped["bpd_unclipped"] != final["bpd"]  # an untrained model's x̂_0 leaves [-1, 1]

    # artifacts
    names = {f.path for f in c.list_artifacts(run_id)}
    assert {"config.json", "per_t_bound.png", "per_t_bound.json", "images", "per_t_estimate"} <= names
    # the model is a LoggedModel of its own (test_the_ema_network_is_an_mlflow_3_logged_model)
    assert "model" not in names
    assert "checkpoints" not in names  # one copy of the checkpoint: in checkpoints/, named by the run's tag
    assert run.data.tags["checkpoint"] == str(home / "checkpoints" / run_id / "last.pt")
    dl = Path(download_artifacts(run_id=run_id, artifact_path="", dst_path=str(home / "dl"),
                                 tracking_uri=f"sqlite:///{home}/mlflow.db"))
    logged_config = json.loads((dl / "config.json").read_text())
    dry = invoke(home, ["run", *WITH_MODEL, "--dry-run"])
    assert dry.exit_code == 0, describe(dry)
    assert logged_config == json.loads(dry.stdout)
    assert make_config(**logged_config).to_dict() == logged_config  # round-trips to a RunConfig
    per_t = json.loads((dl / "per_t_bound.json").read_text())
    assert per_t["t"] == list(range(1, T + 1))
    assert len(per_t["L_t_bits_per_dim"]) == T
    # the curve is the bound's decoder + Σ L_{t-1}; adding the prior gives the total
    assert sum(per_t["L_t_bits_per_dim"]) + final["bpd/prior"] == pytest.approx(final["bpd"], rel=1e-6)
    assert (sum(per_t["L_t_bits_per_dim_unclipped"]) + final["bpd/prior"]
            == pytest.approx(unclipped["bpd_unclipped"], rel=1e-6))
    assert (dl / "per_t_bound.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(run.data.tags["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["run_id"] == run_id and ckpt["config"] == logged_config
    # the training-time estimate's per-t curve, binned by its strata
    est = json.loads((dl / "per_t_estimate" / f"step_{EVAL_EVERY:08d}.json").read_text())
    assert est["t_from"][0] == 1 and est["t_to"][-1] == T and len(est["t_from"]) == len(est["L_t_bits_per_dim_mean"])
    assert all(a == b + 1 for a, b in zip(est["t_from"][1:], est["t_to"][:-1]))  # the bins tile 1..T
    # MLflow 3 log_image(key=, step=) writes images/<key>+step+<step>+timestamp+…(.png|+compressed.webp)
    images = sorted(p.name for p in (dl / "images").iterdir())
    steps_logged = {int(m.group(1)) for n in images if (m := re.match(r"samples\+step\+(\d+)\+.*\.png$", n))}
    assert steps_logged == {EVAL_EVERY, STEPS}, images
    assert run.data.tags.get("mlflow.loggedImages") == "True"

    # the training data is recorded as a dataset input
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "digits-train"
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "train"
    assert inputs[0].dataset.digest


# ----------------------------------------------------------------------------- 2. FID
def test_the_ema_network_is_an_mlflow_3_logged_model(tiny_run, monkeypatch):
    """Issue 19, item 4: the EMA network was a pickled artifact folder of the run. It is a LoggedModel (the Models
    tab lists it with the run's final metrics linked), saved by torch.export, so it loads with pickle refused and
    computes what the checkpoint's EMA network computes."""
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from bench.nets.ema import ema_weights
    from bench.nets.unet import build_network

    home, run_id, _ = tiny_run
    c = client(home)
    run = c.get_run(run_id)
    (model,) = c.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.model_id == run.data.tags["model_id"] and model.source_run_id == run_id and model.name == "model"
    assert str(model.status).endswith("READY")
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, STEPS)]  # the run page's list
    linked = {m.key: m.value for m in model.metrics}
    assert {"bpd", "bpd/vb", "bpd_unclipped", "loss"} <= set(linked) and linked["bpd"] == run.data.metrics["bpd"]
    assert all(m.step == STEPS and m.run_id == run_id for m in model.metrics)
    assert model.params["config.T"] == str(T)
    assert len(history(c, run_id, "bpd")) == 1  # linking added nothing to the run's history

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a pickled model would be refused
    (home / "model_dl").mkdir()
    with _use_tracking_uri(f"sqlite:///{home}/mlflow.db"):
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}", dst_path=str(home / "model_dl"))
    ckpt = torch.load(run.data.tags["checkpoint"], map_location="cpu", weights_only=True)
    ema = build_network("tiny", 1, 1, 8)
    ema.load_state_dict(ema_weights(ckpt["ema"]))
    x, t = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 3, 7, 20, T - 1])
    with torch.no_grad():
        expected = ema.eval()(x, t)
        assert torch.allclose(loaded(x, t), expected, rtol=1e-5, atol=1e-6)  # any batch size: not the traced one
        assert torch.allclose(loaded(x[:1], t[:1]), expected[:1], rtol=1e-5, atol=1e-6)
    assert not list((home / "model_dl").rglob("*.pkl")) and list((home / "model_dl").rglob("*.pt2"))


def test_run_with_fid_logs_fid_and_its_provenance(home):
    run_id, result = run_ok(home, [*TINY, "--fid-samples", "64"])
    c = client(home)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    fid = dict(history(c, run_id, "fid"))
    assert list(fid) == [STEPS]
    assert math.isfinite(fid[STEPS]) and fid[STEPS] >= 0
    assert said("fid", fid[STEPS], result.stdout)
    tags = run.data.tags
    assert tags["fid_extractor"].startswith("digits-classifier"), tags
    assert tags["fid_samples"] == "64"
    assert "10" in tags["fid_sampler"] and str(T) in tags["fid_sampler"], tags["fid_sampler"]
    assert "fid_skipped" not in tags
    # the reference points at the run's sample count, and the scored samples saved to be re-scored
    metrics = run.data.metrics
    assert 0 <= metrics["fid_ref_test"] < metrics["fid_ref_noise"], metrics
    assert tags["fid_ref_test_samples"] == "64"
    from mlflow.artifacts import download_artifacts

    from bench.metrics.samples import load_samples

    path = download_artifacts(run_id=run_id, artifact_path="samples/fid_samples.npz", dst_path=str(home / "dl"),
                              tracking_uri=f"sqlite:///{home}/mlflow.db")
    saved = load_samples(path)
    assert saved.shape == (64, 1, 8, 8) and saved.dtype == torch.uint8
    rescored = invoke(home, ["fid", path])  # the file records its dataset
    assert rescored.exit_code == 0, describe(rescored)
    assert f"{fid[STEPS]:.4f}" in rescored.stdout  # the same samples, the same FID


# ----------------------------------------------------------------------------- 3. reproducibility
def test_same_config_and_seed_reproduce_loss_and_bpd(tiny_run, home):
    first_home, first_id, _ = tiny_run  # another store, another process state (RNG already used)
    second_id, _ = run_ok(home, TINY)
    a, b = client(first_home), client(home)
    for key in ("loss", "bpd", "bpd/vb", "bpd_unclipped", "bpd_estimate", "bpd_estimate_stderr"):
        assert history(a, first_id, key) == history(b, second_id, key), key
    # a different seed gives a different run (the comparison above can fail)
    third_id, _ = run_ok(home, [*TINY, "--seed", "1"])
    assert history(b, third_id, "loss")[-1] != history(a, first_id, "loss")[-1]


# ----------------------------------------------------------------------------- 4. interrupt + resume
def test_sigint_marks_run_killed_and_resume_continues_it(home):
    args = [*TINY, "--steps", "400", "--checkpoint-every", "5", "--eval-every", "0"]
    out, err = (home / "stdout.txt").open("wb"), (home / "stderr.txt").open("wb")
    proc = subprocess.Popen([str(BENCH), "run", *args], cwd=home, env=bench_env(home), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        found: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((home / "checkpoints").glob("*/last.pt"))
            if found:
                break
            time.sleep(0.05)
        assert found, f"no checkpoint appeared (exit {proc.poll()}): {(home / 'stderr.txt').read_text()[-2000:]}"
        proc.send_signal(signal.SIGINT)
        rc = _wait_for_interrupt(proc, home / "stderr.txt")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
    stderr = (home / "stderr.txt").read_text()
    assert rc == 130, stderr[-3000:]
    assert "interrupted" in stderr.splitlines(), stderr[-2000:]

    ckpt_path = found[0]
    run_id = ckpt_path.parent.name
    c = client(home)
    run = c.get_run(run_id)
    assert run.info.status == "KILLED"
    stopped = int(run.data.tags["interrupted_at_step"])
    assert 5 <= stopped < 400
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["step"] == stopped and ckpt["run_id"] == run_id

    k = stopped + 3
    result = invoke(home, ["run", "--resume", str(ckpt_path), "--steps", str(k)])
    assert result.exit_code == 0, describe(result)
    assert f"run {run_id}: FINISHED at step {k}" in result.stdout
    runs = experiment_runs(home)
    assert [r.info.run_id for r in runs] == [run_id]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss = history(c, run_id, "loss")
    assert loss[-1][0] == k
    assert [s for s, _ in loss] == sorted(set(s for s, _ in loss))  # no step logged twice
    assert dict(history(c, run_id, "bpd"))[k] > 0
    assert torch.load(ckpt_path, map_location="cpu", weights_only=True)["step"] == k


# ----------------------------------------------------------------------------- 4b. exact resume
RESUME_ARGS = [
    "--T", str(T), "--batch-size", "16", "--log-every", "2", "--eval-every", "0", "--eval-images", "8",
    "--final-eval-images", "8", "--fid-samples", "0", "--sample-steps", "10", "--checkpoint-every", "100",
    "--no-log-model",  # weights and bpd are compared, not the model
]
RESUME_TO = 8


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store_template):
    """The reference: the same run trained straight through to RESUME_TO steps."""
    home = tmp_path_factory.mktemp("uninterrupted")
    shutil.copyfile(store_template, home / "mlflow.db")
    run_id, _ = run_ok(home, [*RESUME_ARGS, "--steps", str(RESUME_TO)])
    state = torch.load(home / "checkpoints" / run_id / "last.pt", map_location="cpu", weights_only=True)
    return state, client(home).get_run(run_id).data.metrics["bpd"]


def _interrupt_then_resume(home: Path, monkeypatch, arm) -> tuple[dict, float, int]:
    """Start a 400-step run, raise KeyboardInterrupt where ``arm`` says, resume to RESUME_TO steps."""
    with monkeypatch.context() as m:
        arm(m)
        result = invoke(home, ["run", *RESUME_ARGS, "--steps", "400"])
    assert result.exit_code == 130, describe(result)
    assert result.stderr.splitlines()[-1] == "interrupted"
    (ckpt,) = list((home / "checkpoints").glob("*/last.pt"))
    c = client(home)
    run = c.get_run(ckpt.parent.name)
    assert run.info.status == "KILLED"
    stopped = int(run.data.tags["interrupted_at_step"])
    resumed = invoke(home, ["run", "--resume", str(ckpt), "--steps", str(RESUME_TO)])
    assert resumed.exit_code == 0, describe(resumed)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == RESUME_TO
    return state, c.get_run(ckpt.parent.name).data.metrics["bpd"], stopped


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_an_interrupt_between_steps_equals_the_uninterrupted_run(home, monkeypatch, uninterrupted):
    import bench.tracking.logger

    real = bench.tracking.logger.RunLogger.metrics

    def metrics(self, values, step):
        if step == 4 and "loss" in values:  # step 4 is complete; Ctrl-C lands while it is logged
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, values, step)

    state, bpd, stopped = _interrupt_then_resume(
        home, monkeypatch, lambda m: m.setattr(bench.tracking.logger.RunLogger, "metrics", metrics))
    assert stopped == 4
    assert _same_weights(state["ema"], uninterrupted[0]["ema"])
    assert _same_weights(state["model"], uninterrupted[0]["model"])
    assert bpd == uninterrupted[1]


def test_resume_after_an_interrupt_inside_a_step_equals_the_uninterrupted_run(home, monkeypatch, uninterrupted):
    from variants import get_variant

    cls = type(get_variant("simple"))
    real = cls.loss
    calls = []

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # step 4's batch and noise are drawn; Ctrl-C lands before its update
            os.kill(os.getpid(), signal.SIGINT)  # deferred: step 4 completes, then the run stops
        return out

    state, bpd, stopped = _interrupt_then_resume(home, monkeypatch, lambda m: m.setattr(cls, "loss", loss))
    assert stopped == 4
    assert _same_weights(state["ema"], uninterrupted[0]["ema"])
    assert bpd == uninterrupted[1]


def test_a_checkpoint_from_before_averagedmodel_and_lambdalr_resumes_the_same(home, monkeypatch, uninterrupted):
    """Checkpoints written before the EMA was an AveragedModel, the warmup a LambdaLR and the logging window
    saved (a bare EMA state dict, no ``lr_schedule``, no ``window``) resume to the same weights and bound."""
    import bench.tracking.logger

    real = bench.tracking.logger.RunLogger.metrics

    def metrics(self, values, step):
        if step == 4 and "loss" in values:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, values, step)

    with monkeypatch.context() as m:
        m.setattr(bench.tracking.logger.RunLogger, "metrics", metrics)
        assert invoke(home, ["run", *RESUME_ARGS, "--steps", "400"]).exit_code == 130
    (ckpt,) = list((home / "checkpoints").glob("*/last.pt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["ema"]["n_averaged"].item() == 5  # the initial weights, then 4 updates
    state["ema"] = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    del state["lr_schedule"], state["window"]
    for group in state["optimizer"]["param_groups"]:
        group.pop("initial_lr")
    torch.save(state, ckpt)
    resumed = invoke(home, ["run", "--resume", str(ckpt), "--steps", str(RESUME_TO)])
    assert resumed.exit_code == 0, describe(resumed)
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert _same_weights(after["ema"], uninterrupted[0]["ema"])
    assert _same_weights(after["model"], uninterrupted[0]["model"])
    assert client(home).get_run(ckpt.parent.name).data.metrics["bpd"] == uninterrupted[1]


WINDOW_ARGS = ["--T", str(T), "--batch-size", "16", "--log-every", "5", "--checkpoint-every", "7", "--steps", "20",
               "--eval-every", "0", "--final-eval-images", "8", "--fid-samples", "0", "--sample-steps", "10",
               "--no-log-model"]


def test_a_resume_logs_the_same_loss_windows_as_the_uninterrupted_run(home, tmp_path_factory, store_template,
                                                                      monkeypatch):
    """--checkpoint-every 7, --log-every 5: a run that dies at step 9 resumes from its step-7 checkpoint, and its
    step-10 window still averages steps 6..10 (6 and 7 come from the checkpoint); every logged loss, loss term
    and loss quarter equals the uninterrupted run's."""
    from variants import get_variant

    straight = tmp_path_factory.mktemp("straight")
    shutil.copyfile(store_template, straight / "mlflow.db")
    straight_id, _ = run_ok(straight, WINDOW_ARGS)
    cls = type(get_variant("simple"))
    real, calls = cls.loss, []

    def dies_at_step_9(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # after the checkpoint at 7, before the window of 6..10 is logged
            raise RuntimeError("the machine went away")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(cls, "loss", dies_at_step_9)
        assert invoke(home, ["run", *WINDOW_ARGS]).exit_code != 0
    (ckpt,) = list((home / "checkpoints").glob("*/last.pt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 7
    resumed = invoke(home, ["run", "--resume", str(ckpt)])
    assert resumed.exit_code == 0, describe(resumed)
    a, b = client(straight), client(home)
    keys = sorted(k for k in a.get_run(straight_id).data.metrics if k.startswith("loss"))
    assert {"loss", "loss_q0", "loss_q3"} <= set(keys)
    for key in keys:
        assert history(b, ckpt.parent.name, key) == history(a, straight_id, key), key
    assert [s for s, _ in history(b, ckpt.parent.name, "loss")] == [5, 10, 15, 20]


def test_resume_without_steps_continues_to_the_runs_own_target(home, monkeypatch):
    import bench.training.run

    seen = {}

    def spy(state, model, ema_model, ctx, *rest):
        seen["steps"] = ctx.config.steps
        raise RuntimeError("stop: only the resolved config is under test")

    run_id, _ = run_ok(home, TINY)  # configured for, and finished at, STEPS
    client(home).set_terminated(run_id, "KILLED")  # as if it had been interrupted (a FINISHED run is not resumed)
    ckpt = home / "checkpoints" / run_id / "last.pt"
    monkeypatch.setattr(bench.training.run, "training_loop", spy)
    invoke(home, ["run", "--resume", str(ckpt)])
    assert seen["steps"] == STEPS  # observed: 3000, the digits default of a flag that was not given


# ----------------------------------------------------------------------------- 5. divergence
def test_non_finite_loss_ends_the_run_failed_not_crashed(home):
    run_id, result = run_ok(home, [*TINY, "--lr", "1e30"], exit_code=3)  # a script can tell it diverged
    assert "diverged" in result.stdout
    m = RUN_LINE.search(result.stdout)
    assert m.group(2) == "FAILED"
    c = client(home)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["diverged"] == "true"
    assert "non-finite" in tags["failure_reason"]
    assert re.fullmatch(r"\d+", tags["failure_step"]) and tags["failure_step"] == m.group(3)
    assert 0 <= int(tags["failure_step"]) < STEPS
    assert "bpd" not in run.data.metrics  # no evaluation of a diverged model
    assert not list((home / "checkpoints").glob("*/last.pt"))


# ----------------------------------------------------------------------------- 6. bench eval
def test_eval_prints_bpd_and_logs_into_the_run(home):
    run_id, result = run_ok(home, TINY)
    c = client(home)
    logged_bpd = dict(history(c, run_id, "bpd"))[STEPS]
    ckpt = home / "checkpoints" / run_id / "last.pt"

    plain = invoke(home, ["eval", str(ckpt)])
    assert plain.exit_code == 0, describe(plain)
    # the same exact bound on the same EMA weights, images and evaluation noise
    assert said("bpd", logged_bpd, plain.stdout)
    assert "logged into run" not in plain.stdout
    assert len(history(c, run_id, "bpd")) == 1  # nothing was logged

    again = invoke(home, ["eval", str(ckpt), "--log-to-run"])  # the run's own method: bpd is extended
    assert again.exit_code == 0 and "logged as" not in again.stdout, describe(again)
    assert history(c, run_id, "bpd") == [(STEPS, logged_bpd)] * 2
    assert [r.info.run_id for r in experiment_runs(home)] == [run_id]


def test_eval_by_the_other_method_logs_under_its_own_name_and_keeps_the_headline(home):
    """Issue 18, item 9: an exact run re-evaluated with `--nll ode --final-eval estimate --log-to-run` kept its bpd
    history as [exact, estimate] at one step, flipped bpd_method to the estimate and was reported as an exact row
    with a Monte Carlo error. The estimate goes under its own name; bpd, bpd_method and the Result stay."""
    from reports.tables import comparison_table, deduplicate, display_table, load_runs

    run_id, _ = run_ok(home, [*WITH_MODEL, "--eval-every", "0"])
    c = client(home)
    before = c.get_run(run_id).data
    ckpt = home / "checkpoints" / run_id / "last.pt"
    logged = invoke(home, ["eval", str(ckpt), "--nll", "ode", "--final-eval", "estimate", "--log-to-run"])
    assert logged.exit_code == 0, describe(logged)
    assert "this bound is logged as bpd_eval_estimate" in logged.stdout
    after = c.get_run(run_id).data
    assert history(c, run_id, "bpd") == [(STEPS, before.metrics["bpd"])]
    assert after.tags["bpd_method"] == before.tags["bpd_method"] and before.tags["bpd_method"].startswith("exact")
    assert after.tags["bpd_rounded"] == f"{before.metrics['bpd']:.4f} bits/dim (exact)"  # for the runs table
    assert after.tags["bpd_eval_estimate_rounded"] == (f"{after.metrics['bpd_eval_estimate']:.4f} ± "
                                                       f"{after.metrics['bpd_eval_estimate_stderr']:.4f} "
                                                       "bits/dim (estimate)")
    assert "bpd_stderr" not in after.metrics
    estimate = after.metrics["bpd_eval_estimate"]
    assert [s for s, _ in history(c, run_id, "bpd_eval_estimate")] == [STEPS] and estimate != before.metrics["bpd"]
    assert after.metrics["bpd_eval_estimate_stderr"] > 0 and said("bpd_eval_estimate", estimate, logged.stdout)
    assert after.tags["bpd_eval_estimate_method"].startswith("estimate (33 calls/image, 8 test images)")
    note = after.tags["mlflow.note.content"]
    result = note.split("**Result**: ")[1].split("\n\n")[0]
    assert f"bpd {before.metrics['bpd']:.4f}, exact" in result and "estimate" not in result
    assert f"**Re-evaluation (estimate)**: at step {STEPS}, bpd_eval_estimate {estimate:.4f} ± " in note
    shown, _ = display_table(comparison_table(deduplicate(load_runs(c, [EXPERIMENT]))[0]))
    assert shown["bpd"].iloc[0] == f"{before.metrics['bpd']:.4f} (n=1) ★"  # exact: no Monte Carlo error
    assert shown["bpd_method"].iloc[0].startswith("exact")


def _sample_grids(c, run_id: str) -> list[str]:
    return [f.path for f in c.list_artifacts(run_id, "images")]


def test_eval_options_take_effect_and_a_subset_never_overwrites_the_runs_bpd(home):
    """Issue 19, item 3: `bench eval` took neither the number of test images nor the estimate's calls, drew a sample
    grid with --fid-samples 0, and did not say what it computed. A bound on fewer images than the run's bpd goes under
    a name that says so, whichever the method; the run's bpd, its history and its method stay."""
    run_id, _ = run_ok(home, [*WITH_MODEL, "--eval-every", "0"])
    c = client(home)
    before, grids = c.get_run(run_id).data, _sample_grids(c, run_id)
    assert before.tags["bpd_images"] == "8"
    ckpt = home / "checkpoints" / run_id / "last.pt"
    cheap = invoke(home, ["eval", str(ckpt), "--final-eval", "estimate", "--final-eval-images", "4",
                          "--eval-calls", "5", "--fid-samples", "0", "--log-to-run"])
    assert cheap.exit_code == 0, describe(cheap)
    plan = cheap.stdout.split("\n")
    assert plan[0] == f"evaluating the EMA weights of run {run_id} at step {STEPS} on cpu:"
    assert plan[1] == ("  bound      estimate (5 network calls per image) on 4 of 297 test images, "
                       "as bpd_eval_estimate_4images")
    assert plan[2] == "  samples    none (no FID, no grid)"
    after = c.get_run(run_id).data
    assert after.tags["bpd_eval_estimate_4images_method"].startswith("estimate (5 calls/image, 4 test images)")
    assert (after.tags["bpd_eval_estimate_4images_images"] == "4"
            and after.metrics["bpd_eval_estimate_4images_stderr"] > 0)
    same_method = invoke(home, ["eval", str(ckpt), "--final-eval-images", "4", "--fid-samples", "0", "--log-to-run"])
    assert same_method.exit_code == 0, describe(same_method)
    assert "exact (all 40 t) on 4 of 297 test images, as bpd_eval_exact_4images" in same_method.stdout
    after = c.get_run(run_id).data
    assert after.tags["bpd_eval_exact_4images_method"].startswith("exact (all 40 t, 4 test images)")
    assert history(c, run_id, "bpd") == [(STEPS, before.metrics["bpd"])]  # the run's own number, alone
    assert after.tags["bpd_method"] == before.tags["bpd_method"] and after.tags["bpd_images"] == "8"
    assert _sample_grids(c, run_id) == grids  # --fid-samples 0: no samples, no grid
    # the exact bound on 4 images is the mean of the per-image bounds the run's 8 began with: a number of its own
    assert after.metrics["bpd_eval_exact_4images"] != before.metrics["bpd"]
    linked = {m.key for m in c.get_logged_model(after.tags["model_id"]).metrics}
    assert {"bpd", "bpd_eval_exact_4images", "bpd_eval_estimate_4images"} <= linked  # the model's numbers, all


def test_eval_only_ode_adds_nll_ode_without_the_bound_or_samples(home, monkeypatch):
    """Issue 19, item 3: adding the ODE likelihood to a run recomputed the bound and drew samples. `--only ode` computes
    nll_ode alone, with the ODE's own images and solver options; the ODE's bar counts images."""
    import bench.training.evaluation

    run_id, _ = run_ok(home, [*WITH_MODEL, "--eval-every", "0"])
    c = client(home)
    before, grids = c.get_run(run_id).data, _sample_grids(c, run_id)
    ckpt = home / "checkpoints" / run_id / "last.pt"

    def no_bound(*args, **kwargs):
        raise AssertionError("the bound was computed")

    monkeypatch.setattr(bench.training.evaluation, "bits_per_dim", no_bound)
    monkeypatch.setattr(bench.training.evaluation, "estimate_bits_per_dim", no_bound)
    refused = invoke(home, ["eval", str(ckpt), "--only", "ode", "--fid-samples", "5"])
    assert refused.exit_code == 2 and refused.stderr.strip() == \
        "error: --only ode draws no samples; leave out --fid-samples 5", describe(refused)
    ode = invoke(home, ["eval", str(ckpt), "--only", "ode", "--ode-images", "3", "--ode-method", "RK23",
                        "--ode-rtol", "1e-3", "--ode-atol", "1e-3", "--ode-batch-size", "2", "--log-to-run"])
    assert ode.exit_code == 0, describe(ode)
    assert "  bound      not computed\n" in ode.stdout and "on 3 of 297 test images, as nll_ode" in ode.stdout
    assert "probability-flow NLL: 3 images\n" in ode.stderr  # the progress counts images (2 batches of at most 2)
    assert "probability-flow NLL: done, 3 images in " in ode.stderr and "images/s)" in ode.stderr
    after = c.get_run(run_id).data
    assert after.tags["nll_ode_images"] == "3" and "RK23, rtol=0.001, atol=0.001" in after.tags["nll_ode_method"]
    assert math.isfinite(after.metrics["nll_ode"]) and said("nll_ode", after.metrics["nll_ode"], ode.stdout)
    assert {k: v for k, v in after.metrics.items() if not k.startswith("nll_ode")} == before.metrics  # nothing else
    assert history(c, run_id, "bpd") == [(STEPS, before.metrics["bpd"])] and _sample_grids(c, run_id) == grids
    assert "**Re-evaluation (nll_ode)**: at step 6, nll_ode " in after.tags["mlflow.note.content"]
    assert "nll_ode" in {m.key for m in c.get_logged_model(after.tags["model_id"]).metrics}


# ----------------------------------------------------------------------------- 7. CIFAR-10
def test_cifar10_route_end_to_end_on_a_fake_folder(cifar10_root, home):
    run_id, _ = run_ok(home, [
        "--dataset", "cifar10", "--data-dir", str(cifar10_root), "--network", "tiny", "--T", str(T), "--steps", "2",
        "--batch-size", "4", "--fid-samples", "0", "--final-eval-images", "2", "--eval-every", "0",
        "--log-every", "1", "--sample-steps", "4", "--no-log-model",
    ])
    c = client(home)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert not c.search_logged_models([run.info.experiment_id]) and "model_id" not in run.data.tags  # --no-log-model
    assert run.data.params["config.dataset"] == "cifar10"
    assert run.data.params["config.network"] == "tiny"
    assert run.data.params["config.hflip"] == "True"  # the dataset's defaults still apply
    assert run.data.tags["bpd_method"].startswith(f"exact (all {T} t, 2 test images); ")
    assert math.isfinite(run.data.metrics["bpd"]) and run.data.metrics["bpd"] > 0
    assert run.inputs.dataset_inputs[0].dataset.name == "cifar10-train"


def test_cifar10_defaults_are_the_papers(tmp_path):
    result = invoke(tmp_path, ["run", "--dataset", "cifar10", "--dry-run"])
    assert result.exit_code == 0, describe(result)
    cfg = json.loads(result.stdout)
    expected = {"dataset": "cifar10", "network": "ddpm-cifar10", "batch_size": 128, "lr": 2e-4,
                "warmup_steps": 5000, "grad_clip": 1.0, "ema_decay": 0.9999, "hflip": True, "steps": 800_000}
    assert {k: cfg[k] for k in expected} == expected
    assert count_run_rows(tmp_path) == 0


# ----------------------------------------------------------------------------- 8. bad input
@pytest.fixture
def bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01not a checkpoint\xff" * 16)
    toml = tmp_path / "unknown.toml"
    toml.write_text('lr = 1e-3\nlearning_rate = 0.5\n')
    empty = tmp_path / "empty_data"
    empty.mkdir()
    return {"garbage": garbage, "toml": toml, "empty": empty}


BAD = {
    "unknown variant": (["run", "--variant", "nope"], "nope"),
    "unknown dataset": (["run", "--dataset", "imagenet"], "imagenet"),
    "cifar10 missing offline": (["run", "--dataset", "cifar10", "--data-dir", "{empty}"], "cifar-10-batches-py"),
    "corrupt checkpoint for --resume": (["run", "--resume", "{garbage}"], "checkpoint"),
    "corrupt checkpoint for eval": (["eval", "{garbage}"], "checkpoint"),
    "missing checkpoint for eval": (["eval", "{empty}/nothing.pt"], "does not exist"),
    "negative steps": (["run", "--steps", "-5"], "steps"),
    "zero lr": (["run", "--lr", "0"], "lr"),
    "T = 1": (["run", "--T", "1"], "T"),
    "betas reversed": (["run", "--beta-start", "0.5", "--beta-end", "0.1"], "beta"),
    "sample steps above T": (["run", "--sample-steps", "5000"], "sample_steps"),
    "large variance with hybrid": (["run", "--variant", "hybrid", "--variance", "large"], "hybrid"),
    "unknown TOML key": (["run", "--config", "{toml}"], "learning_rate"),
    "missing TOML file": (["run", "--config", "{empty}/none.toml"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_no_run(case, tmp_path, bad_files):
    args, needle = BAD[case]
    args = [a.format(**bad_files) for a in args]
    result = invoke(tmp_path, args)
    assert result.exit_code == 2, describe(result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert count_run_rows(tmp_path) == 0
    assert not (tmp_path / "checkpoints").exists()


TOML_TYPE_ERRORS = [
    ('steps = "10"', "steps"),
    ('lr = "2e-4"', "lr"),
    ('ema_decay = "0.9"', "ema_decay"),
    ('grad_clip = "1"', "grad_clip"),
    ('hflip = "false"', "hflip"),
]


@pytest.mark.parametrize("line, needle", TOML_TYPE_ERRORS)
def test_toml_value_of_the_wrong_type_is_one_error_line(line, needle, tmp_path):
    toml = tmp_path / "typed.toml"
    toml.write_text(line + "\n")
    result = invoke(tmp_path, ["run", "--config", str(toml), "--dry-run"])
    assert result.exit_code == 2, describe(result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_missing_fid_weights_is_refused_before_anything_starts(cifar10_root, home):
    missing = home / "no-such-weights.pth"
    result = invoke(home, [
        "run", "--dataset", "cifar10", "--data-dir", str(cifar10_root), "--network", "tiny", "--T", "10",
        "--steps", "1", "--batch-size", "4", "--final-eval-images", "1", "--eval-every", "0", "--sample-steps", "2",
        "--fid-samples", "4", "--fid-weights", str(missing),
    ])
    assert result.exit_code == 2, describe(result)
    assert count_run_rows(home) == 0, [r.data.tags.get("failure_reason") for r in experiment_runs(home)]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_unreachable_tracking_uri_fails_fast_in_a_real_process(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([str(BENCH), "run", *TINY, "--tracking-uri", "http://127.0.0.1:9"], cwd=tmp_path,
                          env=bench_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 30
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "127.0.0.1:9" in lines[0] and "tracking" in lines[0]
    assert count_run_rows(tmp_path) == 0 and not (tmp_path / "checkpoints").exists()


def test_corrupt_checkpoint_is_one_line_in_a_real_process(tmp_path, bad_files):
    proc = subprocess.run([str(BENCH), "eval", str(bad_files["garbage"])], cwd=tmp_path, env=bench_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), proc.stderr
    assert count_run_rows(tmp_path) == 0


# ----------------------------------------------------------------------------- 9. precedence
def test_dry_run_precedence_default_toml_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 3e-4\nsteps = 77\nvariant = \"elbo\"\n")
    result = invoke(tmp_path, ["run", "--config", str(toml), "--steps", "11", "--dry-run"])
    assert result.exit_code == 0, describe(result)
    cfg = json.loads(result.stdout)
    assert cfg["steps"] == 11  # command line beats the file
    assert cfg["lr"] == 3e-4  # the file beats the default
    assert cfg["variant"] == "elbo"
    assert cfg["batch_size"] == make_config().batch_size == 128  # untouched default
    assert tomllib.loads(toml.read_text())["steps"] == 77
    # a dataset named in the file brings its defaults beneath the file's own values
    toml.write_text('dataset = "cifar10"\nlr = 1e-3\n')
    cfg = json.loads(invoke(tmp_path, ["run", "--config", str(toml), "--dry-run"]).stdout)
    assert (cfg["dataset"], cfg["network"], cfg["lr"], cfg["warmup_steps"]) == ("cifar10", "ddpm-cifar10", 1e-3, 5000)
    assert count_run_rows(tmp_path) == 0


# ----------------------------------------------------------------------------- 10. variants
def test_variants_lists_all_twelve(tmp_path):
    result = invoke(tmp_path, ["variants"])
    assert result.exit_code == 0, describe(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 12
    assert {line.split()[0] for line in lines} == VARIANT_NAMES
    by_name = {line.split()[0]: line for line in lines}
    assert "mean=mu" in by_name["mu-mse"] and "variance=learned_range" in by_name["hybrid"]
    assert "time=continuous (VDM)" in by_name["vdm"] and "learned schedule" in by_name["vdm"]
    assert "time=continuous (weighted ELBO family)" in by_name["weighted"] and "--weighting" in by_name["weighted"]


def test_system_metrics_are_logged_through_mlflow_and_can_be_turned_off(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    on, _ = run_ok(home, [*TINY, "--steps", "30", "--eval-every", "0", "--run-name", "with-system-metrics"])
    off, _ = run_ok(home, [*TINY, "--steps", "30", "--eval-every", "0", "--no-system-metrics", "--run-name", "without"])
    c = client(home)
    logged = c.get_run(on).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(logged), sorted(logged)
    assert 0 <= logged["system/cpu_utilization_percentage"] <= 100 * os.cpu_count()
    assert not [k for k in c.get_run(off).data.metrics if k.startswith("system/")]


def test_the_probability_flow_nll_is_logged_apart_from_the_bound(home):
    """`--final-eval-ode` (and `bench eval --nll ode`): nll_ode with its error and NFE, the method as a tag,
    on the bound's test images; `bpd` stays the bound."""
    run_id, result = run_ok(home, [*TINY, "--eval-every", "0", "--final-eval-ode", "--ode-probes", "2",
                                   "--ode-batch-size", "4"])
    c = client(home)
    run = c.get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    assert {"nll_ode", "nll_ode_stderr", "nll_ode_nfe", "nll_ode_stderr_draws"} <= set(m)
    assert math.isfinite(m["nll_ode"]) and m["nll_ode_stderr"] > 0 and m["nll_ode_nfe"] >= 2
    assert m["nll_ode"] != m["bpd"] and sorted(s for s, _ in history(c, run_id, "bpd")) == [STEPS]
    assert (tags["nll_ode_method"].startswith("probability-flow ODE NLL (not the bound)")
            and "2 rademacher" in tags["nll_ode_method"])
    assert tags["nll_ode_images"] == "8" and said("nll_ode", m["nll_ode"], result.stdout)
    ckpt = home / "checkpoints" / run_id / "last.pt"
    again = invoke(home, ["eval", str(ckpt), "--nll", "ode", "--fid-samples", "0", "--device", "cpu"])
    assert again.exit_code == 0, describe(again)
    assert said("nll_ode", m["nll_ode"], again.stdout)  # the same noise streams: the same number
    plain = invoke(home, ["eval", str(ckpt), "--nll", "bound", "--fid-samples", "0", "--device", "cpu"])
    assert plain.exit_code == 0 and "nll_ode" not in plain.stdout


@pytest.mark.parametrize("args, message", [
    (["--ode-probes", "0"], "probes (draws per image) must be an integer >= 1"),
    (["--ode-rtol", "-1"], "rtol must be a number > 0"),
])
def test_bad_ode_options_are_one_error_line(home, args, message):
    res = invoke(home, ["run", "--dry-run", *args])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_a_flow_that_diverges_is_recorded_and_the_run_still_finishes(home, monkeypatch):
    import bench.diffusion.ode
    import bench.training.ruler

    def diverges(*args, **kwargs):
        raise bench.diffusion.ode.FlowDiverged("the flow's drift is not finite at s = 0.11 "
                                               "(network index 113, along the flow)")

    monkeypatch.setattr(bench.training.ruler, "nll_ode", diverges)  # the DDPM branch of the ruler's ode_nll
    run_id, _ = run_ok(home, [*TINY, "--eval-every", "0", "--final-eval-ode"])
    run = client(home).get_run(run_id)
    assert run.info.status == "FINISHED" and "bpd" in run.data.metrics and "nll_ode" not in run.data.metrics
    assert "network index 113" in run.data.tags["nll_ode_failed"]
    assert "nll_ode not computed" in run.data.tags["mlflow.note.content"]


def test_loss_quarters_are_the_means_of_each_quarter_of_t():
    from bench.runtime.dist import SINGLE
    from bench.training.state import Quarters

    q = Quarters(T=8, dtype=torch.float64, device=torch.device("cpu"))
    q.add(torch.tensor([0, 1, 2, 7, 7]), torch.tensor([1.0, 3.0, 10.0, 4.0, 6.0]))  # t 0-1: q0, 2-3: q1, 6-7: q3
    q.add(torch.tensor([3]), torch.tensor([20.0]))
    assert q.means(SINGLE) == {"loss_q0": 2.0, "loss_q1": 15.0, "loss_q3": 5.0}  # no example in q2: left out
    assert q.means(SINGLE) == {}  # a new window


def test_a_weighted_run_says_what_it_trained_on_and_logs_its_adaptive_schedule(home):
    """A weighted run with --adaptive-schedule: tags give the weighting in words, its monotone flag on the run's
    schedule, the prediction and the adaptive schedule; the schedule's density is logged at each training-time
    evaluation and at the end, its bins a density over λ beside the cosine schedule's own p(λ) in closed form."""
    from mlflow.artifacts import download_artifacts

    from bench.diffusion.weighting import build_weighting

    run_id, _ = run_ok(home, [*TINY, "--variant", "weighted", "--weighting", "edm", "--adaptive-schedule",
                              "--prediction", "v", "--sample-grid", "4"])
    c = client(home)
    tags = c.get_run(run_id).data.tags
    assert tags["variant"] == "weighted[edm+adaptive]" and tags["prediction"] == "v"
    assert tags["weighting"] == build_weighting("edm").describe() and tags["weighting_monotone"] == "no"
    assert tags["adaptive_schedule"] == "yes"
    assert "not monotone in λ on this schedule" in tags["mlflow.note.content"]
    names = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "adaptive_schedule")}
    assert {"adaptive_schedule.png", "adaptive_schedule.json", f"adaptive_schedule/step_{EVAL_EVERY:08d}.png",
            f"adaptive_schedule/step_{EVAL_EVERY:08d}.json"} <= names, sorted(names)
    bins = json.loads(Path(download_artifacts(run_id=run_id, artifact_path="adaptive_schedule.json",
                                              tracking_uri=f"sqlite:///{home}/mlflow.db")).read_text())
    lo, hi = (torch.tensor(bins[k], dtype=torch.float64) for k in ("lambda_from", "lambda_to"))
    assert bins["step"] == STEPS and bins["updates"] == STEPS and (lo[0], hi[-1]) == pytest.approx((-5.0, 13.3))
    q = torch.tensor(bins["density"], dtype=torch.float64)
    assert float((q * (hi - lo)).sum()) == pytest.approx(1.0) and float(q.min()) >= bins["floor"] / (hi[-1] - lo[0])
    u0, u1 = (2 / math.pi * math.atan(math.exp(g / 2)) for g in (-13.3, 5.0))  # CosineEnds: p(λ) = sech(λ/2)/(2π Δu)
    p = 1 / torch.cosh((lo + hi) / 4) / (2 * math.pi * (u1 - u0))  # at the bins' centres
    assert bins["schedule_density"] == pytest.approx(p.tolist(), rel=1e-6)

    # benchmarks/weighting_claims.py on this checkpoint: both samplers estimate the same L_w, and L_∞ with t on the
    # schedule is the run's logged bound while t on the line is another estimate of it
    spec = importlib.util.spec_from_file_location("weighting_claims",
                                                  Path(__file__).parent.parent / "benchmarks" / "weighting_claims.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    r = script.claims(tags["checkpoint"], adapt=2, repeats=3, batch=128)
    assert r["monotone"] is False and r["fixed"]["var"] > 0 and r["adaptive"]["var"] > 0
    assert abs(r["fixed"]["mean"] - r["adaptive"]["mean"]) < 5 * (r["fixed"]["se"] + r["adaptive"]["se"])
    bounds = script.line_bound(tags["checkpoint"], t_per_image=2)
    assert bounds["weighting"] == "edm+adaptive" and bounds["schedule"]["images"] == 297
    assert bounds["line"]["bpd"] != bounds["schedule"]["bpd"] and bounds["line"]["bpd_stderr_mc"] > 0
