"""Every registered variant: its declarations, its loss, where its gradients go, and that it learns."""

import pytest
import torch

from bench import BenchError, Schedule, load_dataset
from bench.diffusion.gaussian import to_data_scale
from bench.diffusion.variant import MEAN_TYPES, VAR_TYPES
from bench.training.config import make_config
from variants import VARIANTS, get_variant

TABLE = {  # the table: name → (mean_type, var_type)
    "simple": ("eps", "fixed_small"),
    "elbo": ("eps", "fixed_small"),
    "hybrid": ("eps", "learned_range"),
    "elbo-learned": ("eps", "learned_range"),
    "elbo-learned-diag": ("eps", "learned"),
    "mu-elbo": ("mu", "fixed_small"),
    "mu-elbo-learned-diag": ("mu", "learned"),
    "mu-mse": ("mu", "fixed_small"),
}


CONTINUOUS = {"vdm": (True, False), "vdm-fixed": (False, False), "vdm-finite": (False, True)}  # (learns γ, finite T)
DDPM = sorted(TABLE)


def test_registry_holds_exactly_the_table():
    assert sorted(VARIANTS) == sorted([*TABLE, *CONTINUOUS, "weighted"])
    assert {n for n, v in VARIANTS.items() if v.continuous} == {*CONTINUOUS, "weighted"}
    assert {n for n, v in VARIANTS.items() if v.weighted} == {"weighted"}
    assert get_variant("weighted").label == "weighted[eps]"  # its weighting shows in results


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_continuous_time_declarations(name):
    v = get_variant(name)
    assert (v.learns_schedule, v.finite) == CONTINUOUS[name] and v.label == name and v.out_channels(3) == 3
    assert v.describe()["time"] == "continuous" and v.describe()["variant"] == name
    with pytest.raises(BenchError, match="continuous-time model: it has no discrete reverse step"):
        v.p_mean_variance(torch.zeros(1, 1, 2, 2), Schedule.linear(T=10), torch.zeros(1, 1, 2, 2), torch.tensor([1]))
    with pytest.raises(BenchError, match="continuous-time model with no reverse variance to fix"):
        get_variant(name, variance="large")


@pytest.mark.parametrize("name", DDPM)
def test_declarations(name):
    v = get_variant(name)
    assert (v.mean_type, v.var_type) == TABLE[name]
    assert v.mean_type in MEAN_TYPES and v.var_type in VAR_TYPES
    assert v.out_channels(3) == (6 if v.var_type.startswith("learned") else 3)
    assert v.objective and v.describe()["variant"] == v.label


@pytest.mark.parametrize("name", [n for n, (_, var) in TABLE.items() if var == "fixed_small"])
def test_fixed_variants_can_use_beta_and_say_so(name):
    small, large = get_variant(name), get_variant(name, variance="large")
    assert (small.var_type, large.var_type) == ("fixed_small", "fixed_large")
    assert small.label == f"{name}[small]" and large.label == f"{name}[large]"
    sched = Schedule.linear(T=10, beta_start=0.01, beta_end=0.2)
    x = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([4])
    out = torch.zeros(1, 1, 2, 2)
    assert large.p_mean_variance(out, sched, x, t).log_var.flatten()[0].item() == pytest.approx(
        sched.log_betas[4].item(), rel=1e-6)
    assert small.p_mean_variance(out, sched, x, t).log_var.flatten()[0].item() == pytest.approx(
        sched.posterior_log_variance_clipped[4].item(), rel=1e-6
    )


@pytest.mark.parametrize("name", [n for n, (_, var) in TABLE.items() if var.startswith("learned")])
def test_learned_variants_refuse_a_fixed_variance(name):
    with pytest.raises(BenchError, match="learns its variance"):
        get_variant(name, variance="large")


def test_unknown_variant_and_variance_are_refused():
    with pytest.raises(BenchError, match="unknown variant 'nope'.*simple"):
        get_variant("nope")
    with pytest.raises(BenchError, match="variance must be one of"):
        get_variant("simple", variance="medium")


def test_mu_parameterisation_recovers_x0():
    sched = Schedule.linear(T=50, scale_to_T=True)
    x0 = torch.rand(4, 1, 3, 3) * 2 - 1
    t = torch.tensor([1, 5, 20, 49])
    x_t = sched.q_sample(x0, t, torch.randn_like(x0))
    step = get_variant("mu-elbo").p_mean_variance(sched.q_posterior_mean(x0, x_t, t), sched, x_t, t)
    assert torch.allclose(step.pred_x0, x0, atol=1e-4)


def test_hybrid_loss_and_its_timesteps_are_pinned():
    """The typed result of `Variant.loss` (loss, the t drawn, named terms) carries, bit for bit, what the dict and
    `last_t` carried before it (numbers computed with that code): 4 digits, T = 40, a fixed 'network', seed 7."""

    def model(x_t, t):  # ε from x_t, the variance channel from t
        return torch.cat([torch.tanh(x_t), (t.float() / 40 - 1).view(-1, 1, 1, 1).expand_as(x_t)], dim=1)

    sched = Schedule.linear(T=40, scale_to_T=True)
    x0 = to_data_scale(load_dataset("digits", split="train")[:4])
    result = get_variant("hybrid").loss(model, sched, x0, torch.Generator().manual_seed(7))
    assert torch.equal(result.t, torch.tensor([15, 12, 1, 6]))
    assert sorted(result.terms) == ["mse", "vb"]
    pinned = {"loss": [0.27807796001434326, 0.28196489810943604, 1.4165949821472168, 0.9526821970939636],
              "mse": [0.27562054991722107, 0.27952542901039124, 1.2061322927474976, 0.9407181739807129],
              "vb": [2.457404851913452, 2.439457893371582, 210.46273803710938, 11.964035987854004]}
    for name, value in {"loss": result.loss, **result.terms}.items():
        assert torch.equal(value, torch.tensor(pinned[name])), name


class LeafOutput(torch.nn.Module):
    """A 'network' whose output is a free tensor, to see exactly which outputs a loss trains."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape) * 0.1)

    def forward(self, x, t):
        return self.out


def grads(name, key):
    torch.manual_seed(0)
    sched = Schedule.linear(T=100, scale_to_T=True)
    v = get_variant(name)
    x0 = to_data_scale(load_dataset("digits", split="train")[:32])
    model = LeafOutput((32, v.out_channels(1), 8, 8))
    result = v.loss(model, sched, x0)
    terms = {"loss": result.loss, **result.terms}
    for value in terms.values():
        assert value.shape == (32,) and torch.isfinite(value).all()
    (g,) = torch.autograd.grad(terms[key].sum(), model.out, allow_unused=True)
    g = torch.zeros_like(model.out) if g is None else g
    return g[:, :1].abs().sum().item(), g[:, 1:].abs().sum().item()


@pytest.mark.parametrize("name", DDPM)  # continuous-time variants: tests/test_vdm_training.py
def test_loss_trains_every_output_it_should(name):
    mean_grad, var_grad = grads(name, "loss")
    assert mean_grad > 0
    if get_variant(name).learns_variance:
        assert var_grad > 0


def test_hybrid_stops_the_vb_gradient_at_the_mean():
    mean_grad, var_grad = grads("hybrid", "vb")
    assert mean_grad == 0 and var_grad > 0  # L_vlb trains the variance only
    mean_grad, var_grad = grads("hybrid", "mse")
    assert mean_grad > 0 and var_grad == 0  # L_simple trains the mean only
    mean_grad, var_grad = grads("elbo-learned", "loss")
    assert mean_grad > 0 and var_grad > 0  # without the stop-gradient both are trained


def test_importance_sampler_turns_on_after_ten_values_per_t():
    from bench.diffusion.timesteps import LossSecondMomentSampler

    s = LossSecondMomentSampler(T=4)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    for _ in range(10):
        s.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    p = s.probabilities()
    expect = torch.tensor([1, 1, 1, 3.0], dtype=torch.float64) / 6 * 0.999 + 0.001 / 4
    assert torch.allclose(p, expect)
    t, w = s.sample(20000, torch.device("cpu"), g)
    assert (t == 3).float().mean().item() == pytest.approx(expect[3].item(), abs=0.02)
    assert torch.allclose(w, (1 / (4 * expect[t])).float())
    state = s.state_dict()
    fresh = LossSecondMomentSampler(T=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probabilities(), p)


@pytest.mark.parametrize("name", [*DDPM, "vdm", "weighted"])
def test_sixty_steps_on_digits_lower_the_loss(name):
    torch.manual_seed(0)
    sched = Schedule.linear(T=100, scale_to_T=True)
    variant = get_variant(name)
    net = make_config("digits", variant=name).build_model(variant, 1, 8)  # vdm: with its learned schedule inside
    data = to_data_scale(load_dataset("digits", split="train"))
    probe = data[:512]

    def probe_loss():  # the same t and ε before and after, through a fresh (uniform-t) instance
        with torch.no_grad():
            return get_variant(name).loss(net, sched, probe, torch.Generator().manual_seed(1)).loss.mean().item()

    before = probe_loss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # after 60 steps every variant measured at most 0.58 of its start (vdm; the rest <= 0.42)
        batch = data[torch.randint(0, len(data), (64,), generator=g)]
        loss = variant.loss(net, sched, batch).loss.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    after = probe_loss()
    assert after < 0.8 * before, (before, after)
