"""Continuous-time variants (vdm, vdm-fixed, vdm-finite) on the shared trainer: their config, their model, their loss
(the whole bound in bits/dim, its gradient reaching a learned schedule) and a short run end to end."""

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.diffusion.continuous import ContinuousDenoiser, FixedLinear, LearnedEndpoints, MonotoneNet, find_denoiser
from bench.errors import BenchError
from bench.runtime.devices import Autocast
from bench.training.config import make_config
from bench.training.run import train
from reports.build import build_report
from variants import get_variant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch, store_template):
    """BENCH_HOME with an empty MLflow store in it (its table creation, seconds, is not what these tests check)."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    return tmp_path


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 127.5 - 1


@pytest.mark.parametrize(("variant", "asked", "built"), [
    ("vdm", "auto", LearnedEndpoints), ("vdm", "learned-net", MonotoneNet), ("vdm-fixed", "auto", FixedLinear),
    ("vdm-finite", "auto", FixedLinear), ("vdm-finite", "learned-ends", LearnedEndpoints),
])
def test_the_config_builds_the_model_with_its_schedule_inside(variant, asked, built):
    config = make_config("digits", variant=variant, gamma_schedule=asked)
    model = config.build_model(get_variant(variant), 1, 8)
    assert isinstance(model, ContinuousDenoiser) and isinstance(model.schedule, built)
    assert find_denoiser(Autocast(model, "fp32", torch.device("cpu"))) is model
    assert model.schedule.endpoints() == pytest.approx((-13.3, 5.0), abs=1e-5 if built is not MonotoneNet else 2.0)
    learned = [n for n, _ in model.named_parameters() if n.startswith("schedule.")]
    assert bool(learned) == (built is not FixedLinear)  # the optimiser and the EMA see the schedule's parameters
    assert all(f"{n}" in model.state_dict() for n in learned)  # and the checkpoint holds them


def test_fourier_features_widen_the_input():
    config = make_config("digits", variant="vdm", fourier_features=True)
    model = config.build_model(get_variant("vdm"), 1, 8)
    assert model.net.in_channels == 5 and model(_batch(2), torch.tensor([0.1, 0.9])).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(("given", "words"), [
    ({"variant": "vdm", "gamma_schedule": "fixed"}, "vdm-fixed"),
    ({"variant": "vdm-fixed", "gamma_schedule": "learned-ends"}, "--variant vdm"),
    ({"variant": "simple", "gamma_schedule": "fixed"}, "continuous-time variants"),
    ({"variant": "hybrid", "fourier_features": True}, "continuous-time variants"),
    ({"variant": "vdm", "gamma_min": 6.0}, "gamma_min < gamma_max"),
    ({"variant": "vdm-fixed", "gamma_max": math.inf}, "finite"),
])
def test_bad_continuous_settings_are_one_line(given, words):
    with pytest.raises(BenchError, match=words) as err:
        make_config("digits", **given)
    assert "\n" not in str(err.value)


def test_the_loss_is_the_whole_bound_and_trains_the_schedule():
    torch.manual_seed(0)
    variant = get_variant("vdm")
    config = make_config("digits", variant="vdm")
    model = config.build_model(variant, 1, 8)
    x0 = _batch()
    loss = variant.loss(model, config.build_schedule(), x0, torch.Generator().manual_seed(1))
    assert set(loss.terms) == {"diffusion", "decoder", "prior"}
    assert torch.allclose(loss.loss, loss.terms["diffusion"] + loss.terms["decoder"] + loss.terms["prior"])
    # a freshly built network outputs ε̂ = 0: the diffusion term is ½γ'‖ε‖² with γ' = 18.3, about 13.2 bits/dim
    assert loss.terms["diffusion"].mean().item() == pytest.approx(0.5 * 18.3 / math.log(2), rel=0.3)
    assert loss.t.dtype == torch.long and 0 <= loss.t.min() and loss.t.max() < 1000
    spread = torch.sort(loss.t.double() / 1000).values.diff()  # low-discrepancy t: one per 1/B of [0, 1]
    assert spread.max().item() < 2 / len(x0) + 1e-3
    loss.loss.mean().backward()
    assert model.schedule.b.grad.abs() > 0 and model.schedule.w.grad.abs() > 0
    with torch.no_grad():  # one step lowers the bound (the end points move with it)
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    assert model.schedule.endpoints() != pytest.approx((-13.3, 5.0), abs=1e-6)


def test_finite_t_draws_steps_of_the_configs_t():
    variant = get_variant("vdm-finite")
    config = make_config("digits", variant="vdm-finite", T=10)
    model = config.build_model(variant, 1, 8)
    loss = variant.loss(model, config.build_schedule(), _batch(), torch.Generator().manual_seed(2))
    assert loss.t.max() < 10 and torch.isfinite(loss.loss).all()
    assert loss.terms["diffusion"].mean() > 0


@pytest.mark.usefixtures("home")
def test_a_short_vdm_run_trains_and_evaluates(tmp_path):
    """A few steps of `vdm` end to end: its bound is logged with its terms, samples are drawn, the learned end points
    are in the checkpoint; the claims benchmark runs on it."""
    config = make_config("digits", variant="vdm", steps=4, batch_size=16, log_every=2, eval_every=2, eval_images=4,
                         final_eval_images=8, eval_calls=4, fid_samples=0, sample_grid=4, sample_steps=5,
                         log_model=False, system_metrics=False, checkpoint_every=4)
    result = train(config, progress=False)
    assert result.status == "FINISHED"
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert {"schedule.b", "schedule.w"} <= set(ckpt["model"])
    metrics = result.metrics
    for name in ("bpd", "bpd/diffusion", "bpd/decoder", "bpd/prior", "bpd_stderr"):
        assert math.isfinite(metrics[name]), name
    assert metrics["bpd"] == pytest.approx(metrics["bpd/diffusion"] + metrics["bpd/decoder"] + metrics["bpd/prior"])
    assert metrics["gamma_0"] != pytest.approx(-13.3, abs=1e-7)  # the learned end points moved, and were logged

    # the report shows the row with its terms and says what its bound is; a curve file of the continuous kind under
    # DDPM's per-t name (as runs logged before it had its own) is passed over, not misread
    client = MlflowClient(result.tracking_uri)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert "diffusion_by_t_bound.json" in names and "per_t_bound.json" not in names
    during = client.get_run(result.run_id).data  # the training-time estimate at step 2
    assert "diffusion_by_t_estimate" in names and "continuous-time bound L_∞" in during.tags["bpd_estimate_method"]
    assert [m.step for m in client.get_metric_history(result.run_id, "bpd_estimate")] == [2]
    legacy = tmp_path / "per_t_bound.json"
    legacy.write_text(json.dumps({"t_from": [0.0], "t_to": [1.0], "diffusion_bits_per_dim_mean": [1.0]}))
    client.log_artifact(result.run_id, str(legacy))
    report = build_report([config.experiment], None, tmp_path / "report", result.tracking_uri).markdown.read_text()
    assert "bpd convention=" not in report and "bpd convention: continuous-time" in report
    assert "estimate (continuous-time bound L_∞ (VDM)" in report and "| bpd/diffusion |" in report

    # benchmarks/vdm_claims.py on this checkpoint: L_∞, L_T and two other shapes through the same end points
    spec = importlib.util.spec_from_file_location("vdm_claims", ROOT / "benchmarks" / "vdm_claims.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.claims(str(result.checkpoint), images=4, t_per_image=4, steps=(2, 8))
    assert [r["bound"] for r in rows] == ["L_∞", "L_2", "L_8", "L_∞, shape t³", "L_∞, shape 1 − (1 − t)³"]
    assert all(math.isfinite(r["bpd"]) and r["se"] > 0 for r in rows)
    assert rows[0]["prior"] == rows[3]["prior"] and rows[0]["bpd"] != rows[3]["bpd"]  # same ends, other t-density
    with torch.no_grad():  # the script put the model's own schedule back after each swap
        model, _, _ = script.load_model(str(result.checkpoint))
    assert type(model.schedule).__name__ == "LearnedEndpoints"


@pytest.mark.usefixtures("home")
def test_a_vdm_run_resumes_bit_exactly():
    """2 steps, then resumed to 4, end with the weights, learned schedule, EMA and optimiser state of 4 straight."""
    config = make_config("digits", variant="vdm", steps=4, batch_size=8, log_every=1, eval_every=0,
                         final_eval_images=2, eval_calls=3, fid_samples=0, sample_grid=1, sample_steps=2,
                         log_model=False, system_metrics=False, checkpoint_every=100, warmup_steps=0)
    straight = torch.load(train(config, progress=False).checkpoint, weights_only=True)
    first = train(dataclasses.replace(config, steps=2), progress=False)
    resumed = train(config, resume=first.checkpoint, reopen=True, progress=False)
    assert resumed.status == "FINISHED" and resumed.step == 4
    again = torch.load(resumed.checkpoint, weights_only=True)
    for part in ("model", "ema"):
        assert straight[part].keys() == again[part].keys()
        assert all(torch.equal(straight[part][k], again[part][k]) for k in straight[part]), part
    assert not torch.equal(straight["model"]["schedule.b"], torch.tensor(-13.3))  # the schedule trained


def test_a_bf16_network_keeps_the_schedule_and_the_bound_in_float32():
    """Under bf16 autocast the network runs in bf16 but γ, γ' and the three terms stay float32 (VDM: never bf16);
    the monotone network schedule has dense layers, which autocast would run in bf16."""
    variant = get_variant("vdm")
    config = make_config("digits", variant="vdm", gamma_schedule="learned-net")
    model = config.build_model(variant, 1, 8)
    seen = set()
    model.schedule.register_forward_hook(lambda m, args, out: seen.add(out.dtype))  # returns None: output kept
    x0 = _batch()
    fp32 = variant.loss(model, config.build_schedule(), x0, torch.Generator().manual_seed(3))
    bf16 = variant.loss(Autocast(model, "bf16", torch.device("cpu")), config.build_schedule(), x0,
                        torch.Generator().manual_seed(3))
    assert seen == {torch.float32}
    assert all(v.dtype == torch.float32 for v in bf16.terms.values())
    assert torch.equal(bf16.terms["prior"], fp32.terms["prior"])  # no network: bit-equal
    assert torch.allclose(bf16.loss, fp32.loss, rtol=0.05)


def test_the_adaptive_schedule_resumes_exactly_from_a_checkpoint(tmp_path):
    """`weighted` with the adaptive schedule: 2 steps, its state through a checkpoint file (read as tensors only),
    then 2 more, draw the λ and end with the bins of 4 straight steps (the trainer restores the rest of a run: the
    vdm test above); a run without the adaptive schedule refuses that state."""
    config = make_config("digits", variant="weighted", weighting="min-snr", prediction="v", adaptive_schedule=True)
    model, sched, x0 = config.build_model(config.build_variant(), 1, 8), config.build_schedule(), _batch()

    def steps(variant, n, g):
        return [variant.loss(model, sched, x0, g).t for _ in range(n)]

    straight, g = config.build_variant(), torch.Generator().manual_seed(4)
    drawn = steps(straight, 4, g)
    first, g = config.build_variant(), torch.Generator().manual_seed(4)
    steps(first, 2, g)
    torch.save({"variant": first.state_dict()}, tmp_path / "last.pt")
    resumed = config.build_variant()
    resumed.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["variant"], sched.T)
    assert [torch.equal(a, b) for a, b in zip(steps(resumed, 2, g), drawn[2:], strict=True)] == [True, True]
    assert resumed.adaptive.updates == straight.adaptive.updates == 4
    assert torch.equal(resumed.adaptive.ema.nan_to_num(-1), straight.adaptive.ema.nan_to_num(-1))
    assert not torch.equal(straight.adaptive.probabilities(), torch.full((64,), 1 / 64, dtype=torch.float64))
    other = dataclasses.replace(config, gamma_min=-12.0)  # a checkpoint's bins over another λ range are refused
    moved = other.build_variant()
    moved.load_state_dict(first.state_dict(), sched.T)
    with pytest.raises(BenchError, match="the checkpoint's adaptive schedule covers"):
        moved.loss(other.build_model(moved, 1, 8), sched, x0, torch.Generator().manual_seed(4))
    with pytest.raises(BenchError, match="adaptive noise schedule but this run has none"):
        dataclasses.replace(config, adaptive_schedule=False).build_variant().load_state_dict(first.state_dict(), 1000)
