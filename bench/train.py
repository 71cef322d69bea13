"""The shared trainer: one loop for every variant, which supplies only its loss and reverse process.

``train(config)`` trains, evaluates (the bound in bits/dim on the test split, samples, FID) and
records everything in MLflow. ``evaluate_checkpoint`` runs the same final evaluation on a saved
model. A non-finite loss ends the run FAILED with the reason and step as tags: a result, not a crash.
"""

from __future__ import annotations

import copy
import math
import signal
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import tracking
from bench.checkpoint import claim_run_dir, load_checkpoint, save_checkpoint
from bench.config import RunConfig, flatten
from bench.data import load_dataset
from bench.errors import BenchError
from bench.evaluate import bits_per_dim, estimate_bits_per_dim
from bench.gaussian import to_data_scale
from bench.plots import per_t_figure, sample_grid
from bench.sample import describe_sampler, sample
from bench.unet import build_network, count_parameters
from variants import get_variant

EVAL_SEED = 1234  # the noise of every bound evaluation, fixed so numbers compare across runs
BPD_CONVENTIONS = "bpd: x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM protocol); bpd_unclipped: not clipped"


class StopRun(Exception):
    """Raised by an ``on_eval`` callback to end a run early (a pruned study trial, say)."""

    def __init__(self, reason: str, status: str = "KILLED"):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class RunResult:
    run_id: str
    status: str  # FINISHED, FAILED (diverged) or KILLED (interrupted)
    step: int
    tracking_uri: str
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def autocast(config: RunConfig, device: torch.device):
    """bf16 autocast for the network on GPU (or when asked); the bound's terms are formed in fp32+."""
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def channels_last(config: RunConfig, device: torch.device) -> bool:
    """Whether the network and its inputs use the NHWC layout: as configured, else on CUDA only."""
    return config.channels_last if config.channels_last is not None else device.type == "cuda"


class _Autocast(torch.nn.Module):
    """Wraps a network so every call (training, evaluation, sampling) runs under the run's autocast."""

    def __init__(self, net, config: RunConfig, device: torch.device):
        super().__init__()
        self.net, self._config, self._device = net, config, device

    def forward(self, x, t):
        with autocast(self._config, self._device):
            return self.net(x, t).float()


class _Interrupt:
    """Ctrl-C (SIGINT) inside the step loop is deferred to the end of the current iteration, so a
    checkpoint never holds half a step; a second Ctrl-C, or one outside the loop, interrupts at once."""

    def __init__(self):
        self.deferring = False
        self.requested = False

    def _handler(self, signum, frame):
        if self.deferring and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class _Interrupted(KeyboardInterrupt):
    """A deferred Ctrl-C, raised between steps: the state is whole and can be checkpointed."""


@dataclass
class _State:
    """Everything the loop changes, as one checkpointable unit."""

    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    data_gen: torch.Generator
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0


def _checkpoint_path(run_id: str) -> Path:
    return tracking.bench_home() / "checkpoints" / run_id / "last.pt"


def _save(state: _State, config: RunConfig, variant, run_id: str, uri: str) -> Path:
    return save_checkpoint(_checkpoint_path(run_id), {
        "config": config.to_dict(), "step": state.step, "model": state.net.state_dict(),
        "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(), "variant": variant.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "data": state.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "run_id": run_id, "tracking_uri": uri, "images_seen": state.images_seen, "train_seconds": state.train_seconds,
    })


def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e, p = list(ema.parameters()), list(net.parameters())
        torch._foreach_lerp_(e, p, 1.0 - decay)
        for eb, b in zip(ema.buffers(), net.buffers()):
            eb.copy_(b)


def _eval_subset(test: torch.Tensor, n: int) -> torch.Tensor:
    return test[: min(n, len(test))] if n else test


def _setup(config: RunConfig):
    """Validate ``config`` and load what a run needs: (device, train and test images, variant, schedule).
    Everything that can refuse bad input happens here, before any MLflow run exists."""
    config.validate()
    device = resolve_device(config.device)
    train_images = load_dataset(config.dataset, "train", config.data_dir, config.download)
    test_images = load_dataset(config.dataset, "test", config.data_dir, config.download)
    return device, train_images, test_images, get_variant(config.variant, config.variance), config.build_schedule()


def resume_config(ckpt: dict, steps: int | None = None, device: str | None = None) -> RunConfig:
    """The config a checkpoint's run continues with: its own, with a new step target or device if given."""
    config = RunConfig(**ckpt["config"])
    return replace(config, steps=config.steps if steps is None else steps, device=device or config.device)


def train(config: RunConfig, resume: str | Path | dict | None = None, progress: bool = True,
          parent_run_id: str | None = None, tags: dict | None = None, on_eval=None, reopen: bool = False) -> RunResult:
    """Train ``config``, or continue the checkpoint ``resume`` (a path or a loaded checkpoint) with its
    own config, to ``config.steps`` (see :func:`resume_config`).

    ``parent_run_id`` nests the MLflow run under another (a study); ``tags`` are added to it.
    ``on_eval(step, metrics)`` is called after each training-time evaluation and may raise
    :class:`StopRun` to end the run early (recorded with the reason as tag ``stop_reason``).
    A FINISHED run is continued only with ``reopen`` and a larger ``config.steps``; a run that another
    live process is training is refused.
    """
    ckpt = (resume if isinstance(resume, dict) else load_checkpoint(resume)) if resume is not None else None
    if ckpt is not None:  # the checkpoint's own config; only the target step count and device may change
        config = replace(RunConfig(**ckpt["config"]), steps=max(config.steps, ckpt["step"]), device=config.device,
                         tracking_uri=ckpt["tracking_uri"])
    device, train_images, test_images, variant, sched = _setup(config)
    C, H = train_images.shape[1], train_images.shape[2]

    torch.manual_seed(config.seed)
    net = build_network(config.network, C, variant.out_channels(C), H).to(device)
    if channels_last(config, device):
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)
    state = _State(net, ema, opt, torch.Generator().manual_seed(config.seed))
    uri = tracking.resolve_tracking_uri(config.tracking_uri)
    client = tracking.client(uri, must_exist=ckpt is not None)  # refuses an unreachable store before anything is written

    with ExitStack() as held:
        if ckpt is not None:
            run_id = ckpt["run_id"]
            held.enter_context(claim_run_dir(_checkpoint_path(run_id).parent, run_id))  # before the status check
            _check_resumable(client, run_id, uri, ckpt["step"], config.steps, reopen)
            _load_state(state, variant, sched, ckpt)
            client.update_run(run_id, status="RUNNING")
        else:
            exp = tracking.experiment_id(client, config.experiment)
            run_tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run_id = client.create_run(exp, run_name=config.default_run_name,
                                       tags={**run_tags, **(tags or {}), **tracking.owner_tags()}).info.run_id
            held.enter_context(claim_run_dir(_checkpoint_path(run_id).parent, run_id))
        log = tracking.RunLogger(client, run_id)
        if ckpt is not None:
            log.tags(tracking.owner_tags())
            log.skip_logged()  # the steps replayed since the checkpoint are in the run's history already
        if tags and ckpt is not None:
            log.tags(tags)
        held.enter_context(tracking.heartbeat(client, run_id))
        return _run(state, net, ema, variant, sched, config, train_images, test_images, device, log, run_id, uri,
                    progress, on_eval, fresh=ckpt is None)


def _check_resumable(client, run_id: str, uri: str, step: int, steps: int, reopen: bool) -> None:
    """Refuse to resume a run that is gone from the store, FINISHED (unless reopened to train further),
    or RUNNING in a live process elsewhere."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise BenchError(f"the checkpoint's MLflow run {run_id} is not in {uri}; cannot resume it") from None
    status, run_tags = run.info.status, run.data.tags
    if status == "RUNNING" and "owner.pid" in run_tags and not tracking.owner_gone(run_tags):
        raise BenchError(f"run {run_id} is being trained by process {run_tags['owner.pid']} on {run_tags.get('owner.host')}; "
                         "wait for it to finish or stop it, then resume")
    if status == "FINISHED" and not reopen:
        raise BenchError(f"run {run_id} is FINISHED at step {step}: resuming would redo and log its final evaluation "
                         f"again; to train it further add --reopen and --steps above {step}; to re-evaluate it use "
                         "`bench eval CHECKPOINT --log-to-run`")
    if status == "FINISHED" and steps <= step:
        raise BenchError(f"run {run_id} is FINISHED at step {step}; --reopen needs --steps above {step}")


def _load_state(state: _State, variant, sched, ckpt: dict) -> None:
    state.net.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["optimizer"])
    variant.load_state_dict(ckpt.get("variant", {}), sched.T)
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.data_gen.set_state(ckpt["rng"]["data"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    state.step, state.images_seen, state.train_seconds = ckpt["step"], ckpt["images_seen"], ckpt["train_seconds"]


def _run(state, net, ema, variant, sched, config, train_images, test_images, device, log, run_id, uri, progress, on_eval,
         fresh: bool) -> RunResult:
    """The training loop and the final evaluation of a run that is claimed and open in MLflow; every
    way out ends the MLflow run with the matching status."""
    interrupt = _Interrupt()
    model = _Autocast(torch.compile(net) if config.compile else net, config, device)
    ema_model = _Autocast(ema, config, device)
    try:
        if fresh:
            _log_start(log, config, variant, sched, net, train_images, device)
        with interrupt.installed():
            failure = _loop(state, model, ema_model, variant, sched, config, train_images, test_images, device, log, run_id,
                            uri, progress, on_eval, interrupt)
        if failure:
            reason, step = failure
            log.tags({"diverged": "true", "failure_reason": reason, "failure_step": step})
            log.end("FAILED")
            return RunResult(run_id, "FAILED", step, uri, None, reason=reason)
        path = _save(state, config, variant, run_id, uri)
        metrics = final_evaluation(ema_model, variant, sched, config, train_images, test_images, device, log, state.step,
                                   progress)
        log.artifact(path, "checkpoints")
        log.end("FINISHED")
        return RunResult(run_id, "FINISHED", state.step, uri, path, metrics)
    except StopRun as stop:
        log.tags({"stop_reason": stop.reason, "stop_step": state.step})
        log.end(stop.status)
        return RunResult(run_id, stop.status, state.step, uri, None, reason=stop.reason)
    except _Interrupted:
        _save(state, config, variant, run_id, uri)
        log.tags({"interrupted_at_step": state.step, "resume_from_step": state.step})
        log.end("KILLED")
        raise
    except KeyboardInterrupt:  # a forced (second) Ctrl-C: the last periodic checkpoint is the one to resume
        log.tags({"interrupted_at_step": state.step, "resume_from": "the last periodic checkpoint"})
        log.end("KILLED")
        raise
    except BaseException as err:
        log.tags({"failure_reason": f"{type(err).__name__}: {err}"[:500]})
        log.end("FAILED")
        raise


def _log_start(log, config, variant, sched, net, train_images, device) -> None:
    log.params({
        **flatten(config), **{f"variant.{k}": v for k, v in variant.describe().items()},
        **{f"schedule.{k}": v for k, v in sched.spec.items()}, "schedule": sched.describe(),
        "network.parameters": count_parameters(net), "optimizer": "AdamW", "device": str(device),
        "code_version": tracking.git_commit(), **tracking.versions(),
        "protocol.bpd": "x0-clipped",  # bpd with x̂_0 clipped to [-1, 1] (DDPM/iDDPM); reports keep conventions apart
    })
    log.tags({"variant": variant.label, "dataset": config.dataset, "schedule": sched.describe()})
    log.dict(config.to_dict(), "config.json")
    log.dataset(train_images, config.dataset, "train")


def _loop(state, model, ema_model, variant, sched, config, train_images, test_images, device, log, run_id, uri, progress,
          on_eval=None, interrupt: _Interrupt | None = None):
    """Optimiser steps up to config.steps. Returns (reason, step) when the loss diverges, else None."""
    data = train_images.to(device)
    sums: dict[str, float] = {}
    window_images, window_seconds, since_log = 0, 0.0, 0
    bar = tqdm(total=config.steps, initial=state.step, desc=f"train {variant.label}", unit="step", disable=not progress)
    interrupt = interrupt or _Interrupt()
    while state.step < config.steps:
        if interrupt.requested:
            bar.close()
            raise _Interrupted
        interrupt.deferring = True
        started = time.perf_counter()
        idx = torch.randint(0, len(data), (config.batch_size,), generator=state.data_gen)
        batch = data[idx.to(device)]
        if config.hflip:
            flip = (torch.rand(config.batch_size, generator=state.data_gen) < 0.5).to(device)
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        x0 = to_data_scale(batch)
        if channels_last(config, device):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        for group in state.opt.param_groups:
            group["lr"] = config.lr * min(1.0, (state.step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        terms = variant.loss(model, sched, x0)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            bar.close()
            return "non-finite loss", state.step
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), config.grad_clip)
            if not torch.isfinite(norm):
                bar.close()
                return "non-finite gradient norm", state.step
        state.opt.step()
        _update_ema(state.ema, state.net, config.ema_decay)
        state.step += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().mean().item()
        seconds = time.perf_counter() - started
        state.images_seen += config.batch_size
        state.train_seconds += seconds
        window_images, window_seconds, since_log = window_images + config.batch_size, window_seconds + seconds, since_log + 1
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == config.steps:
            means = {("loss" if k == "loss" else f"loss/{k}"): v / since_log for k, v in sums.items()}
            ips = window_images / max(window_seconds, 1e-9)
            log.metrics({**means, "images_per_sec": ips, "lr": state.opt.param_groups[0]["lr"]}, state.step)
            bar.set_postfix(loss=f"{means['loss']:.4g}", img_s=f"{ips:.0f}")
            sums, window_images, window_seconds, since_log = {}, 0, 0.0, 0
        if config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
            subset = _eval_subset(test_images, config.eval_images)
            est = estimate_bits_per_dim(ema_model, variant, sched, subset, config.eval_calls, config.eval_batch_size,
                                        EVAL_SEED, device)
            summary = {**est.summary("bpd_estimate"), "bpd_estimate_images": len(subset),
                       "bpd_estimate_calls": est.calls_per_image}
            log.metrics(summary, state.step)
            log.tags({"bpd_estimate_method": f"estimate ({est.calls_per_image} calls/image, {len(subset)} test images, "
                                              f"seed {EVAL_SEED}); bpd_estimate: x̂_0 clipped to [-1, 1] (DDPM/iDDPM), "
                                              "bpd_estimate_unclipped: unclipped"})
            grid = sample(ema_model, variant, sched, config.sample_grid, tuple(train_images.shape[1:]),
                          config.sample_steps or None, config.seed, device=device)
            log.image(sample_grid(grid), "samples", state.step)
            if on_eval is not None:
                on_eval(state.step, summary)
        if state.step % config.checkpoint_every == 0 and state.step < config.steps:
            _save(state, config, variant, run_id, uri)
    interrupt.deferring = False
    bar.close()
    if interrupt.requested:
        raise _Interrupted
    log.metrics({"train_seconds": state.train_seconds, "images_per_sec_overall":
                 state.images_seen / max(state.train_seconds, 1e-9)}, state.step)
    return None


def final_evaluation(model, variant, sched, config: RunConfig, train_images, test_images, device, log, step: int,
                     progress: bool = True) -> dict[str, float]:
    """The bound on the test split, the per-t curve, samples and FID; logged at ``step``."""
    subset = _eval_subset(test_images, config.final_eval_images)
    if config.final_eval == "exact":
        res = bits_per_dim(model, variant, sched, subset, config.eval_batch_size, EVAL_SEED, device, progress)
        method = f"exact (all {sched.T} t, {len(subset)} test images)"
    else:
        res = estimate_bits_per_dim(model, variant, sched, subset, config.eval_calls, config.eval_batch_size, EVAL_SEED,
                                    device, progress)
        method = f"estimate ({res.calls_per_image} calls/image, {len(subset)} test images)"
    metrics = res.summary()
    log.tags({"bpd_method": f"{method}; {BPD_CONVENTIONS}", "bpd_split": "test", "bpd_images": len(subset)})
    if res.per_t.numel():
        log.figure(per_t_figure({variant.label: res.per_t}, sched.describe()), "per_t_bound.png")
        log.dict({"t": list(range(1, sched.T + 1)), "L_t_bits_per_dim": res.per_t.tolist(),
                  "L_t_bits_per_dim_unclipped": res.other.per_t.tolist()}, "per_t_bound.json")
    shape = tuple(train_images.shape[1:])
    steps = config.sample_steps or None
    n = max(config.fid_samples, config.sample_grid)
    images = sample(model, variant, sched, n, shape, steps, config.seed, device=device, progress=progress)
    log.image(sample_grid(images[: config.sample_grid]), "samples", step)
    sampler = describe_sampler(sched, steps)
    if config.fid_samples:
        from bench.fid import FidUnavailable, compute_fid, save_samples

        with tempfile.TemporaryDirectory() as tmp:  # the samples FID scores, to re-score with `bench fid`
            log.artifact(save_samples(images[: config.fid_samples], Path(tmp) / "fid_samples.npz"), "samples")
        try:
            fid = compute_fid(images[: config.fid_samples], config.dataset, train_images,
                              cache_dir=tracking.bench_home() / "cache", device=device, fid_weights=config.fid_weights,
                              test_images=test_images)
            metrics.update(fid.metrics)
            log.tags({**fid.tags, "fid_sampler": sampler})
        except FidUnavailable as err:
            warnings.warn(f"FID skipped: {err}", stacklevel=2)
            log.tags({"fid_skipped": str(err)[:500], "fid_sampler": sampler})
    log.metrics(metrics, step)
    return metrics


def evaluate_checkpoint(path: str | Path, final_eval: str | None = None, fid_samples: int | None = None,
                        sample_steps: int | None = None, log_to_run: bool = False, device: str = "auto",
                        progress: bool = True) -> tuple[dict[str, float], str | None]:
    """The final evaluation of a saved model's EMA weights; logged into its run when asked."""
    ckpt = load_checkpoint(path)
    if log_to_run:
        _run_client(ckpt)  # the run must still be there before minutes of evaluation
    overrides = {k: v for k, v in {"final_eval": final_eval, "fid_samples": fid_samples, "sample_steps": sample_steps,
                                   "device": device}.items() if v is not None}
    config = replace(RunConfig(**ckpt["config"]), **overrides)
    dev, train_images, test_images, variant, sched = _setup(config)
    C, H = train_images.shape[1], train_images.shape[2]
    ema = build_network(config.network, C, variant.out_channels(C), H)
    ema.load_state_dict(ckpt["ema"])
    model = _Autocast(ema.to(dev).eval(), config, dev)
    if log_to_run:
        log = tracking.RunLogger(_run_client(ckpt), ckpt["run_id"])
    else:
        log = _NoLog()
    return final_evaluation(model, variant, sched, config, train_images, test_images, dev, log, ckpt["step"], progress), (
        ckpt["run_id"] if log_to_run else None)


def _run_client(ckpt: dict):
    """A client on the checkpoint's store, checked to still hold the checkpoint's run."""
    client = tracking.client(ckpt["tracking_uri"], must_exist=True)
    try:
        client.get_run(ckpt["run_id"])
    except Exception:
        raise BenchError(f"the checkpoint's MLflow run {ckpt['run_id']} is not in {ckpt['tracking_uri']}; "
                         "evaluate without --log-to-run") from None
    return client


class _NoLog:
    """Stands in for RunLogger when an evaluation is only printed."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def summarize(metrics: dict[str, float]) -> str:
    parts = [f"{k} {v:.4f}" if abs(v) >= 1e-3 else f"{k} {v:.2e}" for k, v in metrics.items() if not math.isnan(v)]
    return ", ".join(parts)
