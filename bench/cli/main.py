"""The ``bench`` command line: thin click commands that parse, validate and call one library function.

Exit status: 0 done; 2 bad input (one line on stderr, ``error: …``, nothing written);
3 ``bench run`` trained but the run diverged (recorded in MLflow as FAILED); 130 interrupted.

``bench run`` and ``bench eval`` also run as the ranks of ``torchrun -m bench …`` (see :mod:`bench.runtime.dist`);
rank 0 alone prints results. This module holds the group, its error handling and ``main()``; the commands live
by family in ``bench.cli.run`` (run, eval), ``.study``, ``.grid``, ``.report``, ``.serve`` (ui, server,
dashboard), ``.tools`` (variants, weightings, runs, fid) and ``.export``; the options they share in
``bench.cli.options``.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from importlib.metadata import version

import click

from bench.cli import export, grid, report, run, serve, study, tools
from bench.cli.options import ARGV
from bench.errors import BenchError
from bench.runtime.dist import teardown
from bench.tracking.provenance import git_commit, versions


class BenchGroup(click.Group):
    """A click group whose errors are one line and a non-zero exit."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        where = "" if rank == "0" else f" (rank {rank})"
        try:
            rv = super().main(args=args, prog_name=prog_name or "bench", standalone_mode=False, **extra)
        except click.UsageError as err:
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
            click.echo(f"error{where}: {err.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"error{where}: {err.format_message()}", err=True)
            sys.exit(err.exit_code or 1)
        except BenchError as err:
            click.echo(f"error{where}: {err}", err=True)
            sys.exit(2)
        except OSError as err:  # a full disk wherever it strikes (checkpoints say more: bench.training.checkpoint)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            place = f" writing {err.filename}" if err.filename else ""
            click.echo(f"error{where}: {os.strerror(err.errno).lower()}{place}; free some space, then run the command "
                       "again (a run resumes from its last checkpoint: bench run --resume)", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, click.Abort):
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            teardown()
        sys.exit(rv if isinstance(rv, int) else 0)

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)  # the arguments of this invocation, for `--nproc` to hand to its ranks
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta[ARGV] = argv
        return ctx


def _print_version(ctx, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    libs = ", ".join(f"{k.removeprefix('version.')} {v}" for k, v in versions().items())
    click.echo(f"elbo-bench {version('elbo-bench')} (source {git_commit()}; {libs})")
    ctx.exit(0)


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version (with the source's git commit and the libraries') and exit.")
def cli() -> None:
    """elbo-bench: train DDPMs with different objectives and compare them by bits/dim and FID."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")


for command in (run.run_cmd, run.eval_cmd, study.study_cmd, grid.grid_cmd, report.report_cmd, serve.ui_cmd,
                serve.server_cmd, serve.dashboard_cmd, tools.variants_cmd, tools.weightings_cmd, tools.runs_cmd,
                tools.fid_cmd):
    cli.add_command(command)
cli.add_command(export.export_cmd)


def main() -> None:
    cli.main()
