"""diffusers' format both ways (bench.published.diffusers_format): a random-weight UNet2DModel read into the project's
network gives its output to 1e-5; a checkpoint exported by `bench export` loads in diffusers' DDPMPipeline, whose
network and sampler (all T steps, the same noise) give the project's; what either side cannot hold is one error line.

diffusers is an optional extra; only these tests import it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli.main import cli
from bench.diffusion.sample import sample
from bench.diffusion.schedule import Schedule
from bench.diffusion.streams import Stream
from bench.errors import BenchError
from bench.nets.ema import Ema
from bench.nets.unet import NETWORK_PRESETS, UNetConfig
from bench.published import diffusers_format as fmt
from bench.published.diffusers_format import read_diffusers, scheduler_diffusion, unet_config, write_diffusers
from bench.runtime.context import Runtime
from bench.training.checkpoint import save_checkpoint
from bench.training.config import RunConfig
from variants import VARIANTS

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# DDPM's network in small: one head per attention, [sin, cos] embedding, asymmetric down-sampling, attention at 4×4
DDPM_SHAPED = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
                   downsample_padding=0, norm_eps=1e-6)
# improved-diffusion's: 4 heads of 8 channels, scale-shift norm, [cos, sin] embedding, symmetric down-sampling
IDDPM_SHAPED = dict(sample_size=8, in_channels=2, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                    attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5,
                    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, dropout=0.1)
TOL = 1e-5


def random_unet(seed: int = 0, **config):
    """A UNet2DModel whose every weight is moved off its initial value (diffusers zero-initialises none, but its
    GroupNorms start at 1 and 0)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet


def max_delta(unet, net, t: list[int], seed: int = 1) -> float:
    """max |UNet2DModel(x, t).sample − the project network(x, t)| on one batch of N(0, 1) inputs."""
    x = torch.randn(len(t), unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(t)
    with torch.no_grad():
        return (unet(x, t).sample - net(x, t)).abs().max().item()


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("config, layout", [(DDPM_SHAPED, "pipeline"), (IDDPM_SHAPED, "unet folder")],
                         ids=["ddpm-shaped", "iddpm-shaped"])
def test_a_random_unet2dmodel_read_from_its_folder_gives_its_output(config, layout, tmp_path):
    unet = random_unet(**config)
    if layout == "pipeline":
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large")
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    else:
        unet.save_pretrained(tmp_path)
    converted = read_diffusers(tmp_path)
    c = converted.unet
    if config is DDPM_SHAPED:
        assert (c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.num_heads, c.scale_shift_norm, c.embedding,
                c.downsample_pad, c.norm_eps) == (16, (1, 2), 1, (4,), 1, False, "ddpm", "asymmetric", 1e-6)
        assert converted.diffusion["variance"] == "large"
    else:
        assert (c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.num_heads, c.scale_shift_norm, c.embedding,
                c.downsample_pad, c.norm_eps, c.dropout) == (16, (1, 2, 2), 2, (4, 2), 4, True, "iddpm", "symmetric",
                                                             1e-5, 0.1)
        assert converted.diffusion["variance"] == "small"  # a bare UNet: DDPMScheduler's defaults
    assert converted.source_format == "diffusers" and converted.origin["temb_dense.0.weight"] == \
        "time_embedding.linear_1.weight"
    assert json.loads(json.dumps(converted.flags))["weights"] == "diffusion_pytorch_model.safetensors"
    with pytest.raises(BenchError, match="carries its own config"):
        read_diffusers(tmp_path, "--num_channels 128")
    net = converted.network()
    # max |Δ| measured: 2.3e-6 (ddpm-shaped), 2.2e-6 (iddpm-shaped) on outputs of magnitude 2-4
    assert max_delta(unet, net, [0, 1, 5, 500, 999]) < TOL


def test_the_legacy_attention_names_are_read(tmp_path):
    """diffusers before 0.15 named the attention projections query, key, value and proj_attn (google/ddpm-cifar10-32's
    .bin still does)."""
    unet = random_unet(**DDPM_SHAPED)
    unet.save_pretrained(tmp_path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, value in unet.state_dict().items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        state[name] = value
    assert "mid_block.attentions.0.query.weight" in state
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    converted = read_diffusers(tmp_path / "config.json")  # a file of the folder names it too
    assert converted.origin["mid_attn_1.q.weight"] == "mid_block.attentions.0.query.weight"
    assert max_delta(unet, converted.network(), [3, 900]) < TOL


@pytest.mark.parametrize("change, message", [
    ("rename", "down_blocks.1.attentions.0.to_k.weight (here down.1.attn.0.k.weight) is missing (and 1 more)"),
    ("drop", "mid_block.resnets.1.conv2.bias (here mid_block_2.conv2.bias) is missing"),
    ("reshape", "up_blocks.1.resnets.0.conv_shortcut.weight (here up.1.block.0.nin_shortcut.weight) has shape "
                "(16, 40, 1, 1), the network's is (16, 48, 1, 1)"),
    ("extra", "mid_block.attentions.1.to_q.weight has no place in the network"),
])
def test_a_tensor_that_does_not_fit_is_one_line_naming_the_diffusers_tensor(change, message, tmp_path):
    from safetensors.torch import load_file, save_file

    random_unet(**DDPM_SHAPED).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    if change == "rename":
        state["down_blocks.1.attentions.0.to_kk.weight"] = state.pop("down_blocks.1.attentions.0.to_k.weight")
    elif change == "drop":
        del state["mid_block.resnets.1.conv2.bias"]
    elif change == "reshape":
        state["up_blocks.1.resnets.0.conv_shortcut.weight"] = torch.zeros(16, 40, 1, 1)
    else:
        state["mid_block.attentions.1.to_q.weight"] = torch.zeros(32, 32)
    save_file(state, path)
    with pytest.raises(BenchError) as err:
        read_diffusers(tmp_path)
    text = str(err.value)
    assert "\n" not in text and text == f"the diffusers weights do not fit the network built from its flags: {message}"


@pytest.mark.parametrize("setting, named", [
    ({"up_block_types": ("UpBlock2D", "UpBlock2D")}, "attention on one path only"),
    ({"add_attention": False}, "add_attention"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
    ({"resnet_time_scale_shift": "scale_shift"}, "the middle attention has no GroupNorm"),
    ({"flip_sin_to_cos": True, "freq_shift": 1}, "flip_sin_to_cos True with freq_shift 1"),
    ({"downsample_padding": 2}, "downsample_padding"),
    ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "block type CrossAttnDownBlock2D"),
    ({"attention_head_dim": 16, "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D"),
      "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D")}, "attention_head_dim 16"),
    ({"block_out_channels": (16, 24)}, "not multiples of the first"),
    ({"time_embedding_dim": 32}, "time_embedding_dim"),
    ({"mid_block_scale_factor": 2}, "mid_block_scale_factor"),
])
def test_a_unet2dmodel_setting_the_project_cannot_express_is_refused_naming_it(setting, named):
    with pytest.raises(BenchError) as err:
        unet_config({**DDPM_SHAPED, **setting})
    assert "\n" not in str(err.value) and named in str(err.value), str(err.value)


def test_our_defaults_for_missing_keys_are_diffusers():
    """A config.json leaves out what it does not change; the reader fills in UNet2DModel's and DDPMScheduler's own."""
    for cls, ours in ((diffusers.UNet2DModel, fmt.UNET_DEFAULTS), (diffusers.DDPMScheduler, fmt.SCHEDULER_DEFAULTS)):
        theirs = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        assert ours == theirs


def test_the_scheduler_config_gives_the_diffusion():
    # google/ddpm-cifar10-32's
    google = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
              "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}
    assert scheduler_diffusion(google) == {"variant": "simple", "variance": "large", "T": 1000, "schedule": "linear",
                                           "beta_start": 1e-4, "beta_end": 0.02, "cosine_s": 0.008}
    cosine = scheduler_diffusion({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000})
    assert (cosine["schedule"], cosine["T"], cosine["cosine_s"], cosine["variance"]) == ("cosine", 4000, 0.008, "small")
    # trained_betas that are a schedule the project builds, as a float32 copy too; any others are refused
    linear = Schedule.linear(50, 1e-3, 0.05).betas
    assert scheduler_diffusion({"trained_betas": linear.float().tolist()})["beta_end"] == pytest.approx(0.05, 1e-7)
    assert scheduler_diffusion({"trained_betas": Schedule.cosine(50).betas.tolist()})["schedule"] == "cosine"
    with pytest.raises(BenchError, match="trained_betas .T = 50. are neither"):
        scheduler_diffusion({"trained_betas": (linear ** 0.9).tolist()})
    for setting, named in (({"variance_type": "learned_range"}, "variance_type"), ({"prediction_type": "v_prediction"},
                           "prediction_type"), ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear'"),
                           ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")):
        with pytest.raises(BenchError, match=named):
            scheduler_diffusion(setting)


@pytest.mark.parametrize("T", [4, 1000, 4000])
def test_the_cosine_schedule_is_diffusers_squaredcos_cap_v2(T):
    """The project's float64 cosine betas, rounded to float32, are diffusers' float32 betas bit for bit (relative
    difference before rounding at most 5.9e-8), so squaredcos_cap_v2 reads as schedule cosine with s = 0.008."""
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    ours = Schedule.cosine(T, s=0.008).betas
    assert torch.equal(theirs, ours.float()) and torch.equal(theirs, fmt._squaredcos_cap_v2(T))
    assert ((theirs.double() - ours) / ours).abs().max() < 1e-7


def test_a_pipeline_without_a_scheduler_is_refused_in_one_line(tmp_path):
    unet = random_unet(**DDPM_SHAPED)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(BenchError, match=r"^diffusers pipeline .* has no scheduler \(scheduler/ with its config\)"):
        read_diffusers(tmp_path)


# ----------------------------------------------------------------------------- writing
def checkpoint(folder: Path, variant: str = "simple", **config) -> tuple[Path, torch.nn.Module, RunConfig]:
    """A project checkpoint as `bench run` writes one (tiny digits network, T = 4), built directly: its EMA holds
    random weights (the network it returns), its raw weights others, so an export of the raw ones shows."""
    config = RunConfig(variant=variant, T=4, network="tiny", dataset="digits", **config)
    v = config.build_variant()
    torch.manual_seed(0)
    raw, ema_net = config.build_model(v, 1, 8), config.build_model(v, 1, 8)
    with torch.no_grad():
        for p, q in zip(raw.parameters(), ema_net.parameters()):
            p.normal_(0, 0.2)
            q.normal_(0, 0.2)
    ema = Ema(ema_net, decay=0.9)
    path = save_checkpoint(folder / "last.pt", {
        "config": config.to_dict(), "step": 7, "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": {},
        "rng": {}, "run_id": "0" * 32, "tracking_uri": "sqlite:///unused.db"})
    return path, ema_net.eval(), config


def export(*args: str):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


@pytest.mark.parametrize("setting", [{"variance": "large", "beta_start": 0.05, "beta_end": 0.5},
                                     {"variant": "elbo", "schedule": "cosine"}], ids=["simple-large-linear",
                                                                                      "elbo-small-cosine"])
def test_an_exported_checkpoint_loads_in_diffusers_and_samples_as_the_project(setting, tmp_path):
    path, net, config = checkpoint(tmp_path, **setting)
    out = tmp_path / "export"
    res = export(path, out, "--format", "diffusers")
    assert res.exit_code == 0, res.output
    assert "the EMA weights of" in res.output and "DDPMPipeline.from_pretrained" in res.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    variance = "fixed_large" if setting.get("variance") == "large" else "fixed_small"
    assert (scheduler.config.variance_type, scheduler.config.clip_sample, scheduler.config.prediction_type) == \
        (variance, True, "epsilon")
    sched = config.build_schedule()
    # linear: diffusers' own float32 linspace is not the float64 table rounded, so the betas are written out
    named = scheduler.config.trained_betas is None
    assert named == (config.schedule == "cosine")
    assert torch.equal(scheduler.betas, sched.betas.float())
    # the network: the checkpoint's EMA weights (max |Δ| measured 7.6e-7)
    assert max_delta(unet, net, [0, 1, 2, 3]) < TOL

    # sampling, all T steps: DDPMPipeline with the project sampler's generator draws x_T and each step's noise in the
    # same order as bench.diffusion.sample, so its images are the project's (uint8: its value rounded; measured: equal)
    variant, n, seed = config.build_variant(), 3, 5
    ours = sample(net, variant, sched, n, (1, 8, 8), seed=seed, runtime=Runtime(batch_size=n))
    theirs = pipe(batch_size=n, generator=Stream.SAMPLES.generator(seed, 0), num_inference_steps=config.T,
                  output_type="pt").images  # [n, C, H, W] on [0, 1]
    assert (theirs.double() * 255 - ours.double()).abs().max() <= 0.5 + 255 * TOL
    # and step by step before quantisation: the project's reverse step and DDPMScheduler.step on the same noise
    g_ours, g_theirs = (Stream.SAMPLES.generator(seed, 0) for _ in range(2))
    x = torch.randn(n, 1, 8, 8, generator=g_ours)
    y = torch.randn(n, 1, 8, 8, generator=g_theirs)
    with torch.no_grad():
        for k in reversed(range(config.T)):
            t = torch.full((n,), k)
            step = variant.p_mean_variance(net(x, t), sched, x, t, clip_x0=True)
            x = step.mean + (torch.exp(0.5 * step.log_var) * torch.randn(n, 1, 8, 8, generator=g_ours) if k else 0)
            y = scheduler.step(unet(y, k).sample, k, y, generator=g_theirs).prev_sample
    # max |Δ| measured: 9.5e-7 (simple, large, linear), 2.4e-6 (elbo, small, cosine); |x_0| up to 1
    assert (x - y).abs().max() < TOL

    # and back: the folder reads as the run's network and diffusion
    converted = read_diffusers(out)
    assert converted.unet == NETWORK_PRESETS["tiny"] and converted.diffusion == {
        "variant": "simple", "variance": config.variance or "small", "T": 4, "schedule": config.schedule,
        "beta_start": config.beta_start, "beta_end": config.beta_end, "cosine_s": config.cosine_s}
    assert max_delta(unet, converted.network(), [0, 3]) < TOL


def _refused(res, *absent: Path) -> str:
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    for path in absent:
        assert not path.exists()
    return res.stderr.strip()


def test_a_learned_variance_checkpoint_is_refused_in_one_line_and_nothing_written(tmp_path):
    path, _, _ = checkpoint(tmp_path, "hybrid")
    out = tmp_path / "new" / "export"
    line = _refused(export(path, out, "--format", "diffusers"), out, out.parent)
    assert line == (f"error: cannot export {path} to diffusers: hybrid learns its reverse variance Σ (learned_range); "
                    "the export writes ε-prediction models of fixed variance only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_folder_that_is_not_empty_is_refused_and_left_as_it_was(tmp_path):
    path, _, _ = checkpoint(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _refused(export(path, out, "--format", "diffusers"))
    assert line == f"error: {out} exists and is not an empty folder; the export writes a new folder and overwrites " \
                   "nothing: name another"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.pt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(path, empty, "--format", "diffusers").exit_code == 0 and (empty / "model_index.json").is_file()


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    path, _, _ = checkpoint(tmp_path)
    with pytest.raises(OSError):
        write_diffusers(path, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no folder, no temporary one


def test_only_eps_models_of_fixed_variance_are_exported():
    """Over the variant registry: μ̃ means, a learned Σ and continuous time are refused, each saying why."""
    reasons = {name: fmt.unexportable(RunConfig(variant=name).build_variant()) for name in VARIANTS}
    assert {name for name, why in reasons.items() if why is None} == {"simple", "elbo"}
    assert "posterior mean μ̃" in reasons["mu-mse"] and "continuous-time" in reasons["vdm"]
    assert "continuous-time" in reasons["weighted"] and "log-variance" in reasons["elbo-learned-diag"]
    assert "learns its reverse variance" in reasons["elbo-learned"]


def test_a_network_unet2dmodel_cannot_hold_is_refused():
    assert "rescaled timesteps" in fmt.unexportable_network(NETWORK_PRESETS["iddpm-cifar10"], 32)
    # 2 heads on 16- and 32-channel attention: heads of 8 and of 16 channels
    two_widths = UNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8, num_heads=2)
    assert "different widths" in fmt.unexportable_network(two_widths, 8)
    same_width = UNetConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8,
                            num_heads=2)
    assert fmt.unexportable_network(same_width, 8) is None
    # UNet2DModel's first level has the stem's width (its conv_in gives block_out_channels[0])
    wider = UNetConfig(ch=16, ch_mult=(2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8)
    assert "ch_mult[0] = 2" in fmt.unexportable_network(wider, 8)
    assert fmt.diffusers_unet_config(same_width, 1, 1, 8)["attention_head_dim"] == 16
    assert unet_config(fmt.diffusers_unet_config(same_width, 1, 1, 8))[0] == same_width


def test_the_files_are_what_diffusers_writes():
    """model_index.json and the configs name what from_pretrained builds; JSON only, keys sorted."""
    assert json.loads(json.dumps(fmt.diffusers_unet_config(NETWORK_PRESETS["ddpm-cifar10"], 3, 3, 32))) == {
        **{k: v for k, v in fmt.UNET_DEFAULTS.items() if k not in ("down_block_types", "up_block_types",
                                                                     "block_out_channels")},
        "_class_name": "UNet2DModel", "_diffusers_version": fmt.DIFFUSERS_VERSION, "sample_size": 32,
        "block_out_channels": [128, 256, 256, 256], "down_block_types": ["DownBlock2D", "AttnDownBlock2D",
                                                                         "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
        "attention_head_dim": None, "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
        "norm_eps": 1e-6, "dropout": 0.1}  # google/ddpm-cifar10-32's, but for the dropout it trained with


@pytest.mark.parametrize("setting", [{"norm_num_groups": None}, {"block_out_channels": "wide"},
                                     {"attention_head_dim": 0, "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
                                      "down_block_types": ("AttnDownBlock2D", "DownBlock2D")}])
def test_a_malformed_config_is_one_line(setting):
    with pytest.raises(BenchError, match=r"^diffusers UNet2DModel config.json is malformed \(.+\)$"):
        unet_config({**DDPM_SHAPED, **setting})
    with pytest.raises(BenchError, match=r"^diffusers DDPMScheduler scheduler_config.json is malformed"):
        scheduler_diffusion({"num_train_timesteps": None})
