"""A weighted-ELBO run (variant ``weighted``) in a report: its row's label and its monotone flag, read from the run's
``config.*`` params, so runs recorded before the ``weighting_monotone`` tag existed show them too.

The label names what the model was trained on: ``weighted[edm]``, ``weighted[v+adaptive]``, with the hyper-parameters
of the weighting that differ from their defaults (``weighted[min-snr γ=3]``). The flag says whether w(λ) is
non-increasing in λ on the run's own schedule (:func:`bench.diffusion.weighting.is_monotone`): then L_w is an ELBO of
Gaussian-noise-augmented data.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from bench.diffusion.weighting import SYMBOLS, WEIGHTINGS, is_monotone
from bench.errors import BenchError
from bench.training.config import WEIGHTED_FIELDS, RunConfig
from variants import VARIANTS

# the fields that give the schedule a weighting is read on (with the variant's resolution of gamma_schedule)
SCHEDULE_FIELDS = ("gamma_schedule", "gamma_min", "gamma_max", "T", "beta_start", "beta_end", "cosine_s")
UNKNOWN = "?"  # the flag where the weighting cannot be rebuilt here (a table file this machine cannot read)
DEFAULTS = RunConfig()


def is_weighted(params: dict[str, str]) -> bool:
    """Whether the run's variant is a member of the weighted-ELBO family."""
    cls = VARIANTS.get(params.get("config.variant", ""))
    return cls is not None and cls.weighted


def _typed(name: str, text: str):
    """A RunConfig field's value from its param's text (flatten writes None as '')."""
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        return text == "True"
    if default is None:
        return text or None
    return type(default)(text)


@functools.lru_cache(maxsize=256)
def _config(items: tuple[tuple[str, str], ...]) -> RunConfig:
    """The defaults with the weighted and schedule fields the run logged (those it predates keep their defaults)."""
    return dataclasses.replace(RunConfig(), **{k: _typed(k, v) for k, v in items})


def run_config(params: dict[str, str]) -> RunConfig:
    """The part of a weighted run's RunConfig that says what it was trained on, from its ``config.*`` params."""
    names = ("variant", "variance", *WEIGHTED_FIELDS, *SCHEDULE_FIELDS)
    return _config(tuple((n, params[f"config.{n}"]) for n in names if f"config.{n}" in params))


def _read(config: RunConfig) -> tuple[str, ...]:
    """The hyper-parameters the run's weighting reads (all of them for a name this version does not know)."""
    kind = WEIGHTINGS.get(config.weighting)
    return kind.hyper if kind is not None else WEIGHTED_FIELDS


def key_values(config: RunConfig) -> dict[str, str]:
    """The weighted fields as a row's key holds them: each hyper-parameter the weighting reads as its number (5 and
    5.0 alike), each other one as its default (it cannot change the run's numbers)."""
    read = (*_read(config), "weighting", "adaptive_schedule")
    values = {n: getattr(config if n in read else DEFAULTS, n) for n in WEIGHTED_FIELDS}
    return {f"config.{n}": "" if v is None else str(float(v) if n in SYMBOLS else v) for n, v in values.items()}


def label(config: RunConfig) -> str:
    """``weighted[NAME]``, with the hyper-parameters that differ from their defaults and ``+adaptive``."""
    hyper = [f"{SYMBOLS[n]}={getattr(config, n):g}" for n in _read(config)
             if n in SYMBOLS and getattr(config, n) != getattr(DEFAULTS, n)]
    if config.weighting_table:
        hyper.append(Path(config.weighting_table).name)
    text = " ".join([config.weighting, *hyper])
    return f"{config.variant}[{text}{'+adaptive' if config.adaptive_schedule else ''}]"


@functools.lru_cache(maxsize=256)
def monotone(config: RunConfig) -> str:
    """'yes' where w(λ) is non-increasing in λ on the run's schedule, 'no' where not, :data:`UNKNOWN` where the
    weighting cannot be rebuilt here."""
    try:
        variant = config.build_variant()
        return "yes" if is_monotone(variant.weighting, config.build_noise_schedule(variant)) else "no"
    except BenchError:
        return UNKNOWN


def row_values(params: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """What a weighted run puts in its report row: ``variant`` (its label), ``monotone`` and the weighted fields'
    key values; for any other run only an empty ``monotone``. Where the weighting cannot be rebuilt here, the flag
    the run recorded (tag ``weighting_monotone``) stands."""
    if not is_weighted(params):
        return {"monotone": ""}
    recorded = tags.get("weighting_monotone") if tags.get("weighting_monotone") in ("yes", "no") else UNKNOWN
    try:
        config = run_config(params)
    except ValueError:  # a param that is not its field's type: the run's own label stands
        return {"monotone": recorded}
    flag = monotone(config)
    return {"variant": label(config), "monotone": recorded if flag == UNKNOWN else flag, **key_values(config)}
