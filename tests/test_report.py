"""Reports built from runs logged straight into a temporary MLflow store (no training), the HTML
rendered in headless Chromium, and `bench ui` answering over HTTP."""

import base64
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats
from tools import CHROMIUM

from bench.cli.main import cli
from bench.tracking.plots import pyplot, sample_grid
from reports import figures
from reports.build import REPORT_EXPERIMENT, build_report
from reports.tables import ROW, comparison_table, deduplicate, load_runs, row_numbers

VARIANTS = {"simple[small]": 3.10, "elbo[small]": 2.90, "hybrid": 3.00}  # true mean bpd of each fake variant
# What bench.training logs with a run: its budget and protocol (params) and how each bpd was obtained (tags).
BUDGET = [Param("config.steps", "500"), Param("config.T", "1000"), Param("config.sample_steps", "250"),
          Param("protocol.bpd", "x0-clipped")]
CONVENTION_TAG = "bpd: x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM protocol); bpd_unclipped: not clipped"
ESTIMATE_TAG = ("estimate (33 calls/image, 128 test images, seed 1234); bpd_estimate: x̂_0 clipped to [-1, 1] "
                "(DDPM/iDDPM), bpd_estimate_unclipped: unclipped")


@pytest.fixture
def store(tmp_path, monkeypatch, store_template):
    """A store with 3 variants × 3 seeds of fake finished runs, one diverged run, and what a run logs."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
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
                             params=[Param("config.seed", str(seed)), *BUDGET],
                             tags=[RunTag("variant", variant), RunTag("dataset", "digits"),
                                   RunTag("schedule", "linear(T=1000, 0.0001..0.02)"),
                                   RunTag("bpd_method", f"exact (all 1000 t, 297 test images); {CONVENTION_TAG}"),
                                   RunTag("bpd_estimate_method", ESTIMATE_TAG),
                                   RunTag("fid_extractor", "digits-classifier-abcd1234"), RunTag("fid_samples", "1000"),
                                   RunTag("fid_sampler", "ancestral, 250 of 1000 steps (strided, iDDPM respacing)"),
                                   RunTag("fid_reference", "digits train split, 1500 images")])
            client.log_dict(rid, {"t": list(range(1, 11)), "L_t_bits_per_dim": list(np.geomspace(1, 1e-3, 10))},
                            "per_t_bound.json")
            img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
            client.log_image(rid, img, key="samples", step=500)
            client.set_terminated(rid, "FINISHED")
            records.append({"variant": variant, "seed": seed, **metrics})
    bad = client.create_run(exp, run_name="diverged")
    client.log_batch(bad.info.run_id, params=[Param("config.seed", "3"), *BUDGET],
                     tags=[RunTag("variant", "elbo[small]"), RunTag("dataset", "digits"),
                           RunTag("schedule", "linear(T=1000, 0.0001..0.02)"), RunTag("diverged", "true")])
    client.set_terminated(bad.info.run_id, "FAILED")
    return uri, pd.DataFrame(records), tmp_path


def test_table_values_equal_pandas_on_the_same_records(store):
    uri, records, tmp = store
    rep = build_report(["fake"], None, tmp / "rep", uri, log_to_mlflow=True)
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
    assert "| elbo[small] | 4 (3 finished, 1 diverged) |" in md and "![samples](samples.png)" in md
    assert ("Common settings (the same in every row):\n\n"
            "- dataset: digits\n- schedule: linear(T=1000, 0.0001..0.02)\n") in md
    assert_self_contained(rep.html)
    captions = _captions(rep.html)
    assert set(captions) == {"bits/dim against training step", "training loss", "per-timestep terms of the bound",
                             "bits/dim against FID", "samples"}
    assert ("against FID (metric fid: 1000 samples drawn by ancestral, 250 of 1000 steps (strided, iDDPM respacing), "
            "features digits-classifier-abcd1234, reference digits train split, 1500 images) of each of the 9") \
        in captions["bits/dim against FID"]
    assert ("Final bits/dim (metric bpd: exact (all 1000 t, 297 test images); x̂_0 clipped"
            in captions["bits/dim against FID"])
    assert "exact (all 1000 t, 297 test images)" in captions["per-timestep terms of the bound"]
    # its fid_sampler tag
    assert "(3 grids); sampler ancestral, 250 of 1000 steps (strided, iDDPM respacing)." in captions["samples"]
    assert all(f"![{title}]" in md and caption in md for title, caption in captions.items())
    logged = {a.path for a in MlflowClient(uri).list_artifacts(rep.run_id)}  # asked for: the report is a run
    assert {"report.html", "report.md", "table.csv"} <= logged
    assert MlflowClient(uri).get_run(rep.run_id).info.status == "FINISHED"


def _report_runs(uri: str) -> list:
    exp = MlflowClient(uri).get_experiment_by_name(REPORT_EXPERIMENT)
    return [] if exp is None else MlflowClient(uri).search_runs([exp.experiment_id])


def test_report_adds_a_run_only_when_asked(store):
    uri, _, tmp = store
    rep = build_report(["fake"], None, tmp / "quiet", uri)
    assert rep.run_id is None and _report_runs(uri) == []  # the default: a report adds nothing to the store
    ok = CliRunner().invoke(cli, ["report", "--experiment", "fake", "--out", str(tmp / "quiet2"),
                                  "--tracking-uri", uri])
    assert ok.exit_code == 0 and "logged as MLflow run" not in ok.output and _report_runs(uri) == []
    logged = CliRunner().invoke(cli, ["report", "--experiment", "fake", "--out", str(tmp / "loud"),
                                      "--tracking-uri", uri, "--log-to-mlflow"])
    assert logged.exit_code == 0, logged.output
    (run,) = _report_runs(uri)
    assert f"logged as MLflow run {run.info.run_id}" in logged.output and run.info.status == "FINISHED"
    names = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert names == {p.name for p in (tmp / "loud").iterdir()}  # the folder as written, pictures included


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
                        (["--out", str(Path(__file__).resolve().parent.parent / "reports" / "x")],
                         "inside the source package")]:
        bad = runner.invoke(cli, ["report", "--tracking-uri", uri, *args])
        assert bad.exit_code == 2 and match in bad.output, bad.output
    assert not (Path(__file__).resolve().parent.parent / "reports" / "x").exists()


def assert_self_contained(page: Path) -> None:
    """report.html needs no other file and no script: MLflow's artifact viewer shows it from a blob: URL in an
    iframe sandboxed to an opaque origin, where nothing beside it could load. Every picture is inlined as a
    data: URI holding exactly the bytes of one of the PNGs kept in the folder, and each of those is shown."""
    class Refs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.style, self.in_style = [], "", False

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))
            self.in_style = tag == "style"

        def handle_data(self, data):
            if self.in_style:
                self.style += data

        def handle_endtag(self, tag):
            self.in_style = False

    refs = Refs()
    refs.feed(page.read_text())
    assert not {tag for tag, _ in refs.tags} & {"script", "link", "iframe", "object", "embed", "base", "frame"}
    assert not [name for _, attrs in refs.tags for name in attrs if name.startswith("on")]  # no inline handlers
    links = [(tag, name, value) for tag, attrs in refs.tags for name, value in attrs.items()
             if name in ("src", "href", "srcset", "poster", "data", "action", "background")]
    assert links and all(tag == "img" and name == "src" and value.startswith("data:image/png;base64,")
                         for tag, name, value in links), [link[:2] + (link[2][:40],) for link in links]
    assert "url(" not in refs.style and "@import" not in refs.style and refs.style
    inlined = sorted(base64.b64decode(value.split(",", 1)[1]) for _, _, value in links)
    assert inlined == sorted(p.read_bytes() for p in page.parent.glob("*.png"))


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


@pytest.mark.usefixtures("chromium")  # skips without it, fails under CI=true (tests/tools.py)
def test_report_html_renders_with_table_and_every_image(store):
    uri, _, tmp = store
    rep = build_report(["fake"], None, tmp / "rep", uri)
    page = tmp / "check.html"
    page.write_text(rep.html.read_text().replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chrome'}", "--virtual-time-budget=5000", "--window-size=1400,2400"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
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


def _wait_healthy(base: str, proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                assert r.read().decode().strip() == "OK"
                return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                output = log.read_text() if log else proc.stdout.read() if proc.poll() is not None else ""
                pytest.fail(f"{what} did not answer /health: {output}")
            time.sleep(0.5)


BEACON = """<img id='control' src='samples.png' alt='control'>
<script>window.addEventListener('load', () => {
  const loaded = i => i.complete && i.naturalWidth > 0;
  const report = {imgs: [...document.querySelectorAll('figure img')].map(loaded),
                  control: loaded(document.getElementById('control')),
                  rows: document.querySelectorAll('#comparison tbody tr').length,
                  origin: String(window.origin), scheme: location.protocol,
                  background: getComputedStyle(document.body).backgroundColor};
  new Image().src = '%s?' + encodeURIComponent(JSON.stringify(report));
});</script>"""


@pytest.mark.usefixtures("chromium")  # skips without it, fails under CI=true (tests/tools.py)
def test_report_renders_inside_mlflows_artifact_viewer(small_store):
    """report.html as MLflow's own UI shows it: logged with --log-to-mlflow and opened at its run's artifact page
    in headless Chromium. A copy with a measuring script appended (check.html) reports over HTTP what rendered in
    the viewer's sandboxed iframe; its control, one more picture named by file as a page beside its pictures would
    name it, shows what the viewer cannot load."""
    uri, client, log, tmp = small_store
    log("simple", 30, "exact", 3.1, estimates=[(10, 3.4), (20, 3.3)], losses=[(10, 1.0), (30, 0.9)], grid=True)
    log("elbo", 30, "estimate", 3.0, estimates=[(10, 3.3), (20, 3.2)], losses=[(10, 2.0), (30, 1.8)], grid=True)
    rep = build_report(["small"], None, tmp / "rep", uri, log_to_mlflow=True)
    heard: list[dict] = []

    class Beacon(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            heard.append(json.loads(urllib.parse.unquote(self.path.partition("?")[2])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    beacon = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Beacon)
    threading.Thread(target=beacon.serve_forever, daemon=True).start()
    check = tmp / "check.html"
    check.write_text(rep.html.read_text().replace("</body>",
                                                  BEACON % f"http://127.0.0.1:{beacon.server_port}/" + "</body>"))
    client.log_artifact(rep.run_id, str(check))
    port, server_log = _free_port(), tmp / "mlflow-server.log"
    with server_log.open("w") as out:  # a file, not a pipe nobody reads while the UI's requests are logged
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers
    base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        _wait_healthy(base, server, "mlflow server", server_log)
        experiment = client.get_run(rep.run_id).info.experiment_id
        browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                    f"--user-data-dir={tmp / 'chrome'}", "--window-size=1600,1200",
                                    f"{base}/#/experiments/{experiment}/runs/{rep.run_id}/artifacts/check.html"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60  # the browser stays open: wait for the page's report, not for a time budget
        while not heard and browser.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        for proc in (browser, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
        beacon.shutdown()
    assert heard, f"the page never reported from MLflow's viewer; server log: {server_log.read_text()[-2000:]}"
    shown = heard[0]
    assert shown["scheme"] == "blob:" and shown["origin"] == "null"  # MLflow's sandboxed iframe, an opaque origin
    assert shown["rows"] == 2 and len(shown["imgs"]) == 3 and all(shown["imgs"]), shown  # the table, every picture
    assert shown["background"] == "rgb(255, 255, 255)"  # its own background, whatever the viewer's theme
    assert not shown["control"]  # a picture beside the page, named by file, does not load in there


def test_bench_ui_serves_health_and_runs_then_stops(store):
    uri, _, tmp = store
    port = _free_port()
    bench = Path(sys.executable).with_name("bench")
    proc = subprocess.Popen([str(bench), "ui", "--no-browser", "--port", str(port), "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, "bench ui")
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


def test_grid_runs_variants_by_seeds_then_reports(tmp_path, monkeypatch, store_template):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["grid", "--variant", "simple", "--variant", "mu-mse", "--seeds", "2",
                                      "--steps", "2", "--T", "20", "--fid-samples", "0", "--final-eval", "estimate",
                                      "--final-eval-images", "8", "--sample-steps", "5", "--no-log-model"])
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


def test_runs_of_different_budgets_and_protocols_are_not_pooled(tmp_path, store_template):
    """300-step and 150-step runs, an estimated and an exact bound, a duplicated seed: rows stay apart,
    the report says so, the duplicate counts once, and two seeds get no t-interval."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("mixed")
    now = int(time.time() * 1000)

    def run(steps: str, final_eval: str, seed: int, bpd: float, status: str = "FINISHED") -> str:
        rid = client.create_run(exp, run_name=f"simple-{steps}-{seed}").info.run_id
        prior = 2e-5 * (1 + 1e-15 * seed)  # the same closed form, up to float rounding
        client.log_batch(rid,
                         metrics=[Metric("bpd", bpd, now, int(steps)), Metric("bpd/prior", prior, now, int(steps))],
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


# ------------------------------------------------------------------------- figures and what their captions say
@pytest.fixture
def small_store(tmp_path, monkeypatch, store_template):
    """An empty store (copied from the session's initialised one) and a helper that logs a finished run as
    bench.training does: its budget and protocol params, training-time estimates, the final bound and its tags."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("small", artifact_location=(tmp_path / "mlartifacts").as_uri())
    now = int(time.time() * 1000)

    def log(variant: str, steps: int, final: str, bpd: float, estimates=(), losses=(), seed: int = 0,
            schedule: str = "linear(T=1000, 0.0001..0.02)", grid: bool = False, T: int = 1000,
            fid: float | None = None) -> str:
        rid = client.create_run(exp, run_name=f"{variant}-{steps}-{seed}").info.run_id
        method = ("exact (all 1000 t, 297 test images)" if final == "exact"
                  else "estimate (33 calls/image, 297 test images)")
        metrics = [Metric("bpd", bpd, now, steps)] + [Metric("bpd_stderr", 0.02, now, steps)] * (final == "estimate")
        metrics += [m for s, v in estimates
                    for m in (Metric("bpd_estimate", v, now, s), Metric("bpd_estimate_stderr", 0.01, now, s))]
        metrics += [Metric("loss", v, now, s) for s, v in losses] + [Metric("fid", fid, now, steps)] * (fid is not None)
        client.log_batch(rid, metrics=metrics,
                         params=[Param("config.seed", str(seed)), Param("config.steps", str(steps)),
                                 Param("config.T", str(T)), Param("config.sample_steps", "250"),
                                 Param("protocol.bpd", "x0-clipped")],
                         tags=[RunTag("variant", variant), RunTag("dataset", "digits"), RunTag("schedule", schedule),
                               RunTag("bpd_method", f"{method}; {CONVENTION_TAG}"), RunTag("bpd_split", "test")]
                         + [RunTag("bpd_estimate_method", ESTIMATE_TAG)] * bool(estimates))
        if grid:
            tiles = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8))
            client.log_image(rid, sample_grid(tiles), key="samples", step=steps)
        client.set_terminated(rid, "FINISHED")
        return rid

    return uri, client, log, tmp_path


def _captions(page: Path) -> dict[str, str]:
    """alt text → caption of each figure in report.html."""
    class Figures(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self.alt, self.text = {}, None, None

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.alt = dict(attrs)["alt"]
            elif tag == "figcaption":
                self.text = ""

        def handle_data(self, data):
            if self.text is not None:
                self.text += data

        def handle_endtag(self, tag):
            if tag == "figcaption":
                self.found[self.alt], self.text = self.text, None

    parser = Figures()
    parser.feed(page.read_text())
    return parser.found


def test_the_bpd_caption_says_exact_or_estimated_from_the_runs(small_store):
    uri, _, log, tmp = small_store
    log("simple", 30, "exact", 3.1, estimates=[(20, 3.3)])
    log("elbo", 30, "estimate", 3.0, estimates=[(20, 3.2)])
    both = _captions(build_report(["small"], None, tmp / "both", uri).html)["bits/dim against training step"]
    assert "Stars: the final bound computed exactly (metric bpd), exact (all 1000 t, 297 test images)" in both
    assert ("Hollow diamonds: the final bound estimated without bias (metric bpd), "
            "estimate (33 calls/image, 297 ") in both
    assert ("(metric bpd_estimate), estimate (33 calls/image, 128 test images, seed 1234); "
            "x̂_0 clipped to [-1, 1]") in both
    assert "test split" in both and "x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM)" in both
    rep = build_report(["small"], "tags.variant = 'elbo'", tmp / "estimated", uri)
    estimated = _captions(rep.html)["bits/dim against training step"]
    assert "exact" not in estimated and "estimate (33 calls/image, 297 test images)" in estimated
    assert estimated in rep.markdown.read_text()  # the same caption under the picture in report.md


def _multi_point_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]


def test_single_evaluations_are_points_and_budgets_are_not_pooled(small_store):
    uri, client, log, _ = small_store
    log("simple", 30, "exact", 3.1, estimates=[(20, 3.3)], losses=[(30, 0.9)])
    log("simple", 60, "exact", 3.0, estimates=[(20, 3.35), (40, 3.2)], losses=[(50, 0.8), (60, 0.7)])
    log("elbo", 30, "estimate", 3.05, estimates=[(20, 3.25)], losses=[(30, 2.0)])
    df = load_runs(client, ["small"])
    (ax,) = figures.bpd_history(figures.bpd_series(client, df)).axes
    (line,) = _multi_point_lines(ax)  # the only line joins the 60-step run's two estimates …
    assert list(line.get_xdata()) == [20, 40] and list(line.get_ydata()) == [3.35, 3.2]
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]  # … and the budgets are groups of their own
    assert legend == ["elbo · 30 steps", "simple · 30 steps", "simple · 60 steps", "estimate during training",
                      "final bound, estimated", "final bound, exact"]
    assert ax.get_xlim()[0] == 0  # a point at step 30 sits on an axis from 0, not alone on a 30-step-wide one
    (loss_ax,) = figures.loss_history(client, df).axes
    (loss_line,) = _multi_point_lines(loss_ax)
    assert list(loss_line.get_xdata()) == [50, 60]
    colors = {ln.get_label(): ln.get_color() for ln in loss_ax.get_lines()}
    assert colors["simple · 30 steps"] != colors["simple · 60 steps"]


def test_each_table_row_has_one_colour_in_every_figure_and_legends_follow_the_table(small_store):
    """Rows sort by the key (T before steps); labels would sort by steps first: the figures follow the table."""
    uri, client, log, tmp = small_store
    for variant, T, steps, bpd in (("simple", 1000, 2000, 3.0), ("simple", 4000, 200, 3.1), ("hybrid", 1000, 200, 3.2)):
        rid = log(variant, steps, "exact", bpd, estimates=[(100, bpd + .2), (200, bpd + .1)],
                  losses=[(10, 1.), (20, .9)], T=T, fid=20 + bpd, grid=True)
        client.log_dict(rid, {"t": [1, 2, 3], "L_t_bits_per_dim": [1.0, 0.1, bpd / 100]}, "per_t_bound.json")
    rep = build_report(["small"], None, tmp / "rep", uri)
    rows = ["hybrid · 200 steps · T=1000", "simple · 2000 steps · T=1000", "simple · 200 steps · T=4000"]
    assert [f"{r.variant} · {r.steps} steps · T={r['T']}" for _, r in rep.table.iterrows()] == rows
    md = rep.markdown.read_text()
    assert md.index("| hybrid | T=1000, steps=200 |") < md.index("| simple | T=1000, steps=2000 |") \
        < md.index("| simple | T=4000, steps=200 |")  # the key column names what differs, in the table's order
    df = load_runs(client, ["small"])
    df = df.assign(**{ROW: row_numbers(df)})  # as build_report hands the runs to the figures
    tab10 = [to_hex(c) for c in pyplot().get_cmap("tab10").colors[:3]]
    legend = figures.bpd_history(figures.bpd_series(client, df)).legends[0]
    assert [t.get_text() for t in legend.get_texts()][:3] == rows
    assert [to_hex(h.get_color()) for h in legend.legend_handles[:3]] == tab10
    loss = figures.loss_history(client, df).legends[0]
    assert ([t.get_text() for t in loss.get_texts()] == rows
            and [to_hex(h.get_color()) for h in loss.legend_handles] == tab10)
    (fid_ax,) = figures.bpd_vs_fid(df).axes
    assert [(c.get_label(), to_hex(c.get_facecolor()[0])) for c in fid_ax.collections] == list(zip(rows, tab10))
    per_t, _ = figures.per_t_curves(client, df)
    assert [(ln.get_label(), to_hex(ln.get_color())) for ln in per_t.axes[0].get_lines()] == [
        (f"{r} (n=1)", c) for r, c in zip(rows, tab10)]
    grids, _ = figures.sample_grids(client, df)
    assert [ax.get_title().split("\nstep")[0].replace("\n", " · ") for ax in grids.axes if ax.images] == rows


def test_runs_evaluated_at_one_step_only_are_spread_by_group(small_store):
    uri, client, log, _ = small_store
    log("simple", 30, "exact", 3.1)
    log("simple", 30, "exact", 3.12, seed=1)
    log("hybrid", 30, "estimate", 3.0)
    (ax,) = figures.bpd_history(figures.bpd_series(client, load_runs(client, ["small"]))).axes
    assert _multi_point_lines(ax) == []
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hybrid\n30 steps", "simple\n30 steps"]
    assert ax.get_xlabel() == "every point at training step 30"
    markers = sorted((round(ln.get_xdata()[0], 2), ln.get_ydata()[0])
                     for ln in ax.get_lines() if ln.get_marker() in "*D")
    assert markers == [(0, 3.0), (0.96, 3.1), (1.04, 3.12)]  # the two seeds side by side in their group's column


def test_sample_grid_labels_stay_off_the_images(small_store):
    uri, client, log, _ = small_store
    for i, variant in enumerate(["mu-elbo-learned-diag[small]", "elbo-learned-diag", "hybrid"]):
        for steps, schedule in ((300, "cosine(T=4000, s=0.008)"), (30, "linear(T=1000, 0.0001..0.02)")):
            log(variant, steps, "exact", 3.0 + i / 10, schedule=schedule, grid=True)
    fig, caption = figures.sample_grids(client, load_runs(client, ["small"]))
    canvas = FigureCanvasAgg(fig)  # as savefig draws it
    canvas.draw()
    renderer = canvas.get_renderer()
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 6
    images = [ax.images[0].get_window_extent(renderer) for ax in tiles]
    texts = [ax.title.get_window_extent(renderer) for ax in tiles] + [fig._suptitle.get_window_extent(renderer)]
    assert not any(t.overlaps(i) for t in texts for i in images)  # no label over any image, its own or another's
    assert not any(a.overlaps(b) for k, a in enumerate(texts) for b in texts[k + 1:])  # nor over another label
    assert all(fig.bbox.contains(b.x0, b.y0) and fig.bbox.contains(b.x1, b.y1) for b in texts + images)
    assert "mu-elbo-learned-diag[small]\ncosine(T=4000, s=0.008)\n300 steps\nstep 300, seed 0" in [
        ax.get_title() for ax in tiles]
    assert "sampler ancestral, 250 of 1000 steps (strided)" in caption


def test_the_ode_likelihood_sits_beside_the_bound_with_the_gap(tmp_path, store_template):
    """Runs that logged nll_ode: the table shows it next to bpd with its MC error, the per-run gap bpd − nll_ode
    and the NFE, says what it is, and a row without it shows a dash; nll_ode never enters the bpd column."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("ode")
    now = int(time.time() * 1000)

    def run(variant: str, seed: int, bpd: float, nll: float | None) -> None:
        rid = client.create_run(exp, run_name=f"{variant}-{seed}").info.run_id
        metrics = [Metric("bpd", bpd, now, 100)]
        if nll is not None:
            metrics += [Metric("nll_ode", nll, now, 100), Metric("nll_ode_stderr", 0.05, now, 100),
                        Metric("nll_ode_nfe", 300.0, now, 100)]
        client.log_batch(rid, metrics=metrics,
                         params=[Param("config.seed", str(seed)), Param("protocol.bpd", "x0-clipped")],
                         tags=[RunTag("variant", variant), RunTag("dataset", "digits"), RunTag("schedule", "linear")]
                         + [RunTag("nll_ode_method", "probability-flow ODE NLL (not the bound), RK45")]
                         * (nll is not None))
        client.set_terminated(rid, "FINISHED")

    run("simple[small]", 0, 4.6, 4.2)
    run("simple[small]", 1, 4.8, 4.3)
    run("hybrid", 0, 4.3, None)
    rep = build_report(["ode"], None, tmp_path / "rep", uri, log_to_mlflow=False)
    table = rep.table.set_index("variant")
    assert table.loc["simple[small]", "bpd mean"] == pytest.approx(4.7)  # the bound alone
    assert table.loc["simple[small]", "nll_ode mean"] == pytest.approx(4.25)
    assert table.loc["simple[small]", "bpd − nll_ode mean"] == pytest.approx(0.45)  # the mean of the per-run gaps
    assert table.loc["hybrid", "nll_ode n"] == 0
    md = rep.markdown.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols.index("nll_ode") == cols.index("bpd") + 1 and "bpd − nll_ode" in cols
    assert "4.2500 ± 0.0707 (n=2) (MC se 0.0500)" in md and "0.4500 ± 0.0707 (n=2)" in md
    assert "nll_ode is another estimand" in md and "not a bound" in md
    assert "nll_ode_method: probability-flow ODE NLL (not the bound), RK45" in md or "| nll_ode_method |" in md


# ------------------------------------------------------------------------- what a row pools (its key)
def _config_run(client, exp: str, seed: int, bpd: float, variant: str = "simple", extractor: str = "",
                fid: float | None = None, **config) -> str:
    """A finished run logged as bench.training logs one: its whole RunConfig as `config.*` params (``config``:
    fields changed from the defaults), the protocol, its tags, the final bound and, with ``fid``, a FID and its
    extractor."""
    from bench.training.config import RunConfig, flatten

    rid = client.create_run(exp, run_name=f"{variant}-{seed}").info.run_id
    params = {**flatten(RunConfig(variant=variant, seed=seed)), **{f"config.{k}": str(v) for k, v in config.items()}}
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric("bpd", bpd, now, 100)] + [Metric("fid", fid, now, 100)] * (fid is not None),
                     params=[Param(k, v) for k, v in params.items()] + [Param("protocol.bpd", "x0-clipped")],
                     tags=[RunTag("variant", variant), RunTag("dataset", "digits"), RunTag("schedule", "linear")]
                     + [RunTag("fid_extractor", extractor)] * bool(extractor))
    client.set_terminated(rid, "FINISHED")
    return rid


def _other_value(field: str) -> str:
    """A value of RunConfig field ``field`` other than its default, as its param would hold it."""
    from bench.training.config import RunConfig

    default = getattr(RunConfig(), field)
    if isinstance(default, bool):
        return str(not default)
    if isinstance(default, int | float):
        return str(default * 2 + 1)
    return f"{default}-other"


@pytest.fixture
def key_store(tmp_path, store_template):
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.create_experiment("key", artifact_location=(tmp_path / "mlartifacts").as_uri())


def test_the_row_key_is_every_config_field_but_a_few_that_cannot_change_a_result():
    from dataclasses import fields

    from bench.training.config import RunConfig
    from reports.tables import KEY_FIELDS, RESULT_FREE, SETTINGS, row_key

    names = [f.name for f in fields(RunConfig)]
    assert set(RESULT_FREE) <= set(names)  # a renamed or removed field is not silently left out of the key
    assert list(KEY_FIELDS) == [n for n in names if n not in RESULT_FREE]
    assert {"ema_decay", "warmup_steps", "weight_decay", "grad_clip", "hflip", "precision", "ode_rtol", "ode_atol",
            "ode_probes", "ode_probe_type", "ode_batch_size", "final_eval_ode"} <= set(KEY_FIELDS)  # issue 18's list
    assert "seed" not in KEY_FIELDS and {f"config.{n}" for n in KEY_FIELDS} <= set(SETTINGS)
    assert "fid_extractor" in row_key()


@pytest.mark.parametrize("field", __import__("reports.tables", fromlist=["KEY_FIELDS"]).KEY_FIELDS)
def test_runs_that_differ_in_one_setting_are_not_pooled(key_store, field):
    """Two seeds that differ in ``field`` alone are two rows of one run each, not one row of two seeds."""
    from reports.tables import IN_GROUP

    client, exp = key_store
    _config_run(client, exp, 0, 3.0)
    _config_run(client, exp, 1, 3.5, **{field: _other_value(field)})
    df, dropped = deduplicate(load_runs(client, ["key"]))
    table = comparison_table(df)
    assert dropped == 0 and list(table["runs"]) == [1, 1], table
    assert sorted(table["bpd mean"]) == [3.0, 3.5]
    if field not in IN_GROUP:  # those change the run's tags too (variant, dataset, schedule), which the labels show
        assert figures.run_groups(df).nunique() == 2  # nor one group of the figures (a per-t mean, a colour)


def test_seeds_of_one_configuration_are_pooled(key_store):
    client, exp = key_store
    _config_run(client, exp, 0, 3.0)
    _config_run(client, exp, 1, 3.5)
    _config_run(client, exp, 2, 4.0, run_name="renamed", experiment="elsewhere", eval_every=7, device="cpu",
                sample_grid=9, eval_batch_size=3)  # settings that cannot change a number
    table = comparison_table(deduplicate(load_runs(client, ["key"]))[0])
    assert list(table["runs"]) == [3] and table["bpd mean"].iloc[0] == pytest.approx(3.5)


def test_precision_auto_counts_as_what_the_device_made_it(key_store):
    """precision=auto is bf16 on CUDA and fp32 on the CPU: those runs are kept apart; two CUDA cards are not."""
    client, exp = key_store
    for seed, device in enumerate(["cuda:0", "cuda:1", "cpu"]):
        rid = _config_run(client, exp, seed, 3.0 + seed, device=device)
        client.log_param(rid, "device", device)  # the device the run resolved, as bench.training logs it
    table = comparison_table(deduplicate(load_runs(client, ["key"]))[0]).set_index("precision")
    assert table["runs"].to_dict() == {"bf16": 2, "fp32": 1}


def test_fids_of_different_feature_extractors_are_never_pooled_or_compared(key_store, tmp_path):
    client, exp = key_store
    x, y = "digits-classifier-aaaa1111", "digits-classifier-bbbb2222"
    _config_run(client, exp, 0, 3.0, "simple", x, 10.0)
    _config_run(client, exp, 1, 3.1, "simple", x, 11.0)
    _config_run(client, exp, 2, 3.4, "simple", y, 30.0)  # the same settings, scored by another classifier
    _config_run(client, exp, 0, 3.2, "hybrid", y, 20.0)
    _config_run(client, exp, 1, 3.3, "hybrid", y, 21.0)
    rep = build_report(["key"], None, tmp_path / "rep", client.tracking_uri)
    table = rep.table.set_index(["variant", "fid_extractor"])
    assert table["runs"].to_dict() == {("hybrid", y): 2, ("simple", x): 2, ("simple", y): 1}
    assert table.loc[("simple", x), "fid mean"] == pytest.approx(10.5)  # not (10 + 11 + 30) / 3
    assert table["best_fid"].to_dict() == {("hybrid", y): True, ("simple", x): True, ("simple", y): False}
    pairs = pd.read_csv(rep.out_dir / "paired_differences.csv")
    assert list(pairs.metric) == ["bpd"]  # no FID difference across extractors ...
    assert (pairs.A.iloc[0], pairs.B.iloc[0], pairs["pairs"].iloc[0]) == ("hybrid", "simple", 2)  # ... the bound is
    assert pairs["mean A−B"].iloc[0] == pytest.approx(0.2)  # paired, whatever scored the FIDs
    md = rep.markdown.read_text()
    assert f"FIDs of hybrid ({y}) and simple ({x}) on digits are not compared: different feature extractors" in md
    assert "FIDs come from 2 feature extractors" in md
    caption = _captions(rep.html)["bits/dim against FID"]
    assert f"features {y}, " in caption and f"Left out: 2 run(s) whose FID another feature extractor computed ({x})" \
        in caption  # the picture shows the FIDs of one extractor only, the one most runs used


def _header(md: str, after: str) -> list[str]:
    """The column names of the first Markdown table after the line ``after``."""
    rest = md[md.index(after):].splitlines()
    return [c.strip() for c in next(line for line in rest if line.startswith("|")).strip("|").split("|")]


def test_a_report_over_mixed_settings_stays_narrow_and_says_what_it_shows(key_store, tmp_path):
    """Three variants × two budgets × two seeds, an exact and an estimated bound: the settings every row shares are
    said once above the table, those that differ in one key column, the rest of the numbers in a details table; the
    paired differences say what their numbers are; a value identical in every seed is printed once."""
    client, exp = key_store
    for variant in ("simple", "hybrid", "elbo"):
        for steps, T, final in ((200, 1000, "exact"), (2000, 4000, "estimate")):
            for seed in (0, 1):
                rid = _config_run(client, exp, seed, 3.0 + seed / 10 + (variant == "hybrid") / 5, variant,
                                  "digits-classifier-abcd1234", 20.0 + seed, steps=steps, T=T, final_eval=final)
                now = int(time.time() * 1000)
                prior = 2.1e-5 if T == 1000 else 1.3e-5  # the same in both seeds of a row: no spread to print
                client.log_batch(rid, metrics=[Metric("bpd/prior", prior, now, 100),
                                               Metric("train_seconds", 60.0 + seed, now, 100)],
                                 tags=[RunTag("bpd_method", f"{final} (…, 297 test images)"),
                                       RunTag("fid_samples", "500")])
    rep = build_report(["key"], None, tmp_path / "rep", client.tracking_uri)
    md, page = rep.markdown.read_text(), rep.html.read_text()
    for text in (md, page.replace("<li>", "- ").replace("</li>", "\n")):
        assert "Common settings (the same in every row):" in text and "- dataset: digits" in text
        # bound images 0: the whole split
        assert "- fid_samples: 500" in text and "- network: " in text and "- bound images: all" in text
    main = _header(md, "## Comparison by variant")
    assert main == ["variant", "settings", "runs", "bpd", "fid"]
    assert "| elbo | T=1000, steps=200, bound=exact | 2 |" in md  # the key column: only what differs
    details = _header(md, "## Details by row")
    assert details == ["variant", "settings", "bpd/prior", "train s", "measured"]
    # a zero spread is not printed as one
    assert "| elbo | T=1000, steps=200, bound=exact | 2.10e-05 (n=2, identical) | 60.5 ± 0.7 (n=2) | " \
           "bpd_method: exact (…, 297 test images) |" in md and "± 0.00e+00" not in md
    for text in (md, page):
        assert "std is the sample standard deviation of those differences (across seeds, not a standard error)" in text
        assert "95% t-interval of their mean" in text and "a negative A − B favours A" in text
        assert "Every line: dataset: digits. Every line: schedule: linear." in text
    assert _header(md, "## Paired differences") == ["settings", "metric", "A", "B", "pairs", "mean A−B",
                                                     "std", "ci_low", "ci_high"]
    for table_id in ("comparison", "details", "paired"):  # a page of 1400 px holds about 12 columns of these cells
        table = page[page.index(f'id="{table_id}"'):].split("</table>")[0]
        assert 0 < len(re.findall(r"<th[ >]", table.split("<tbody>")[0])) <= 10, table_id



def test_a_method_tag_ends_at_its_first_semicolon_outside_parentheses():
    """A continuous-time bound's method (its own parentheses and commas) is shown whole, its convention cut off."""
    _method = figures._method
    tag = "estimate (continuous-time bound L_∞ (VDM), Monte Carlo: 2×16 t; old; form); a continuous-time model's bound"
    assert _method(tag) == "estimate (continuous-time bound L_∞ (VDM), Monte Carlo: 2×16 t; old; form)"
    assert _method("exact (all 1000 t, 297 test images); bpd: x̂_0 clipped") == "exact (all 1000 t, 297 test images)"
    assert _method("") == ""


# ------------------------------------------------------------------------- the weighted-ELBO family
def test_each_weighting_is_a_row_of_its_own_with_its_monotone_flag(key_store, tmp_path):
    """Weighted runs are one row per weighting (its hyper-parameters, the adaptive schedule), labelled from their
    config params alone, with w's monotone flag read on their own schedule; a hyper-parameter the weighting does not
    read, or 3 for 3.0, splits nothing; a run from before the family's fields pools with one that has them; two
    weightings are paired like two variants; the intro says what the weighted rows are."""
    client, exp = key_store
    for seed in (0, 1):
        _config_run(client, exp, seed, 3.0 + seed / 10, "weighted", weighting="eps")  # cosine-ends: sech(λ/2)
        _config_run(client, exp, seed, 3.3, "weighted", weighting="eps", gamma_schedule="fixed")  # constant in λ
        _config_run(client, exp, seed, 3.6, "weighted", weighting="edm")
        _config_run(client, exp, seed, 3.4, "weighted", weighting="min-snr", min_snr_gamma=(3, 3.0)[seed],
                    adaptive_schedule=True)
        _config_run(client, exp, seed, 3.5, "weighted", weighting="sigmoid", sigmoid_bias=2.0)
    _config_run(client, exp, 2, 3.6, "weighted", weighting="edm", min_snr_gamma=3.0)  # not read by edm
    _config_run(client, exp, 0, 3.9, "simple")
    old = client.create_run(exp, run_name="before-the-family").info.run_id  # logged before the family's fields
    from bench.training.config import RunConfig, flatten

    params = {k: v for k, v in flatten(RunConfig(seed=1)).items()
              if k.removeprefix("config.") not in ("prediction", "weighting", "min_snr_gamma", "sigmoid_bias",
                                                   "edm_mean", "edm_std", "weighting_table", "adaptive_schedule")}
    client.log_batch(old, metrics=[Metric("bpd", 4.1, int(time.time() * 1000), 100)],
                     params=[Param(k, v) for k, v in params.items()] + [Param("protocol.bpd", "x0-clipped")],
                     tags=[RunTag("variant", "simple"), RunTag("dataset", "digits"), RunTag("schedule", "linear")])
    client.set_terminated(old, "FINISHED")
    rep = build_report(["key"], None, tmp_path / "rep", client.tracking_uri)
    table = rep.table.assign(gamma=rep.table["gamma_schedule"]).set_index(["variant", "gamma"])
    assert table["runs"].to_dict() == {
        ("simple", "auto"): 2, ("weighted[edm]", "auto"): 3, ("weighted[eps]", "auto"): 2,
        ("weighted[eps]", "fixed"): 2, ("weighted[min-snr γ=3+adaptive]", "auto"): 2,
        ("weighted[sigmoid b=2]", "auto"): 2}
    assert table["monotone"].to_dict() == {
        ("simple", "auto"): "", ("weighted[edm]", "auto"): "no", ("weighted[eps]", "auto"): "no",
        ("weighted[eps]", "fixed"): "yes", ("weighted[min-snr γ=3+adaptive]", "auto"): "no",
        ("weighted[sigmoid b=2]", "auto"): "yes"}
    assert table.loc[("weighted[eps]", "auto"), "bpd mean"] == pytest.approx(3.05)
    md = rep.markdown.read_text()
    assert _header(md, "## Comparison by variant")[:4] == ["variant", "settings", "monotone", "runs"]
    assert "| weighted[min-snr γ=3+adaptive] | gamma_schedule=auto | no | 2 |" in md
    assert "Rows weighted[w] are the weighted-ELBO family" in md and "same ruler" in md
    pairs = pd.read_csv(rep.out_dir / "paired_differences.csv")
    edm_eps = pairs[(pairs.A == "weighted[edm]") & (pairs.B == "weighted[eps]") & (pairs.metric == "bpd")]
    assert list(edm_eps["pairs"]) == [2] and edm_eps["mean A−B"].iloc[0] == pytest.approx(0.55)


def test_a_weighting_table_this_machine_cannot_read_keeps_the_runs_own_flag(key_store, tmp_path):
    """A table weighting is read on the run's schedule where its file is here, else the run's recorded flag shows
    (none recorded: '?'); the label names the file."""
    client, exp = key_store
    table = tmp_path / "w.csv"
    table.write_text("lambda,w\n-20,1\n20,0.5\n")  # non-increasing: monotone
    _config_run(client, exp, 0, 3.0, "weighted", weighting="table", weighting_table=str(table))
    gone = _config_run(client, exp, 0, 3.1, "weighted", weighting="table", weighting_table=str(tmp_path / "gone.csv"))
    client.set_tag(gone, "weighting_monotone", "no")
    _config_run(client, exp, 0, 3.2, "weighted", weighting="table", weighting_table=str(tmp_path / "x" / "gone.csv"))
    df = load_runs(client, ["key"]).set_index("bpd")
    assert df.loc[3.0, "variant"] == "weighted[table w.csv]" and df.loc[3.1, "variant"] == "weighted[table gone.csv]"
    assert df["monotone"].to_dict() == {3.0: "yes", 3.1: "no", 3.2: "?"}


# ------------------------------------------------------------------------- published models as reference rows
def _imported_run(client, exp: str, bpd: float, fid: float, tags: dict[str, str], variant_tag: bool = True,
                  **config) -> str:
    """An imported published model's evaluation as `bench eval --from` records one: its RunConfig as `config.*` params,
    its metrics and the import's tags (tag ``variant`` only with ``variant_tag``; its params name the variant)."""
    from bench.training.config import RunConfig, flatten

    rid = client.create_run(exp, run_name="imported").info.run_id
    params = {**flatten(RunConfig(variant="hybrid", seed=0)), **{f"config.{k}": str(v) for k, v in config.items()}}
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric("bpd", bpd, now, 0), Metric("fid", fid, now, 0)],
                     params=[Param(k, v) for k, v in params.items()] + [Param("protocol.bpd", "x0-clipped")],
                     tags=[RunTag("dataset", "digits"), RunTag("schedule", tags.pop("schedule", "linear")),
                           RunTag("imported", "true"), RunTag("fid_extractor", "digits-classifier-abcd1234")]
                     + [RunTag("variant", "hybrid")] * variant_tag + [RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(rid, "FINISHED")
    return rid


def test_published_models_are_reference_rows_never_pooled_paired_or_starred(key_store, tmp_path):
    """Two imported models beside trained hybrid and simple runs (values here are made up): each is a row of its own,
    labelled with its variant and what it is, marked kind=reference, with the paper's values beside the measured
    ones; one shares every setting with the trained hybrid runs and is still not pooled with them; neither is starred
    (though its bpd is lowest) nor paired; the trained rows' cells and common settings stay as without them."""
    from reports.tables import display_table

    client, exp = key_store
    x = "digits-classifier-abcd1234"
    for seed in (0, 1):
        _config_run(client, exp, seed, 3.0 + seed / 10, "hybrid", x, 20.0 + seed)
        _config_run(client, exp, seed, 3.4 + seed / 10, "simple", x, 25.0 + seed)
    alone = build_report(["key"], None, tmp_path / "alone", client.tracking_uri)
    before = deduplicate(load_runs(client, ["key"]))[0]
    _imported_run(client, exp, 2.5, 30.0, {"source_format": "improved-diffusion", "source_file": "a.pt",
                                           "source_sha256": "aa" * 32, "ema": "yes", "published_as": "Fake model A",
                                           "paper_bpd": "2.40", "paper_fid": "≤ 9.5"})
    _imported_run(client, exp, 2.6, 31.0, {"source_format": "pytorch-diffusion", "source_file": "b.ckpt",
                                           "source_sha256": "bb" * 32, "ema": "no", "schedule": "cosine"},
                  variant_tag=False, T=4000, final_eval="estimate")
    rep = build_report(["key"], None, tmp_path / "rep", client.tracking_uri)
    a, b = ("hybrid · published: Fake model A (improved-diffusion, EMA)",
            "hybrid · imported: b.ckpt (pytorch-diffusion, raw weights)")
    table = rep.table.set_index("variant")
    assert sorted(table.index) == sorted(["hybrid", "simple", a, b])
    assert table["kind"].to_dict() == {"hybrid": "trained", "simple": "trained", a: "reference", b: "reference"}
    assert table.loc["hybrid", "runs"] == 2 and table.loc["hybrid", "bpd mean"] == pytest.approx(3.05)  # not pooled
    assert table.loc[a, "runs"] == 1 and table.loc[a, "bpd mean"] == 2.5
    assert (table.loc[a, "paper bpd"], table.loc[a, "paper FID"]) == ("2.40", "≤ 9.5")
    assert (table.loc[b, "paper bpd"], table.loc[b, "paper FID"]) == ("", "")
    assert table["best_bpd"].to_dict() == {"hybrid": True, "simple": False, a: False, b: False}
    assert table.loc[b, "settings"] == "schedule=cosine, T=4000, bound=estimate"  # how its evaluation differs
    assert table.loc[a, "settings"] == "" and table.loc["hybrid", "settings"] == ""
    pairs = pd.read_csv(rep.out_dir / "paired_differences.csv")
    assert sorted(zip(pairs.metric, pairs.A, pairs.B, pairs["pairs"])) == [("bpd", "hybrid", "simple", 2),
                                                                          ("fid", "hybrid", "simple", 2)]
    assert pairs["mean A−B"].to_list() == pytest.approx(
        pd.read_csv(alone.out_dir / "paired_differences.csv")["mean A−B"].to_list())
    md = rep.markdown.read_text()
    assert _header(md, "## Comparison by variant") == ["variant", "kind", "settings", "runs", "bpd", "paper bpd", "fid",
                                                       "paper FID"]
    assert f"| {a} | reference |  | 1 | 2.5000 (n=1) | 2.40 | 30.00 (n=1) | ≤ 9.5 |" in md
    assert "| hybrid | trained |  | 2 | 3.0500 ± 0.0707 (n=2) ★ |  | 20.50 ± 0.71 (n=2) ★ |  |" in md
    assert "Reference rows (kind: reference) are published models" in md and "never pooled" in md
    assert "Common settings (the same in every trained row):" in md
    assert "Common settings (the same in every trained row):" not in alone.markdown.read_text()
    both = deduplicate(load_runs(client, ["key"]))[0]
    assert display_table(comparison_table(both))[1] == display_table(comparison_table(before))[1]  # common settings


def test_a_report_of_published_models_alone_lists_no_training_settings_as_common(key_store, tmp_path):
    """With no trained row, the settings every row shares are the evaluation's: an imported model's steps, lr or
    batch are the config it was read with, not how it was trained, and are not listed."""
    client, exp = key_store
    for sha, bpd in (("aa", 2.5), ("bb", 2.6)):
        _imported_run(client, exp, bpd, 30.0, {"source_format": "improved-diffusion", "source_file": f"{sha}.pt",
                                               "source_sha256": sha * 32, "ema": "yes", "published_as": sha})
    md = build_report(["key"], None, tmp_path / "rep", client.tracking_uri).markdown.read_text()
    common = md.split("Common settings (the same in every row):")[1].split("|")[0]
    assert "- T: 1000" in common and "- bpd convention: x0-clipped" in common
    assert "- steps:" not in common and "- lr:" not in common and "- batch:" not in common, common
    assert "the same in every trained row" not in md
