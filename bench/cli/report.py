"""``bench report``: compare recorded runs in a table, figures, report.html and report.md."""

from __future__ import annotations

import click

from bench.cli import options
from reports.build import build_report


@click.command("report")
@options.experiments("MLflow experiment(s) to read (default: all).")
@click.option("--filter", "filter_string", default=None,
              help="MLflow search filter, e.g. \"params.`config.T` = '1000'\".")
@options.report_out("Report folder (default: ./report-<name>).")
@options.tracking_uri("MLflow tracking URI.")
@options.log_to_mlflow("Also log the report as an MLflow run (experiment elbo-bench-reports); "
                       "off, so reports add no runs.")
def report_cmd(experiments, filter_string, out, tracking_uri, log_to_mlflow) -> None:
    """Compare runs: a table by variant, paired differences, figures, report.html and report.md."""
    rep = build_report(list(experiments) or None, filter_string, out, tracking_uri, log_to_mlflow=log_to_mlflow)
    click.echo(f"report of {rep.runs} runs: {rep.html}")
    click.echo(f"  markdown: {rep.markdown}" + (f"; logged as MLflow run {rep.run_id}" if rep.run_id else ""))
