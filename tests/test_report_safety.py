"""`bench report --out` (and `bench grid --out`) never delete what the report did not write.

A report may replace only a folder holding its marker file and nothing the marker does not list;
anything else is refused with one line before any work, and nothing is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import reports.build as build
from bench.cli.main import cli
from bench.errors import BenchError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch, store_template):
    """BENCH_HOME with a store of two finished fake runs, a checkpoint folder, and the working directory elsewhere."""
    bench_home = tmp_path / "home"
    bench_home.mkdir()
    shutil.copyfile(store_template, bench_home / "mlflow.db")
    (bench_home / "checkpoints").mkdir()
    (bench_home / "checkpoints" / "last.pt").write_bytes(b"weights")
    monkeypatch.setenv("BENCH_HOME", str(bench_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    client = MlflowClient(f"sqlite:///{bench_home}/mlflow.db")
    exp = client.create_experiment("fake", artifact_location=(bench_home / "mlartifacts").as_uri())
    for seed in range(2):
        rid = client.create_run(exp, run_name=f"simple-{seed}").info.run_id
        client.log_batch(rid, metrics=[Metric("bpd", 3.0 + seed / 10, int(time.time() * 1000), 10)],
                         params=[Param("config.seed", str(seed))],
                         tags=[RunTag("variant", "simple[small]"), RunTag("dataset", "digits"),
                               RunTag("schedule", "linear(T=1000, 0.0001..0.02)")])
        client.set_terminated(rid, "FINISHED")
    return bench_home


def _report(out, *extra: str):
    return CliRunner().invoke(cli, ["report", "--experiment", "fake", "--out", str(out), *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    """Staging or set-aside folders of a report named ``name`` left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _refused(result, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert f"--out {out.resolve()}" in result.stderr


def test_report_refuses_a_folder_of_someone_elses_files_and_touches_nothing(home, tmp_path):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "precious.txt").write_text("keep me")
    (docs / "sub").mkdir()
    (docs / "sub" / "more.txt").write_text("and me")
    before = _tree(docs)
    result = _report(docs)
    _refused(result, docs)
    assert "is not an elbo-bench report folder" in result.stderr and "remove it yourself" in result.stderr
    assert _tree(docs) == before
    assert _leftovers(tmp_path, "mydocs") == []


@pytest.mark.parametrize("where", ["cwd is BENCH_HOME", "BENCH_HOME", "a parent of BENCH_HOME"])
def test_report_refuses_bench_home_and_keeps_the_store(home, monkeypatch, where):
    out = {"cwd is BENCH_HOME": Path("."), "BENCH_HOME": home, "a parent of BENCH_HOME": home.parent}[where]
    if where == "cwd is BENCH_HOME":
        monkeypatch.chdir(home)
    before = _tree(home)
    result = _report(out)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert (home / "mlflow.db").is_file() and (home / "checkpoints" / "last.pt").read_bytes() == b"weights"
    assert _tree(home) == before


@pytest.mark.parametrize("out", [REPO, REPO.parent, Path("."), Path("..")])
def test_out_may_not_be_the_source_tree_or_the_working_directory(home, out):
    # Checked on the function alone: on code without this check the CLI would delete the repository.
    with pytest.raises(BenchError, match="choose a new folder"):
        build.check_out_dir(out)


def test_refusal_comes_before_reading_any_run(home, tmp_path, monkeypatch):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "precious.txt").write_text("keep me")

    def no_reading(*args, **kwargs):
        raise AssertionError("the runs were read before --out was checked")

    monkeypatch.setattr(build, "load_runs", no_reading)
    with pytest.raises(BenchError, match="is not an elbo-bench report folder"):
        build.build_report(["fake"], None, docs)


def test_a_file_as_out_is_refused_and_kept(home, tmp_path):
    target = tmp_path / "notes"
    target.write_text("mine")
    with pytest.raises(BenchError, match="is not an elbo-bench report folder"):
        build.build_report(["fake"], None, target, log_to_mlflow=False)
    assert target.read_text() == "mine"
    assert _leftovers(tmp_path, "notes") == []


def test_an_empty_folder_is_used(home, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    rep = build.build_report(["fake"], None, out, log_to_mlflow=False)
    assert rep.out_dir == out.resolve() and (out / "report.html").is_file()


@pytest.mark.parametrize("umask, folder, files", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_the_report_folder_is_as_readable_as_the_umask_makes_new_files(home, tmp_path, umask, folder, files):
    """Not mkdtemp's private 0700: others may read a report (0755 / 0644 under the usual umask 022)."""
    saved = os.umask(umask)
    try:
        rep = build.build_report(["fake"], None, tmp_path / "rep", log_to_mlflow=False)
    finally:
        os.umask(saved)
    assert stat.S_IMODE(rep.out_dir.stat().st_mode) == folder
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in rep.out_dir.iterdir()}
    assert "report.html" in modes and set(modes.values()) == {files}, modes


def test_what_the_tool_writes_into_a_clone_is_ignored_by_git(tmp_path):
    shutil.copyfile(REPO / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    written = ["checkpoints/last.pt", "cache/fid/ref.npz", "optuna.db", "report-grid-digits/report.html", "mlflow.db",
               "mlartifacts/1/a.png"]
    ignored = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", *written], capture_output=True, text=True)
    assert ignored.stdout.split() == written
    kept = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "reports/build.py", "bench/cache.py"],
                          capture_output=True, text=True)
    assert kept.stdout == ""  # the source is not


def test_a_previous_report_is_replaced_and_listed_in_its_marker(home, tmp_path):
    out = tmp_path / "rep"
    first = build.build_report(["fake"], None, out, log_to_mlflow=False)
    marker = json.loads((out / build.MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {build.MARKER}
    assert {"report.html", "report.md", "table.csv"} <= set(marker["files"])
    (out / "report.html").write_text("stale")
    second = build.build_report(["fake"], None, out, log_to_mlflow=False)
    assert second.out_dir == first.out_dir
    assert (out / "report.html").read_text() != "stale"
    assert _leftovers(tmp_path, "rep") == []  # neither staging nor the set-aside old report stays behind
    ok = _report(out)
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("intruder", ["file", "folder", "symlink"])
def test_a_report_folder_holding_something_it_did_not_write_is_refused(home, tmp_path, intruder):
    out = tmp_path / "rep"
    build.build_report(["fake"], None, out, log_to_mlflow=False)
    if intruder == "file":
        (out / "notes.txt").write_text("my notes")
    elif intruder == "folder":
        (out / "drafts").mkdir()
        (out / "drafts" / "d.txt").write_text("draft")
    else:  # a listed name replaced by a link to something of someone else's
        (tmp_path / "elsewhere.csv").write_text("theirs")
        (out / "table.csv").unlink()
        (out / "table.csv").symlink_to(tmp_path / "elsewhere.csv")
    before = _tree(out)
    result = _report(out)
    _refused(result, out)
    assert _tree(out) == before
    assert (tmp_path / "elsewhere.csv").exists() or intruder != "symlink"


@pytest.mark.parametrize("marker", ["not json", json.dumps({"tool": "something else", "files": ["a.txt"]}),
                                    json.dumps(["a.txt"]), json.dumps({"tool": "elbo-bench report", "files": "a.txt"})])
def test_a_forged_or_broken_marker_does_not_make_a_folder_ours(home, tmp_path, marker):
    out = tmp_path / "looks-like-a-report"
    out.mkdir()
    (out / build.MARKER).write_text(marker)
    (out / "a.txt").write_text("keep")
    result = _report(out)
    _refused(result, out)
    assert (out / "a.txt").read_text() == "keep"


def test_a_failed_report_leaves_the_previous_one_and_no_staging(home, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    build.build_report(["fake"], None, out, log_to_mlflow=False)
    before = _tree(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "_write_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build.build_report(["fake"], None, out, log_to_mlflow=False)
    assert _tree(out) == before
    assert _leftovers(tmp_path, "rep") == []


def test_a_folder_filled_while_the_report_ran_is_not_replaced(home, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    build.build_report(["fake"], None, out, log_to_mlflow=False)
    real = build._write_markdown

    def meanwhile(*args, **kwargs):  # someone saves a file into the old report during a long report
        (out / "added-meanwhile.txt").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_write_markdown", meanwhile)
    with pytest.raises(BenchError, match="added-meanwhile.txt"):
        build.build_report(["fake"], None, out, log_to_mlflow=False)
    assert (out / "added-meanwhile.txt").read_text() == "theirs" and (out / "report.html").is_file()
    assert _leftovers(tmp_path, "rep") == []


def test_report_md_escapes_html_from_experiment_run_and_tag_names(tmp_path, monkeypatch, store_template):
    """Markdown renders raw HTML: a name holding a tag shows as text in report.md, as it does in report.html."""
    import numpy as np
    from matplotlib import pyplot as plt

    evil = "<img src=x onerror=alert(1)>"
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(evil, artifact_location=(tmp_path / "mlartifacts").as_uri())
    for seed in range(2):
        rid = client.create_run(exp, run_name=evil).info.run_id
        client.log_batch(rid, metrics=[Metric("bpd", 3.0 + seed / 10, int(time.time() * 1000), 10)],
                         params=[Param("config.seed", str(seed))],
                         tags=[RunTag("variant", evil), RunTag("dataset", "digits"), RunTag("schedule", evil)])
        client.set_terminated(rid, "FINISHED")
    study = client.create_run(exp, run_name=evil, tags={"optuna.study": evil}).info.run_id  # its picture's title
    plt.imsave(tmp_path / "optimization_history.png", np.zeros((4, 4)))
    client.log_artifact(study, str(tmp_path / "optimization_history.png"))
    client.set_terminated(study, "FINISHED")
    rep = build.build_report([evil], None, tmp_path / "rep", uri)
    md = rep.markdown.read_text()
    assert "<img" not in md and "onerror=alert(1)>" not in md
    assert md.count("&lt;img src=x onerror=alert(1)&gt;") >= 4  # the experiment, the variant, schedule and study
    assert "![study &lt;img src=x onerror=alert(1)&gt;: optimization history]" in md
    assert "<img src=x" not in rep.html.read_text()
