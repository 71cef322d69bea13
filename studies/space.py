"""The search space of a schedule study: built-in defaults, narrowed or extended by a TOML file.

A study file holds tables ``[params.NAME]`` keyed by RunConfig fields:
``choices = [...]`` for a categorical parameter, or ``low``/``high`` (and ``log = true``) for a
float or int range; ``enabled = false`` drops a default parameter. Example (``studies/narrow.toml``)::

    [params.schedule]
    choices = ["cosine"]
    [params.lr]
    low = 3e-4
    high = 3e-3
    log = true
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.training.config import SCHEDULES, RunConfig

STUDY_DIR = Path(__file__).resolve().parent
TUNABLE = {  # RunConfig fields a study may tune → their type
    "schedule": str, "beta_start": float, "beta_end": float, "cosine_s": float, "T": int,
    "lr": float, "warmup_steps": int, "ema_decay": float, "batch_size": int,
}
LINEAR_ONLY, COSINE_ONLY = ("beta_start", "beta_end"), ("cosine_s",)


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None  # categorical
    low: float | None = None  # range
    high: float | None = None
    log: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name}: one of {list(self.choices)}"
        kind = "log-uniform" if self.log else "uniform"
        return f"{self.name}: {kind} in [{self.low:g}, {self.high:g}]" + (" (int)" if TUNABLE[self.name] is int else "")


DEFAULT_SPACE: dict[str, Param] = {
    "schedule": Param("schedule", choices=("linear", "cosine")),
    "beta_start": Param("beta_start", low=1e-5, high=1e-3, log=True),  # linear β_1
    "beta_end": Param("beta_end", low=5e-3, high=5e-2, log=True),  # linear β_T (sampled first; β_1 < β_T)
    "cosine_s": Param("cosine_s", low=1e-3, high=0.1, log=True),
    "T": Param("T", choices=(250, 500, 1000)),
}


def _param(name: str, spec: dict, where: str) -> Param:
    if name not in TUNABLE:
        raise BenchError(f"{where}: unknown parameter {name!r}; tunable are {', '.join(sorted(TUNABLE))}")
    unknown = set(spec) - {"choices", "low", "high", "log", "enabled"}
    if unknown:
        raise BenchError(f"{where}: parameter {name!r} has unknown key(s) {', '.join(sorted(unknown))}")
    kind = TUNABLE[name]
    if "choices" in spec and name in LINEAR_ONLY:
        raise BenchError(f"{where}: {name} takes a range (low, high) so that β_1 < β_T can be kept, not choices")
    if "choices" in spec:
        choices = tuple(spec["choices"])
        if not choices:
            raise BenchError(f"{where}: parameter {name!r} has no choices")
        if name == "schedule" and not set(choices) <= set(SCHEDULES):
            raise BenchError(f"{where}: schedule choices must be among {', '.join(SCHEDULES)}, got {list(choices)}")
        if kind is not str and not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            raise BenchError(f"{where}: parameter {name!r} needs numeric choices, got {list(choices)}")
        return Param(name, choices=choices)
    if kind is str:
        raise BenchError(f"{where}: parameter {name!r} is categorical; give choices = [...]")
    if "low" not in spec or "high" not in spec:
        raise BenchError(f"{where}: parameter {name!r} needs low and high (or choices)")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise BenchError(f"{where}: parameter {name!r} needs finite numbers for low and high")
    if not low < high:
        raise BenchError(f"{where}: parameter {name!r} has an impossible range: low {low} must be below high {high}")
    if log and low <= 0:
        raise BenchError(f"{where}: parameter {name!r} is log-scaled, so low must be > 0 (got {low})")
    return Param(name, low=float(low) if kind is float else int(low), high=float(high) if kind is float else int(high),
                 log=log)


def load_space(path: str | Path | None = None, tune_lr: bool = False) -> dict[str, Param]:
    """The default space, with ``lr`` added when ``tune_lr``, then the study file's changes.

    ``path`` is a file path or the name of a file in ``studies/`` (with or without ``.toml``).
    """
    space = dict(DEFAULT_SPACE)
    if tune_lr:
        space["lr"] = Param("lr", low=1e-4, high=3e-3, log=True)
    if path is not None:
        file = Path(path)
        if not file.exists():
            named = STUDY_DIR / (file.name if file.suffix == ".toml" else f"{file.name}.toml")
            if not named.exists():
                raise BenchError(f"study file {path} not found (looked for it as a path and in {STUDY_DIR})")
            file = named
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise BenchError(f"study file {file} is not valid TOML: {err}") from None
        extra = set(data) - {"params"}
        if extra:
            raise BenchError(f"study file {file}: unknown section(s) {', '.join(sorted(extra))}; use [params.NAME]")
        for name, spec in data.get("params", {}).items():
            if not isinstance(spec, dict):
                raise BenchError(f"study file {file}: [params.{name}] must be a table")
            if spec.get("enabled", True) is False:
                if name not in TUNABLE:
                    raise BenchError(f"study file {file}: unknown parameter {name!r}")
                space.pop(name, None)
                continue
            space[name] = _param(name, spec, f"study file {file}")
    _check_consistent(space)
    _check_runnable(space)
    return space


def _check_consistent(space: dict[str, Param]) -> None:
    start, end = space.get("beta_start"), space.get("beta_end")
    if start and end and start.choices is None and end.choices is None and not start.low < end.low:
        raise BenchError(
            f"impossible range: beta_start's low ({start.low:g}) must be below beta_end's low ({end.low:g}) "
            "so that β_1 < β_T"
        )
    if end and end.choices is None and end.high >= 1:
        raise BenchError(f"impossible range: beta_end's high must be below 1, got {end.high:g}")


def _check_runnable(space: dict[str, Param]) -> None:
    """Every end of a range and every choice must be a value a run accepts (RunConfig.validate)."""
    for p in space.values():
        if p.name in LINEAR_ONLY:  # checked against each other by _check_consistent
            continue
        values = p.choices if p.choices is not None else (p.low, p.high)
        for v in values:
            try:
                dataclasses.replace(RunConfig(), sample_steps=0, **{p.name: v}).validate()
            except BenchError as err:
                raise BenchError(f"impossible range for {p.name}: a run refuses {v!r} ({err})") from None


def suggest(trial, space: dict[str, Param], base_schedule: str = "linear") -> dict:
    """Draw one point; β parameters only for linear schedules, s only for cosine, β_1 < β_T.

    ``base_schedule`` is the schedule kind when the space does not tune it.
    """
    values = {}
    order = (["schedule", "beta_end", "beta_start"]
             + [n for n in space if n not in ("schedule", "beta_end", "beta_start")])
    schedule = base_schedule
    for name in order:
        p = space.get(name)
        if p is None:
            continue
        if name == "schedule":
            schedule = values["schedule"] = trial.suggest_categorical("schedule", list(p.choices))
            continue
        if schedule == "cosine" and name in LINEAR_ONLY or schedule == "linear" and name in COSINE_ONLY:
            continue
        if p.choices is not None:
            values[name] = trial.suggest_categorical(name, list(p.choices))
        elif TUNABLE[name] is int:
            values[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        else:
            high = p.high
            if name == "beta_start" and "beta_end" in values:
                high = min(high, values["beta_end"] * 0.999)  # keep β_1 < β_T
            values[name] = trial.suggest_float(name, p.low, high, log=p.log)
    return values


def describe_space(space: dict[str, Param]) -> str:
    lines = [space[n].describe() for n in space]
    lines.append("(beta_start/beta_end apply to linear schedules, cosine_s to cosine; "
                 "beta_end is drawn first and β_1 < β_T)")
    return "\n".join(lines)
