"""The weighted-ELBO family (bench.diffusion.weighting, bench.diffusion.weighted): w ≡ 1 is the bound's diffusion
term exactly; ε-MSE on the cosine schedule is sech(λ/2); the ε/x/v conversions and their error scales; min-SNR's
three forms; the adaptive schedule is unbiased with a lower variance; a non-finite weight is one error line; which
weightings are monotone; the weighting table; the config of a weighted run. All on 1×4×4 or 1×8×8 images."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from nets import nonzero_network
from torch import nn

from bench.cli.main import cli
from bench.diffusion.continuous import (
    VDM_GAMMA_MAX,
    VDM_GAMMA_MIN,
    ContinuousDenoiser,
    CosineEnds,
    FixedLinear,
    NoiseSchedule,
    eps_error_scale,
    eps_from_output,
    low_discrepancy_times,
    prediction_target,
)
from bench.diffusion.continuous_bound import bound_terms_nats
from bench.diffusion.schedule import Schedule
from bench.diffusion.weighted import WeightedVariant
from bench.diffusion.weighting import (
    WEIGHTINGS,
    AdaptiveSchedule,
    build_weighting,
    check_weights,
    edm_peak,
    is_monotone,
    min_snr_factor,
    read_weighting_table,
    schedule_weights,
)
from bench.errors import BenchError
from bench.training.config import RunConfig, make_config
from variants import get_variant

SCHED = Schedule.linear(T=1000)  # the loss's `sched` (only its T is read: the grid of the logged t)
F64 = torch.float64


def _data(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n 8-bit images [n, 1, size, size] on the model's scale k/127.5 − 1."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=gen).float() / 127.5 - 1


def _one_line(err: BenchError) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------- (a) w ≡ 1 is the ELBO's diffusion term
@pytest.mark.parametrize("schedule", [FixedLinear(), CosineEnds()], ids=["fixed", "cosine-ends"])
def test_elbo_weighting_is_exactly_the_bounds_diffusion_term(schedule):
    """weighted[elbo] with ε-prediction: its loss is bit for bit ½γ'(t)‖ε − ε̂‖²/(D ln 2) at the t and ε it drew
    (low-discrepancy t, then the global batch's noise, from the same generator); the eps weighting is not."""
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), schedule)
    x0 = _data(4, 8)
    variant = get_variant("weighted", weighting=build_weighting("elbo"))
    with torch.no_grad():
        loss = variant.loss(model, SCHED, x0, torch.Generator().manual_seed(7))
        gen = torch.Generator().manual_seed(7)
        t = low_discrepancy_times(4, gen)
        eps = torch.randn(x0.shape, generator=gen)
        nats = bound_terms_nats(model, x0, t.float(), eps)["diffusion"]
    expected = nats / (x0[0].numel() * math.log(2))
    assert torch.equal(loss.terms["weighted"], expected)
    assert torch.equal(loss.loss, expected)
    assert expected.abs().min() > 0
    with torch.no_grad():
        other = get_variant("weighted", weighting=build_weighting("eps")).loss(model, SCHED, x0,
                                                                               torch.Generator().manual_seed(7))
    assert not torch.allclose(other.loss, expected, rtol=1e-3)


def test_elbo_weighting_matches_vdm_fixed_diffusion_term():
    """The same draws through the vdm-fixed variant: its diffusion term is the weighted[elbo] loss."""
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), FixedLinear())
    x0 = _data(4, 8, seed=1)
    with torch.no_grad():
        weighted = get_variant("weighted", weighting=build_weighting("elbo")).loss(
            model, SCHED, x0, torch.Generator().manual_seed(3))
        vdm = get_variant("vdm-fixed").loss(model, SCHED, x0, torch.Generator().manual_seed(3))
    assert torch.equal(weighted.loss, vdm.terms["diffusion"])


# --------------------------------------------------------------------- (b) ε-MSE on the cosine schedule
def test_eps_weighting_on_cosine_ends_is_sech():
    """p(λ) of the cosine schedule is sech(λ/2)/(2π(u₁ − u₀)); the loss weight per unit t of ε-MSE is 1."""
    schedule = CosineEnds()
    t = torch.linspace(0, 1, 513, dtype=F64)
    gamma, factor = schedule_weights(build_weighting("eps"), schedule, t, "eps")
    assert (factor - 1).abs().max() <= 2.3e-16  # (1/γ')·γ' in float64: 1 to the last bit, or one ulp below it
    _, slope = schedule.gamma_and_slope(t)
    lam = -gamma
    w = build_weighting("eps")(lam, 1 / slope.detach())
    ratio = w / (1 / torch.cosh(lam / 2))
    assert float(ratio.max() - ratio.min()) / float(ratio.mean()) < 1e-10
    u0 = 2 / math.pi * math.atan(math.exp(VDM_GAMMA_MIN / 2))
    u1 = 2 / math.pi * math.atan(math.exp(VDM_GAMMA_MAX / 2))
    assert float(ratio.mean()) == pytest.approx(1 / (2 * math.pi * (u1 - u0)), rel=1e-10)
    assert lam.max() == pytest.approx(-VDM_GAMMA_MIN, abs=1e-9) and lam.min() == pytest.approx(-VDM_GAMMA_MAX,
                                                                                               abs=1e-9)


# --------------------------------------------------------------------- (c) ε, x, v
GAMMAS = torch.tensor([-10.0, -2.5, 0.0, 1.5, 6.0], dtype=F64)


def _pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((5, 1, 4, 4), generator=gen, dtype=F64) * 2 - 1
    eps = torch.randn((5, 1, 4, 4), generator=gen, dtype=F64)
    g = GAMMAS.reshape(-1, 1, 1, 1)
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    return x, eps, a * x + s * eps, a, s, gen


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_eps_from_output_inverts_prediction_target(prediction):
    x, eps, z, a, s, _ = _pair()
    target = prediction_target(prediction, x, eps, GAMMAS)
    assert torch.allclose(eps_from_output(prediction, target, z, GAMMAS), eps, rtol=0, atol=1e-12)
    if prediction == "v":
        assert torch.allclose(target, a * eps - s * x, rtol=0, atol=1e-15)


def test_v_x_eps_errors_and_their_scales():
    """For any output v̂: ‖v − v̂‖² = (1 + SNR)‖x − x̂‖² = ‖ε − ε̂‖²/α², with x̂ = αz − σv̂, ε̂ = σz + αv̂; and
    eps_error_scale turns each prediction's own error into the ε-error."""
    x, eps, z, a, s, gen = _pair(seed=1)
    v_hat = torch.randn(x.shape, generator=gen, dtype=F64)
    x_hat, eps_hat = a * z - s * v_hat, s * z + a * v_hat
    assert torch.allclose(eps_from_output("v", v_hat, z, GAMMAS), eps_hat, rtol=0, atol=1e-14)
    assert torch.allclose(eps_from_output("x", x_hat, z, GAMMAS), eps_hat, rtol=1e-12, atol=1e-12)

    def err(u, v):
        return ((u - v) ** 2).flatten(1).sum(1)

    v = prediction_target("v", x, eps, GAMMAS)
    snr = torch.exp(-GAMMAS)
    e_v, e_x, e_eps = err(v, v_hat), err(x, x_hat), err(eps, eps_hat)
    assert torch.allclose(e_v, (1 + snr) * e_x, rtol=1e-10)
    assert torch.allclose(e_v, e_eps / a.flatten() ** 2, rtol=1e-10)
    assert torch.allclose(eps_error_scale("v", GAMMAS) * e_v, e_eps, rtol=1e-10)
    assert torch.allclose(eps_error_scale("x", GAMMAS) * e_x, e_eps, rtol=1e-10)
    assert torch.equal(eps_error_scale("eps", GAMMAS), torch.ones_like(GAMMAS))


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_denoiser_converts_its_raw_output_to_eps(prediction):
    schedule = CosineEnds()
    model = ContinuousDenoiser(nonzero_network("tiny", 1, 1, 8), schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn((3, 1, 8, 8), generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        raw, eps_hat = model(z, t, raw=True), model(z, t)
        g = schedule.gamma(t.double()).reshape(-1, 1, 1, 1)
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    expected = s * z + a * raw if prediction == "v" else (z - a * raw) / s
    assert raw.abs().mean() > 0.01
    assert torch.allclose(eps_hat.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps_hat, raw, atol=1e-3)


# --------------------------------------------------------------------- (d) min-SNR
SNR = torch.logspace(-4, 5, 91, dtype=F64)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_three_forms(gamma):
    """min(SNR, γ)/SNR on ε, min(SNR, γ) on x, min(SNR, γ)/(SNR + 1) on v; each divided by its error scale is the
    one ε-weighting min(1, γ/SNR); the widespread v form min(SNR + 1, γ)/(SNR + 1) is not."""
    clipped = torch.minimum(SNR, torch.tensor(gamma, dtype=F64))
    forms = {"eps": clipped / SNR, "x": clipped, "v": clipped / (SNR + 1)}
    on_eps = torch.minimum(torch.ones_like(SNR), gamma / SNR)
    lg = -torch.log(SNR)
    for prediction, form in forms.items():
        factor = min_snr_factor(SNR, gamma, prediction)
        assert torch.allclose(factor, form, rtol=1e-14, atol=0)
        assert torch.allclose(factor / eps_error_scale(prediction, lg), on_eps, rtol=1e-12, atol=0)
    wrong = torch.minimum(SNR + 1, torch.tensor(gamma, dtype=F64)) / (SNR + 1)
    assert float((wrong / eps_error_scale("v", lg) - on_eps).abs().max()) > 0.5
    with pytest.raises(BenchError):
        min_snr_factor(SNR, gamma, "score")


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_min_snr_training_weight_is_its_papers_form(prediction):
    """The weighted variant's factor on the prediction's own error with --weighting min-snr, on the cosine schedule
    (and on the straight line): min_snr_factor of the prediction."""
    t = torch.linspace(0, 1, 257, dtype=F64)
    for schedule in (CosineEnds(), FixedLinear()):
        gamma, factor = schedule_weights(build_weighting("min-snr", min_snr_gamma=5.0), schedule, t, prediction)
        expected = min_snr_factor(torch.exp(-gamma), 5.0, prediction)
        assert torch.allclose(factor, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------- (e) the adaptive schedule
class _TinyDenoiser(nn.Module):
    """A fixed 3×3 convolution of z whose gain moves with the conditioning: an imperfect ε̂ whose error depends on λ."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x, cond):
        c = (cond / 1000).reshape(-1, 1, 1, 1)
        return self.conv(x) * (0.2 + 0.8 * c) + x * c


def _batch_means(variant, model, x0, calls: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([variant.loss(model, SCHED, x0, gen).loss.double().mean() for _ in range(calls)])


def test_adaptive_schedule_is_unbiased_with_a_lower_variance():
    """One fixed network and batch: the ELBO weighting's loss (L_w = ½∫E‖ε − ε̂‖²dλ) drawn by the cosine schedule
    and by the adaptive one (after 6 adapting batches) has the same mean within 3 combined standard errors, and the
    adaptive one's batch means vary far less. A third estimate, drawn by VDM's line (uniform in λ, so w/q is
    constant: low variance; the same end points, so the same network function of γ), pins the mean closer."""
    net = _TinyDenoiser()
    model = ContinuousDenoiser(net, CosineEnds())
    x0 = _data(4, 4).repeat(8, 1, 1, 1)  # 32 examples of 4 images
    weighting = build_weighting("elbo")
    plain = _batch_means(WeightedVariant(weighting=weighting), model, x0, calls=48, seed=11)
    adaptive = WeightedVariant(weighting=weighting, adaptive=True)
    _batch_means(adaptive, model, x0, calls=6, seed=12)  # adapt
    assert adaptive.adaptive.updates == 6
    probs = adaptive.adaptive.probabilities()
    assert float(probs.max() / probs.min()) > 1.5  # it did adapt: no longer uniform in λ
    adapted = _batch_means(adaptive, model, x0, calls=48, seed=13)
    line = _batch_means(WeightedVariant(weighting=weighting), ContinuousDenoiser(net, FixedLinear()), x0, calls=48,
                        seed=14)

    def se(*estimates):
        return math.sqrt(sum(float(e.var()) / len(e) for e in estimates))

    assert abs(float(plain.mean() - adapted.mean())) < 3 * se(plain, adapted)
    assert abs(float(line.mean() - adapted.mean())) < 3 * se(line, adapted)
    assert 3 * se(line, adapted) < 0.06 * float(line.mean())  # a test with teeth: a bias above ~6% fails
    assert float(adapted.var()) < 0.1 * float(plain.var())


def test_adaptive_schedule_draws_its_density():
    """The bins' probabilities are (1 − floor)·EMA/ΣEMA + floor/bins (unseen bins at the mean of the seen ones);
    a stratified draw of n puts n·p ± 1 in each bin, uniformly within it, with q = p/width = density(λ)."""
    sched = AdaptiveSchedule(-2.0, 6.0, bins=8, decay=0.5, floor=0.2)
    assert torch.allclose(sched.probabilities(), torch.full((8,), 1 / 8, dtype=F64))
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0, 0.5], dtype=F64)
    sched.update(torch.arange(6, dtype=F64) - 1.5, values)  # bins 0..5 seen, 6 and 7 not
    ema = torch.cat([values, values.mean().repeat(2)])
    assert torch.allclose(sched.probabilities(), 0.8 * ema / ema.sum() + 0.2 / 8, rtol=1e-14)
    sched.update(torch.tensor([-1.5], dtype=F64), torch.tensor([3.0], dtype=F64))
    assert float(sched.ema[0]) == pytest.approx(0.5 * 1.0 + 0.5 * 3.0, rel=1e-15)
    p = sched.probabilities()
    n = 8000
    lam, q = sched.sample(n, torch.Generator().manual_seed(4))
    k = ((lam + 2.0) / 1.0).floor().long()
    counts = torch.bincount(k, minlength=8).double()
    assert (counts - n * p).abs().max() <= 1.0
    assert torch.allclose(q, p[k] / 1.0, rtol=1e-15)
    assert torch.allclose(sched.density(lam), q, rtol=1e-15)
    within = lam + 2.0 - k
    for b in range(8):
        assert float(within[k == b].mean()) == pytest.approx(0.5, abs=0.01)


def test_adaptive_schedule_state_round_trips_and_refuses_another_range():
    sched = AdaptiveSchedule(-5.0, 13.3, bins=16)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        lam, _ = sched.sample(32, gen)
        sched.update(lam, torch.rand(32, generator=gen, dtype=F64) + lam.abs())
    again = AdaptiveSchedule(-5.0, 13.3, bins=16)
    again.load_state_dict(sched.state_dict())
    assert torch.equal(again.ema, sched.ema) and again.updates == sched.updates == 3
    draw = [s.sample(64, torch.Generator().manual_seed(6)) for s in (sched, again)]
    assert torch.equal(draw[0][0], draw[1][0]) and torch.equal(draw[0][1], draw[1][1])
    sched.update(torch.tensor([0.0], dtype=F64), torch.tensor([100.0], dtype=F64))
    assert not torch.equal(again.ema, sched.ema)  # the loaded state is a copy
    for other in (AdaptiveSchedule(-5.0, 13.0, bins=16), AdaptiveSchedule(-5.0, 13.3, bins=8)):
        with pytest.raises(BenchError, match="adaptive schedule"):
            other.load_state_dict(sched.state_dict())


def test_weighted_variant_carries_its_adaptive_state():
    """The variant's state (checkpointed with the run) loads into a fresh variant before its first step."""
    model = ContinuousDenoiser(_TinyDenoiser(), CosineEnds())
    x0 = _data(8, 4)
    first = WeightedVariant(weighting=build_weighting("sigmoid"), adaptive=True)
    _batch_means(first, model, x0, calls=2, seed=1)
    resumed = WeightedVariant(weighting=build_weighting("sigmoid"), adaptive=True)
    resumed.load_state_dict(first.state_dict(), T=1000)
    assert torch.allclose(resumed.adaptive_for(model).ema, first.adaptive.ema, rtol=0, atol=0, equal_nan=True)
    a, b = (_batch_means(v, model, x0, calls=1, seed=2) for v in (first, resumed))
    assert torch.equal(a, b)
    with pytest.raises(BenchError, match="--adaptive-schedule"):
        WeightedVariant(weighting=build_weighting("sigmoid")).load_state_dict(first.state_dict(), T=1000)


# --------------------------------------------------------------------- (f) zero terminal SNR
class _ZeroTerminalCosine(NoiseSchedule):
    """The continuous cosine from γ_min run to u = 1: γ(t) = −2 log tan(π(1 − u)/2), γ(1) = +∞ (SNR(1) = 0)."""

    def __init__(self, gamma_min: float = VDM_GAMMA_MIN):
        super().__init__()
        self.u0 = 2 / math.pi * math.atan(math.exp(gamma_min / 2))

    def forward(self, t):
        return -2 * torch.log(torch.tan(math.pi / 2 * (1 - t) * (1 - self.u0)))


@pytest.mark.parametrize("name", ["elbo", "eps", "min-snr"])
def test_zero_terminal_snr_with_eps_prediction_is_one_error_line(name):
    schedule = _ZeroTerminalCosine()
    assert schedule.endpoints()[1] == math.inf
    with pytest.raises(BenchError) as err:
        check_weights(build_weighting(name), schedule, "eps")
    text = _one_line(err.value)
    assert f"weighting {name!r}" in text and "--prediction v" in text and "t = 1" in text
    check_weights(build_weighting(name), CosineEnds(), "eps")  # finite end points: no complaint


def test_zero_terminal_snr_is_refused_by_the_config_and_the_cli(monkeypatch):
    monkeypatch.setattr(RunConfig, "build_noise_schedule", lambda self, variant: _ZeroTerminalCosine())
    with pytest.raises(BenchError) as err:
        make_config(variant="weighted", weighting="elbo")
    assert "--prediction v" in _one_line(err.value)
    res = CliRunner().invoke(cli, ["run", "--variant", "weighted", "--weighting", "elbo", "--dry-run"],
                             env={"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None})
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weighting 'elbo'") and "--prediction v" in lines[0]


# --------------------------------------------------------------------- (g) monotone weightings
def test_which_weightings_are_monotone():
    cosine, line = CosineEnds(), FixedLinear()
    for name in ("elbo", "sigmoid", "edm-monotonic"):
        assert is_monotone(build_weighting(name), cosine) and is_monotone(build_weighting(name), line), name
    assert not is_monotone(build_weighting("edm"), cosine) and not is_monotone(build_weighting("edm"), line)
    assert not is_monotone(build_weighting("eps"), cosine)  # sech(λ/2) rises up to λ = 0
    assert is_monotone(build_weighting("eps"), line)  # p(λ) constant: a multiple of the ELBO
    assert is_monotone(build_weighting("v"), cosine)  # ∝ e^{−λ/2}
    assert not is_monotone(build_weighting("min-snr"), cosine)
    assert {k: v.monotone for k, v in WEIGHTINGS.items() if v.monotone in ("yes", "no")} == {
        "elbo": "yes", "edm": "no", "edm-monotonic": "yes", "sigmoid": "yes"}


def test_edm_peak_is_the_argmax_and_edm_monotonic_holds_it():
    edm, held = build_weighting("edm"), build_weighting("edm-monotonic")
    lam = torch.linspace(-15, 15, 300_001, dtype=F64)
    ones = torch.ones_like(lam)
    w = edm(lam, ones)
    peak = edm_peak(2.4, 2.4)
    assert peak == pytest.approx(float(lam[w.argmax()]), abs=1e-4)
    assert float(edm(torch.tensor([peak], dtype=F64), ones[:1])) >= float(w.max())
    assert peak < 2.4
    above = lam >= peak
    assert torch.equal(held(lam, ones)[above], w[above])
    top = edm(torch.tensor([peak], dtype=F64), ones[:1])
    assert torch.allclose(held(lam, ones)[~above], top.expand(int((~above).sum())), rtol=1e-15)
    assert edm_peak(0.0, 1.0) != pytest.approx(peak, abs=0.1)  # it moves with the hyper-parameters


# --------------------------------------------------------------------- (h) the weighting table
def _table(tmp_path, text: str):
    path = tmp_path / "w.csv"
    path.write_text(text)
    return path


def test_weighting_table_interpolates_and_is_flat_beyond(tmp_path):
    path = _table(tmp_path, "lambda,w\n-10,1\n0,0.5\n\n10,0\n")
    lam, w = read_weighting_table(path)
    assert lam.tolist() == [-10.0, 0.0, 10.0] and w.tolist() == [1.0, 0.5, 0.0]
    weighting = build_weighting("table", weighting_table=str(path))
    at = torch.tensor([-20.0, -10.0, -5.0, 0.0, 5.0, 2.5, 10.0, 30.0], dtype=F64)
    assert weighting(at, torch.ones_like(at)).tolist() == pytest.approx([1, 1, 0.75, 0.5, 0.25, 0.375, 0, 0],
                                                                        abs=1e-15)
    assert is_monotone(weighting, CosineEnds())


@pytest.mark.parametrize("text, words", [
    ("lam,w\n0,1\n1,1\n", "header lambda,w"),
    ("lambda,w\n0,1\n1,x\n", "row 3"),
    ("lambda,w\n0,1\n1,2,3\n", "row 3"),
    ("lambda,w\n0,1\n2,1\n1,1\n", "row 4"),
    ("lambda,w\n0,1\n0,1\n", "row 3"),
    ("lambda,w\n0,1\n1,-0.5\n", "row 3"),
    ("lambda,w\n0,1\nnan,1\n", "row 3"),
    ("lambda,w\n0,1\n", "2 to"),
])
def test_weighting_table_refuses_a_bad_file_in_one_line(tmp_path, text, words):
    with pytest.raises(BenchError) as err:
        read_weighting_table(_table(tmp_path, text))
    assert words in _one_line(err.value)


def test_weighting_table_names_the_files_own_row_past_blank_lines(tmp_path):
    with pytest.raises(BenchError, match="row 5"):
        read_weighting_table(_table(tmp_path, "lambda,w\n0,1\n\n1,0.5\nx,1\n"))


# --------------------------------------------------------------------- (i) the config
@pytest.mark.parametrize("weighting, prediction", [("min-snr", "v"), ("edm", "x"), ("sigmoid", "eps")])
def test_weighted_config_builds(weighting, prediction):
    cfg = make_config(variant="weighted", weighting=weighting, prediction=prediction, network="tiny")
    variant = cfg.build_variant()
    assert variant.label == f"weighted[{weighting}]" and variant.weighting.name == weighting
    model = cfg.build_model(variant, 1, 8)
    assert model.prediction == prediction and isinstance(model.schedule, CosineEnds)
    assert variant.describe()["weighting_formula"].startswith(weighting)


def test_weighting_options_are_refused_for_other_variants_in_one_line():
    with pytest.raises(BenchError) as err:
        make_config(variant="simple", weighting="v")
    assert "--weighting" in _one_line(err.value) and "'simple'" in str(err.value)
    with pytest.raises(BenchError) as err:
        make_config(variant="vdm", adaptive_schedule=True)
    assert "--adaptive-schedule" in _one_line(err.value)
    with pytest.raises(BenchError) as err:
        make_config(variant="weighted", weighting="table")
    assert "--weighting-table" in _one_line(err.value)
    res = CliRunner().invoke(cli, ["run", "--variant", "simple", "--weighting", "v", "--dry-run"],
                             env={"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None})
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "--weighting" in res.stderr


# --------------------------------------------------------------------- `bench weightings`
def test_bench_weightings_lists_each_with_formula_monotone_options_and_source():
    res = CliRunner().invoke(cli, ["weightings"], env={"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 4 * len(WEIGHTINGS)
    blocks = {b[0].split()[0]: [line.strip() for line in b] for b in (lines[i:i + 4] for i in range(0, len(lines), 4))}
    assert list(blocks) == list(WEIGHTINGS)
    for name, kind in WEIGHTINGS.items():
        assert kind.formula in blocks[name][0] and blocks[name][3] == f"source: {kind.source}"
    monotone = {name: block[1] for name, block in blocks.items()}
    assert monotone == {
        "elbo": "monotone: yes", "edm": "monotone: no", "edm-monotonic": "monotone: yes", "sigmoid": "monotone: yes",
        "eps": "monotone: depends on the schedule: on the default cosine-ends, no",
        "v": "monotone: depends on the schedule: on the default cosine-ends, yes",
        "min-snr": "monotone: depends on the schedule: on the default cosine-ends, no",
        "table": "monotone: depends on the table"}
    assert blocks["elbo"][0].split() == ["elbo", "w(λ)", "=", "1"] and blocks["elbo"][2] == "options: none"
    assert blocks["min-snr"][2] == "options: --min-snr-gamma (default 5.0)"
    assert blocks["edm"][2] == "options: --edm-mean (default 2.4), --edm-std (default 2.4)"
    assert blocks["sigmoid"][2] == "options: --sigmoid-bias (default 0.0)"
    assert blocks["table"][2] == "options: --weighting-table FILE.csv (required)"
