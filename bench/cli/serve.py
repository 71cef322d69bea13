"""``bench ui``, ``bench server`` and ``bench dashboard``: the MLflow UI, a tracking server and optuna-dashboard."""

from __future__ import annotations

import click

from bench.cli import options
from bench.serve.ui import serve, serve_dashboard, serve_tracking


@click.command("ui")
@options.host()
@options.port(5000)
@options.tracking_uri("The store to browse (default: $MLFLOW_TRACKING_URI, else the embedded one).")
@options.config_option("experiment", state_default=False,
                       help="Experiment to open (default: $MLFLOW_EXPERIMENT_NAME, else the one with the newest run).")
@options.BROWSER
def ui_cmd(host, port, tracking_uri, experiment, browser) -> None:
    """Start the MLflow UI on the runs table of an experiment (bpd, fid, variant shown); Ctrl-C stops it."""
    serve(tracking_uri, host, port, experiment=experiment, open_browser=browser)


@click.command("server")
@click.option("--backend-store-uri", default=None, envvar="MLFLOW_BACKEND_STORE_URI",
              help="Database of the runs: postgresql://USER:PASSWORD@HOST/DB, or sqlite:///PATH (unset: "
                   "$MLFLOW_BACKEND_STORE_URI, which keeps a password off the command line, "
                   "else mlflow.db in BENCH_HOME).")
@click.option("--artifacts-destination", default=None,
              help="Where uploaded artifacts are kept: a folder or an object-store URI such as s3://bucket/path "
                   "(unset: mlartifacts-served/ in BENCH_HOME).")
@options.host("Address to serve on; "
              "workers on other machines need 0.0.0.0 or this machine's address (no authentication).")
@options.port(5000)
@click.option("--workers", type=int, default=4, show_default=True, help="Server processes answering requests.")
@click.option("--allowed-hosts", default=None,
              help="Host names workers may use to reach the server, comma-separated (MLflow's DNS-rebinding guard; "
                   "unset: localhost and private addresses).")
def server_cmd(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts) -> None:
    """Start an MLflow tracking server for studies across machines; Ctrl-C stops it.

    Workers then log to it with `--tracking-uri http://HOST:PORT`; artifacts go through the server, so
    they need no shared disk."""
    serve_tracking(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts)


@click.command("dashboard")
@options.storage("Optuna RDB URL (default: the sqlite optuna.db in BENCH_HOME that bench study uses).")
@options.host()
@options.port(8080)
@options.BROWSER
@options.study_name("Open this study's page (default: the list of studies).")
def dashboard_cmd(storage, host, port, browser, study_name) -> None:
    """Start optuna-dashboard on the studies' storage; Ctrl-C stops it."""
    serve_dashboard(storage, host, port, open_browser=browser, study_name=study_name)
