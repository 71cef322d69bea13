"""The exact bound and its estimator, against an analytic oracle and invariances."""

import math

import numpy as np
import pytest
import torch
from nets import nonzero_network, output_scale
from oracle import GaussianOracle, gaussian_grid_data

from bench import BenchError, Runtime, Schedule, bits_per_dim, estimate_bits_per_dim
from bench.diffusion.bound import strata_edges
from bench.diffusion.streams import Stream, keyed_generator
from bench.runtime.context import default_precision
from variants import get_variant

S = 0.3  # pixel std of the oracle's data: clipping at ±1 is then negligible


@pytest.fixture(scope="module")
def oracle_bounds():
    """The bound of the optimal model on 128 grid images for each variance choice (T = 1000)."""
    sched = Schedule.linear(T=1000)
    images, nll = gaussian_grid_data(128, S)
    results = {}
    for name, variance in [("elbo", "small"), ("elbo", "large"), ("elbo-learned", None), ("elbo-learned-diag", None)]:
        variant = get_variant(name, variance)
        model = GaussianOracle(sched, S, variant.var_type)
        results[variant.label] = bits_per_dim(model, variant, sched, images, runtime=Runtime(batch_size=8192))
    return results, nll


def test_oracle_bound_sits_just_above_the_exact_nll(oracle_bounds):
    results, nll = oracle_bounds
    best = results["elbo-learned"]
    gap = best.total - nll
    stderr = gap.std().item() / math.sqrt(len(gap))
    # Printed for the closing note: the bound vs the exact NLL for each variance choice.
    print({label: round(r.total.mean().item() - nll.mean().item(), 4) for label, r in results.items()},
          nll.mean().item())
    assert gap.mean().item() > -3 * stderr  # a bound: never below the NLL beyond noise
    assert gap.mean().item() < 0.08  # and tight with the true reverse variance
    assert nll.mean().item() == pytest.approx(7.30, abs=0.05)  # entropy of N(0, (0.3·127.5)²) on the grid


def test_variance_choices_order_as_theory_says(oracle_bounds):
    results, _ = oracle_bounds
    small, large, learned = (results[k].total.mean().item() for k in ("elbo[small]", "elbo[large]", "elbo-learned"))
    assert small > large + 0.3 > learned + 0.3  # β̃ worst, β between, the true (learned-range) variance best
    # The learned diagonal parameterisation reaches the same optimum through log σ² directly.
    assert torch.allclose(results["elbo-learned-diag"].total, results["elbo-learned"].total, atol=1e-6)


def test_terms_add_up_and_per_t_curve_is_the_mean(oracle_bounds):
    results, _ = oracle_bounds
    r = results["elbo-learned"]
    assert torch.allclose(r.total, r.prior + r.vb + r.decoder)
    assert r.per_t.shape == (1000,)
    assert r.per_t[0].item() == pytest.approx(r.decoder.mean().item(), rel=1e-12)
    assert r.per_t[1:].sum().item() == pytest.approx(r.vb.mean().item(), rel=1e-9)
    assert (r.per_t[1:] >= -1e-9).all()  # KLs are non-negative
    assert r.summary()["bpd"] == pytest.approx(r.total.mean().item())


def small_setup(name="hybrid", T=40, n=12):
    sched = Schedule.linear(T=T, scale_to_T=True)
    variant = get_variant(name)
    images, _ = gaussian_grid_data(n, S, shape=(1, 4, 4), seed=3)
    return sched, variant, images, GaussianOracle(sched, S, variant.var_type)


def test_bound_does_not_depend_on_batch_size():
    sched, variant, images, model = small_setup()
    results = [bits_per_dim(model, variant, sched, images, seed=5, runtime=Runtime(batch_size=b))
               for b in (7, 40, 1000)]
    for r in results[1:]:
        assert torch.equal(r.total, results[0].total)
        assert torch.equal(r.per_t, results[0].per_t)
    other_seed = bits_per_dim(model, variant, sched, images, seed=6, runtime=Runtime(batch_size=40))
    assert not torch.equal(other_seed.total, results[0].total)


def test_an_images_bound_does_not_depend_on_the_images_after_it():
    sched, variant, images, model = small_setup()
    full = bits_per_dim(model, variant, sched, images, runtime=Runtime(batch_size=64))
    head = bits_per_dim(model, variant, sched, images[:5], runtime=Runtime(batch_size=64))
    assert torch.equal(full.total[:5], head.total)


def test_bound_through_a_real_network_is_batch_invariant():
    sched = Schedule.linear(T=40, scale_to_T=True)
    variant = get_variant("hybrid")
    net = nonzero_network("tiny", 1, variant.out_channels(1), 8)  # a fresh one outputs zeros for every input
    assert output_scale(net, 1, 8, sched.T) > 0.01
    images, _ = gaussian_grid_data(6, S, shape=(1, 8, 8))
    a = bits_per_dim(net, variant, sched, images, runtime=Runtime(batch_size=13))
    b = bits_per_dim(net, variant, sched, images, runtime=Runtime(batch_size=120))
    assert torch.allclose(a.total, b.total, rtol=1e-5)
    assert torch.isfinite(a.total).all()


def test_estimator_agrees_with_the_exact_value_within_its_error():
    sched = Schedule.linear(T=1000)
    variant = get_variant("elbo-learned")
    images, _ = gaussian_grid_data(64, S, seed=1)
    model = GaussianOracle(sched, S, variant.var_type)
    exact = bits_per_dim(model, variant, sched, images, runtime=Runtime(batch_size=8192)).total.mean().item()
    z = []
    for seed in range(8):
        est = estimate_bits_per_dim(model, variant, sched, images, calls_per_image=17, seed=seed,
                                    runtime=Runtime(batch_size=4096))
        assert est.calls_per_image == 17 and est.stderr > 0
        z.append((est.total.mean().item() - exact) / est.stderr)
    assert max(abs(v) for v in z) < 4
    # The reported error is honest: z-scores neither all tiny (error overstated) nor large (understated).
    rms = math.sqrt(sum(v * v for v in z) / len(z))
    assert 0.3 < rms < 2.0, z


def test_estimator_decoder_and_prior_are_exact():
    sched, variant, images, model = small_setup(T=40)
    exact = bits_per_dim(model, variant, sched, images, seed=0, runtime=Runtime(batch_size=64))
    est = estimate_bits_per_dim(model, variant, sched, images, calls_per_image=9, seed=0)
    assert torch.equal(est.prior, exact.prior)
    # The decoder term uses its own noise draw, so it agrees in law, not sample by sample.
    assert est.decoder.mean().item() == pytest.approx(exact.decoder.mean().item(), rel=0.2)


def test_the_streams_keep_their_numbers():
    """A stream's key is part of every result drawn from it: (seed, index) for the exact bound's noise, and
    (seed, index, n) for the others, n as before the streams had names."""
    old_keys = {Stream.BOUND_NOISE: (), Stream.ESTIMATE: (1,), Stream.SAMPLES: (2,), Stream.DEQUANTISATION: (3,),
                Stream.PROBES: (4,), Stream.CONTINUOUS: (5,)}
    assert set(old_keys) == set(Stream)
    for stream, number in old_keys.items():
        for seed, index in ((0, 0), (1234, 7), (5, 2**20)):
            got = torch.randn(8, generator=stream.generator(seed, index))
            assert torch.equal(got, torch.randn(8, generator=keyed_generator(seed, index, *number))), stream
    draws = [torch.randn(8, generator=stream.generator(3, 1)) for stream in Stream]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])  # independent streams


def test_a_runtime_resolves_to_the_models_device_and_the_evaluators_own_batch_size():
    model = torch.nn.Linear(1, 1).double()
    rt = Runtime().resolve(model, batch_size=512)
    assert rt.device == torch.device("cpu") and rt.precision == torch.float64 and rt.batch_size == 512
    assert Runtime(batch_size=7).resolve(model, batch_size=512).batch_size == 7  # the caller's wins
    assert Runtime("cpu", precision=torch.float32).resolve().precision == torch.float32
    assert default_precision(torch.device("mps")) == torch.float32  # MPS has no float64
    assert Runtime(progress=True, desc="trial 3").label("exact bits/dim") == "trial 3: exact bits/dim"
    assert Runtime().label("exact bits/dim") == "exact bits/dim" and not Runtime().shows_progress


def test_strata_cover_every_timestep_once():
    for T, S_ in [(1000, 16), (40, 39), (10, 1), (100, 7)]:
        edges = strata_edges(T, S_)
        assert edges[0].item() == 1 and edges[-1].item() == T and len(edges) == S_ + 1
        assert ((edges[1:] - edges[:-1]) >= 1).all()
    with pytest.raises(BenchError, match="strata"):
        strata_edges(10, 10)


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.zeros(2, 1, 8, 8), "uint8"),
        (torch.zeros(1, 8, 8, dtype=torch.uint8), r"\[N, C, H, W\]"),
        (torch.zeros(0, 1, 8, 8, dtype=torch.uint8), r"N >= 1"),
        ([[0]], "uint8"),
    ],
)
def test_bad_images_are_refused(images, match):
    sched, variant, _, model = small_setup()
    with pytest.raises(BenchError, match=match):
        bits_per_dim(model, variant, sched, images)
    with pytest.raises(BenchError, match=match):
        estimate_bits_per_dim(model, variant, sched, images)


def test_estimator_needs_three_calls():
    sched, variant, images, model = small_setup()
    with pytest.raises(BenchError, match="calls_per_image"):
        estimate_bits_per_dim(model, variant, sched, images, calls_per_image=2)


# ----------------------------------------------------------------------------- both conventions
def _reference_bound_bits(model, variant, sched, images, seed: int, clip_x0: bool):
    """Per-image bound in bits/dim written out from the papers with numpy/scipy, independent of
    bench's Gaussian helpers; the same noise as ``bits_per_dim`` (drawn per (seed, image))."""
    from scipy.stats import norm

    T = sched.T
    b = sched.betas.numpy()
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1 - ab_prev) / (1 - ab)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))  # β̃_1 = 0: clipped to β̃_2
    coef1, coef2 = b * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - b) / (1 - ab)
    totals = []
    for i, img in enumerate(images):
        x0 = img.double().numpy() / 127.5 - 1
        D = x0.size
        noise = torch.randn(T, *img.shape, generator=Stream.BOUND_NOISE.generator(seed, i))
        t = torch.arange(T)
        x_t32 = sched.q_sample(torch.as_tensor(x0, dtype=torch.float32).expand(T, *img.shape), t, noise)
        out = model(x_t32, t).double().numpy()
        x_t = x_t32.double().numpy()
        C = img.shape[0]
        shape = (T,) + (1,) * x0.ndim
        eps, v = out[:, :C], out[:, C:]
        x0_hat = (x_t - np.sqrt(1 - ab).reshape(shape) * eps) / np.sqrt(ab).reshape(shape)
        if clip_x0:
            x0_hat = np.clip(x0_hat, -1, 1)
        mean = coef1.reshape(shape) * x0_hat + coef2.reshape(shape) * x_t
        if variant.var_type == "fixed_small":
            log_var = np.broadcast_to(post_log_var.reshape(shape), mean.shape)
        elif variant.var_type == "fixed_large":
            log_var = np.broadcast_to(np.log(np.append(post_var[1], b[1:])).reshape(shape), mean.shape)
        else:  # learned_range
            frac = (v + 1) / 2
            log_var = frac * np.log(b).reshape(shape) + (1 - frac) * post_log_var.reshape(shape)
        true_mean = coef1.reshape(shape) * x0 + coef2.reshape(shape) * x_t
        true_log_var = post_log_var.reshape(shape)
        kl = 0.5 * (-1 + log_var - true_log_var + np.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 / np.exp(log_var))
        sd = np.exp(0.5 * log_var[0])
        hi = np.where(x0 > 0.999, np.inf, (x0 + 1 / 255 - mean[0]) / sd)
        lo = np.where(x0 < -0.999, -np.inf, (x0 - 1 / 255 - mean[0]) / sd)
        decoder = -np.log(norm.cdf(hi) - norm.cdf(lo)).sum()
        prior = 0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2).sum()
        nats = prior + decoder + kl[1:].reshape(T - 1, -1).sum()
        totals.append(nats / (D * math.log(2)))
    return np.array(totals)


@pytest.mark.parametrize("name,variance", [("elbo", "small"), ("elbo", "large"), ("elbo-learned", None)])
def test_both_conventions_match_a_reference_computation_on_the_same_noise(name, variance):
    sched = Schedule.linear(T=40, beta_start=1e-3, beta_end=0.2)
    images, _ = gaussian_grid_data(6, 0.9)  # wide data: x̂_0 often leaves [-1, 1], so clipping matters
    variant = get_variant(name, variance)
    model = GaussianOracle(sched, 0.9, variant.var_type)
    # the default convention: the papers' protocol
    clipped = bits_per_dim(model, variant, sched, images, seed=3, runtime=Runtime(batch_size=50))
    unclipped = bits_per_dim(model, variant, sched, images, seed=3, clip_x0=False, runtime=Runtime(batch_size=17))
    assert clipped.clip_x0 and not clipped.other.clip_x0 and not unclipped.clip_x0
    ref_clipped = _reference_bound_bits(model, variant, sched, images, 3, clip_x0=True)
    ref_unclipped = _reference_bound_bits(model, variant, sched, images, 3, clip_x0=False)
    assert np.abs(ref_clipped - ref_unclipped).max() > 1e-3  # the test can tell the conventions apart
    np.testing.assert_allclose(clipped.total.numpy(), ref_clipped, rtol=0, atol=2e-5)
    np.testing.assert_allclose(clipped.other.total.numpy(), ref_unclipped, rtol=0, atol=2e-5)
    # either way round, one pass gives both, identical to the other call's (batching does not matter)
    assert torch.allclose(unclipped.total, clipped.other.total, rtol=0, atol=1e-10)
    assert torch.allclose(unclipped.other.total, clipped.total, rtol=0, atol=1e-10)
    s = clipped.summary()
    assert s["bpd"] == pytest.approx(ref_clipped.mean(), abs=2e-5)
    assert s["bpd_unclipped"] == pytest.approx(ref_unclipped.mean(), abs=2e-5)
    assert s["bpd/prior"] == s["bpd_unclipped/prior"]


def test_the_estimate_gives_both_conventions_from_the_same_calls():
    sched = Schedule.linear(T=40, beta_start=1e-3, beta_end=0.2)
    images, _ = gaussian_grid_data(6, 0.9)
    variant = get_variant("elbo", "small")
    model = GaussianOracle(sched, 0.9, variant.var_type)
    est = estimate_bits_per_dim(model, variant, sched, images, calls_per_image=9, seed=1)
    est_u = estimate_bits_per_dim(model, variant, sched, images, calls_per_image=9, seed=1, clip_x0=False)
    assert torch.equal(est.other.total, est_u.total) and torch.equal(est.total, est_u.other.total)
    s = est.summary("bpd_estimate")
    assert set(s) == {f"bpd_estimate{c}{k}" for c in ("", "_unclipped")
                      for k in ("", "/prior", "/vb", "/decoder", "_stderr")}
    assert s["bpd_estimate"] != s["bpd_estimate_unclipped"]


# ----------------------------------------------------------------------------- numbers pinned
# Both evaluators on a small fixed case (T = 24, 5 images, batches that cut across images), every field of their
# results under both conventions, pinned bit for bit: the exact bound and the estimate share one (image, t)-pairs
# evaluator, and how it is organised must not move a single bit. The oracle is elementwise (no reductions whose
# order could depend on the machine's threads), and data at std 0.6 make clipping x̂_0 matter.
PINNED = {  # float.hex() of every number, written by the code before the shared pairs evaluator
    "exact": {
        "clipped": {
            "total": (
                "0x1.0f515760abed6p+3 0x1.f6c6ae14f67a7p+2 0x1.db7a2604bda53p+2 0x1.031e6a7dbefc7p+3 "
                "0x1.023f41d821064p+3"
            ),
            "prior": (
                "0x1.a43afc3f0445fp-26 0x1.9fc27424a4b72p-26 0x1.cde4c00e28c0ap-26 0x1.00137fcc93233p-25 "
                "0x1.0bd5a6dc2a668p-25"
            ),
            "vb": (
                "0x1.80d8d617a34adp+1 0x1.64283136124eep+1 0x1.7f84d0c9ee512p+1 0x1.8aeccf2e40e23p+1 "
                "0x1.af05dcf3f7c67p+1"
            ),
            "decoder": (
                "0x1.5e36439b42859p+2 0x1.44b2955ff12bcp+2 0x1.1bb7bd82e830ap+2 0x1.40c66d445b17dp+2 "
                "0x1.2cfb9514cb746p+2"
            ),
            "per_t": (
                "0x1.3c13b82b0d493p+2 0x1.a7a0b609e273dp+0 0x1.068cda8e34d56p-1 0x1.86f72d8a1a0ebp-2 "
                "0x1.495e65bf37ae8p-3 0x1.11c0044db0762p-3 0x1.1bd643ba8aa7ep-4 0x1.930a11936f067p-5 "
                "0x1.06293b7cd9abfp-5 0x1.4a1ba160c2889p-6 0x1.beb432be85e65p-7 0x1.080a8da46f95bp-7 "
                "0x1.555fc3865d7fep-8 0x1.87465c2893610p-9 0x1.a8cd4db834dcdp-10 0x1.c4198a23dd345p-11 "
                "0x1.b47dedc97f2b3p-12 0x1.826ba8ad6807ap-13 0x1.386a9d1a2e84ap-14 0x1.c9d7b9e044336p-16 "
                "0x1.2b7b21031fd06p-17 0x1.59c567a5a873dp-19 0x1.59e2a2b1870fap-21 0x1.2536c057560b2p-23"
            ),
            "method": "exact",
            "clip_x0": True,
        },
        "unclipped": {
            "total": (
                "0x1.1142e4fa1757ep+3 0x1.f6cafaf286846p+2 0x1.db85bcd184073p+2 0x1.033ad5380ae32p+3 "
                "0x1.082386356d750p+3"
            ),
            "prior": (
                "0x1.a43afc3f0445fp-26 0x1.9fc27424a4b72p-26 0x1.cde4c00e28c0ap-26 0x1.00137fcc93233p-25 "
                "0x1.0bd5a6dc2a668p-25"
            ),
            "vb": (
                "0x1.889f0c7d50f4dp+1 0x1.6430caf13262cp+1 0x1.7f9bfe637b152p+1 0x1.8b5e7a17707d1p+1 "
                "0x1.af05dcf3f7c67p+1"
            ),
            "decoder": (
                "0x1.5e36439b42859p+2 0x1.44b2955ff12bcp+2 0x1.1bb7bd82e830ap+2 0x1.40c66d445b17dp+2 "
                "0x1.38c41dcf64520p+2"
            ),
            "per_t": (
                "0x1.3e6f06b6c5759p+2 0x1.a7a9fb7a8128ap+0 0x1.0ccbe7753fd3ap-1 0x1.870ed73dc9222p-2 "
                "0x1.4a9acedba510ep-3 0x1.11c0044db0762p-3 0x1.1bd643ba8aa7ep-4 0x1.930a11936f067p-5 "
                "0x1.06293b7cd9abfp-5 0x1.4a1ba160c2889p-6 0x1.beb432be85e65p-7 0x1.080a8da46f95bp-7 "
                "0x1.555fc3865d7fep-8 0x1.87465c2893610p-9 0x1.a8cd4db834dcdp-10 0x1.c4198a23dd345p-11 "
                "0x1.b47dedc97f2b3p-12 0x1.826ba8ad6807ap-13 0x1.386a9d1a2e84ap-14 0x1.c9d7b9e044336p-16 "
                "0x1.2b7b21031fd06p-17 0x1.59c567a5a873dp-19 0x1.59e2a2b1870fap-21 0x1.2536c057560b2p-23"
            ),
            "method": "exact",
            "clip_x0": False,
        },
    },
    "estimate": {
        "clipped": {
            "total": (
                "0x1.bf5dfd8aa9e4cp+2 0x1.cd957860e9fefp+2 0x1.12a563c3c66fap+3 0x1.237f97ec1a0b1p+3 "
                "0x1.2bf606dba4d26p+3"
            ),
            "prior": (
                "0x1.a43afc3f0445fp-26 0x1.9fc27424a4b72p-26 0x1.cde4c00e28c0ap-26 0x1.00137fcc93233p-25 "
                "0x1.0bd5a6dc2a668p-25"
            ),
            "vb": (
                "0x1.b2352ddd2d4ecp+0 0x1.3bb436cc27436p+1 0x1.e962e369bf0b3p+1 0x1.0924d443d147ap+2 "
                "0x1.0b91a171bc038p+2"
            ),
            "decoder": (
                "0x1.52d0b1f91ae15p+2 0x1.2fbb5ce0da360p+2 0x1.309955b5cf0dbp+2 0x1.3dda5b74605e8p+2 "
                "0x1.4c5a6c2412ec6p+2"
            ),
            "per_t": [],  # the estimate has no per-t curve
            "strata": [1, 4, 11, 24],
            "per_stratum": "0x1.bb1873d221d4dp-1 0x1.8066cb4a8f846p-4 0x1.5f226ec7ce236p-11",
            "method": "estimate",
            "clip_x0": True,
            "stderr": "0x1.8643d77cddbe9p-1",
            "stderr_images": "0x1.f468e96eea5c5p-2",
            "calls_per_image": 7,
        },
        "unclipped": {
            "total": (
                "0x1.c077ff411c05ep+2 0x1.dd083bec69af8p+2 0x1.1244053436104p+3 0x1.2622406fbc959p+3 "
                "0x1.2af7b3230b430p+3"
            ),
            "prior": (
                "0x1.a43afc3f0445fp-26 0x1.9fc27424a4b72p-26 0x1.cde4c00e28c0ap-26 0x1.00137fcc93233p-25 "
                "0x1.0bd5a6dc2a668p-25"
            ),
            "vb": (
                "0x1.b69d34b6f5d31p+0 0x1.5a99bde326a48p+1 0x1.e962e369bf0b3p+1 0x1.0e6a254b165cap+2 "
                "0x1.0ba108686c9dbp+2"
            ),
            "decoder": (
                "0x1.52d0b1f91ae15p+2 0x1.2fbb5ce0da360p+2 0x1.2fd69896ae4eep+2 0x1.3dda5b74605e8p+2 "
                "0x1.4a4e5dbc2f336p+2"
            ),
            "per_t": [],  # the estimate has no per-t curve
            "strata": [1, 4, 11, 24],
            "per_stratum": "0x1.c6c3e9d214c42p-1 0x1.8066cb4a8f846p-4 0x1.5f226ec7ce236p-11",
            "method": "estimate",
            "clip_x0": False,
            "stderr": "0x1.8a1db4770b892p-1",
            "stderr_images": "0x1.dd2252d96e137p-2",
            "calls_per_image": 7,
        },
    },
}


def _pinned_case():
    sched = Schedule.linear(T=24, scale_to_T=True)
    variant = get_variant("hybrid")
    images, _ = gaussian_grid_data(5, 0.6, shape=(1, 4, 4), seed=3)
    return GaussianOracle(sched, 0.6, variant.var_type), variant, sched, images


def _assert_pinned(result, pinned: dict) -> None:
    for name, value in pinned.items():
        got = getattr(result, name)
        if isinstance(value, str) and isinstance(got, torch.Tensor):
            want = torch.tensor([float.fromhex(v) for v in value.split()], dtype=torch.float64)
            assert got.dtype == torch.float64 and torch.equal(got, want), name
        elif isinstance(value, list):
            assert torch.equal(got, torch.tensor(value)), name
        elif isinstance(value, str) and name in ("stderr", "stderr_images"):
            assert got.hex() == value, name
        else:
            assert got == value, name


@pytest.mark.parametrize("clip_x0", [True, False])
def test_the_bound_and_the_estimate_give_the_pinned_numbers_bit_for_bit(clip_x0):
    model, variant, sched, images = _pinned_case()
    main, other = ("clipped", "unclipped") if clip_x0 else ("unclipped", "clipped")
    exact = bits_per_dim(model, variant, sched, images, seed=5, clip_x0=clip_x0, runtime=Runtime(batch_size=7))
    _assert_pinned(exact, PINNED["exact"][main])
    _assert_pinned(exact.other, PINNED["exact"][other])
    est = estimate_bits_per_dim(model, variant, sched, images, calls_per_image=7, seed=5, clip_x0=clip_x0,
                                runtime=Runtime(batch_size=5))
    _assert_pinned(est, PINNED["estimate"][main])
    _assert_pinned(est.other, PINNED["estimate"][other])
