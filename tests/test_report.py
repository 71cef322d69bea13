"""Reports built from runs logged straight into a temporary MLflow store (no training), the HTML
rendered in headless Chromium, and `bench ui` answering over HTTP."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.cli import cli
from reports.build import build_report

VARIANTS = {"simple[small]": 3.10, "elbo[small]": 2.90, "hybrid": 3.00}  # true mean bpd of each fake variant


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store with 3 variants × 3 seeds of fake finished runs, one diverged run, and what a run logs."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("fake", artifact_location=(tmp_path / "mlartifacts").as_uri())
    rng = np.random.default_rng(0)
    records = []
    for variant, mu in VARIANTS.items():
        for seed in range(3):
            run = client.create_run(exp, run_name=f"{variant}-{seed}")
            rid = run.info.run_id
            bpd = mu + rng.normal(0, 0.05)
            fid = 20 + 10 * (mu - 2.9) + rng.normal(0, 1)
            metrics = {"bpd": bpd, "bpd/prior": 1e-5, "bpd/vb": bpd - 1.0 - 1e-5, "bpd/decoder": 1.0, "fid": fid,
                       "train_seconds": 60 + seed, "images_per_sec_overall": 1500 + 10 * seed}
            now = int(time.time() * 1000)
            history = [Metric("bpd_estimate", bpd + 1.0 / (s + 1), now, s * 100) for s in range(1, 4)]
            history += [Metric("bpd_estimate_stderr", 0.01, now, s * 100) for s in range(1, 4)]
            history += [Metric("loss", 1.0 / (s + 1), now, s * 10) for s in range(1, 6)]
            client.log_batch(rid, metrics=[Metric(k, v, now, 500) for k, v in metrics.items()] + history,
                             params=[Param("config.seed", str(seed))],
                             tags=[RunTag("variant", variant), RunTag("dataset", "digits"),
                                   RunTag("schedule", "linear(T=1000, 0.0001..0.02)"),
                                   RunTag("bpd_method", "exact (all 1000 t, 297 test images)"),
                                   RunTag("fid_extractor", "digits-classifier-abcd1234"), RunTag("fid_samples", "1000"),
                                   RunTag("fid_sampler", "ancestral, 250 of 1000 steps")])
            client.log_dict(rid, {"t": list(range(1, 11)), "L_t_bits_per_dim": list(np.geomspace(1, 1e-3, 10))},
                            "per_t_bound.json")
            img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
            client.log_image(rid, img, key="samples", step=500)
            client.set_terminated(rid, "FINISHED")
            records.append({"variant": variant, "seed": seed, **metrics})
    bad = client.create_run(exp, run_name="diverged")
    client.log_batch(bad.info.run_id, params=[Param("config.seed", "3")],
                     tags=[RunTag("variant", "elbo[small]"), RunTag("dataset", "digits"),
                           RunTag("schedule", "linear(T=1000, 0.0001..0.02)"), RunTag("diverged", "true")])
    client.set_terminated(bad.info.run_id, "FAILED")
    return uri, pd.DataFrame(records), tmp_path


def test_table_values_equal_pandas_on_the_same_records(store):
    uri, records, tmp = store
    rep = build_report(["fake"], None, tmp / "rep", uri)
    table = rep.table.set_index("variant")
    for variant, g in records.groupby("variant"):
        row = table.loc[variant]
        for m in ("bpd", "fid", "bpd/vb", "train_seconds"):
            v = g[m].to_numpy()
            half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
            assert row[f"{m} mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert row[f"{m} std"] == pytest.approx(v.std(ddof=1), rel=1e-12)
            assert row[f"{m} ci_low"] == pytest.approx(v.mean() - half, rel=1e-12)
            assert row[f"{m} ci_high"] == pytest.approx(v.mean() + half, rel=1e-12)
    assert table.loc["elbo[small]", "runs"] == 4 and table.loc["elbo[small]", "diverged"] == 1
    assert table.loc["elbo[small]", "finished"] == 3 and table.loc["simple[small]", "diverged"] == 0
    best_bpd = records.groupby("variant").bpd.mean().idxmin()
    assert table["best_bpd"].to_dict() == {v: v == best_bpd for v in table.index}
    assert table.loc["hybrid", "fid_extractor"] == "digits-classifier-abcd1234"
    # Paired differences: A − B over shared seeds.
    pairs = pd.read_csv(rep.out_dir / "paired_differences.csv")
    row = pairs[(pairs.A == "elbo[small]") & (pairs.B == "hybrid") & (pairs.metric == "bpd")].iloc[0]
    a = records[records.variant == "elbo[small]"].set_index("seed").bpd
    b = records[records.variant == "hybrid"].set_index("seed").bpd
    assert row["mean A−B"] == pytest.approx((a - b).mean(), rel=1e-9) and row["pairs"] == 3
    # The files, and the report logged to MLflow as a run.
    for name in ("report.html", "report.md", "table.csv", "bpd_vs_step.png", "loss.png", "per_t.png", "bpd_vs_fid.png",
                 "samples.png"):
        assert (rep.out_dir / name).is_file(), name
    md = (rep.out_dir / "report.md").read_text()
    assert "| digits | elbo[small] |" in md and "![samples](samples.png)" in md
    logged = {a.path for a in MlflowClient(uri).list_artifacts(rep.run_id)}
    assert {"report.html", "report.md", "table.csv"} <= logged
    assert MlflowClient(uri).get_run(rep.run_id).info.status == "FINISHED"


def test_report_cli_and_its_errors(store):
    uri, _, tmp = store
    runner = CliRunner()
    ok = runner.invoke(cli, ["report", "--experiment", "fake", "--out", str(tmp / "r2"), "--tracking-uri", uri])
    assert ok.exit_code == 0, ok.output
    assert "report of 10 runs" in ok.output
    filtered = runner.invoke(cli, ["report", "--experiment", "fake", "--filter", "tags.variant = 'hybrid'",
                                   "--out", str(tmp / "r3"), "--tracking-uri", uri])
    assert filtered.exit_code == 0 and "report of 3 runs" in filtered.output
    for args, match in [(["--experiment", "nope"], "no MLflow experiment named nope"),
                        (["--filter", "tags.variant = 'nothing'"], "no training runs match"),
                        (["--filter", "this is not a filter"], "could not search runs"),
                        (["--out", str(Path(__file__).resolve().parent.parent / "reports" / "x")], "inside the source package")]:
        bad = runner.invoke(cli, ["report", "--tracking-uri", uri, *args])
        assert bad.exit_code == 2 and match in bad.output, bad.output
    assert not (Path(__file__).resolve().parent.parent / "reports" / "x").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const rows = document.querySelectorAll('#comparison tbody tr').length;
  const table = document.querySelector('#comparison');
  const line = parseFloat(getComputedStyle(table).fontSize) * 1.6;
  const cells = [...table.querySelectorAll('td')];
  const wrapped = cells.filter(c => c.getBoundingClientRect().height > 2 * line).length;
  document.body.setAttribute('data-check', JSON.stringify({imgs, rows, width: table.getBoundingClientRect().right,
                                                           wrapped, cells: cells.length}));
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
def test_report_html_renders_with_table_and_every_image(store):
    uri, _, tmp = store
    rep = build_report(["fake"], None, tmp / "rep", uri)
    page = tmp / "check.html"
    page.write_text(rep.html.read_text().replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chrome'}", "--virtual-time-budget=5000", "--window-size=1400,2400"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    marker = dom.split("data-check=\"", 1)[1].split("\"", 1)[0].replace("&quot;", "\"")
    check = json.loads(marker)
    assert check["rows"] == 3  # one row per variant, rendered
    assert check["width"] <= 1400, check  # the table fits a 1400-px page …
    assert check["wrapped"] < check["cells"] / 4, check  # … without wrapping its cells
    assert len(check["imgs"]) >= 5 and all(check["imgs"])  # every embedded image decoded
    shot = tmp / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1400,2400", f"--screenshot={shot}", rep.html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_ui_serves_health_and_runs_then_stops(store):
    uri, _, tmp = store
    port = _free_port()
    bench = Path(sys.executable).with_name("bench")
    proc = subprocess.Popen([str(bench), "ui", "--port", str(port), "--tracking-uri", uri], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    assert r.read().decode().strip() == "OK"
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"bench ui did not answer /health: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.5)
        exp = MlflowClient(uri).get_experiment_by_name("fake").experiment_id
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())["runs"]
        assert len(runs) == 10
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out
    with socket.socket() as s:  # the server and its workers are gone: nothing listens on the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))


def test_grid_runs_variants_by_seeds_then_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["grid", "--variant", "simple", "--variant", "mu-mse", "--seeds", "2", "--steps", "2",
                                      "--T", "20", "--fid-samples", "0", "--final-eval", "estimate", "--sample-steps", "5"])
    assert result.exit_code == 0, result.output
    assert "[4/4] mu-mse-digits-seed1" in result.output
    out = tmp_path / "report-grid-digits"
    table = pd.read_csv(out / "table.csv")
    assert sorted(table.variant) == ["mu-mse[small]", "simple[small]"]
    assert table.finished.tolist() == [2, 2] and table["bpd n"].tolist() == [2, 2]
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("grid-digits").experiment_id])
    assert sorted(r.data.params["config.seed"] for r in runs) == ["0", "0", "1", "1"]
    assert (out / "report.html").is_file()
    bad = CliRunner().invoke(cli, ["grid", "--seeds", "0"])
    assert bad.exit_code == 2 and "--seeds must be >= 1" in bad.output


def test_runs_of_different_budgets_and_protocols_are_not_pooled(tmp_path):
    """300-step and 150-step runs, an estimated and an exact bound, a duplicated seed: rows stay apart,
    the report says so, the duplicate counts once, and two seeds get no t-interval."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("mixed")
    now = int(time.time() * 1000)

    def run(steps: str, final_eval: str, seed: int, bpd: float, status: str = "FINISHED") -> str:
        rid = client.create_run(exp, run_name=f"simple-{steps}-{seed}").info.run_id
        prior = 2e-5 * (1 + 1e-15 * seed)  # the same closed form, up to float rounding
        client.log_batch(rid, metrics=[Metric("bpd", bpd, now, int(steps)), Metric("bpd/prior", prior, now, int(steps))],
                         params=[Param("config.seed", str(seed)), Param("config.steps", steps),
                                 Param("config.final_eval", final_eval), Param("protocol.bpd", "x0-clipped")],
                         tags=[RunTag("variant", "simple[small]"), RunTag("dataset", "digits"),
                               RunTag("schedule", "linear(T=1000, 0.0001..0.02)")])
        client.set_terminated(rid, status)
        return rid

    run("300", "exact", 0, 5.0)
    run("300", "exact", 1, 5.2)
    run("300", "exact", 1, 9.9, status="FAILED")  # an earlier failed try of the same config and seed
    run("150", "estimate", 0, 6.0)
    run("150", "estimate", 0, 6.0)  # the same config and seed twice: counted once (the latest)
    rep = build_report(["mixed"], None, tmp_path / "rep", uri, log_to_mlflow=False)
    table = rep.table.set_index("steps")
    assert sorted(table.index) == ["150", "300"]  # two rows, not one pooled "runs 4"
    assert table.loc["300", "runs"] == 2 and table.loc["300", "bpd n"] == 2
    assert table.loc["150", "runs"] == 1 and table.loc["150", "bpd mean"] == 6.0
    assert table.loc["300", "settings"] == "steps=300, bound=exact"
    md = rep.markdown.read_text()
    assert "mixes settings (steps, bound)" in md and "2 duplicate run(s)" in md
    assert "5.1000 ± 0.1414 (n=2)" in md  # two seeds: mean ± std, no t-interval
    assert "± 0.0000" not in md  # the duplicated seed is not a second sample
    assert "bpd/prior: 2.00e-05 in every run" in md and "| bpd/prior |" not in md  # constant: said once, not a column
