"""The search space of a study per variant kind (studies/space.py): the DDPM variants' space and its draws as
before, the continuous-time variants' γ(t) end points with γ(0) < γ(1), the weighted family's weighting with each
hyper-parameter drawn only with its weighting, study files checked against the variant.

Unit level: Optuna's in-memory storage, no trial is trained (the studies that train are in test_study.py).
"""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest

from bench.errors import BenchError
from bench.training.config import RunConfig
from studies.config import StudyConfig
from studies.space import (
    CONTINUOUS_SPACE,
    DEFAULT_SPACE,
    HYPER,
    STUDY_WEIGHTINGS,
    WEIGHTED_SPACE,
    default_point,
    describe_schedule,
    describe_space,
    describe_weighting,
    load_space,
    suggest,
)
from variants import VARIANTS

DDPM = sorted(n for n, v in VARIANTS.items() if not v.continuous)
CONTINUOUS = sorted(n for n, v in VARIANTS.items() if v.continuous)
# Drawn by the code before the continuous-time variants' space existed (the default space, variant simple), with
# the samplers below: a DDPM study must draw these again for the same seed.
PINNED_RANDOM_SEED_3 = [
    {"schedule": "cosine", "cosine_s": 0.0038177675111179033, "T": 1000},
    {"schedule": "cosine", "cosine_s": 0.001267460421300406, "T": 1000},
    {"schedule": "linear", "beta_end": 0.02372602077351692, "beta_start": 0.00015195872284984644, "T": 500},
    {"schedule": "linear", "beta_end": 0.024666522268286254, "beta_start": 7.601642397847535e-05, "T": 1000},
]
PINNED_TPE_SEED_0 = [  # TPESampler(seed=0, n_startup_trials=3), told _value(point)
    {"schedule": "cosine", "cosine_s": 0.01605191133358762, "T": 1000},
    {"schedule": "cosine", "cosine_s": 0.08459126528049378, "T": 500},
    {"schedule": "cosine", "cosine_s": 0.0013869861245357324, "T": 1000},
    {"schedule": "linear", "beta_end": 0.026115183603752135, "beta_start": 0.00027871583610147084, "T": 500},
    {"schedule": "linear", "beta_end": 0.045373950269744105, "beta_start": 0.000837739313951432, "T": 500},
    {"schedule": "linear", "beta_end": 0.013565257200408432, "beta_start": 7.166379499920784e-05, "T": 250},
]
# Drawn by the code before the weighted family's space existed: a VDM study must draw these again.
PINNED_VDM_FIXED_RANDOM_SEED_3 = [
    {"gamma_max": 5.3047874154474535, "gamma_min": -10.334817419055161},
    {"gamma_max": 3.7454284334776657, "gamma_min": -11.913379158418696},
    {"gamma_max": 7.357681726085929, "gamma_min": -8.829655288532496},
]
PINNED_VDM_FINITE_TPE_SEED_0 = [  # TPESampler(seed=0, n_startup_trials=2), told _value(point)
    {"gamma_max": 5.2928810235639485, "gamma_min": -10.278485069020643, "T": 250},
    {"gamma_max": 5.8753646783999365, "gamma_min": -12.49930230989846, "T": 500},
    {"gamma_max": 7.928227681237887, "gamma_min": -13.703603568602121, "T": 500},
    {"gamma_max": 2.0762047359887004, "gamma_min": -12.78278778275289, "T": 500},
]


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def base(variant: str, **fields) -> RunConfig:
    """A trial's config before the space's values, as a study on digits builds it."""
    config = StudyConfig(variants=(variant,)).base_config(variant)
    return dataclasses.replace(config, **fields).validate() if fields else config


def _value(point: dict) -> float:
    return point.get("T", 0) / 1000 + sum(v for v in point.values() if isinstance(v, float))


def draw(sampler, n: int, space, config: RunConfig | None = None) -> list[dict]:
    study = optuna.create_study(sampler=sampler)
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(suggest(trial, space, config))
        study.tell(trial, _value(points[-1]))
    return points


def write(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the default space per variant kind
def test_the_default_space_follows_the_variant_kind():
    assert DDPM and set(CONTINUOUS) == {"vdm", "vdm-fixed", "vdm-finite", "weighted"}
    for v in DDPM:
        assert StudyConfig(variants=(v,)).space(v) == DEFAULT_SPACE, v
    assert list(DEFAULT_SPACE) == ["schedule", "beta_start", "beta_end", "cosine_s", "T"]
    for v in ("vdm", "vdm-fixed"):
        assert StudyConfig(variants=(v,)).space(v) == CONTINUOUS_SPACE, v
    assert StudyConfig(variants=("vdm-finite",)).space("vdm-finite") == {**CONTINUOUS_SPACE, "T": DEFAULT_SPACE["T"]}
    assert StudyConfig(variants=("weighted",)).space("weighted") == WEIGHTED_SPACE
    assert list(WEIGHTED_SPACE) == ["gamma_min", "gamma_max", "weighting", "min_snr_gamma", "sigmoid_bias"]
    assert WEIGHTED_SPACE["weighting"].choices == ("elbo", "eps", "v", "min-snr", "edm", "edm-monotonic", "sigmoid")
    gmin, gmax = CONTINUOUS_SPACE["gamma_min"], CONTINUOUS_SPACE["gamma_max"]
    assert (gmin.low, gmin.high, gmax.low, gmax.high) == (-16.0, -8.0, 2.0, 8.0)
    assert gmin.low < RunConfig().gamma_min < gmin.high and gmax.low < RunConfig().gamma_max < gmax.high  # VDM's
    assert gmin.high < gmax.low  # disjoint: γ(0) < γ(1) everywhere


def test_the_description_says_what_the_end_points_are():
    fixed = describe_space(CONTINUOUS_SPACE, base("vdm-fixed")).splitlines()
    assert fixed == ["gamma_min: uniform in [-16, -8]", "gamma_max: uniform in [2, 8]",
                     "(gamma_min/gamma_max: the fixed schedule's end points γ(0), γ(1); gamma_max is drawn first "
                     "and γ(0) < γ(1))"]
    learned = describe_space(CONTINUOUS_SPACE, base("vdm")).splitlines()[-1]
    assert "the learned schedule's starting end points" in learned
    assert "starting" in describe_space(CONTINUOUS_SPACE, base("vdm-finite", gamma_schedule="learned-ends"))
    assert describe_space(DEFAULT_SPACE).splitlines()[-1].startswith("(beta_start/beta_end apply to linear")


def test_the_default_point_is_the_configured_schedule():
    assert default_point(base("vdm-fixed"), CONTINUOUS_SPACE) == {"gamma_min": -13.3, "gamma_max": 5.0}
    assert default_point(base("vdm-finite"), load_space(None, False, base("vdm-finite"))) == {
        "gamma_min": -13.3, "gamma_max": 5.0, "T": 1000}
    assert default_point(base("simple"), DEFAULT_SPACE) == {"schedule": "linear", "beta_start": 1e-4,
                                                            "beta_end": 0.02, "T": 1000}
    assert default_point(base("vdm", gamma_min=-20.0), CONTINUOUS_SPACE) is None  # outside the space
    tuned = load_space(None, False, base("vdm"))
    tuned["gamma_schedule"] = dataclasses.replace(DEFAULT_SPACE["schedule"], name="gamma_schedule",
                                                  choices=("learned-ends", "learned-net"))
    assert default_point(base("vdm"), tuned)["gamma_schedule"] == "learned-ends"  # 'auto' resolved for vdm


# ----------------------------------------------------------------------------- the draws
def test_ddpm_studies_draw_the_points_they_drew_before():
    for v in ("simple", "hybrid"):
        space = StudyConfig(variants=(v,)).space(v)
        got = draw(optuna.samplers.RandomSampler(seed=3), 4, space, base(v))
        assert same_points(got, PINNED_RANDOM_SEED_3), (v, got)
    got = draw(optuna.samplers.TPESampler(seed=0, n_startup_trials=3), 6, load_space())
    assert same_points(got, PINNED_TPE_SEED_0), got


def test_vdm_studies_draw_the_points_they_drew_before():
    for v in ("vdm-fixed", "vdm"):
        got = draw(optuna.samplers.RandomSampler(seed=3), 3, load_space(None, False, base(v)), base(v))
        assert same_points(got, PINNED_VDM_FIXED_RANDOM_SEED_3), (v, got)
    space = load_space(None, False, base("vdm-finite"))
    got = draw(optuna.samplers.TPESampler(seed=0, n_startup_trials=2), 4, space, base("vdm-finite"))
    assert same_points(got, PINNED_VDM_FINITE_TPE_SEED_0), got


def same_points(got: list[dict], pinned: list[dict]) -> bool:
    """The same parameters drawn in the same order, floats to 12 digits."""
    return len(got) == len(pinned) and all(
        list(a) == list(b) and all(math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(b[k], float) else a[k] == b[k]
                                   for k in b) for a, b in zip(got, pinned))


@pytest.mark.parametrize("variant", CONTINUOUS)
def test_continuous_points_keep_gamma_min_below_gamma_max(tmp_path, variant):
    config = base(variant)
    default = load_space(None, False, config)
    # overlapping ranges: the bound γ(0) < γ(1) binds
    overlap = load_space(write(tmp_path, "[params.gamma_min]\nlow = -6.0\nhigh = 3.0\n"
                                         "[params.gamma_max]\nlow = -5.0\nhigh = 4.0\n"), False, config)
    binds = 0
    for space, lo, hi in ((default, (-16, -8), (2, 8)), (overlap, (-6, 3), (-5, 4))):
        for sampler in (optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1, n_startup_trials=5)):
            for p in draw(sampler, 25, space, config):
                unread = {n for n in HYPER if n in space and p.get("weighting") not in HYPER[n]}
                assert set(p) == set(space) - unread, p  # γ's end points (and T for vdm-finite), no β
                assert lo[0] <= p["gamma_min"] < p["gamma_max"] and p["gamma_min"] <= lo[1], p
                assert hi[0] <= p["gamma_max"] <= hi[1], p
                binds += p["gamma_max"] < lo[1]
                dataclasses.replace(config, **p).validate()  # a point a run accepts
    assert binds > 5  # the overlapping draws did test the bound


def test_gamma_min_alone_stays_below_the_configured_gamma_max(tmp_path):
    config = base("vdm-fixed", gamma_max=-9.0)
    with pytest.raises(BenchError, match=r"gamma_min's high \(-8\) must be below gamma_max \(-9, not tuned\)"):
        load_space(write(tmp_path, "[params.gamma_max]\nenabled = false\n"), False, config)  # -16..-8 reaches -9
    space = load_space(write(tmp_path, "[params.gamma_max]\nenabled = false\n[params.gamma_min]\nlow = -12.0\n"
                                       "high = -9.5\n"), False, config)
    assert list(space) == ["gamma_min"]
    points = draw(optuna.samplers.RandomSampler(seed=0), 20, space, config)
    assert all(-12 <= p["gamma_min"] <= -9.5 and set(p) == {"gamma_min"} for p in points), points


# ----------------------------------------------------------------------------- the weighted family
def test_weighted_draws_a_weighting_and_only_its_own_hyper_parameter():
    config = base("weighted")
    space = load_space(None, False, config)
    points = [p for sampler in (optuna.samplers.RandomSampler(seed=0),
                                optuna.samplers.TPESampler(seed=0, n_startup_trials=10))
              for p in draw(sampler, 40, space, config)]
    assert {p["weighting"] for p in points} == set(STUDY_WEIGHTINGS)  # every weighting but a table is drawn
    assert sum("min_snr_gamma" in p for p in points) > 3 and sum("sigmoid_bias" in p for p in points) > 3
    for p in points:
        w = p["weighting"]
        assert ("min_snr_gamma" in p) == (w == "min-snr") and ("sigmoid_bias" in p) == (w == "sigmoid"), p
        assert 1 <= p.get("min_snr_gamma", 1) <= 20 and -6 <= p.get("sigmoid_bias", 0) <= 4, p
        assert -16 <= p["gamma_min"] < p["gamma_max"] <= 8, p
        weighting = dataclasses.replace(config, **p).validate().build_variant().weighting  # what the trial trains
        assert weighting.name == w and all(weighting.params[k] == p[k] for k in p if k in HYPER), p


def test_the_weighted_default_point_and_the_weightings_study_file(tmp_path):
    assert default_point(base("weighted"), WEIGHTED_SPACE) == {"gamma_min": -13.3, "gamma_max": 5.0,
                                                               "weighting": "eps"}
    space = StudyConfig(variants=("weighted",), space_file="weightings").space("weighted")  # studies/weightings.toml
    assert space == {n: WEIGHTED_SPACE[n] for n in ("weighting", "min_snr_gamma", "sigmoid_bias")}  # ends fixed
    assert default_point(base("weighted"), space) == {"weighting": "eps"}
    assert describe_space(space, base("weighted")).splitlines()[-1] == (
        "(a weighting's hyper-parameter is drawn only with it: min_snr_gamma with min-snr, sigmoid_bias with sigmoid)")
    # the weighting fixed by the trials' config: its own hyper-parameter is tuned, and trial 0 has the configured one
    fixed = base("weighted", weighting="min-snr", min_snr_gamma=3.0)
    space = load_space(write(tmp_path, "[params.weighting]\nenabled = false\n"), False, fixed)
    assert default_point(fixed, space) == {"gamma_min": -13.3, "gamma_max": 5.0, "min_snr_gamma": 3.0}
    assert all(set(p) == {"gamma_min", "gamma_max", "min_snr_gamma"}
               for p in draw(optuna.samplers.RandomSampler(seed=0), 5, space, fixed))
    # the adaptive schedule as a boolean; min_snr_gamma stays in the space but is never drawn with sigmoid only
    text = "[params.weighting]\nchoices = ['sigmoid']\n[params.adaptive_schedule]\nchoices = [false, true]\n"
    adaptive = load_space(write(tmp_path, text), False, base("weighted"))
    points = draw(optuna.samplers.RandomSampler(seed=0), 12, adaptive, base("weighted"))
    assert {p["adaptive_schedule"] for p in points} == {False, True}
    assert all(set(p) == {"gamma_min", "gamma_max", "weighting", "sigmoid_bias", "adaptive_schedule"} for p in points)
    assert default_point(base("weighted"), adaptive) is None  # its eps is not among the choices


BAD_WEIGHTED_FILES = {  # (variant, file, what the one line says)
    "weighting-on-vdm": ("vdm", "[params.weighting]\nchoices = ['eps', 'v']\n",
                         "parameter weighting does not act on variant vdm (the weighting and its hyper-parameters "
                         "are for variant weighted)"),
    "min-snr-gamma-on-a-ddpm-variant": ("simple", "[params.min_snr_gamma]\nlow = 1.0\nhigh = 5.0\n",
                                        "parameter min_snr_gamma does not act on variant simple"),
    "hyper-parameter-of-no-weighting-drawn": (
        "weighted", "[params.weighting]\nchoices = ['eps', 'v']\n[params.sigmoid_bias]\nlow = -1.0\nhigh = 1.0\n",
        "parameter sigmoid_bias does not act on variant weighted (with weighting eps or v: sigmoid_bias is read by "
        "sigmoid)"),
    "table": ("weighted", "[params.weighting]\nchoices = ['eps', 'table']\n",
              "weighting choices must be among elbo, eps, v, min-snr, edm, edm-monotonic, sigmoid (a table is a file"),
    "unknown-weighting": ("weighted", "[params.weighting]\nchoices = ['lognormal']\n", "weighting choices must be"),
    "weighting-as-a-range": ("weighted", "[params.weighting]\nlow = 1\nhigh = 2\n",
                             "parameter 'weighting' is categorical"),
    "adaptive-not-boolean": ("weighted", "[params.adaptive_schedule]\nchoices = [0, 1]\n",
                             "parameter 'adaptive_schedule' needs true/false choices"),
    "min-snr-gamma-zero": ("weighted", "[params.min_snr_gamma]\nlow = 0.0\nhigh = 5.0\n",
                           "impossible range for min_snr_gamma: a run of weighted refuses 0.0 (min_snr_gamma must "
                           "be > 0"),
    "edm-std-zero": ("weighted", "[params.weighting]\nchoices = ['edm']\n[params.edm_std]\nlow = 0.0\nhigh = 3.0\n",
                     "edm_std must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTED_FILES))
def test_a_bad_weighting_study_file_is_one_error_line(tmp_path, case):
    variant, text, message = BAD_WEIGHTED_FILES[case]
    with pytest.raises(BenchError) as err:
        load_space(write(tmp_path, text), False, base(variant))
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- study files
def test_the_vdm_ends_study_file_loads_for_the_fixed_and_the_learned_schedule():
    for v in ("vdm-fixed", "vdm"):
        assert StudyConfig(variants=(v,), space_file="vdm-ends").space(v) == CONTINUOUS_SPACE  # studies/vdm-ends.toml
    with pytest.raises(BenchError, match="parameter gamma_max does not act on variant simple"):
        StudyConfig(variants=("simple",), space_file="vdm-ends").space("simple")


def test_gamma_schedule_choices_are_checked_against_the_study_variant(tmp_path):
    learned = write(tmp_path, "[params.gamma_schedule]\nchoices = ['learned-ends', 'learned-net']\n")
    space = load_space(learned, False, base("vdm"))
    points = draw(optuna.samplers.RandomSampler(seed=0), 12, space, base("vdm"))
    assert {p["gamma_schedule"] for p in points} == {"learned-ends", "learned-net"}
    assert all(p["gamma_min"] < p["gamma_max"] for p in points)
    with pytest.raises(BenchError, match="impossible choice for gamma_schedule: variant 'vdm-fixed' trains with"):
        load_space(learned, False, base("vdm-fixed"))  # the same file, not the default variant's verdict


BAD_GAMMA_FILES = {  # (variant, file, what the one line says)
    "gamma-min-low-not-below-gamma-max-low": (
        "vdm-fixed", "[params.gamma_min]\nlow = -4.0\nhigh = 1.0\n[params.gamma_max]\nlow = -5.0\nhigh = 6.0\n",
        "impossible range: gamma_min's low (-4) must be below gamma_max's low (-5) so that γ(0) < γ(1)"),
    "gamma-max-below-the-configured-gamma-min": (
        "vdm", "[params.gamma_min]\nenabled = false\n[params.gamma_max]\nlow = -14.0\nhigh = 3.0\n",
        "impossible range: gamma_max's low (-14) must be above gamma_min (-13.3, not tuned)"),
    "gamma-as-choices": ("vdm-fixed", "[params.gamma_max]\nchoices = [4.0, 5.0]\n",
                         "gamma_max takes a range (low, high) so that γ(0) < γ(1) can be kept"),
    "gamma-low-equals-high": ("vdm-finite", "[params.gamma_min]\nlow = -9.0\nhigh = -9.0\n", "impossible range"),
    "gamma-not-finite": ("vdm-fixed", "[params.gamma_min]\nlow = -inf\nhigh = -8.0\n", "needs finite numbers"),
    "gamma-on-a-ddpm-variant": ("simple", "[params.gamma_min]\nlow = -16.0\nhigh = -8.0\n",
                                "parameter gamma_min does not act on variant simple (a DDPM variant"),
    "gamma-schedule-on-a-ddpm-variant": ("hybrid", "[params.gamma_schedule]\nchoices = ['fixed']\n",
                                         "parameter gamma_schedule does not act on variant hybrid"),
    "discrete-schedule-on-vdm": ("vdm", "[params.schedule]\nchoices = ['cosine']\n",
                                 "parameter schedule does not act on variant vdm (a continuous-time variant"),
    "beta-on-a-fixed-line": ("vdm-fixed", "[params.beta_end]\nlow = 0.01\nhigh = 0.03\n",
                             "parameter beta_end does not act on variant vdm-fixed"),
    "unknown-gamma-schedule": ("vdm", "[params.gamma_schedule]\nchoices = ['sigmoid']\n",
                               "gamma_schedule choices must be among auto, fixed"),
}


@pytest.mark.parametrize("case", sorted(BAD_GAMMA_FILES))
def test_a_bad_gamma_study_file_is_one_error_line(tmp_path, case):
    variant, text, message = BAD_GAMMA_FILES[case]
    with pytest.raises(BenchError) as err:
        load_space(write(tmp_path, text), False, base(variant))
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- what a study shows
def test_the_schedule_is_described_in_one_phrase_per_kind():
    cosine = {"schedule": "cosine", "cosine_s": 0.01, "T": 500}
    assert describe_schedule(cosine, base("simple")) == "cosine s=0.01, T=500"
    assert describe_schedule({}, base("simple")) == "linear β_1=0.0001 β_T=0.02, T=1000"
    ends = {"gamma_min": -12.25, "gamma_max": 4.5}
    assert describe_schedule(ends, base("vdm-fixed")) == "γ(t) fixed, γ(0)=-12.25 γ(1)=4.5"
    assert describe_schedule(ends, base("vdm")) == "γ(t) learned-ends, learned from γ(0)=-12.25 γ(1)=4.5"
    assert describe_schedule({**ends, "T": 250}, base("vdm-finite")) == ("γ(t) fixed, γ(0)=-12.25 γ(1)=4.5, "
                                                                         "L_T with T=250")


def test_a_weighting_is_described_in_one_phrase():
    config = base("weighted")
    assert describe_weighting({"weighting": "min-snr", "min_snr_gamma": 4.25}, config) == "min-snr(min_snr_gamma=4.25)"
    assert describe_weighting({"weighting": "sigmoid", "sigmoid_bias": -2.0, "adaptive_schedule": True}, config) == \
        "sigmoid(sigmoid_bias=-2) + adaptive schedule"
    assert describe_weighting({"weighting": "edm"}, config) == "edm(edm_mean=2.4, edm_std=2.4)"
    assert describe_weighting({}, config) == "eps"  # the configured one
    assert describe_weighting({}, base("weighted", weighting="min-snr"), frozenset({"min_snr_gamma"})) == \
        "min-snr(min_snr_gamma tuned)"
    assert describe_weighting({"gamma_min": -12.0}, base("vdm-fixed")) is None
