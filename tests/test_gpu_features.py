"""The GPU path exercised on the CPU: bf16 autocast, the channels_last layout and torch.compile each
train a tiny digits run to the end, and the bound stays a float64 computation from fp32 network
outputs — so a trained digits model's bound under bf16 autocast is within 0.01 bits/dim of fp32.

CPU autocast runs the same bf16 casting policy as CUDA's; inductor compiles with the system gcc. The
compile test is the slow one (~15 s with a warm inductor cache, ~95 s cold, one thread on shared cores).
"""

from __future__ import annotations

import math
import shutil
import traceback
from functools import partial

import pytest
import torch
from mlflow.tracking import MlflowClient

import bench.diffusion.ode
from bench.data.datasets import load_dataset
from bench.diffusion.bound import _terms, estimate_bits_per_dim
from bench.diffusion.schedule import Schedule
from bench.nets.ema import ema_weights
from bench.nets.unet import UNet, build_network
from bench.runtime.context import Runtime
from bench.runtime.devices import Autocast
from bench.training.checkpoint import load_checkpoint
from bench.training.config import make_config
from bench.training.evaluation import EVAL_SEED
from bench.training.run import train
from variants import get_variant

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
BOUND_TOLERANCE = 0.01  # bits/dim: the limit on |bpd(bf16) − bpd(fp32)|


@pytest.fixture
def home(tmp_path, store_template, monkeypatch):
    """BENCH_HOME with an initialised (empty) embedded store; no ambient MLflow URI or data dir."""
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    return tmp_path


def digits_config(home, **overrides):
    """A digits run that trains ``steps`` and ends with a cheap estimated bound (no FID)."""
    values = dict(steps=4, batch_size=16, T=40, log_every=2, eval_every=0, final_eval="estimate",
                  final_eval_images=8, eval_calls=5, fid_samples=0, sample_steps=5, sample_grid=4, device="cpu",
                  log_model=False,
                  tracking_uri=f"sqlite:///{home}/mlflow.db", experiment="gpu-features")
    return make_config("digits", **{**values, **overrides})


@pytest.fixture
def network_calls(monkeypatch) -> list[dict]:
    """A spy on the U-Net: per call, whether autocast was on, the layouts, and the raw output dtype."""
    calls: list[dict] = []
    forward = UNet.forward

    def spy(self, x, t):
        out = forward(self, x, t)
        kernels = [p for p in self.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
        calls.append({
            "autocast": torch.is_autocast_enabled("cpu"),
            "weights_nhwc": all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                for p in kernels),
            "input_nhwc": x.is_contiguous(memory_format=torch.channels_last),
            "in_dtype": x.dtype,
            "out_dtype": out.dtype,
            "grad": torch.is_grad_enabled(),
        })
        return out

    monkeypatch.setattr(UNet, "forward", spy)
    return calls


def assert_finished_with_finite_bounds(result, home):
    assert result.status == "FINISHED", result.reason
    bounds = {k: v for k, v in result.metrics.items() if k.startswith("bpd")}
    assert {"bpd", "bpd_unclipped", "bpd/vb", "bpd/decoder"} <= set(bounds)
    assert all(math.isfinite(v) for v in bounds.values()), bounds
    run = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert all(math.isfinite(v) for k, v in run.data.metrics.items() if k.startswith(("bpd", "loss"))), run.data.metrics
    return run


# ----------------------------------------------------------------------------- (a) each feature trains
def test_bf16_autocast_run_finishes_with_the_network_in_bf16(home, network_calls):
    run = assert_finished_with_finite_bounds(train(digits_config(home, precision="bf16"), progress=False), home)
    assert run.data.params["config.precision"] == "bf16"
    training = [c for c in network_calls if c["grad"]]
    assert training and all(c["autocast"] and c["out_dtype"] == torch.bfloat16 for c in training)
    assert all(c["autocast"] for c in network_calls)  # evaluation and sampling too


def test_channels_last_run_finishes_with_nhwc_weights_and_inputs(home, network_calls):
    run = assert_finished_with_finite_bounds(
        train(digits_config(home, channels_last=True, precision="fp32"), progress=False), home)
    assert run.data.params["config.channels_last"] == "True"
    training = [c for c in network_calls if c["grad"]]
    assert training and all(c["weights_nhwc"] and c["input_nhwc"] for c in training)
    assert all(c["weights_nhwc"] for c in network_calls)  # the EMA copy evaluated and sampled keeps the layout
    assert not any(c["autocast"] for c in network_calls)


def test_channels_last_is_off_on_cpu_by_default(home, network_calls):
    """The control for the test above: without the option a CPU run keeps NCHW weights."""
    assert train(digits_config(home, steps=1, final_eval_images=2), progress=False).status == "FINISHED"
    assert network_calls and not any(c["weights_nhwc"] for c in network_calls)


def test_compiled_run_finishes_with_inductor_graphs(home):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        result = train(digits_config(home, compile=True, precision="bf16"), progress=False)
        graphs, compiled = counters["stats"]["unique_graphs"], counters["aot_autograd"]["ok"]
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    run = assert_finished_with_finite_bounds(result, home)
    assert run.data.params["config.compile"] == "True"
    assert graphs >= 1 and compiled >= 1  # the network went through dynamo, AOT autograd and inductor
    assert not breaks, breaks  # the U-Net compiles as whole graphs


# ----------------------------------------------------------------------------- (b) where the precision changes
def test_autocast_wrapper_returns_fp32_and_the_bound_is_formed_in_float64(home, monkeypatch):
    torch.manual_seed(0)
    variant = get_variant("elbo-learned")
    net = build_network("tiny", 1, variant.out_channels(1), 8)
    with torch.no_grad():  # a freshly built U-Net outputs zeros; give it outputs that bf16 would round
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    raw: list[torch.dtype] = []
    net.register_forward_hook(lambda module, args, out: raw.append(out.dtype))
    model = Autocast(net, "bf16", CPU)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 5, 10, 20, 39])
    out = model(x0, t)
    assert raw == [torch.bfloat16] and out.dtype == torch.float32  # bf16 inside, fp32 out
    assert not torch.is_autocast_enabled("cpu")  # the wrapper leaves autocast off behind it

    seen: list[tuple] = []
    p_mean_variance = variant.p_mean_variance

    def spy(out, sched, x_t, t, clip_x0=False):
        seen.append((out.dtype, x_t.dtype, torch.is_autocast_enabled("cpu")))
        return p_mean_variance(out, sched, x_t, t, clip_x0=clip_x0)

    monkeypatch.setattr(variant, "p_mean_variance", spy)
    sched = Schedule.linear(T=40, scale_to_T=True)
    nats = _terms(model, variant, sched, x0, t, torch.randn_like(x0))
    assert nats.dtype == torch.float64 and nats.shape == (2, 6) and torch.isfinite(nats).all()
    assert seen == [(torch.float64, torch.float64, False)] * 2  # both conventions, float64, outside autocast


# ----------------------------------------------------------------------------- (c) bf16 vs fp32 bound
def test_bf16_bound_of_a_trained_digits_model_is_within_a_hundredth_of_a_bit_of_fp32(home, record_property):
    """300 fp32 steps of `elbo-learned` on digits (T = 1000; learned variance, importance-sampled t), then the
    EMA weights' estimated bound on 64 test images (33 calls each, the evaluation seed: the same (image, t, ε)
    for both) in fp32 and under the trainer's bf16 autocast."""
    config = digits_config(home, variant="elbo-learned", T=1000, steps=300, batch_size=48, ema_decay=0.97,
                           log_every=100, precision="fp32", sample_grid=2)
    result = train(config, progress=False)
    assert result.status == "FINISHED", result.reason
    variant, sched = get_variant(config.variant), config.build_schedule()
    net = build_network(config.network, 1, variant.out_channels(1), 8)
    net.load_state_dict(ema_weights(load_checkpoint(result.checkpoint)["ema"]))
    images = load_dataset("digits", "test")[:64]
    bounds = {precision: estimate_bits_per_dim(Autocast(net, precision, CPU), variant, sched, images,
                                               calls_per_image=33, seed=EVAL_SEED, runtime=Runtime(CPU)).summary()
              for precision in ("fp32", "bf16")}
    fp32, bf16 = bounds["fp32"], bounds["bf16"]
    diff = {k: bf16[k] - fp32[k] for k in ("bpd", "bpd_unclipped", "bpd/vb", "bpd/decoder")}
    print(f"\nbf16 - fp32 bound, 64 digits test images: bpd {fp32['bpd']:.4f} -> {bf16['bpd']:.4f} "
          f"(diff {diff['bpd']:+.5f}); bpd_unclipped diff {diff['bpd_unclipped']:+.5f}; "
          f"vb {diff['bpd/vb']:+.5f}; decoder {diff['bpd/decoder']:+.5f} bits/dim")
    for k, v in diff.items():
        record_property(f"bf16_minus_fp32/{k}", v)
    assert fp32["bpd"] < 6  # trained: the untrained network's bound here is 6.84 bits/dim
    assert 0 < abs(diff["bpd"]) < BOUND_TOLERANCE  # bf16 changed the outputs, but not the bound by 0.01
    assert abs(diff["bpd_unclipped"]) < BOUND_TOLERANCE


# ----------------------------------------------------------------------------- (d) the ODE likelihood in float32
def test_the_probability_flow_runs_the_network_in_float32_in_a_bf16_run(home, network_calls, monkeypatch):
    """Under bf16 autocast the flow's score moves in steps far coarser than the solver's tolerances (on CPU the
    solve had not reached s = 0.56 after more evaluations than fp32 needed for all of it): whatever the run's
    precision, the flow's network calls see float32 inputs with autocast off, and the tag says so."""
    in_flow = []
    score_and_quadratic = bench.diffusion.ode.score_and_quadratic

    def marked(*args, **kwargs):
        in_flow.append(len(network_calls))  # the network call this drift evaluation makes is the next one
        return score_and_quadratic(*args, **kwargs)

    monkeypatch.setattr(bench.diffusion.ode, "score_and_quadratic", marked)
    config = digits_config(home, precision="bf16", final_eval_ode=True, final_eval_images=2, ode_batch_size=2,
                           ode_rtol=1e-3, ode_atol=1e-3)
    run = assert_finished_with_finite_bounds(train(config, progress=False), home)
    flow = [network_calls[i] for i in in_flow]
    assert len(flow) >= 2 and math.isfinite(run.data.metrics["nll_ode"])
    assert all(not c["autocast"] and c["in_dtype"] == torch.float32 and c["out_dtype"] == torch.float32 for c in flow)
    others = [c for i, c in enumerate(network_calls) if i not in set(in_flow)]
    assert others and all(c["autocast"] for c in others)  # training, the bound and sampling stay in bf16
    assert run.data.tags["nll_ode_precision"] == "float32"


# ----------------------------------------------------------------------------- (e) a step never waits for the device
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


STEADY_VARIANT = "elbo-learned"  # learned variance and the importance sampler of t: the most a step does


def steady_steps(monkeypatch, start, stop, first: int = 2, last: int = 5) -> None:
    """Call ``start()`` as training step ``first`` of a ``STEADY_VARIANT`` run computes its loss (earlier
    steps warm up: tables and histories move to the device once) and ``stop()`` as step ``last + 1`` does:
    steps first..last run between them, and no logging step (those read the window's means) when
    log_every > last + 1."""
    cls = type(get_variant(STEADY_VARIANT))
    loss, calls = cls.loss, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == first:
            start()
        elif len(calls) == last + 1:
            stop()
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(cls, "loss", counted)


def _target_device(args, kwargs) -> torch.device | None:
    """The device a ``Tensor.to(...)`` call names, if any."""
    for a in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (torch.device, str)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_read_nothing_back_from_the_device(home, monkeypatch, device):
    """Between two logging points a training step (data, loss, backward, clipping, AdamW, EMA, the loss window)
    makes no host read of a tensor (.item(), .cpu(), .tolist(), .numpy(), bool/float/int of a tensor) and no
    copy of unpinned host memory to the device: on a GPU each waits for the queued work. On the CPU the spy sees
    the reads (which are where a GPU run would wait); the copies show on a GPU. AdamW runs fused, as it does
    on a GPU (its unfused step reads a step counter that lives on the host by design)."""
    seen: list[str] = []
    armed = [False]

    def record(what: str) -> None:
        armed[0] = False  # the spy's own tensor calls are not the step's
        caller = next(f for f in reversed(traceback.extract_stack()[:-2]) if "test_gpu_features" not in f.filename)
        seen.append(f"{what} at {caller.filename.split('/')[-1]}:{caller.lineno} ({caller.name})")
        armed[0] = True

    def reads(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            if armed[0]:
                record(f"Tensor.{name}")
            return real(self, *args, **kwargs)
        return spy

    def copies(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            if armed[0]:
                src, dst = (args[0], self) if name == "copy_" else (self, None)
                target = dst.device if dst is not None else _target_device(args, kwargs)
                if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and target is not None
                        and target.type != "cpu" and not src.is_pinned()):
                    record(f"Tensor.{name} of unpinned host memory to {target}")
            return real(self, *args, **kwargs)
        return spy

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, reads(name))
    for name in ("to", "copy_", "cuda"):
        monkeypatch.setattr(torch.Tensor, name, copies(name))
    monkeypatch.setattr(torch.optim, "AdamW", partial(torch.optim.AdamW, fused=True))
    steady_steps(monkeypatch, start=lambda: armed.__setitem__(0, True), stop=lambda: armed.__setitem__(0, False))
    config = digits_config(home, variant=STEADY_VARIANT, device=device, steps=8, log_every=8, final_eval_images=2)
    assert train(config, progress=False).status == "FINISHED"
    assert seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_whole_training_steps_never_synchronise(home, monkeypatch):
    """The same steps under CUDA's sync debug mode, which raises at any synchronising call (a device-to-host
    read, a copy from unpinned memory, a blocking allocator or stream call), with the GPU path's defaults:
    bf16 autocast, channels_last, fused AdamW, the importance sampler of a learned-variance variant."""
    steady_steps(monkeypatch, start=lambda: torch.cuda.set_sync_debug_mode("error"),
                 stop=lambda: torch.cuda.set_sync_debug_mode(0))
    try:
        result = train(digits_config(home, variant=STEADY_VARIANT, device="cuda", steps=8, log_every=8,
                                     final_eval_images=2), progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.status == "FINISHED", result.reason
