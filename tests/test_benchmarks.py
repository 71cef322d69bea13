"""benchmarks/scale.py: its smoke mode runs as a real process on the CPU and prints both tables with
numbers that agree with each other; its FLOP count and its table of device peaks."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"
DURATION = re.compile(r"^([\d.]+) (s|min|h|d)$")
SECONDS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def load_scale():
    """The script as a module (registered first: its dataclass looks its module up)."""
    if "benchmarks_scale" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_scale", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_scale"]


def table(text: str, header: str) -> dict[str, list[str]]:
    """The Markdown table whose header row starts with ``| header |``: first cell → the other cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def seconds(cell: str) -> float:
    m = DURATION.match(cell)
    assert m, cell
    return float(m.group(1)) * SECONDS[m.group(2)]


@pytest.fixture(scope="module")
def smoke() -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_smoke_prints_every_row_with_a_rate_and_no_invented_peak(smoke):
    rows = table(smoke, "measurement")
    names = list(rows)
    assert names[:3] == ["training fp32", "training bf16", "training bf16+compile"]
    assert names[3].startswith("exact bound (fp32, all 1000 t)") and names[4].startswith("sampling (fp32, 1000 steps)")
    assert len(names) == 5
    for name, (batch, rate, tflops, util, target, note) in rows.items():
        if name == "training bf16+compile":
            assert rate == "skipped" and note == "--skip-compile"  # --smoke leaves out the minutes of compiling
            continue
        assert int(batch) > 0 and number(rate) > 0 and number(tflops) > 0, (name, rate, tflops)
        assert util == "n/a"  # the CPU has no datasheet peak here: none is made up
        assert target in {"≥ 5,000", "≥ 20"}
    assert "peak: n/a" in smoke
    assert re.search(r"tiny, [\d,]+ parameters, 1×8×8 images, [\d.]+ GFLOP per image forward", smoke)


def test_smoke_projection_is_the_work_divided_by_the_measured_rates(smoke):
    rates = {name: number(cells[1]) for name, cells in table(smoke, "measurement").items() if cells[1] != "skipped"}
    parts = table(smoke, "part")
    assert list(parts) == ["training", "exact bound", "FID samples", "total"]
    best = max((rate, name) for name, rate in rates.items() if name.startswith("training"))
    assert parts["training"][1] == best[1]
    expected = {
        "training": 800_000 * 128 / best[0],
        "exact bound": 10_000 / rates[parts["exact bound"][1]],
        "FID samples": 50_000 / rates[parts["FID samples"][1]],
    }
    for part, want in expected.items():
        assert seconds(parts[part][2]) == pytest.approx(want, rel=0.03), part
    assert seconds(parts["total"][2]) == pytest.approx(sum(expected.values()), rel=0.03)


@pytest.mark.usefixtures("one_torch_thread")
def test_forward_flops_of_ddpm_cifar10_are_the_papers_network():
    """≈ 12.4 GFLOP per 32×32 image forward for the 35.7M-parameter DDPM U-Net (2 FLOPs per MAC)."""
    from bench.nets.unet import build_network

    torch.manual_seed(0)
    net = build_network("ddpm-cifar10", 3, 3, 32)
    flops = load_scale().forward_flops(net, (3, 32, 32), torch.device("cpu"))
    assert flops == pytest.approx(12.44e9, rel=0.002)


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 NVL", None),  # not in the table: n/a rather than a guess
    ("NVIDIA H200 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_device_peak_is_looked_up_by_name_never_guessed(monkeypatch, name, key):
    scale = load_scale()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found, peaks = scale.peak_for(torch.device("cuda"))
    assert found == key
    assert peaks == (scale.PEAK_TFLOPS[key] if key else None)
    assert scale.peak_for(torch.device("cpu")) == (None, None)


# ------------------------------------------------------------------------- benchmarks/published_cost.py
def test_published_cost_quick_measures_both_networks_and_projects_calls_over_throughput():
    """--quick on the CPU: both published networks measured (their parameter counts are the originals'), and every
    projected wall time is its job's network calls (N × T, N × eval_calls, 50k × steps) ÷ the measured images/s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "published_cost.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    measured = table(out, "network")  # the first table: what was measured
    assert {name: tuple(cells[:5]) for name, cells in measured.items()} == {
        "improved-diffusion CIFAR-10": ("52,546,438", "4000", "CPU", "2", "fp32"),
        "DDPM CIFAR-10": ("35,746,307", "1000", "CPU", "2", "fp32")}
    rate = {name: number(cells[-1]) for name, cells in measured.items()}
    assert all(r > 0 for r in rate.values())
    assert "Projected (a projection, not a measurement): wall time = network calls ÷ the measured images/s" in out
    lines = out[out.index("| network | dtype | job |"):].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    calls = RunConfig().eval_calls
    expected = {(name, job): n for name, T in (("improved-diffusion CIFAR-10", 4000), ("DDPM CIFAR-10", 1000))
                for job, n in ((f"exact bound, 10,000 test images × {T} t", 10_000 * T),
                               (f"exact bound, 1,000 test images × {T} t", 1_000 * T),
                               (f"estimate, 10,000 test images × {calls} calls", 10_000 * calls),
                               (f"FID-50k, 50,000 samples × {T} steps", 50_000 * T),
                               ("FID-50k, 50,000 samples × 250 steps", 50_000 * 250),
                               ("FID-50k, 50,000 samples × 100 steps", 50_000 * 100))}
    assert {(name, job): number(n) for name, dtype, job, n, _, _ in rows} == expected
    for name, dtype, _, n, shown_rate, wall in rows:
        assert dtype == "fp32" and number(shown_rate) == pytest.approx(rate[name])
        assert seconds(wall) == pytest.approx(number(n) / rate[name], rel=0.06)  # to the printed rounding
