"""Store URLs with passwords: masked wherever shown or stored, the real one needed again to resume; the
advisory lock's name does not depend on how a URL is spelled."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.cli.main import cli
from bench.errors import BenchError
from bench.runtime.locks import advisory_name
from bench.runtime.urls import hides_secret, masked, scrubbed
from bench.tracking import store as tracking
from bench.training.config import flatten, make_config

SECRET = "s3cr%40t"  # percent-encoded '@'
URL = f"postgresql://bench:{SECRET}@db.example:5432/runs"


@pytest.mark.parametrize("url, shown", [
    (URL, "postgresql://bench:***@db.example:5432/runs"),
    ("postgresql+psycopg://bench@db.example/runs", "postgresql+psycopg://bench@db.example/runs"),
    ("mysql://u:p@h/d?charset=utf8&password=x", "mysql://u:***@h/d?charset=utf8&password=***"),
    ("https://user:tok@mlflow.example/path", "https://user:***@mlflow.example/path"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
    ("file:///tmp/a@b/mlruns", "file:///tmp/a@b/mlruns"),  # an '@' in the path is no password
    ("not a url", "not a url"),
])
def test_masked_hides_the_password_and_keeps_the_rest(url, shown):
    assert masked(url) == shown
    assert hides_secret(shown) is (shown != url)
    assert masked(shown) == shown


def test_scrubbed_masks_the_password_in_a_message():
    assert scrubbed('connection to "db.example" as bench:s3cr@t / s3cr%40t failed', URL) == \
        'connection to "db.example" as bench:*** / *** failed'


def test_the_config_is_recorded_and_printed_masked():
    config = make_config(tracking_uri=URL)
    assert config.tracking_uri == URL  # in memory the run connects with the real one
    assert flatten(config)["config.tracking_uri"] == "postgresql://bench:***@db.example:5432/runs"
    assert config.redacted().to_dict()["tracking_uri"] == "postgresql://bench:***@db.example:5432/runs"
    res = CliRunner().invoke(cli, ["run", "--tracking-uri", URL, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tracking_uri"] == "postgresql://bench:***@db.example:5432/runs"
    assert "s3cr" not in res.output


def test_a_recorded_store_needs_its_password_again(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stored = masked(URL)
    with pytest.raises(BenchError, match=r"recorded without its password; give the URI with the password as "
                                         r"--tracking-uri \(or in \$MLFLOW_TRACKING_URI\)"):
        tracking.recorded_store(stored)
    assert tracking.recorded_store(stored, URL) == URL
    assert tracking.recorded_store(stored, stored.replace("***", "x")) == stored.replace("***", "x")  # another password
    with pytest.raises(BenchError, match=r"--tracking-uri postgresql://bench:\*\*\*@other:5432/runs is not the store"):
        tracking.recorded_store(stored, URL.replace("db.example", "other"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URL)
    assert tracking.recorded_store(stored) == URL
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    with pytest.raises(BenchError, match="recorded without its password"):
        tracking.recorded_store(stored)
    assert tracking.recorded_store("sqlite:///here.db") == "sqlite:///here.db"  # nothing hidden: as recorded


def test_the_advisory_lock_does_not_depend_on_how_the_url_is_spelled():
    spellings = ["postgresql://bench@127.0.0.1:5432/runs", "postgresql+psycopg://bench:pw@LOCALHOST/runs",
                 "postgres://other@localhost:5432/runs?connect_timeout=10", "postgresql://bench@[::1]/runs"]
    assert {advisory_name(u, "trial") for u in spellings} == {"runs:trial"}
    assert advisory_name("postgresql://bench@127.0.0.1/other", "trial") != advisory_name(spellings[0], "trial")
    assert advisory_name(spellings[0], "create") != advisory_name(spellings[0], "trial")
