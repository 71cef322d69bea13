"""The options the commands share, each declared once: one per RunConfig field, made from the field's metadata
(help text, choices, path; bench.training.config), and the few others that several commands take.

A config field's option defaults to None, so the config's own default (one place) applies; its help ends with
that default, per dataset where DATASET_DEFAULTS differ (``[default: 3000 (digits), 800,000 (cifar10)]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import fields

import click

from bench.training.config import DATASET_DEFAULTS, RunConfig

FIELDS = {f.name: f for f in fields(RunConfig)}
ARGV = "bench.argv"  # click's ctx.meta key of this invocation's arguments (`bench run --nproc` hands them to its ranks)


def show(v) -> str:
    """A default as the help states it: unset, true/false, 800,000."""
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else f"{v:_}".replace("_", ",") \
        if isinstance(v, int) and abs(v) >= 10_000 else str(v)


def default_text(name: str) -> str:
    """``default: 3000 (digits), 800000 (cifar10)``: the RunConfig default, per dataset where it differs."""
    generic = getattr(RunConfig(), name)
    per = {d: DATASET_DEFAULTS[d].get(name, generic) for d in sorted(DATASET_DEFAULTS)}
    if all(v is None for v in per.values()):
        return ""  # the help says what unset means
    if len(set(map(repr, per.values()))) == 1:
        return f"default: {show(generic)}"
    return "default: " + ", ".join(f"{show(v)} ({d})" for d, v in per.items())


def config_option(name: str, *, help: str | None = None, state_default: bool = True, param: str | None = None,
                  **click_kw):
    """The option of the RunConfig field ``name``: ``--NAME`` (``-`` for ``_``), a ``--NAME/--no-NAME`` switch for a
    bool, its choices or path, and its help from the field's metadata, ending with the default it resolves to
    (unless not ``state_default``). A command that says something else of it gives its own ``help`` ('' for none),
    ``param`` (its parameter's name) and click settings (its own ``default``, ``multiple`` ...)."""
    f, declared = FIELDS[name], str(FIELDS[name].type).replace(" ", "").split("|")
    flag, meta = name.replace("_", "-"), FIELDS[name].metadata
    kw: dict = {"default": None}
    if "bool" in declared:
        decl = f"--{flag}/--no-{flag}"
    else:
        decl, kw["show_default"] = f"--{flag}", False
        if "choices" in meta:
            kw["type"] = click.Choice(meta["choices"])
        elif "path" in meta:
            kw["type"] = click.Path(dir_okay=False) if meta["path"] == "file" else click.Path(file_okay=False)
        elif declared[0] in ("int", "float"):
            kw["type"] = {"int": int, "float": float}[declared[0]]
    text = meta["help"] if help is None else help
    default = default_text(f.name) if state_default else ""
    return click.option(decl, param or f.name, help=f"{text} [{default}]" if default else text, **{**kw, **click_kw})


CONFIG_FILE = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="TOML file of RunConfig values (keys: these options' names with _); "
                                "options given here win.")
# the options of `bench run` that set its config (--config, then each RunConfig field in the config's order);
# `bench grid` and `bench study` take them too, less those they set themselves
RUN_OPTIONS = [CONFIG_FILE, *(config_option(name) for name in FIELDS)]


def param_name(option) -> str:
    """The parameter name that an option decorator declares."""
    return option(lambda: None).__click_params__[-1].name


def without(options, names: Iterable[str]) -> list:
    """``options`` less those whose parameter is one of ``names``."""
    return [o for o in options if param_name(o) not in set(names)]


def stating(options, defaults: dict) -> list:
    """``options`` with the help of those named in ``defaults`` ending in that default instead of `bench run`'s:
    a command's own defaults, stated as its --dry-run resolves them."""
    return [_restated(o, defaults[param_name(o)]) if param_name(o) in defaults else o for o in options]


def _restated(option, default):
    def decorate(f):
        f = option(f)
        param = f.__click_params__[-1]  # the Option that ``option`` just added
        param.help = re.sub(r" \[default: [^\]]*\]$", "", param.help) + f" [default: {show(default)}]"
        return f

    return decorate


def with_options(options) -> Callable:
    """A decorator adding ``options`` in their order."""
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


# ------------------------------------------------------------------------- options of several commands
def tracking_uri(help: str):
    return config_option("tracking_uri", help=help, state_default=False)


def experiments(help: str):
    """--experiment, repeated: the MLflow experiments a command reads."""
    return config_option("experiment", help=help, state_default=False, param="experiments", multiple=True)


def dry_run(help: str):
    return click.option("--dry-run", is_flag=True, help=help)


def report_out(help: str):
    return click.option("--out", default=None, type=click.Path(file_okay=False), help=help)


def log_to_mlflow(help: str):
    return click.option("--log-to-mlflow", is_flag=True, help=help)


def storage(help: str):
    return click.option("--storage", default=None, help=help)


def study_name(help: str):
    return click.option("--study-name", default=None, help=help)


def host(help: str = "Address to serve on (beyond 127.0.0.1: no authentication)."):
    return click.option("--host", default="127.0.0.1", show_default=True, help=help)


def port(default: int):
    return click.option("--port", type=int, default=default, show_default=True)


BROWSER = click.option("--browser/--no-browser", default=True, show_default=True,
                       help="Open the page in a browser when one is available.")
