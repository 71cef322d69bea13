"""What ``bench run`` writes where no terminal reads it (a log file, CI), and the progress helper behind it.

Off a terminal every long loop says a line when it starts, one at each quarter and one when it ends, never a
bar (whose updates would be kept, joined by carriage returns); the run says where it writes; the summary is
aligned lines with units; MLflow's own INFO lines stay out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.runtime import progress as progress_mod
from bench.runtime.progress import Progress, format_duration, progress_of
from bench.training.record import summarize

REPO = Path(__file__).resolve().parents[1]
RUN = ["--T", "40", "--steps", "12", "--batch-size", "16", "--log-every", "2", "--eval-every", "4",
       "--eval-images", "8", "--final-eval-images", "8", "--fid-samples", "16", "--sample-steps", "10",
       "--experiment", "logs-test"]
PHASES = ("train simple[small]:", "exact bits/dim", "sampling (", "FID:")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A tiny ``bench run`` in a fresh process, its stdout and stderr pipes (not a terminal), on a new store
    (whose creation MLflow would announce)."""
    home = tmp_path_factory.mktemp("logs")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                                                            "BENCH_DATA_DIR", "MLFLOW_LOGGING_LEVEL")}
    env.update(BENCH_HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "bench", "run", *RUN], env=env, cwd=home, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return home, done


def test_off_a_terminal_the_log_is_a_few_lines_per_phase_without_bars(piped_run):
    _, done = piped_run
    text = done.stdout + done.stderr
    assert "\r" not in text and "|" not in done.stderr  # no bar, no carriage return
    lines = done.stderr.splitlines()
    for phase in PHASES:
        mine = [line for line in lines if line.startswith(phase)]
        assert 2 <= len(mine) <= 6, (phase, mine)  # it starts, (quarters,) it ends
        assert "done" in mine[-1]
    train = [line for line in lines if line.startswith(PHASES[0])]
    # 12 steps: the start, steps 3, 6 and 9 with the time left, and the end (which gives the evaluations' time apart)
    assert [re.search(r": (\S+)", line).group(1) for line in train] == ["12", "3/12", "6/12", "9/12", "done,"], train
    assert all("left" in line for line in train[1:4]) and "paused" in train[-1]
    assert len(lines) <= 25, done.stderr


def test_the_run_says_where_it_writes_and_when_it_evaluates(piped_run):
    home, done = piped_run
    run_id = re.search(r"^run ([0-9a-f]{32}): FINISHED at step 12$", done.stdout, re.M).group(1)
    start, warning = done.stderr.splitlines()[:2]  # then, once the run is open, that 12 steps end inside the lr warm-up
    assert warning.startswith("warning: --steps 12 ends inside the learning-rate warm-up")
    assert start == (f"new run {run_id} (simple-digits-seed0) in experiment 'logs-test', "
                     f"store sqlite:///{home}/mlflow.db")
    for step, later in ((4, "1 more evaluation"), (8, "0 more evaluations")):
        [announce, result] = [line for line in done.stderr.splitlines() if line.startswith(f"step {step}: ")]
        assert announce.startswith(f"step {step}: evaluating (bound estimate on 8 test images, 33 calls each")
        assert re.match(rf"step {step}: bpd_estimate \d+\.\d{{4}} ± \d+\.\d{{4}} bits/dim "
                        rf".* in \d+s; {later} before the end$",
                        result), result


def test_no_mlflow_info_lines(piped_run):
    _, done = piped_run
    text = done.stdout + done.stderr
    assert " INFO " not in text and "View run" not in text and "alembic" not in text, text


def test_the_summary_is_aligned_lines_with_units(piped_run):
    _, done = piped_run
    rows = [line for line in done.stdout.splitlines()
            if re.match(r"  (bpd|bpd_unclipped|fid|kid|precision|recall|isc) ", line)]
    assert [line.split()[0] for line in rows] == ["bpd", "bpd_unclipped", "fid", "kid", "precision", "recall", "isc"]
    points = {line.index(".", len(line.split()[0]) + 2) for line in rows}
    assert len(points) == 1, rows  # the values' decimal points in one column
    bpd, unclipped, fid = rows[:3]
    assert "bits/dim" in bpd and "lower is better" in bpd and "= prior " in bpd and "x̂_0 clipped" in bpd
    assert "bits/dim" in unclipped and "not clipped" in unclipped
    assert re.search(r"noise images \(worst\) \d+\.\d{4}, real test images \(the floor\) \d+\.\d{4}", fid), fid
    assert re.search(r"  kid +\d+\.\d{4} ± \d+\.\d{4} ", rows[3])
    assert "fid_ref_noise" not in done.stdout and "bpd/vb" not in done.stdout  # each metric said once, in its row


def test_summarize_shows_every_metric_once_with_its_error():
    metrics = {"bpd": 3.25, "bpd/prior": 1e-5, "bpd/vb": 2.0, "bpd/decoder": 1.25, "bpd_stderr": 0.0125,
               "nll_ode": 3.0, "nll_ode_stderr": 0.5, "nll_ode_nfe": 212.0, "something": 7.0, "gone": float("nan")}
    lines = summarize(metrics, "  ").splitlines()
    assert lines[0] == ("  bpd        3.2500 ± 0.0125 bits/dim  lower is better; x̂_0 clipped (DDPM protocol); "
                        "= prior 1.00e-05 + vb 2.0000 + decoder 1.2500")
    assert lines[1].startswith("  nll_ode    3.0000 ± 0.5000 bits/dim  lower is better; probability-flow ODE NLL")
    assert lines[1].endswith("212 network calls per solve")
    assert lines[2] == "  something  7.0000"
    assert len(lines) == 3


# ----------------------------------------------------------------------------- the helper
@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves: ``clock[0]`` seconds."""
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    return now


def test_progress_off_a_terminal_is_five_lines_and_its_time_left_counts_pauses(capsys, clock):
    bar = Progress(1000, "train x", "step")
    for step in range(1, 1001):
        clock[0] += 0.1  # 10 steps/s
        bar.update()
        if step == 500:
            with bar.paused("evaluating"):
                clock[0] += 30.0
            bar.pauses_left = 1  # one more such pause before the end
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "train x: 1000 steps",
        "train x: 250/1000 steps (25%), 25s, about 1m15s left",
        "train x: 500/1000 steps (50%), 50s, about 50s left",
        "evaluating",
        "train x: 750/1000 steps (75%), 1m15s, about 55s left",  # 25 s of steps and the 30 s pause to come
        "train x: done, 1000 steps in 1m40s (10 steps/s), and 30s paused",
    ]


def test_progress_of_counts_items_and_says_nothing_when_not_shown(capsys, clock):
    assert list(progress_of(range(3), 3, "exact bits/dim", "batch")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == ["exact bits/dim: 3 batches",
                                                    "exact bits/dim: 1/3 batches (33%), 0s, about 0s left",
                                                    "exact bits/dim: 2/3 batches (66%), 0s, about 0s left",
                                                    "exact bits/dim: done, 3 batches in 0s"]
    assert list(progress_of(range(3), 3, "quiet", "batch", show=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 59.6, 458, 3725)] == ["4s", "1m00s", "7m38s", "1h02m"]
