"""The suite's own guards: under CI a missing Chromium or PostgreSQL fails the tests that need it (it
skips elsewhere), and .ci/run stops when it cannot install them instead of running a suite that skips."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import postgres
import pytest
import tools

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         (None, pytest.skip.Exception)])
def test_a_missing_program_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(tools, "CHROMIUM", None)
    with pytest.raises(outcome, match="Chromium is not installed"):
        tools.need_chromium()
    monkeypatch.setattr(postgres, "server_binaries", lambda: (None, "no PostgreSQL server programs"))
    with pytest.raises(outcome, match="no PostgreSQL server programs"):
        tools.missing(postgres.unavailable())


def _fake_bin(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_ci_run_stops_when_it_cannot_install_chromium(tmp_path):
    """.ci/run with no chromium on PATH and an apt-get that fails: it exits non-zero, saying so, before
    `make test` (a stand-in that records being called) runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "ls"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    _fake_bin(bin_dir, "apt-get", "exit 100")
    _fake_bin(bin_dir, "initdb", "exit 0")  # PostgreSQL counts as installed: only Chromium is missing
    _fake_bin(bin_dir, "make", f"touch {tmp_path / 'make-ran'}")
    done = subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "run")], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "error: could not install chromium" in done.stderr
    assert not (tmp_path / "make-ran").exists()


def test_ci_run_runs_the_suite_with_ci_set(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "ls"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    for present in ("chromium", "initdb"):
        _fake_bin(bin_dir, present, "exit 0")
    _fake_bin(bin_dir, "make", f'echo "CI=$CI $*" > {tmp_path / "make-ran"}')
    done = subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "run")], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "make-ran").read_text() == "CI=true test\n"
