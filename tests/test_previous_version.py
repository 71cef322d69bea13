"""Files written by the flat-layout version (before the layered package, tests/fixtures/v1-flat-layout) still load.

A checkpoint holds tensors and plain values only (read with ``weights_only=True``) and an MLflow model is a
``torch.export`` program: neither pickles a class by its module path, so moving the modules needs no shim. This
test holds the claim to account: the old checkpoint's config, its EMA network's output and its exact bound, and the
old MLflow model's output, all equal what that version computed — to float32 rounding: a convolution's sums are
ordered by the number of threads, so outputs computed on 1 and on 2 threads may differ in the last bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pytorch
import pytest
import torch

from bench.data.datasets import load_dataset
from bench.diffusion.bound import bits_per_dim
from bench.nets.ema import ema_weights
from bench.nets.unet import build_network
from bench.training.checkpoint import load_checkpoint
from bench.training.run import resume_config
from variants import get_variant

OLD = Path(__file__).parent / "fixtures" / "v1-flat-layout"
FLOAT32_ROUNDING = {"rtol": 1e-5, "atol": 1e-7}  # the network's outputs are about 1e-2
BOUND_ROUNDING = 1e-6  # bits/dim: the float32 outputs' rounding, carried through the float64 bound


def _old_network():
    ckpt = load_checkpoint(OLD / "checkpoint.pt")
    config = resume_config(ckpt, device="cpu")
    net = build_network(config.network, 1, get_variant(config.variant).out_channels(1), 8)
    net.load_state_dict(ema_weights(ckpt["ema"]))
    return ckpt, config, net.eval()


def test_a_checkpoint_written_before_the_layers_loads_with_its_config_and_network_output():
    ckpt, config, net = _old_network()
    assert ((config.variant, config.dataset, config.network, config.T, ckpt["step"])
            == ("hybrid", "digits", "tiny", 40, 6))
    expected = torch.load(OLD / "expected_output.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(net(expected["x"], expected["t"]), expected["ema_output"], **FLOAT32_ROUNDING)


def test_the_old_checkpoints_exact_bound_is_what_that_version_computed():
    _, config, net = _old_network()
    expected = json.loads((OLD / "expected_bound.json").read_text())
    images = load_dataset("digits", "test")[:8]
    result = bits_per_dim(net, get_variant(config.variant), config.build_schedule(), images, seed=1234)
    assert result.total.tolist() == pytest.approx(expected["bpd_per_image"], abs=BOUND_ROUNDING, rel=0)
    assert result.other.total.tolist() == pytest.approx(expected["bpd_unclipped_per_image"], abs=BOUND_ROUNDING, rel=0)


def test_an_mlflow_model_written_before_the_layers_loads_and_gives_the_same_output(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a pt2 model needs no unpickling
    model = mlflow.pytorch.load_model(str(OLD / "mlflow-model"), dst_path=str(tmp_path))
    expected = torch.load(OLD / "expected_output.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["x"], expected["t"]), expected["ema_output"], **FLOAT32_ROUNDING)
