"""Published models read into the project's network, against fixtures made by running the original code.

tests/fixtures/published/ holds random-weight networks saved by improved-diffusion's ``UNetModel`` and the PyTorch
port's ``Model``, fixed inputs and what the original code computed from them (its README and make_fixtures.py say
how). Nothing of the original code is imported here: the project's network built from the converted state dict
must give the same outputs, and the project's exact bound the same terms as improved-diffusion's ``calc_bpd_loop``
on the same noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.diffusion.bound import _pairs_nats, _prior_bits, bits_per_dim_from_nats
from bench.diffusion.schedule import Schedule
from bench.errors import BenchError
from bench.published.improved_diffusion import parse_flags, read_improved_diffusion
from bench.published.pytorch_diffusion import read_pytorch_diffusion
from bench.runtime.context import LOCAL
from variants import get_variant

FIXTURES = Path(__file__).parent / "fixtures" / "published"
ID = FIXTURES / "improved_diffusion"
PD = FIXTURES / "pytorch_diffusion"


def _case(folder: Path) -> dict:
    return torch.load(folder / "case.pt", weights_only=True)


@pytest.fixture(scope="module")
def iddpm():
    """(the converted network, the fixture case) of the improved-diffusion fixture."""
    converted = read_improved_diffusion(ID / "model.pt", json.loads((ID / "flags.json").read_text()))
    return converted, converted.network(), _case(ID)


def test_improved_diffusion_network_matches_the_original_to_1e_5(iddpm):
    converted, net, case = iddpm
    assert converted.unet.num_heads == 4 and converted.unet.scale_shift_norm and converted.unet.num_res_blocks == 3
    assert converted.unet.time_scale == 1000 / 20  # rescaled timesteps: the original saw t·1000/T (t_model)
    assert torch.equal(case["t"] * converted.unet.time_scale, case["t_model"])
    with torch.no_grad():
        out = net(case["x_t"], case["t"])
    assert out.shape == (4, 6, 8, 8)
    assert (out - case["out"]).abs().max().item() < 1e-5, (out - case["out"]).abs().max()


def test_improved_diffusion_bound_equals_calc_bpd_loop_on_the_same_noise(iddpm):
    """Every term of the exact bound (x̂0 clipped, as calc_bpd_loop's clip_denoised=True, and unclipped), the prior
    and the total, in bits/dim, against the original's on the same images and noise."""
    converted, net, case = iddpm
    d = converted.diffusion
    assert (d["variant"], d["schedule"], d["T"]) == ("hybrid", "cosine", 20)
    sched = Schedule.cosine(T=20, s=d["cosine_s"])
    assert torch.allclose(sched.betas, case["betas"], rtol=0, atol=1e-15)
    variant = get_variant(d["variant"], d["variance"])
    images, noise = case["pixels"], case["noise"]  # noise [T, N, C, H, W]: the original's draw for each t
    N, T, D = images.shape[0], 20, images[0].numel()
    nats = _pairs_nats(net, variant, sched, images, torch.arange(T).repeat(N, 1), lambda i: noise[:, i],
                       LOCAL.resolve(net, batch_size=16), "fixture")
    clipped, unclipped = (bits_per_dim_from_nats(nats[row], D) for row in (0, 1))
    prior = _prior_bits(sched, images)
    # the KL terms L_1..L_{T-1} and the prior: equal
    assert (clipped[:, 1:] - case["vb"][:, 1:].double()).abs().max().item() < 1e-6
    assert torch.allclose(prior, case["prior_bpd"].double(), rtol=1e-4, atol=1e-9)
    # unclipped, the last term is ~790 bits (β_T = 0.999), float32 in the original: relative
    assert torch.allclose(unclipped[:, 1:], case["vb_unclipped"][:, 1:].double(), rtol=1e-6, atol=1e-6)
    # the decoder L_0: the project integrates the exact normal density over each bin; the original's code uses a
    # tanh approximation of the normal CDF (with bin probabilities floored at 1e-12). With that approximation, the
    # project's decoder mean and variance at t = 1 give the original's term exactly...
    x0 = images.float() / 127.5 - 1
    t0 = torch.zeros(N, dtype=torch.long)
    with torch.no_grad():
        x1 = sched.q_sample(x0, t0, noise[0])
        step = variant.p_mean_variance(net(x1, t0).double(), sched, x1.double(), t0, clip_x0=True)
    approx = _tanh_decoder_bits(x0.double(), step.mean, step.log_var)
    assert (approx - case["vb"][:, 0].double()).abs().max().item() < 1e-5
    # ... and the exact integral differs from it by a few thousandths of a bit on this random network
    difference = (clipped[:, 0] - case["vb"][:, 0].double()).abs().max().item()
    assert 1e-3 < difference < 1e-2, difference
    total = prior + clipped.sum(1)
    assert (total - case["total_bpd"].double()).abs().max().item() == pytest.approx(difference, rel=0.01)


def _tanh_decoder_bits(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """−log p(x_0 | x_1) in bits/dim under DDPM's approximate normal CDF: benchmarks/decoder_cdf.py's, which this
    test so checks against the original code's numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("decoder_cdf", FIXTURES.parents[2] / "benchmarks" / "decoder_cdf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nats = module.tanh_log_likelihood(x, mean, log_var).flatten(1).sum(1)
    return -nats / (x[0].numel() * torch.log(torch.tensor(2.0, dtype=torch.float64)))


def test_pytorch_port_network_matches_the_original_to_1e_5():
    converted = read_pytorch_diffusion(PD / "model.pt", json.loads((PD / "flags.json").read_text()))
    case = _case(PD)
    with torch.no_grad():
        out = converted.network()(case["x"], case["t"])
    assert (out - case["out"]).abs().max().item() < 1e-5
    assert (converted.diffusion["variant"], converted.diffusion["variance"]) == ("simple", "large")


def test_a_tensor_of_the_wrong_name_or_shape_is_one_line_naming_it(tmp_path):
    state = torch.load(ID / "model.pt", weights_only=True)
    flags = json.loads((ID / "flags.json").read_text())
    renamed = {("input_blocks.1.0.in_layers.2.weights" if k == "input_blocks.1.0.in_layers.2.weight" else k): v
               for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(BenchError, match=r"input_blocks\.1\.0\.in_layers\.2\.weight \(here down\.0\.block\.0\.conv1"
                                         r"\.weight\) is missing \(and 1 more\)$"):
        read_improved_diffusion(tmp_path / "renamed.pt", flags).network()
    with pytest.raises(BenchError, match=r"out\.2\.weight \(here conv_out\.weight\) has shape \(6, 32, 3, 3\), "
                                         r"the network's is \(3, 32, 3, 3\) \(and 1 more\)$"):
        read_improved_diffusion(ID / "model.pt", {**flags, "learn_sigma": False}).network()
    no_norm = {k: v for k, v in state.items() if k != "middle_block.1.norm.bias"}
    torch.save(no_norm, tmp_path / "no_norm.pt")
    with pytest.raises(BenchError, match=r"middle_block\.1\.norm\.bias \(here mid_attn_1\.norm\.bias\) is missing$"):
        read_improved_diffusion(tmp_path / "no_norm.pt", flags).network()
    with pytest.raises(BenchError, match=r"num_heads=3 must be positive and divide every level's channels"):
        read_improved_diffusion(ID / "model.pt", {**flags, "num_heads": 3})
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    with pytest.raises(BenchError, match="is not a state dict"):
        read_improved_diffusion(tmp_path / "junk.pt", flags)


@pytest.mark.parametrize(("flags", "message"), [
    ("--num_chanels 128", r"improved-diffusion has no flag --num_chanels"),
    ("--learn_sigma maybe", r"--learn_sigma takes True or False, got 'maybe'"),
    ("--num_channels", r"'--name value' pairs"),
    ("--class_cond True", r"--class_cond True: not supported"),
    ("--image_size 48", r"--image_size 48: .* give --channel_mult"),
    ("--timestep_respacing 250", r"--timestep_respacing: give the model's full diffusion"),
    ("--diffusion_steps 0", r"--diffusion_steps and --num_heads must be at least 1"),
])
def test_bad_flags_are_one_line(flags, message):
    from bench.published.improved_diffusion import unet_config

    with pytest.raises(BenchError, match=message):
        unet_config(parse_flags(flags))


def test_the_released_cifar10_flags_build_the_iddpm_preset():
    """improved-diffusion's README flags for its CIFAR-10 models, over its defaults, are the iddpm-cifar10 preset."""
    from bench.nets.unet import NETWORK_PRESETS
    from bench.published.improved_diffusion import diffusion, unet_config

    flags = parse_flags("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                        "--diffusion_steps 4000 --noise_schedule cosine")
    assert unet_config(flags) == NETWORK_PRESETS["iddpm-cifar10"]
    assert diffusion(flags)["variant"] == "hybrid"
    assert diffusion({**flags, "use_kl": True})["variant"] == "elbo-learned"


# ------------------------------------------------------------------ bench eval --from, end to end
def _port_file(path: Path) -> Path:
    """A random-weight digits-shaped network (1×8×8) saved in the PyTorch port's names (its Model's state dict
    layout: temb.dense, mid.*, downsample/upsample, the up path top level first)."""
    import re

    from bench.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0), 1, 1, 8)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.5 / p[0].numel() ** 0.5))
    theirs = {}
    for k, v in net.state_dict().items():
        k = k.replace("temb_dense.", "temb.dense.").replace("mid_block_", "mid.block_")
        k = k.replace("mid_attn_", "mid.attn_")
        k = re.sub(r"^(down)\.(\d+)\.resample\.", r"\1.\2.downsample.", k)
        k = re.sub(r"^up\.(\d+)\.resample\.", r"up.\1.upsample.", k)
        k = re.sub(r"^up\.(\d+)\.", lambda m: f"up.{1 - int(m[1])}.", k)
        theirs[k] = v
    torch.save(theirs, path)
    return path


PORT_FLAGS = "--in_channels 1 --out_ch 1 --resolution 8 --ch 32 --ch_mult 1,2 --num_res_blocks 1 --attn_resolutions 4"


def _eval(args, tmp_path):
    from click.testing import CliRunner

    from bench.cli.main import cli

    env = {"MLFLOW_EXPERIMENT_NAME": None, "MLFLOW_TRACKING_URI": None, "BENCH_HOME": str(tmp_path)}
    return CliRunner().invoke(cli, ["eval", *args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], env=env)


@pytest.fixture
def store(tmp_path, store_template) -> Path:
    """An initialised empty MLflow store at tmp_path/m.db (copied: creating its tables costs seconds)."""
    import shutil

    shutil.copyfile(store_template, tmp_path / "m.db")
    return tmp_path / "m.db"


def test_bench_eval_from_records_an_imported_run_measured_on_the_converted_network(tmp_path, store, one_torch_thread):
    import hashlib

    import mlflow

    from bench.data.datasets import load_dataset
    from bench.diffusion.bound import estimate_bits_per_dim
    from bench.published.pytorch_diffusion import read_pytorch_diffusion
    from bench.training.evaluation import EVAL_SEED, eval_subset

    path = _port_file(tmp_path / "model-1.ckpt")
    res = _eval([str(path), "--from", "pytorch-diffusion", "--flags", PORT_FLAGS, "--dataset", "digits",
                 "--final-eval", "estimate", "--final-eval-images", "2", "--fid-samples", "0"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "as simple[large], T = 1000" in res.output and "(tagged imported)" in res.output
    assert "the paper reports" not in res.output  # not a released file
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("published").experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["imported"], tags["source_format"], tags["ema"], tags["published_as"]) == \
        ("true", "pytorch-diffusion", "unknown", "")
    assert tags["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(tags["source_flags"])["ch_mult"] == "1,2"
    assert run.data.params["config.network"] == "imported" and run.data.params["network.num_res_blocks"] == "1"
    # the number recorded is the project's bound estimate of this very network on those test images
    converted = read_pytorch_diffusion(path, PORT_FLAGS)
    images = eval_subset(load_dataset("digits", "test"), 2)
    direct = estimate_bits_per_dim(converted.network(), get_variant("simple", "large"), Schedule.linear(T=1000),
                                   images, 33, seed=EVAL_SEED)
    assert run.data.metrics["bpd"] == pytest.approx(direct.total.mean().item(), rel=1e-6)


def test_a_released_file_is_recognised_by_its_checksum_and_its_paper_value_printed(tmp_path, monkeypatch, store,
                                                                                  one_torch_thread):
    """The port's released files are known by the MD5 its code publishes: its paper's values are printed beside the
    measured one and tagged, and whether it is an EMA is known. (A stand-in file with a registered checksum.)"""
    import dataclasses

    import mlflow

    import bench.published.evaluate as evaluate
    from bench.runtime.files import file_digest

    path = _port_file(tmp_path / "model-790000.ckpt")
    known = dataclasses.replace(evaluate.KNOWN[2], md5=file_digest(path, "md5"), flags=PORT_FLAGS)
    monkeypatch.setattr(evaluate, "KNOWN", (known,))
    res = _eval([str(path), "--from", "pytorch-diffusion", "--dataset", "digits", "--final-eval", "estimate",
                 "--final-eval-images", "2", "--fid-samples", "0"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "DDPM CIFAR-10 (EMA), its EMA weights" in res.output
    assert "the paper reports bpd ≤ 3.75, FID 3.17 (Ho et al. 2020" in res.output
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("published").experiment_id])
    assert (run.data.tags["paper_bpd"], run.data.tags["paper_fid"], run.data.tags["ema"]) == ("≤ 3.75", "3.17", "yes")


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "pytorch-diffusion", "--dataset", "cifar10"], "takes images 1×8×8; cifar10 has 3×32×32"),
    (["--flags", "--ch 32"], "are for a published model: add --from FORMAT"),
    (["--from", "pytorch-diffusion", "--log-to-run"], "a published model is recorded as a new run"),
])
def test_bench_eval_from_refuses_in_one_line(tmp_path, args, message, cifar10_root, store):
    path = _port_file(tmp_path / "model.ckpt")
    flags = [] if "--flags" in args else ["--flags", PORT_FLAGS]
    res = _eval([str(path), *args, *flags, "--data-dir", str(cifar10_root), "--final-eval-images", "1",
                 "--fid-samples", "0"], tmp_path)
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    import mlflow  # nothing recorded: the refusal comes before the run is created

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_diffusers_fixture_network_matches_the_original_to_1e_5_and_the_folder_is_recognised(monkeypatch):
    """The DDPM-shaped UNet2DModel folder that diffusers' own save_pretrained wrote (fixtures), read without
    diffusers: its outputs, its scheduler's diffusion, and recognition by the weights' SHA-256."""
    import dataclasses
    import hashlib

    import bench.published.evaluate as evaluate
    from bench.published.diffusers_format import read_diffusers
    from bench.runtime.files import file_digest

    folder = FIXTURES / "diffusers"
    converted = read_diffusers(folder)
    case = _case(folder)
    with torch.no_grad():
        out = converted.network()(case["x"], case["t"])
    assert (out - case["out"]).abs().max().item() < 1e-5
    assert converted.diffusion == {**converted.diffusion, "variant": "simple", "variance": "large", "T": 20,
                                   "schedule": "linear"}
    digest = file_digest(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert digest == hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert evaluate.recognise(folder, "diffusers", digest) is None
    google = next(k for k in evaluate.KNOWN if k.source_format == "diffusers")
    monkeypatch.setattr(evaluate, "KNOWN", (dataclasses.replace(google, sha256=(digest,)),))
    found = evaluate.recognise(folder, "diffusers", digest)
    assert found.published_as.startswith("DDPM CIFAR-10 (google/ddpm-cifar10-32")
    imported = evaluate.read_published(folder, "diffusers")
    assert imported.ema == "no" and imported.sha256 == digest  # a folder's recorded SHA-256 is its weights file's
    assert imported.tags()["source_file"] == "diffusers/unet/diffusion_pytorch_model.safetensors"
