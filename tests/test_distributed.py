"""torch.distributed on this CPU with gloo, 2 ranks (torchrun, as users launch it): the shared bound,
estimate and sampling equal one process's bit for bit; a 2-rank run logs one MLflow run, trains the same
numbers as 1 rank and its checkpoint resumes on 1; a killed rank ends the run FAILED with a reason;
processes started together share the cores instead of fighting over them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RUN = ["-m", "bench", "run", "--variant", "elbo-learned", "--steps", "40", "--log-every", "10", "--eval-every", "20",
       "--eval-images", "8", "--checkpoint-every", "20", "--fid-samples", "0", "--final-eval", "estimate",
       "--final-eval-images", "16", "--sample-steps", "10", "--experiment", "dist"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "BENCH_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent),
            "BENCH_DIST_TIMEOUT": "120"}


@pytest.fixture
def seeded(store_template):
    """A BENCH_HOME made with an empty MLflow store already in it: rank 0 alone opens the store, so a fresh one
    would only add its table creation (~8 s of fsyncs) to these tests, not a case."""

    def make(home: Path) -> Path:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store_template, home / "mlflow.db")
        return home

    return make


def _client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")


def _runs(home: Path):
    c = _client(home)
    exp = c.get_experiment_by_name("dist")
    return [] if exp is None else c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _losses(home: Path, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(_client(home).get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_two_ranks_share_the_bound_the_estimate_and_sampling_bit_equal(tmp_path):
    out = tmp_path / "out.pt"
    subprocess.run([*TORCHRUN, str(TESTS / "dist_worker.py"), str(out)], env=_env(tmp_path), check=True,
                   capture_output=True, timeout=300)
    got = torch.load(out, weights_only=True)
    assert int(got["world"]) == 2
    assert float(got["output_scale"]) > 0.01  # the network's output is not all zeros: equality means something
    for key in ("exact.total", "exact.unclipped", "exact.per_t", "estimate.total", "estimate.unclipped",
                "estimate.stderr", "samples"):
        assert torch.equal(got[f"shared.{key}"], got[f"alone.{key}"]), key
    assert got["shared.samples"].shape == (11, 1, 8, 8)
    # a continuous-time model: its bound and samples, and a DDP training step of `vdm` (the gradient of the network
    # and of the learned schedule, averaged over the ranks) equal one process's on the whole batch
    for key in ("bound", "samples"):
        assert torch.equal(got[f"shared.vdm.{key}"], got[f"alone.vdm.{key}"]), key
    assert got["shared.vdm.samples"].shape == (5, 1, 8, 8)
    grad, alone = got["shared.vdm.grad"], got["alone.vdm.grad"]
    assert alone.abs().max() > 0 and torch.allclose(grad, alone, rtol=1e-4, atol=1e-6)
    assert alone[-2:].abs().min() > 0  # the schedule's two parameters (b, w) get a gradient
    # two steps of `weighted` with the adaptive schedule: every rank folds the whole batch into it, so the second
    # step's λ, and its gradient, are one process's
    ema, alone_ema = got["shared.weighted.ema"], got["alone.weighted.ema"]
    assert torch.isfinite(alone_ema).sum() > 2 and torch.allclose(ema, alone_ema, rtol=1e-5, equal_nan=True)
    grad, alone = got["shared.weighted.grad"], got["alone.weighted.grad"]
    assert alone.abs().max() > 0 and torch.allclose(grad, alone, rtol=1e-4, atol=1e-6)


def test_two_rank_training_logs_one_run_equals_one_rank_and_resumes_on_one(tmp_path, seeded):
    """Launched with `bench run --nproc 2`; the killed-rank test below launches with torchrun."""
    home2, home1 = seeded(tmp_path / "two"), seeded(tmp_path / "one")
    # `bench run --nproc 2` starts the ranks through torch's elastic launcher, as torchrun does
    res = subprocess.run([sys.executable, *RUN, "--nproc", "2"], env=_env(home2), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("FINISHED at step 40") == 1  # rank 0 alone reports
    (run,) = _runs(home2)  # one MLflow run, not one per rank
    assert run.info.status == "FINISHED" and run.data.params["dist.world_size"] == "2"
    two_losses = _losses(home2, run.info.run_id)
    assert [s for s, _ in two_losses] == [10, 20, 30, 40]  # one set of metrics
    (model,) = _client(home2).search_logged_models([run.info.experiment_id])  # rank 0 alone logs the EMA network
    assert (model.model_id == run.data.tags["model_id"]
            and {m.key: m.value for m in model.metrics}["bpd"] == run.data.metrics["bpd"])

    ckpt = home2 / "checkpoints" / run.info.run_id / "last.pt"
    # The one-rank reference runs beside the evaluations and the resume below (they leave a core idle; it has a
    # BENCH_HOME of its own). Its numbers alone are compared: its model's export would add seconds, not a check.
    with open(tmp_path / "reference.log", "w") as log:  # a file: a pipe nobody reads could fill and stall it
        reference = subprocess.Popen([sys.executable, *RUN, "--no-log-model"], env=_env(home1), stdout=log,
                                     stderr=subprocess.STDOUT, text=True)
    try:
        evals = [subprocess.run([*launcher, "-m", "bench", "eval", str(ckpt), "--final-eval", "estimate",
                                 "--fid-samples", "0", "--device", "cpu"], env=_env(home2), capture_output=True,
                                text=True, timeout=600)
                 for launcher in (TORCHRUN, [sys.executable])]
        resumed = subprocess.run([sys.executable, "-m", "bench", "run", "--resume", str(ckpt), "--reopen", "--steps",
                                  "50"], env=_env(home2), capture_output=True, text=True, timeout=600)
        reference.wait(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    (run1,) = _runs(home1)
    one_losses = _losses(home1, run1.info.run_id)
    # The same global batches, timesteps and noise: only the gradient's reduction order differs.
    assert [s for s, _ in one_losses] == [s for s, _ in two_losses]
    for (_, a), (_, b) in zip(one_losses, two_losses):
        assert a == pytest.approx(b, rel=1e-4)
    assert run1.data.metrics["bpd"] == pytest.approx(run.data.metrics["bpd"], rel=1e-4)

    assert [e.returncode for e in evals] == [0, 0], evals[0].stderr[-3000:]
    # `bench eval` under torchrun: rank 0 prints
    assert evals[0].stdout == evals[1].stdout and "bpd " in evals[0].stdout
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run {run.info.run_id}: FINISHED at step 50" in resumed.stdout
    assert [s for s, _ in _losses(home2, run.info.run_id)] == [10, 20, 30, 40, 50]


def _rank_pid(home: Path, rank: int) -> int | None:
    """The pid of this test's rank ``rank`` (found by the BENCH_HOME and RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in v)
        except OSError:
            continue
        if env.get("BENCH_HOME") == str(home) and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_run_failed_with_a_reason_not_a_hang(tmp_path, seeded):
    seeded(tmp_path)
    args = [a if a != "40" else "100000" for a in RUN]
    proc = subprocess.Popen([*TORCHRUN, *args], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # Training is under way once the step-20 checkpoint exists (the store is left alone meanwhile).
        while not list((tmp_path / "checkpoints").glob("*/last.pt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(1)
        pid = _rank_pid(tmp_path, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)  # bounded: no hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            proc.communicate()
    assert proc.returncode != 0
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED", err[-4000:]
    assert run.data.tags.get("failure_reason"), run.data.tags
    assert "failure_step" in run.data.tags


WORKLOAD = """
import os, sys, time, torch
from pathlib import Path
from bench.runtime.cores import CoreShare
from bench.nets.unet import build_network
net = build_network("tiny", 1, 1, 8).eval()
x, t = torch.randn(100, 1, 8, 8), torch.randint(0, 1000, (100,))
with torch.no_grad(), CoreShare(sys.argv[1]) as cores:
    deadline = time.monotonic() + 120  # both have registered (the other may still be importing torch on a busy machine)
    while cores.live() < int(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.1)
    cores.apply()
    for _ in range(5):
        net(x, t)
    start = time.perf_counter()
    for i in range(150):
        net(x, t)
        if i % 25 == 0:
            cores.apply()  # as the trainer does at every logging step
    seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    # stay registered until every process has finished its work: one that finished first and left would
    # rightly let the other grow back to all the cores at its next look, and the threads read would race
    (Path(sys.argv[1]) / f"done-{os.getpid()}").touch()
    while len(list(Path(sys.argv[1]).glob("done-*"))) < int(sys.argv[2]) and time.monotonic() < deadline + 600:
        time.sleep(0.05)
print(seconds, threads)
"""


def test_processes_started_side_by_side_share_the_cores_instead_of_fighting(tmp_path):
    """Two processes each running every core's OpenMP threads were measured 100x slower than one. Two
    elbo-bench processes started side by side, neither told anything (no OMP_NUM_THREADS), find each other
    (bench.runtime.cores) and split the cores: together they take about twice one's time, not 100x."""
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user who chose nothing
    env["PYTHONPATH"] = str(TESTS.parent)

    def timed(n: int) -> tuple[float, list[int]]:
        """The slowest process's time for the fixed work, and each one's threads at the end."""
        procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"cores{n}"), str(n)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(n)]
        seconds, threads = [], []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0
            seconds.append(float(out.split()[0]))
            threads.append(int(out.split()[1]))
        return max(seconds), threads

    alone, (threads_alone,) = timed(1)
    together, threads_together = timed(2)
    from bench.runtime.cores import cpu_count

    assert threads_alone == cpu_count()
    assert threads_together == [max(1, cpu_count() // 2)] * 2
    assert together < 5 * alone, (alone, together)


def test_a_study_under_torchrun_trains_each_trial_on_both_ranks(tmp_path, seeded):
    """`torchrun -m bench study`: the two ranks are one study worker (a trial that should use several GPUs):
    rank 0 takes the trials and tells Optuna, both ranks train each trial, one MLflow run per trial."""
    import optuna

    seeded(tmp_path)
    space = tmp_path / "space.toml"
    space.write_text("[params.T]\nchoices = [40]\n")
    res = subprocess.run([*TORCHRUN, "-m", "bench", "study", "--trials", "2", "--steps", "20", "--exact-top", "1",
                          "--study-name", "ranked", "--space", str(space), "--experiment", "dist", "--batch-size", "16",
                          "--eval-images", "8", "--eval-calls", "3", "--sample-grid", "4", "--sample-steps", "10",
                          "--device", "cpu"], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("2 trials of 20 steps") == 1, res.stdout  # rank 0 alone prints
    study = optuna.load_study(study_name="ranked", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials), [t.state for t in study.trials]
    runs = _runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["optuna.trial"] for r in trials) == ["0", "1"]  # one run per trial, not one per rank
    assert all(r.data.params["dist.world_size"] == "2" for r in trials)
