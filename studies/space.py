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

The built-in space depends on the study's variant. A DDPM variant tunes the discrete schedule (``schedule``,
``beta_start``/``beta_end`` or ``cosine_s``, ``T``). A continuous-time variant (``vdm-fixed``, ``vdm-finite``)
tunes its schedule's end points instead, ``gamma_min`` = γ(0) and ``gamma_max`` = γ(1) of γ(t) = −log SNR(t),
and ``vdm-finite`` its ``T`` as well. For ``vdm`` (a learned schedule) the same two parameters are the learned
schedule's *starting* end points: training moves them by the bound, but an Adam step moves a parameter by about
the learning rate, so within a study's short trials where they start largely decides where they end; tuning them
is what "tuned (Optuna) vs learned (VDM) schedule" compares against ``vdm-fixed``. A study file may also tune
``gamma_schedule`` among the schedules the variant trains with. The weighted-ELBO family (``weighted``) tunes, besides
γ's end points, its ``weighting`` w(λ) and that weighting's hyper-parameter, drawn only with it (``min_snr_gamma``
with ``min-snr``, ``sigmoid_bias`` with ``sigmoid``); a study file may add ``edm_mean``/``edm_std`` (with ``edm``,
``edm-monotonic``) and ``adaptive_schedule`` (``choices = [false, true]``); ``studies/weightings.toml`` is the study
over weightings at fixed end points. A parameter that does not act on the study's variant (``gamma_min`` for a DDPM
variant, ``schedule`` for a continuous-time one, ``weighting`` for any but ``weighted``) is refused.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.diffusion.vdm import GAMMA_SCHEDULES, LEARNED_GAMMAS
from bench.diffusion.weighting import WEIGHTINGS
from bench.errors import BenchError
from bench.training.config import SCHEDULES, RunConfig
from variants import get_variant

STUDY_DIR = Path(__file__).resolve().parent
TUNABLE = {  # RunConfig fields a study may tune → their type
    "schedule": str, "beta_start": float, "beta_end": float, "cosine_s": float, "T": int,
    "gamma_schedule": str, "gamma_min": float, "gamma_max": float,
    "weighting": str, "min_snr_gamma": float, "sigmoid_bias": float, "edm_mean": float, "edm_std": float,
    "adaptive_schedule": bool,
    "lr": float, "warmup_steps": int, "ema_decay": float, "batch_size": int,
}
LINEAR_ONLY, COSINE_ONLY = ("beta_start", "beta_end"), ("cosine_s",)
GAMMA_ENDS = ("gamma_min", "gamma_max")  # γ(0) < γ(1), kept like β_1 < β_T
DISCRETE_ONLY = ("schedule",)  # a continuous-time variant's γ(t) is named by gamma_schedule
READINGS = {"linear-beta": LINEAR_ONLY, "cosine": COSINE_ONLY}  # γ(t) read from the discrete schedule's fields
# a weighting's hyper-parameter → the weightings that read it (bench.diffusion.weighting.WEIGHTINGS)
HYPER = {h: tuple(w for w, kind in WEIGHTINGS.items() if h in kind.hyper)
         for h in ("min_snr_gamma", "sigmoid_bias", "edm_mean", "edm_std")}
WEIGHTED_ONLY = ("weighting", *HYPER, "adaptive_schedule")  # read by variant weighted only
STUDY_WEIGHTINGS = tuple(w for w in WEIGHTINGS if w != "table")  # a table is a file: train it with `bench run`


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
# Continuous-time variants: the end points of γ(t) = −log SNR(t), around VDM's (−13.3, 5.0). γ(0) sets the
# decoder's noise, σ_0 ≈ exp(γ_min/2): 3e-4 at −16 (the diffusion term must span more SNR) to 0.018 at −8 (over
# two of the 8-bit bins of width 2/255, so the reconstruction term grows). γ(1) sets the prior term, α_1² =
# sigmoid(−γ_max): 0.12 at 2 (KL(q(z_1|x) ‖ N(0, I)) costs bits) to 3e-4 at 8 (the prior term vanishes and the
# diffusion term spans more). The ranges are disjoint, so γ(0) < γ(1) at every point.
CONTINUOUS_SPACE: dict[str, Param] = {
    "gamma_min": Param("gamma_min", low=-16.0, high=-8.0),
    "gamma_max": Param("gamma_max", low=2.0, high=8.0),  # drawn first; γ(0) < γ(1)
}
FINITE_SPACE: dict[str, Param] = {**CONTINUOUS_SPACE, "T": DEFAULT_SPACE["T"]}  # vdm-finite: L_T's T too
# Variant weighted: γ's end points as above, and which weighting w(λ) with its hyper-parameter, each drawn only with
# the weighting that reads it. min-SNR's clip γ log-uniform around its paper's 5: at 1 the x-error's weight is held
# at SNR 1 from λ = 0 up, at 20 only from λ = 3. The sigmoid's bias b: sigmoid(b − λ) falls from 1 to 0 and is ½ at
# λ = b; over the schedule's λ range [−γ(1), −γ(0)] = [−5, 13.3] (by default) w <= 0.27 throughout at b = −6, and
# w >= ½ up to SNR e^4 ≈ 55 at b = 4.
WEIGHTED_SPACE: dict[str, Param] = {
    **CONTINUOUS_SPACE,
    "weighting": Param("weighting", choices=STUDY_WEIGHTINGS),
    "min_snr_gamma": Param("min_snr_gamma", low=1.0, high=20.0, log=True),  # with min-snr
    "sigmoid_bias": Param("sigmoid_bias", low=-6.0, high=4.0),  # with sigmoid
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
    if "choices" in spec and name in GAMMA_ENDS:
        raise BenchError(f"{where}: {name} takes a range (low, high) so that γ(0) < γ(1) can be kept, not choices")
    if "choices" in spec:
        choices = tuple(spec["choices"])
        if not choices:
            raise BenchError(f"{where}: parameter {name!r} has no choices")
        if name == "schedule" and not set(choices) <= set(SCHEDULES):
            raise BenchError(f"{where}: schedule choices must be among {', '.join(SCHEDULES)}, got {list(choices)}")
        if name == "gamma_schedule" and not set(choices) <= set(GAMMA_SCHEDULES):
            raise BenchError(f"{where}: gamma_schedule choices must be among {', '.join(GAMMA_SCHEDULES)}, "
                             f"got {list(choices)}")
        if name == "weighting" and not set(choices) <= set(STUDY_WEIGHTINGS):
            raise BenchError(f"{where}: weighting choices must be among {', '.join(STUDY_WEIGHTINGS)} (a table is a "
                             f"file: train it with bench run --weighting table), got {list(choices)}")
        if kind is bool and not all(isinstance(c, bool) for c in choices):
            raise BenchError(f"{where}: parameter {name!r} needs true/false choices, got {list(choices)}")
        numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
        if kind not in (str, bool) and not numeric:
            raise BenchError(f"{where}: parameter {name!r} needs numeric choices, got {list(choices)}")
        return Param(name, choices=choices)
    if kind in (str, bool):
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


def default_space(base: RunConfig) -> dict[str, Param]:
    """The built-in space of ``base``'s variant: the discrete schedule for a DDPM variant, γ(t)'s end points for a
    continuous-time one (and T for the finite-T bound; the weighting and its hyper-parameters for ``weighted``)."""
    variant = get_variant(base.variant, base.variance)
    if not variant.continuous:
        return dict(DEFAULT_SPACE)
    if variant.weighted:
        return dict(WEIGHTED_SPACE)
    return dict(FINITE_SPACE if variant.finite else CONTINUOUS_SPACE)


def load_space(path: str | Path | None = None, tune_lr: bool = False,
               base: RunConfig | None = None) -> dict[str, Param]:
    """The default space of ``base``'s variant (a trial's config before the space's values; default: ``bench run``'s
    defaults, variant ``simple``), with ``lr`` added when ``tune_lr``, then the study file's changes, checked
    against that config: every parameter the file gives must act on its variant and every value must be one a
    run accepts.

    ``path`` is a file path or the name of a file in ``studies/`` (with or without ``.toml``).
    """
    base = base or RunConfig()
    space, given = default_space(base), set()
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
            given.add(name)
    _check_acts(space, base, given)
    _check_consistent(space, base)
    _check_runnable(space, base)
    return space


def acts(name: str, base: RunConfig, schedule: str | None = None, gamma_schedule: str | None = None,
         weighting: str | None = None) -> bool:
    """Whether the tunable field ``name`` changes a run of ``base``'s variant when the discrete ``schedule``, the
    ``gamma_schedule`` and the ``weighting`` are these (default: ``base``'s). A DDPM variant reads β_1, β_T for a
    linear schedule, s for a cosine one and no γ; a continuous-time one reads γ(0), γ(1) for VDM's line and the
    learned schedules, β_1, β_T or s (with T) where γ(t) is the discrete schedule read in continuous time, never
    ``schedule``. Only ``weighted`` reads the weighting, and a weighting's hyper-parameter only with it."""
    variant = get_variant(base.variant, base.variance)
    if name in WEIGHTED_ONLY:
        return variant.weighted and (name not in HYPER or (weighting or base.weighting) in HYPER[name])
    if not variant.continuous:
        schedule = schedule or base.schedule
        if name in GAMMA_ENDS or name == "gamma_schedule":
            return False
        return not (name in LINEAR_ONLY and schedule != "linear" or name in COSINE_ONLY and schedule != "cosine")
    if name in DISCRETE_ONLY:
        return False
    reading = READINGS.get(variant.gamma_schedule(gamma_schedule or base.gamma_schedule))
    if name in GAMMA_ENDS:
        return reading is None
    if name in LINEAR_ONLY + COSINE_ONLY:
        return reading is not None and name in reading
    return True


def base_value(name: str, base: RunConfig):
    """``base``'s value of the tunable field ``name``, its gamma_schedule resolved for its variant (``auto`` →
    what the variant trains with), so that a study's default point names the schedule it runs."""
    variant = get_variant(base.variant, base.variance)
    if name == "gamma_schedule" and variant.continuous:
        return variant.gamma_schedule(base.gamma_schedule)
    return getattr(base, name)


def default_point(base: RunConfig, space: dict[str, Param]) -> dict | None:
    """``base``'s values of the tuned parameters that act on its run (a study's trial 0, to compare with), or None
    when the space cannot hold them."""
    point = {}
    for name in space:
        if not acts(name, base):
            continue
        point[name] = value = base_value(name, base)
        p = space[name]
        inside = value in p.choices if p.choices is not None else p.low <= value <= p.high
        if not inside:
            return None
    return point


def _check_acts(space: dict[str, Param], base: RunConfig, given: set[str]) -> None:
    """Refuse a parameter of the study file (``given``) that acts on the variant under none of the schedules the
    study can draw. A default one that does not act under them is kept and never drawn (β with cosine only)."""
    variant = get_variant(base.variant, base.variance)
    schedules = space["schedule"].choices if "schedule" in space else (base.schedule,)
    gammas = space["gamma_schedule"].choices if "gamma_schedule" in space else (base.gamma_schedule,)
    weightings = _weightings(space, base)
    if variant.continuous:
        for g in gammas:  # a schedule the variant cannot train with: its own one-line refusal
            try:
                variant.gamma_schedule(g)
            except BenchError as err:
                raise BenchError(f"impossible choice for gamma_schedule: {err}") from None
    for name in sorted(given):
        if not any(acts(name, base, s, g, w) for s in schedules for g in gammas for w in weightings):
            if name in WEIGHTED_ONLY:
                kind = (f"with weighting {' or '.join(weightings)}: {name} is read by {' and '.join(HYPER[name])}"
                        if variant.weighted else "the weighting and its hyper-parameters are for variant weighted")
            else:
                kind = ("a continuous-time variant: its γ(t) is set by gamma_schedule, gamma_min and gamma_max"
                        if variant.continuous else "a DDPM variant: its schedule is schedule, beta_start/beta_end or "
                        "cosine_s, and T")
            raise BenchError(f"parameter {name} does not act on variant {base.variant} ({kind}); drop it from the "
                             "study file or study another variant")


def _check_consistent(space: dict[str, Param], base: RunConfig) -> None:
    start, end = space.get("beta_start"), space.get("beta_end")
    if start and end and start.choices is None and end.choices is None and not start.low < end.low:
        raise BenchError(
            f"impossible range: beta_start's low ({start.low:g}) must be below beta_end's low ({end.low:g}) "
            "so that β_1 < β_T"
        )
    if end and end.choices is None and end.high >= 1:
        raise BenchError(f"impossible range: beta_end's high must be below 1, got {end.high:g}")
    low, high = space.get("gamma_min"), space.get("gamma_max")  # ranges: _param refuses choices for them
    if low and high and not low.low < high.low:
        raise BenchError(f"impossible range: gamma_min's low ({low.low:g}) must be below gamma_max's low "
                         f"({high.low:g}) so that γ(0) < γ(1)")
    if low and not high and not low.high < base.gamma_max:
        raise BenchError(f"impossible range: gamma_min's high ({low.high:g}) must be below gamma_max "
                         f"({base.gamma_max:g}, not tuned) so that γ(0) < γ(1)")
    if high and not low and not base.gamma_min < high.low:
        raise BenchError(f"impossible range: gamma_max's low ({high.low:g}) must be above gamma_min "
                         f"({base.gamma_min:g}, not tuned) so that γ(0) < γ(1)")


def _weightings(space: dict[str, Param], base: RunConfig) -> tuple[str, ...]:
    """The weightings a study of ``base`` can draw: the space's choices, or ``base``'s."""
    return space["weighting"].choices if "weighting" in space else (base.weighting,)


def _check_runnable(space: dict[str, Param], base: RunConfig) -> None:
    """Every end of a range and every choice must be a value a run of ``base`` accepts (RunConfig.validate); a
    weighting's hyper-parameter with a weighting that reads it, γ's end points with every weighting."""
    weightings = _weightings(space, base)
    for p in space.values():
        if p.name in LINEAR_ONLY + GAMMA_ENDS:  # checked against each other by _check_consistent
            continue
        reader = next((w for w in weightings if w in HYPER[p.name]), None) if p.name in HYPER else base.weighting
        if reader is None:  # a default hyper-parameter of no weighting drawn: never drawn
            continue
        values = p.choices if p.choices is not None else (p.low, p.high)
        for v in values:
            _runs(base, p.name, v, **{"weighting": reader, p.name: v})
    if any(n in space for n in GAMMA_ENDS):  # the widest pair a draw can give, for the variant's say
        low = space["gamma_min"].low if "gamma_min" in space else base.gamma_min
        high = space["gamma_max"].high if "gamma_max" in space else base.gamma_max
        for w in weightings:  # a weight not finite at some end point (zero SNR with ε-prediction) is refused here
            _runs(base, "gamma_min/gamma_max", (low, high), gamma_min=low, gamma_max=high, weighting=w)


def _runs(base: RunConfig, name: str, value, **fields) -> None:
    try:
        dataclasses.replace(base, sample_steps=0, **fields).validate()
    except BenchError as err:
        raise BenchError(f"impossible range for {name}: a run of {base.variant} refuses {value!r} ({err})") from None


def suggest(trial, space: dict[str, Param], base: RunConfig | None = None) -> dict:
    """Draw one point for a trial of ``base`` (default: ``bench run``'s defaults); a parameter only where it
    acts (β for linear schedules, s for cosine, γ's end points for VDM's line and the learned schedules, a
    weighting's hyper-parameter with that weighting), β_1 < β_T and γ(0) < γ(1): β_T and γ(1) are drawn first,
    β_1 and γ(0) below them. The schedules and the weighting are ``base``'s where the space does not tune them."""
    base = base or RunConfig()
    values = {}
    first = ("schedule", "gamma_schedule", "weighting", "beta_end", "beta_start", "gamma_max", "gamma_min")
    order = [*first, *(n for n in space if n not in first)]
    for name in order:
        p = space.get(name)
        if p is None:
            continue
        if name in ("schedule", "gamma_schedule", "weighting"):
            values[name] = trial.suggest_categorical(name, list(p.choices))
            continue
        if not acts(name, base, values.get("schedule"), values.get("gamma_schedule"), values.get("weighting")):
            continue
        if p.choices is not None:
            values[name] = trial.suggest_categorical(name, list(p.choices))
        elif TUNABLE[name] is int:
            values[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        else:
            high = p.high
            if name == "beta_start" and "beta_end" in values:
                high = min(high, values["beta_end"] * 0.999)  # keep β_1 < β_T
            if name == "gamma_min":  # keep γ(0) < γ(1); _check_consistent keeps low below it
                high = min(high, math.nextafter(values.get("gamma_max", base.gamma_max), -math.inf))
            values[name] = trial.suggest_float(name, p.low, high, log=p.log)
    return values


def describe_space(space: dict[str, Param], base: RunConfig | None = None) -> str:
    """The space as ``--show-space`` prints it, one parameter a line, then what applies where for ``base``'s
    variant (default: ``simple``)."""
    base = base or RunConfig()
    lines = [space[n].describe() for n in space]
    if not get_variant(base.variant, base.variance).continuous:
        lines.append("(beta_start/beta_end apply to linear schedules, cosine_s to cosine; "
                     "beta_end is drawn first and β_1 < β_T)")
    elif any(n in space for n in GAMMA_ENDS):
        lines.append(f"({gamma_note(base)}; gamma_max is drawn first and γ(0) < γ(1))")
    hyper = [f"{n} with {' or '.join(HYPER[n])}" for n in space if n in HYPER]
    if hyper and "weighting" in space:
        lines.append(f"(a weighting's hyper-parameter is drawn only with it: {', '.join(hyper)})")
    return "\n".join(lines)


def gamma_note(base: RunConfig, gamma_schedule: str | None = None) -> str:
    """What gamma_min/gamma_max are in a run of ``base`` (its gamma_schedule, or ``gamma_schedule``): the fixed
    schedule's end points, or a learned schedule's starting ones."""
    variant = get_variant(base.variant, base.variance)
    if not variant.continuous:
        return "gamma_min/gamma_max: not used by a DDPM variant"
    if variant.gamma_schedule(gamma_schedule or base.gamma_schedule) in LEARNED_GAMMAS:
        return ("gamma_min/gamma_max: the learned schedule's starting end points γ(0), γ(1) "
                "(training moves them)")
    return "gamma_min/gamma_max: the fixed schedule's end points γ(0), γ(1)"


def describe_schedule(params: dict, base: RunConfig) -> str:
    """The noise schedule a trial of ``base`` ran with its ``params`` (a study's point), in one phrase, so the
    studies of a DDPM and a continuous-time variant compare in one column: the discrete schedule, or γ(t)
    with its end points (a learned schedule's starting ones)."""
    config = dataclasses.replace(base, **{k: v for k, v in params.items() if k in TUNABLE})
    variant = get_variant(config.variant, config.variance)
    if not variant.continuous:
        return (f"linear β_1={config.beta_start:.4g} β_T={config.beta_end:.4g}" if config.schedule == "linear"
                else f"cosine s={config.cosine_s:.4g}") + f", T={config.T}"
    gamma = variant.gamma_schedule(config.gamma_schedule)
    if gamma in READINGS:
        text = (f"γ(t) {gamma} from β_1={config.beta_start:.4g} β_T={config.beta_end:.4g}" if gamma == "linear-beta"
                else f"γ(t) cosine from s={config.cosine_s:.4g}")
        return f"{text}, T={config.T}"
    ends = f"γ(0)={config.gamma_min:.4g} γ(1)={config.gamma_max:.4g}"
    text = f"γ(t) {gamma}, " + (f"learned from {ends}" if gamma in LEARNED_GAMMAS else ends)
    return text + (f", L_T with T={config.T}" if variant.finite else "")


def describe_weighting(params: dict, base: RunConfig, tuned: frozenset[str] = frozenset()) -> str | None:
    """The weighting w(λ) a trial of ``base`` trained with its ``params`` (a study's point), in one phrase with its
    hyper-parameters, e.g. ``min-snr(min_snr_gamma=4.2)`` or ``sigmoid(sigmoid_bias=-2) + adaptive schedule``; a
    hyper-parameter in ``tuned`` is said to be tuned instead of given a value. None for a variant without one."""
    config = dataclasses.replace(base, **{k: v for k, v in params.items() if k in TUNABLE})
    if not get_variant(config.variant, config.variance).weighted:
        return None
    hyper = ", ".join(f"{k} tuned" if k in tuned else f"{k}={_short(getattr(config, k))}"
                      for k in WEIGHTINGS[config.weighting].hyper)
    text = f"{config.weighting}({hyper})" if hyper else config.weighting
    if "adaptive_schedule" in tuned:
        return text + ", adaptive schedule tuned"
    return text + (" + adaptive schedule" if config.adaptive_schedule else "")


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
