"""The shared trainer: one loop for every variant, which supplies only its loss and reverse process.

``train(config)`` trains, evaluates (the bound in bits/dim on the test split, samples, FID) and
records everything in MLflow. ``evaluate_checkpoint`` runs the same final evaluation on a saved
model. A non-finite loss ends the run FAILED with the reason and step as tags: a result, not a crash.

Under ``torchrun`` (see :mod:`bench.runtime.dist`) every rank runs this same code: the global batch of
``batch_size`` images is drawn identically on every rank (data indices, timesteps, noise: the same
streams as one process) and each rank trains on its contiguous share, with DDP averaging the
gradients, so EMA and optimiser stay identical across ranks; the importance sampler sees every rank's
losses in global batch order. Rank 0 alone writes MLflow and checkpoints; evaluation and sampling are
shared (:mod:`bench.diffusion.bound`, :mod:`bench.diffusion.sample`). A checkpoint resumes at any number of ranks.

The training step never waits for the device: the loss means are accumulated on it, and a non-finite
loss or gradient norm is flagged on it and checked every ``log_every`` steps (and before an evaluation
or checkpoint), when the logged means are read anyway. ``images_per_sec`` is images trained per
wall-clock second between two logging points (evaluation and checkpoint time left out).
"""

from __future__ import annotations

import math
import signal
import socket
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from bench.runtime import dist as dist_mod
from bench.tracking import store as tracking
from bench.training.checkpoint import claim_run_dir, load_checkpoint, save_checkpoint
from bench.training.config import RunConfig, flatten
from bench.runtime.cores import CoreShare
from bench.data.datasets import load_dataset
from bench.runtime.dist import SINGLE, Dist
from bench.nets.ema import Ema, ema_weights, horizon, initial_share
from bench.errors import BenchError, first_line
from bench.diffusion.bound import bits_per_dim, estimate_bits_per_dim, to_device
from bench.diffusion.gaussian import to_data_scale
from bench.tracking.plots import per_t_figure, sample_grid
from bench.runtime.progress import Progress, format_duration, say
from bench.diffusion.sample import describe_sampler, sample
from bench.diffusion.schedule import Schedule
from bench.nets.unet import build_network, count_parameters
from bench.runtime.urls import masked
from bench.diffusion.variant import Loss, Variant
from variants import get_variant

EVAL_SEED = 1234  # the noise of every bound evaluation, fixed so numbers compare across runs
BPD_CONVENTIONS = "bpd: x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM protocol); bpd_unclipped: not clipped"
HEADLINE = "bpd"  # a run's final bound; `bpd_method` says whether it is exact or an estimate


def other_method_name(method: str) -> str:
    """Where a re-evaluation by ``method`` ('exact' or 'estimate') logs its bound in a run whose ``bpd`` came from the
    other method: ``bpd_eval_exact`` or ``bpd_eval_estimate`` (with ``…_stderr``, ``…/vb``…, ``…_method``)."""
    return f"{HEADLINE}_eval_{method}"


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
    rank: int = 0  # which rank returned it: only rank 0 reports


@dataclass
class _Ctx:
    """What a run is, where it logs and which rank this process is: what the loop and the evaluation share."""

    config: RunConfig
    variant: Variant
    sched: Schedule
    device: torch.device
    train_images: torch.Tensor
    test_images: torch.Tensor
    log: object  # tracking.RunLogger on rank 0, _NoLog elsewhere
    run_id: str
    uri: str
    dist: Dist = SINGLE
    progress: bool = True
    on_eval: object = None
    cores: CoreShare | None = None  # this process's share of the machine's cores, looked at every log step


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


def _without_autocast(model):
    """The network an :class:`_Autocast` wraps (any other model as it is): for what must not run in bf16."""
    return model.net if isinstance(model, _Autocast) else model


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
    ema: Ema  # the EMA of the weights (``ema.module``), what evaluation and sampling use
    opt: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    data_gen: torch.Generator
    window: _Window  # the loss sums of the logging window under way
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0


def _checkpoint_path(run_id: str) -> Path:
    return tracking.bench_home() / "checkpoints" / run_id / "last.pt"


def _save(state: _State, ctx: _Ctx) -> Path:
    """Write the run's checkpoint (rank 0 only; every rank holds the same state). Returns its path."""
    path = _checkpoint_path(ctx.run_id)
    window = state.window.state_dict(ctx.dist)  # every rank takes part
    if not ctx.dist.main:
        return path
    cuda = [torch.cuda.get_rng_state(ctx.device)] if ctx.device.type == "cuda" else []
    return save_checkpoint(path, {
        "config": ctx.config.redacted().to_dict(), "step": state.step, "model": state.net.state_dict(),
        "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(), "lr_schedule": state.lr_schedule.state_dict(),
        "variant": ctx.variant.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "data": state.data_gen.get_state(), "cuda": cuda},
        "run_id": ctx.run_id, "tracking_uri": masked(ctx.uri), "images_seen": state.images_seen,
        "train_seconds": state.train_seconds, "window": window,
    })


def warmup_factor(warmup_steps: int, step: int) -> float:
    """The learning rate's factor at ``step`` (0-based): linear warmup over ``warmup_steps``, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


EMA_LEFTOVER = 0.01  # a budget after which the initial network still makes more of the EMA than this is "short"


def short_budget(config: RunConfig, tuned=()) -> str | None:
    """One line saying that ``config.steps`` ends inside the learning-rate warm-up or leaves more than
    ``EMA_LEFTOVER`` of the initial network in the EMA, and what to do; None when neither. Fields in ``tuned``
    (a study's search space) are not judged: their configured value is not the one trained."""
    steps, problems, remedies, enough = config.steps, [], [], 0
    if "warmup_steps" not in tuned and steps < config.warmup_steps:
        problems.append(f"ends inside the learning-rate warm-up (--warmup-steps {config.warmup_steps}: its last step "
                        f"trains at {steps / config.warmup_steps:.0%} of --lr)")
        remedies.append("lower --warmup-steps")
        enough = config.warmup_steps
    left = initial_share(config.ema_decay, steps, config.ema_warmup)
    if not {"ema_decay", "ema_warmup"} & set(tuned) and left > EMA_LEFTOVER:
        needed = horizon(config.ema_decay, config.ema_warmup, EMA_LEFTOVER)
        problems.append(f"leaves {left:.0%} of the initial network in the EMA that evaluation and sampling use "
                        f"(--ema-decay {config.ema_decay:g}{'' if config.ema_warmup else ', --no-ema-warmup'}; under "
                        f"{EMA_LEFTOVER:.0%} from {needed} steps)")
        remedies += [] if config.ema_warmup else ["use --ema-warmup"]
        enough = max(enough, needed)
    if not problems:
        return None
    return (f"warning: --steps {steps} {' and '.join(problems)}; raise --steps to {enough} or more"
            + "".join(f", or {r}" for r in remedies))


def _eval_subset(test: torch.Tensor, n: int) -> torch.Tensor:
    return test[: min(n, len(test))] if n else test


def _setup(config: RunConfig, device_name: str | None = None):
    """Validate ``config`` and load what a run needs: (device, train and test images, variant, schedule).
    Everything that can refuse bad input happens here, before any MLflow run exists."""
    config.validate()
    device = resolve_device(device_name or config.device)
    train_images = load_dataset(config.dataset, "train", config.data_dir, config.download)
    test_images = load_dataset(config.dataset, "test", config.data_dir, config.download)
    return device, train_images, test_images, get_variant(config.variant, config.variance), config.build_schedule()


def resume_config(ckpt: dict, steps: int | None = None, device: str | None = None,
                  tracking_uri: str | None = None) -> RunConfig:
    """The config a checkpoint's run continues with: its own, with a new step target or device if given, and
    its store's real URI (the checkpoint holds it masked: see :func:`bench.tracking.store.recorded_store`)."""
    config = RunConfig(**ckpt["config"])
    return replace(config, steps=config.steps if steps is None else steps, device=device or config.device,
                   tracking_uri=tracking.recorded_store(ckpt["tracking_uri"], tracking_uri))


def train(config: RunConfig, resume: str | Path | dict | None = None, progress: bool = True,
          parent_run_id: str | None = None, tags: dict | None = None, on_eval=None, reopen: bool = False,
          warn_short_budget: bool = False) -> RunResult:
    """Train ``config``, or continue the checkpoint ``resume`` (a path or a loaded checkpoint) with its
    own config, to ``config.steps`` (see :func:`resume_config`).

    ``parent_run_id`` nests the MLflow run under another (a study); ``tags`` are added to it.
    ``on_eval(step, metrics)`` is called after each training-time evaluation and may raise
    :class:`StopRun` to end the run early (recorded with the reason as tag ``stop_reason``).
    A FINISHED run is continued only with ``reopen`` and a larger ``config.steps``; a run that another
    live process is training is refused. Launched by torchrun, every rank calls this (module docstring).
    ``warn_short_budget``: say after the start line when the steps end inside a warm-up (:func:`short_budget`).
    """
    ckpt = (resume if isinstance(resume, dict) else load_checkpoint(resume)) if resume is not None else None
    if ckpt is not None:  # the checkpoint's own config; only the target step count and device may change
        config = replace(RunConfig(**ckpt["config"]), steps=max(config.steps, ckpt["step"]), device=config.device,
                         tracking_uri=tracking.recorded_store(ckpt["tracking_uri"], config.tracking_uri))
    d, device_name = dist_mod.setup(config.device)
    device, train_images, test_images, variant, sched = _setup(config, device_name)
    if config.batch_size % d.world:
        raise BenchError(f"batch_size {config.batch_size} does not split over {d.world} ranks; use a multiple of "
                         f"{d.world} (the global batch stays batch_size whatever the number of ranks)")
    variant.distribute(d)
    C, H = train_images.shape[1], train_images.shape[2]

    torch.manual_seed(config.seed)
    net = build_network(config.network, C, variant.out_channels(C), H).to(device)
    if channels_last(config, device):
        net = net.to(memory_format=torch.channels_last)
    ema = Ema(net, config.ema_decay, config.ema_warmup)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_factor, config.warmup_steps))
    state = _State(net, ema, opt, lr_schedule, torch.Generator().manual_seed(config.seed), _Window(sched.T, device))
    if ckpt is not None:  # before the run is reopened: weights that do not fit are refused with the store untouched
        _load_state(state, variant, sched, ckpt, device, d)
    uri = tracking.resolve_tracking_uri(config.tracking_uri)

    with ExitStack() as held:
        cores = held.enter_context(CoreShare())
        # rank 0 alone touches the store; the others learn the run id, or the error, from it
        run_id, client = d.main_decides(lambda: _open_run(held, uri, config, ckpt, reopen, parent_run_id, tags)) \
            or (None, None)
        run_id = d.share(run_id)
        log = tracking.RunLogger(client, run_id) if d.main else _NoLog()
        say(f"{'continuing' if ckpt is not None else 'new'} run {run_id} ({config.default_run_name}) in experiment "
            f"{config.experiment!r}, store {masked(uri)}", progress and d.main)
        short = short_budget(config) if warn_short_budget and d.main else None
        if short:  # `bench run`: once the run is open, so a refused run prints its one error line alone
            say(short)
        if d.main:
            if ckpt is not None:
                log.skip_logged()  # the steps replayed since the checkpoint are in the run's history already
            if tags and ckpt is not None:
                log.tags(tags)
            held.enter_context(tracking.heartbeat(client, run_id))
            if config.system_metrics:
                held.enter_context(tracking.system_metrics(uri, run_id, resume=ckpt is not None))
        if d.active:
            held.enter_context(_sigterm_fails())
        ctx = _Ctx(config, variant, sched, device, train_images, test_images, log, run_id, uri, d, progress and d.main,
                   on_eval, cores)
        return _run(state, ctx, fresh=ckpt is None)


def _open_run(held: ExitStack, uri: str, config: RunConfig, ckpt: dict | None, reopen: bool, parent_run_id, tags):
    """Create the MLflow run, or reopen the checkpoint's, and claim its checkpoint folder (rank 0).
    Returns (run id, client)."""
    client = tracking.client(uri, must_exist=ckpt is not None)  # refuses an unreachable store before anything is written
    if ckpt is not None:
        run_id = ckpt["run_id"]
        held.enter_context(claim_run_dir(_checkpoint_path(run_id).parent, run_id))  # before the status check
        _check_resumable(client, run_id, uri, ckpt["step"], config.steps, reopen)
        # this process's owner tags first: a run RUNNING under its last owner's tags (a dead process) is
        # what `bench runs --cleanup`, a report or a study worker marks KILLED
        tracking.RunLogger(client, run_id).tags(tracking.owner_tags())
        client.update_run(run_id, status="RUNNING")
    else:
        exp = tracking.experiment_id(client, config.experiment)
        run_tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id = client.create_run(exp, run_name=config.default_run_name,
                                   tags={**run_tags, **tracking.source_tags(), **{k: str(v) for k, v in (tags or {}).items()},
                                         **tracking.owner_tags()}).info.run_id
        held.enter_context(claim_run_dir(_checkpoint_path(run_id).parent, run_id))
    return run_id, client


class _Terminated(Exception):
    """SIGTERM reached a rank: torchrun stops every rank this way when one of them fails or the job is stopped."""


@contextmanager
def _sigterm_fails():
    """Under torchrun, turn SIGTERM into an exception, so the run ends FAILED with the reason (once: a
    second SIGTERM while the run is being closed is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated("SIGTERM: the launcher stopped this rank (another rank failed or exited, or the job was "
                          "stopped); resume from the last checkpoint")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _closing(d: Dist) -> None:
    """The run is being closed: under torchrun a SIGTERM (the launcher stopping the ranks after a failure)
    must not cut the closing short and leave the run RUNNING."""
    if d.active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


def load_weights(net: torch.nn.Module, weights: dict, what: str) -> None:
    """``net.load_state_dict(weights)``, a mismatch (missing or extra tensors, other shapes) refused in one line."""
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])[:300]
        raise BenchError(f"the checkpoint's {what} do not fit the network its config builds ({detail or first_line(err)}); "
                         "it was written by another version of elbo-bench or altered") from None


def _load_state(state: _State, variant, sched, ckpt: dict, device: torch.device, d: Dist) -> None:
    load_weights(state.net, ckpt["model"], "weights")
    load_weights(state.ema.module, ema_weights(ckpt["ema"]), "EMA weights")
    state.ema.n_averaged.fill_(int(ckpt["ema"].get("n_averaged", ckpt["step"] + 1)))
    state.opt.load_state_dict(ckpt["optimizer"])
    if "lr_schedule" in ckpt:
        state.lr_schedule.load_state_dict(ckpt["lr_schedule"])
    else:  # a checkpoint from before the schedule was saved: its position is the step count
        state.lr_schedule.last_epoch = ckpt["step"]
        for group, base, factor in zip(state.opt.param_groups, state.lr_schedule.base_lrs, state.lr_schedule.lr_lambdas):
            group["lr"] = base * factor(ckpt["step"])
    variant.load_state_dict(ckpt.get("variant", {}), sched.T)
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.data_gen.set_state(ckpt["rng"]["data"])
    if ckpt["rng"]["cuda"] and device.type == "cuda":  # the saving rank's device stream, on this rank's device
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    state.step, state.images_seen, state.train_seconds = ckpt["step"], ckpt["images_seen"], ckpt["train_seconds"]
    if "window" in ckpt:  # older checkpoints: the first window after the resume starts empty
        state.window.load_state_dict(ckpt["window"], d)


def _run(state: _State, ctx: _Ctx, fresh: bool) -> RunResult:
    """The training loop and the final evaluation of a run that is claimed and open in MLflow; every
    way out ends the MLflow run with the matching status."""
    config, log, d = ctx.config, ctx.log, ctx.dist
    interrupt = _Interrupt()
    model = _Autocast(torch.compile(state.net) if config.compile else state.net, config, ctx.device)
    if d.active:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, gradient_as_bucket_view=True)
    ema_model = _Autocast(state.ema.module, config, ctx.device)
    result = partial(RunResult, ctx.run_id, tracking_uri=ctx.uri, rank=d.rank)
    try:
        if fresh:
            _log_start(log, config, ctx.variant, ctx.sched, state.net, ctx.train_images, ctx.device, d,
                       _checkpoint_path(ctx.run_id))
        with interrupt.installed():
            failure = _loop(state, model, ema_model, ctx, interrupt)
        if failure:
            _closing(d)
            reason, step = failure
            log.tags({"diverged": "true", "failure_reason": reason, "failure_step": step})
            log.end("FAILED")
            return result("FAILED", step, checkpoint=None, reason=reason)
        path = _save(state, ctx)
        metrics = final_evaluation(ema_model, ctx.variant, ctx.sched, config, ctx.train_images, ctx.test_images,
                                   ctx.device, log, state.step, ctx.progress, d)
        if d.main and config.log_model:
            _log_model(state.ema.module, ctx, state.step)
        d.barrier()  # the others wait for rank 0's export: a rank that exits first takes the process group down under it
        log.end("FINISHED")
        return result("FINISHED", state.step, checkpoint=path, metrics=metrics)
    except StopRun as stop:
        _closing(d)
        log.tags({"stop_reason": stop.reason, "stop_step": state.step})
        log.end(stop.status)
        return result(stop.status, state.step, checkpoint=None, reason=stop.reason)
    except _Interrupted:
        _closing(d)
        _save(state, ctx)
        log.tags({"interrupted_at_step": state.step, "resume_from_step": state.step})
        log.end("KILLED")
        raise
    except KeyboardInterrupt:  # a forced (second) Ctrl-C: the last periodic checkpoint is the one to resume
        _closing(d)
        log.tags({"interrupted_at_step": state.step, "resume_from": "the last periodic checkpoint"})
        log.end("KILLED")
        raise
    except BaseException as err:
        _closing(d)
        log.tags({"failure_reason": f"{type(err).__name__}: {err}"[:500], "failure_step": state.step})
        log.end("FAILED")
        raise


def _log_start(log, config, variant, sched, net, train_images, device, d: Dist, checkpoint: Path) -> None:
    log.params({
        **flatten(config), **{f"variant.{k}": v for k, v in variant.describe().items()},
        **{f"schedule.{k}": v for k, v in sched.spec.items()}, "schedule": sched.describe(),
        "network.parameters": count_parameters(net), "optimizer": "AdamW", "device": str(device),
        "lr_schedule": "LambdaLR: linear warmup over warmup_steps, then constant",
        "ema": "torch AveragedModel from the initial weights, decay min(ema_decay, (1+n)/(10+n)) at update n"
               if config.ema_warmup else "torch AveragedModel from the initial weights, decay ema_decay",
        "code_version": tracking.git_commit(), **tracking.versions(),
        "protocol.bpd": "x0-clipped",  # bpd with x̂_0 clipped to [-1, 1] (DDPM/iDDPM); reports keep conventions apart
        "dist.world_size": d.world, "dist.backend": _backend(d),
    })
    log.tags({"variant": variant.label, "dataset": config.dataset, "schedule": sched.describe(),
              "images_per_sec": "images trained per wall-clock second between two logging points, all ranks together "
                                "(evaluation and checkpoint time left out)",
              "checkpoint": str(checkpoint), "checkpoint_host": socket.gethostname(),
              "loss_quartiles": "loss_q0..loss_q3: the training loss (as minimised) of the examples whose t lies in "
                                "each quarter of 1..T, means over the logging window"})
    log.note(_description(config, variant, sched, net, d))
    log.dict(config.redacted().to_dict(), "config.json")
    log.dataset(train_images, config.dataset, "train")


def _description(config: RunConfig, variant, sched, net, d: Dist) -> str:
    """The run's description in MLflow: what was trained and how it is measured."""
    world = f", {d.world} data-parallel processes" if d.world > 1 else ""
    final = f"the exact bound (all {sched.T} terms)" if config.final_eval == "exact" else \
        f"the unbiased estimate of the bound ({config.eval_calls} network calls per image)"
    images = f"{config.final_eval_images} test images" if config.final_eval_images else "the whole test split"
    sampler = describe_sampler(sched, config.sample_steps or None, variant)
    during = (f" During training, `bpd_estimate` (the unbiased estimate, {config.eval_calls} calls per image, "
              f"{config.eval_images} test images) every {config.eval_every} steps.") if config.eval_every else ""
    fid = (f"`fid`: {config.fid_samples} samples (sampler: {sampler}) against the train split, in the features of the "
           "dataset's extractor (tag `fid_extractor`)." if config.fid_samples else "No FID.")
    return (f"**{variant.label}** trained on **{config.dataset}**: {variant.objective} "
            f"(mean: {variant.mean_type}, variance: {variant.var_type}). {config.network} U-Net, "
            f"{count_parameters(net):,} parameters; noise schedule {sched.describe()}. {config.steps} steps of AdamW "
            f"(lr {config.lr:g}, {config.warmup_steps} warmup steps, batch {config.batch_size}, gradient clip "
            f"{config.grad_clip:g}), EMA decay {config.ema_decay:g}{' after a warm-up' * config.ema_warmup}, seed {config.seed}{world}.\n\n"
            f"**Measured** with the EMA weights: `bpd` is {final} in bits/dim on {images}, x̂_0 clipped to [-1, 1] "
            f"in the reverse step (the DDPM/iDDPM protocol; `bpd_unclipped` without). {fid}{during} Loss by quarter "
            "of t: `loss_q0`..`loss_q3`.")


def _log_model(ema_net, ctx: _Ctx, step: int) -> None:
    """The EMA network as the run's MLflow model (:meth:`bench.tracking.store.RunLogger.model`), linked to the final metrics
    logged at ``step``. One that cannot be exported is a tag (``model_not_logged``) and a warning, not a failed run:
    the checkpoint holds the weights."""
    C, H, W = ctx.train_images.shape[1:]
    example = (torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0)), torch.tensor([0, ctx.sched.T - 1]))
    try:
        model_id = ctx.log.model(ema_net, example, step, metadata=_model_metadata(ctx, step))
    except Exception as err:  # torch.export cannot trace some network, or the store refused the upload
        warnings.warn(f"the EMA network was not logged as an MLflow model: {first_line(err)}", stacklevel=2)
        ctx.log.tags({"model_not_logged": first_line(err)[:500]})
        return
    ctx.log.tags({"model_id": model_id})


def _model_metadata(ctx: _Ctx, step: int) -> dict:
    """What the logged MLflow model is and how to call it."""
    C, H, W = ctx.train_images.shape[1:]
    return {"what": f"EMA weights (decay {ctx.config.ema_decay:g}) of {ctx.variant.label} at step {step}",
            "call": f"model(x_t, t): x_t float [B, {C}, {H}, {W}] on the [-1, 1] data scale, t long [B] in 0..{ctx.sched.T - 1} "
                    f"(paper time t + 1); returns [B, {ctx.variant.out_channels(C)}, {H}, {W}]: the predicted "
                    f"{'ε' if ctx.variant.mean_type == 'eps' else 'μ̃'}"
                    + (" then the variance channels" if ctx.variant.out_channels(C) > C else ""),
            "schedule": ctx.sched.describe(), "variant": ctx.variant.label, "dataset": ctx.config.dataset,
            "checkpoint": str(_checkpoint_path(ctx.run_id))}


def _backend(d: Dist) -> str:
    return torch.distributed.get_backend() if d.active else "none"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Window:
    """The training loss of the logging window under way, summed on the device: each term's per-step means
    and the loss by quarter of t (:class:`_Quarters`). It goes into checkpoints, so the first window after
    a resume averages the same steps as it would have without the interruption."""

    def __init__(self, T: int, device: torch.device):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}  # term → sum over the window's steps of this rank's batch mean
        self.quarters = _Quarters(T, self.dtype, device)
        self.steps = 0

    def add(self, result: Loss) -> None:
        """One step's loss: its per-example loss and terms [B] (this rank's share) and timesteps t [B]."""
        for k, v in {"loss": result.loss, **result.terms}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().to(self.dtype).mean()
        self.quarters.add(result.t, result.loss)
        self.steps += 1

    def means(self, d: Dist) -> dict[str, float]:
        """The window's means over all ranks (``loss``, ``loss/<term>``, ``loss_q0``..): waits for the
        device; starts a new window."""
        keys = sorted(self.sums)
        values = (d.reduce(torch.stack([self.sums[k] for k in keys]), "sum") / (d.world * self.steps)).tolist()
        means = {("loss" if k == "loss" else f"loss/{k}"): v for k, v in zip(keys, values)}
        means.update(self.quarters.means(d))
        self.sums, self.steps = {}, 0
        return means

    def state_dict(self, d: Dist) -> dict:
        """The window so far, on the CPU, with every rank's part summed (every rank must call it): ``sums``
        holds each term's sum of global-batch means, ``quarters`` the loss sums and counts per quarter."""
        keys = sorted(self.sums)
        sums = d.reduce(torch.stack([self.sums[k] for k in keys]), "sum") / d.world if keys else torch.zeros(0)
        return {"steps": self.steps, "sums": dict(zip(keys, sums.cpu().clone())),
                "quarters": d.reduce(self.quarters.sums, "sum").cpu().clone()}

    def load_state_dict(self, state: dict, d: Dist) -> None:
        """Continue a checkpointed window at any number of ranks: rank 0 holds what all ranks had summed."""
        mine = 1 if d.main else 0  # rank 0 carries the window's past, the others start from zero
        self.steps = state["steps"]
        # means() divides the ranks' total by the world size
        self.sums = {k: (v * d.world * mine).to(self.device, self.dtype) for k, v in state["sums"].items()}
        self.quarters.sums = (state["quarters"] * mine).to(self.device, self.dtype)


class _Quarters:
    """The training loss by quarter of t (``loss_q0`` for t in the first quarter of 1..T … ``loss_q3``),
    summed on the device over a logging window (improved-diffusion logs the same)."""

    def __init__(self, T: int, dtype: torch.dtype, device: torch.device):
        self.T = T
        self.sums = torch.zeros(2, 4, dtype=dtype, device=device)  # loss sums, counts

    def add(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        q = t * 4 // self.T
        self.sums[0].index_add_(0, q, loss.detach().to(self.sums.dtype))
        self.sums[1].index_add_(0, q, torch.ones_like(q, dtype=self.sums.dtype))

    def means(self, d: Dist) -> dict[str, float]:
        """The window's means over all ranks (a quarter no example fell in is left out); starts a new window."""
        sums, counts = d.reduce(self.sums, "sum").tolist()
        self.sums.zero_()
        return {f"loss_q{q}": s / n for q, (s, n) in enumerate(zip(sums, counts)) if n}


class _Health:
    """Non-finite loss or gradient norm, flagged on the device without waiting for it; read at checks."""

    REASONS = ("non-finite loss", "non-finite gradient norm")

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.reason = torch.zeros((), dtype=torch.long, device=device)

    def flag(self, bad: torch.Tensor, step: int, reason: int) -> None:
        new = bad & (self.first_step < 0)
        self.reason = torch.where(new, reason, self.reason)
        self.first_step = torch.where(new, step, self.first_step)

    def check(self, d: Dist) -> tuple[str, int] | None:
        """(reason, step) of the first non-finite value on any rank, else None (waits for the device)."""
        never = 2**61
        first = torch.where(self.first_step >= 0, self.first_step, never)
        code = int(d.reduce(first * 2 + self.reason, "min"))  # the earliest step wins; its reason rides along
        if code >= 2 * never:
            return None
        return self.REASONS[code % 2], code // 2


def _loop(state: _State, model, ema_model, ctx: _Ctx, interrupt: _Interrupt | None = None):
    """Optimiser steps up to config.steps. Returns (reason, step) when the loss diverges, else None."""
    config, variant, device, log, d = ctx.config, ctx.variant, ctx.device, ctx.log, ctx.dist
    data = ctx.train_images.to(device)
    mine = slice(d.rank * config.batch_size // d.world, (d.rank + 1) * config.batch_size // d.world)
    window = state.window
    health = _Health(device)
    window_images, window_seconds = 0, 0.0
    bar = Progress(config.steps, f"train {variant.label}", "step", ctx.progress, initial=state.step)
    interrupt = interrupt or _Interrupt()
    tick = time.perf_counter()

    def pause() -> float:
        _sync(device)
        return time.perf_counter() - tick

    while state.step < config.steps:
        at_check = state.step % config.log_every == 0
        if _stop_requested(interrupt, d, at_check):
            bar.close()
            raise _Interrupted
        interrupt.deferring = True
        idx = torch.randint(0, len(data), (config.batch_size,), generator=state.data_gen)  # the global batch
        if config.hflip:
            flip = torch.rand(config.batch_size, generator=state.data_gen) < 0.5
        batch = data[to_device(idx[mine], device)]
        if config.hflip:
            batch = torch.where(to_device(flip[mine], device)[:, None, None, None], batch.flip(3), batch)
        x0 = to_data_scale(batch)
        if channels_last(config, device):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        result = variant.loss(model, ctx.sched, x0)
        loss = result.loss.mean()
        health.flag(~torch.isfinite(loss), state.step, 0)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), config.grad_clip)
            health.flag(~torch.isfinite(norm), state.step, 1)
        state.opt.step()
        lr = state.opt.param_groups[0]["lr"]  # this step's
        state.lr_schedule.step()
        state.ema.update_parameters(state.net, state.step)  # its decay warms up with the step
        state.step += 1
        window.add(result)
        state.images_seen += config.batch_size
        window_images += config.batch_size
        bar.update(1)
        evaluating = bool(config.eval_every) and state.step % config.eval_every == 0 and state.step < config.steps
        saving = state.step % config.checkpoint_every == 0 and state.step < config.steps
        if state.step % config.log_every == 0 or state.step == config.steps:
            means = window.means(d)
            now = time.perf_counter()  # the means were waited for: the window's work is done
            window_seconds += now - tick
            tick = now
            ips = window_images / max(window_seconds, 1e-9)
            state.train_seconds += window_seconds
            failure = health.check(d)
            if failure:
                bar.close()
                return failure
            log.metrics({**means, "images_per_sec": ips, "lr": lr}, state.step)
            if ctx.cores is not None:
                ctx.cores.apply()  # another elbo-bench process may have started or ended on this machine
            bar.set_postfix(loss=f"{means['loss']:.4g}", img_s=f"{ips:.0f}")
            window_images, window_seconds = 0, 0.0
        if evaluating or saving:
            window_seconds += pause()
            failure = health.check(d)
            if failure:
                bar.close()
                return failure
        if evaluating:
            with bar.paused(f"step {state.step}: evaluating ({_evaluation_plan(config)})"):
                _evaluate_during_training(ema_model, ctx, state.step, bar)
        if saving:
            _save(state, ctx)
        if evaluating or saving:
            tick = time.perf_counter()
    interrupt.deferring = False
    bar.close()
    if interrupt.requested:
        raise _Interrupted
    log.metrics({"train_seconds": state.train_seconds, "images_per_sec_overall":
                 state.images_seen / max(state.train_seconds, 1e-9)}, state.step)
    return None


def _stop_requested(interrupt: _Interrupt, d: Dist, at_check: bool) -> bool:
    """A deferred Ctrl-C ends the loop between steps; all ranks must stop at the same step, so under
    torchrun they agree on it at logging steps only (no collective in the other steps)."""
    if not d.active:
        return interrupt.requested
    if not at_check:
        return False
    return bool(d.reduce(torch.tensor(int(interrupt.requested)), "max"))


def _evaluation_plan(config: RunConfig) -> str:
    """What a training-time evaluation does, in a few words."""
    return (f"bound estimate on {config.eval_images} test images, {config.eval_calls} calls each; "
            f"{config.sample_grid} samples")


def _evaluate_during_training(ema_model, ctx: _Ctx, step: int, bar: Progress | None = None) -> None:
    """The training-time bound estimate on a test subset and a sample grid, logged at ``step``; ``bar``
    (the training's progress) says the result and counts the evaluations still to come in its time left."""
    config = ctx.config
    started = time.monotonic()
    subset = _eval_subset(ctx.test_images, config.eval_images)
    est = estimate_bits_per_dim(ema_model, ctx.variant, ctx.sched, subset, config.eval_calls, config.eval_batch_size,
                                EVAL_SEED, ctx.device, dist=ctx.dist)
    summary = {**est.summary("bpd_estimate"), "bpd_estimate_images": len(subset),
               "bpd_estimate_calls": est.calls_per_image}
    ctx.log.metrics(summary, step)
    ctx.log.tags({"bpd_estimate_method": f"estimate ({est.calls_per_image} calls/image, {len(subset)} test images, "
                                         f"seed {EVAL_SEED}); bpd_estimate: x̂_0 clipped to [-1, 1] (DDPM/iDDPM), "
                                         "bpd_estimate_unclipped: unclipped"})
    if ctx.dist.main:
        binned = est.binned_per_t(ctx.sched.T)
        S = len(est.per_stratum)
        ctx.log.figure(per_t_figure({ctx.variant.label: binned}, f"estimate at step {step}, mean over each of {S} strata of t"),
                       f"per_t_estimate/step_{step:08d}.png")
        ctx.log.dict({"step": step, "images": len(subset), "t_from": [1] + [int(e) + 1 for e in est.strata[:-1]],
                      "t_to": [1] + [int(e) for e in est.strata[1:]],
                      "L_t_bits_per_dim_mean": [float(binned[0])] + est.per_stratum.tolist(),
                      "note": "estimated: the decoder L_0 (t = 1), then the mean of L_t over each stratum of t "
                              "(paper time, inclusive), x̂_0 clipped"}, f"per_t_estimate/step_{step:08d}.json")
    grid = sample(ema_model, ctx.variant, ctx.sched, config.sample_grid, tuple(ctx.train_images.shape[1:]),
                  config.sample_steps or None, config.seed, device=ctx.device, dist=ctx.dist)
    if ctx.dist.main:
        ctx.log.image(sample_grid(grid), "samples", step)
    if bar is not None:
        bar.pauses_left = later = (config.steps - 1) // config.eval_every - step // config.eval_every
        bar.write(f"step {step}: bpd_estimate {summary['bpd_estimate']:.4f} ± {summary['bpd_estimate_stderr']:.4f} "
                  f"bits/dim (lower is better; {len(subset)} test images) in {format_duration(time.monotonic() - started)}; "
                  f"{later} more evaluation{'s' * (later != 1)} before the end")
    if ctx.on_eval is not None:
        ctx.on_eval(step, summary)


def final_evaluation(model, variant, sched, config: RunConfig, train_images, test_images, device, log, step: int,
                     progress: bool = True, dist: Dist = SINGLE, desc: str = "", bound: str | None = HEADLINE,
                     ode: str = "nll_ode", grid: bool = True) -> dict[str, float]:
    """The bound on the test split, the per-t curve, samples and FID; logged at ``step``. Under
    torchrun every rank shares the bound and the sampling; rank 0 alone scores FID and logs.
    ``desc`` names the progress bars (``desc: exact bits/dim``…). ``bound``: the name the bound is logged under
    (its tags ``<bound>_method``…, its per-t curve ``per_t_<bound>.json``), when it is not the run's headline ``bpd``
    (see :func:`other_method_name`); the description then gets a section of its own instead of its Result; None:
    no bound. ``ode``: the name ``nll_ode`` (with ``config.final_eval_ode``) is logged under. ``grid``: draw the
    sample grid (with ``config.fid_samples`` 0, no samples at all)."""
    metrics, res, method = {}, None, ""
    if bound is not None:
        subset = _eval_subset(test_images, config.final_eval_images)
        if config.final_eval == "exact":
            res = bits_per_dim(model, variant, sched, subset, config.eval_batch_size, EVAL_SEED, device, progress,
                               dist=dist, desc=desc)
            method = f"exact (all {sched.T} t, {len(subset)} test images)"
        else:
            res = estimate_bits_per_dim(model, variant, sched, subset, config.eval_calls, config.eval_batch_size,
                                        EVAL_SEED, device, progress, dist=dist, desc=desc)
            method = f"estimate ({res.calls_per_image} calls/image, {len(subset)} test images)"
        metrics = res.summary(bound)
    nll, ode_failed, ode_tags = None, "", {}
    if config.final_eval_ode:  # a different estimand from the bound: logged as nll_ode, never as bpd
        from bench.diffusion.ode import FlowFailed, network_dtype, nll_ode

        ode_subset = _eval_subset(test_images, config.ode_images or config.final_eval_images)
        flow_net = _without_autocast(model)  # the network in float32 whatever the run's precision (network_score)
        ode_tags[f"{ode}_precision"] = str(network_dtype(flow_net)).removeprefix("torch.")
        try:
            nll = nll_ode(flow_net, variant, sched, ode_subset, config.ode_options(), config.ode_batch_size,
                          EVAL_SEED, device, dist, progress, desc=desc)
            metrics.update({ode + k.removeprefix("nll_ode"): v for k, v in nll.summary().items()})
        except FlowFailed as err:  # diverged, or the solver gave up: a result about this network, recorded; the
            ode_failed = str(err)  # rest of the evaluation goes on
            warnings.warn(f"{ode} not computed: {err}", stacklevel=2)
    shape = tuple(train_images.shape[1:])
    steps = config.sample_steps or None
    drawn = max(config.fid_samples, config.sample_grid) if grid or config.fid_samples else 0
    images = sample(model, variant, sched, drawn, shape, steps, config.seed, device=device, progress=progress,
                    dist=dist, desc=desc) if drawn else None
    if not dist.main:
        return metrics
    if res is not None:
        conventions = BPD_CONVENTIONS.replace(HEADLINE, bound)
        log.tags({f"{bound}_method": f"{method}; {conventions}", f"{bound}_split": "test", f"{bound}_images": len(subset),
                  f"{bound}_rounded": _rounded(metrics, bound, method)})
    if nll is not None:
        log.tags({**ode_tags, f"{ode}_method": nll.method, f"{ode}_split": "test", f"{ode}_images": len(ode_subset)})
    if ode_failed:
        log.tags({**ode_tags, f"{ode}_failed": ode_failed[:500], f"{ode}_method": config.ode_options().describe()})
    if res is not None and res.per_t.numel():
        per_t = "per_t_bound" if bound == HEADLINE else f"per_t_{bound}"
        log.figure(per_t_figure({variant.label: res.per_t}, sched.describe()), f"{per_t}.png")
        log.dict({"t": list(range(1, sched.T + 1)), "L_t_bits_per_dim": res.per_t.tolist(),
                  "L_t_bits_per_dim_unclipped": res.other.per_t.tolist()}, f"{per_t}.json")
    if grid and images is not None:
        log.image(sample_grid(images[: config.sample_grid]), "samples", step)
    sampler = describe_sampler(sched, steps, variant)
    fid_tags: dict[str, str] = {}
    if config.fid_samples:
        from bench.metrics.fid import FidUnavailable, compute_fid, save_samples

        with tempfile.TemporaryDirectory() as tmp:  # the samples FID scores, to re-score with `bench fid`
            log.artifact(save_samples(images[: config.fid_samples], Path(tmp) / "fid_samples.npz", config.dataset), "samples")
        started = time.monotonic()
        say(f"FID: {config.fid_samples} samples against the {config.dataset} train split", progress)
        try:
            fid = compute_fid(images[: config.fid_samples], config.dataset, train_images,
                              cache_dir=tracking.bench_home() / "cache", device=device, fid_weights=config.fid_weights,
                              test_images=test_images)
            metrics.update(fid.metrics)
            fid_tags = fid.tags
            say(f"FID: done in {format_duration(time.monotonic() - started)}", progress)
            log.tags({**fid.tags, "fid_sampler": sampler})
        except FidUnavailable as err:
            warnings.warn(f"FID skipped: {err}", stacklevel=2)
            log.tags({"fid_skipped": str(err)[:500], "fid_sampler": sampler})
    log.metrics(metrics, step)
    fid = f"; FID {metrics['fid']:.4g} ({config.fid_samples} samples, sampler: {sampler}; features: {fid_tags['fid_extractor']})" \
        if "fid" in metrics else ""
    ode_text = (f"{ode} {metrics[ode]:.4f} ± {metrics[f'{ode}_stderr']:.4f} bits/dim ({nll.method})" if nll is not None
                else f"{ode} not computed ({ode_failed})" if ode_failed else "")
    if res is None:  # no bound: the description's Result keeps saying what `bpd` is
        what = ode_text or fid.removeprefix("; ")
        if what:
            log.note_section(f"Re-evaluation ({ode if nll is not None or ode_failed else 'FID'})",
                             f"at step {step}, {what}. The run's bpd is unchanged.")
        return metrics
    stderr = f" ± {metrics[f'{bound}_stderr']:.4f} (Monte Carlo)" if f"{bound}_stderr" in metrics else ""
    result = f"at step {step}, {bound} {metrics[bound]:.4f}{stderr}, {method}{'; ' + ode_text if ode_text else ''}{fid}."
    if bound == HEADLINE:
        log.note_section("Result", result)
    else:  # the Result keeps saying what `bpd` is; this number is another method's, under its own name
        log.note_section(f"Re-evaluation ({method.split(' ')[0]})", f"{result} The run's bpd is unchanged.")
    return metrics


@dataclass
class CheckpointEval:
    """A saved model's evaluation, resolved before anything is computed (:func:`prepare_evaluation`): the config it
    runs with, the data, and under which names it logs. ``bound``/``ode``: the names the bound and ``nll_ode`` are
    logged under (None: not computed); ``grid``: whether samples are drawn for a grid (with ``config.fid_samples``)."""

    ckpt: dict
    config: RunConfig
    dist: Dist
    device: torch.device
    train_images: torch.Tensor
    test_images: torch.Tensor
    variant: Variant
    sched: Schedule
    client: object | None  # the run's store when the results are logged into the run (rank 0), else None
    bound: str | None
    ode: str | None
    grid: bool

    @property
    def run_id(self) -> str:
        return self.ckpt["run_id"]

    def describe(self) -> str:
        """What will be computed, on how many images, by which method, and where it goes: a few lines."""
        c, n_test = self.config, len(self.test_images)
        lines = [f"evaluating the EMA weights of run {self.run_id} at step {self.ckpt['step']} on {self.device}:"]
        if self.bound is None:
            lines.append("  bound      not computed")
        else:
            how = f"exact (all {self.sched.T} t)" if c.final_eval == "exact" else \
                f"estimate ({c.eval_calls} network calls per image)"
            lines.append(f"  bound      {how} on {len(_eval_subset(self.test_images, c.final_eval_images))} of {n_test} "
                         f"test images, as {self.bound}")
        if self.ode is not None:
            images = len(_eval_subset(self.test_images, c.ode_images or c.final_eval_images))
            lines.append(f"  nll_ode    probability-flow ODE ({c.ode_options().describe()}; batches of {c.ode_batch_size}) "
                         f"on {images} of {n_test} test images, as {self.ode}")
        sampler = describe_sampler(self.sched, c.sample_steps or None, self.variant)
        if c.fid_samples:
            lines.append(f"  fid        {c.fid_samples} samples against the train split (sampler: {sampler}), and a "
                         f"grid of {c.sample_grid}")
        elif self.grid:
            lines.append(f"  samples    a grid of {c.sample_grid} (sampler: {sampler}); no FID")
        else:
            lines.append("  samples    none (no FID, no grid)")
        lines.append(f"  logged into run {self.run_id}" if self.client is not None else "  printed, not logged (--log-to-run logs)")
        return "\n".join(lines)


def prepare_evaluation(path: str | Path, overrides: dict | None = None, bound: bool = True, grid: bool | None = None,
                       log_to_run: bool = False, device: str = "auto", alone: bool = False,
                       tracking_uri: str | None = None) -> CheckpointEval:
    """Resolve the evaluation of checkpoint ``path`` (see :class:`CheckpointEval`): its run's config with ``overrides``
    (RunConfig fields: ``final_eval``, ``final_eval_images``, ``final_eval_ode``, ``ode_*``, ``fid_samples``…),
    ``bound``: compute the bound; ``grid``: draw a sample grid (default: when ``fid_samples`` is not 0). Under
    torchrun the ranks share the work, unless ``alone`` (this process evaluates by itself: a study's rank 0 after
    the others have left); ``tracking_uri``: the store's URI with its password, where the checkpoint's is masked."""
    ckpt = load_checkpoint(path)
    d, device_name = (SINGLE, device) if alone else dist_mod.setup(device)
    # the run must still be there before minutes of evaluation
    client = d.main_decides(lambda: _run_client(ckpt, tracking_uri)) if log_to_run else None
    config = replace(RunConfig(**ckpt["config"]), device=device, **{k: v for k, v in (overrides or {}).items() if v is not None})
    dev, train_images, test_images, variant, sched = _setup(config, device_name)
    if not (bound or config.final_eval_ode or config.fid_samples or grid):
        raise BenchError("nothing to evaluate: no bound, no nll_ode and fid_samples 0; give --fid-samples N, or leave "
                         "out --only")
    names = {"bound": HEADLINE if bound else None, "ode": "nll_ode" if config.final_eval_ode else None}
    if client is not None:  # rank 0's: the others log nothing
        run = client.get_run(ckpt["run_id"]).data
        if bound:
            names["bound"] = _bound_name(run, config.final_eval, len(_eval_subset(test_images, config.final_eval_images)))
        if config.final_eval_ode:
            names["ode"] = _ode_name(run, len(_eval_subset(test_images, config.ode_images or config.final_eval_images)))
    return CheckpointEval(ckpt, config, d, dev, train_images, test_images, variant, sched, client, **names,
                          grid=bool(config.fid_samples) if grid is None else grid)


def run_evaluation(plan: CheckpointEval, progress: bool = True, desc: str = "") -> dict[str, float]:
    """Compute ``plan`` (see :func:`prepare_evaluation`) and log it into the run when it says so (linked to the run's
    model, its tag ``model_id``). Returns the metrics under the names they are logged under."""
    c, d, dev = plan.config, plan.dist, plan.device
    C, H = plan.train_images.shape[1], plan.train_images.shape[2]
    ema = build_network(c.network, C, plan.variant.out_channels(C), H)
    load_weights(ema, ema_weights(plan.ckpt["ema"]), "EMA weights")
    model = _Autocast(ema.to(dev).eval(), c, dev)
    log = _NoLog()
    if plan.client is not None:
        log = tracking.RunLogger(plan.client, plan.run_id,
                                 model_id=plan.client.get_run(plan.run_id).data.tags.get("model_id"))
    with CoreShare():
        return final_evaluation(model, plan.variant, plan.sched, c, plan.train_images, plan.test_images, dev, log,
                                plan.ckpt["step"], progress and d.main, d, desc, plan.bound, plan.ode or "nll_ode",
                                plan.grid)


def _rounded(metrics: dict[str, float], bound: str, method: str) -> str:
    """The bound as the MLflow runs table should show it, which prints every digit of a metric: rounded, with its
    Monte Carlo standard error and method ('3.1235 ± 0.0123 bits/dim (estimate)'). A tag beside the metric,
    which keeps every digit."""
    se = f" ± {metrics[f'{bound}_stderr']:.4f}" if f"{bound}_stderr" in metrics else ""
    return f"{metrics[bound]:.4f}{se} bits/dim ({method.split(' ')[0]})"


def evaluate_checkpoint(path: str | Path, final_eval: str | None = None, fid_samples: int | None = None,
                        sample_steps: int | None = None, log_to_run: bool = False, device: str = "auto",
                        progress: bool = True, desc: str = "", alone: bool = False,
                        ode: bool | None = None, tracking_uri: str | None = None) -> tuple[dict[str, float], str | None, Dist]:
    """The final evaluation of a saved model's EMA weights (:func:`prepare_evaluation`, then :func:`run_evaluation`);
    logged into its run when asked. Returns (metrics, the run logged into or None, this rank). ``desc`` names
    the progress bars."""
    plan = prepare_evaluation(path, {"final_eval": final_eval, "fid_samples": fid_samples, "sample_steps": sample_steps,
                                     "final_eval_ode": ode}, log_to_run=log_to_run, device=device, alone=alone,
                              tracking_uri=tracking_uri)
    return run_evaluation(plan, progress, desc), (plan.run_id if log_to_run else None), plan.dist


def _bound_name(run, method: str, images: int) -> str:
    """Where a re-evaluation by ``method`` on ``images`` test images logs its bound in ``run`` (its data): ``bpd``
    when the run has none yet, or its ``bpd`` came from the same method (``bpd_method``) on as many images
    (``bpd_images``); by the other method on as many images, its own name (:func:`other_method_name`); on another
    number of images, ``bpd_eval_<method>_<images>images``. So a run's ``bpd`` history never mixes an exact bound with
    an estimate nor a subset with the whole split, and ``bpd_method`` never changes."""
    if HEADLINE not in run.metrics:
        return HEADLINE
    if run.tags.get(f"{HEADLINE}_images", str(images)) != str(images):
        return f"{other_method_name(method)}_{images}images"
    return HEADLINE if run.tags.get(f"{HEADLINE}_method", "").split(" ")[0] == method else other_method_name(method)


def _ode_name(run, images: int) -> str:
    """Where ``nll_ode`` on ``images`` test images is logged in ``run``: ``nll_ode``, unless the run holds one on another
    number of images (``nll_ode_images``): then ``nll_ode_<images>images``."""
    if "nll_ode" in run.metrics and run.tags.get("nll_ode_images", str(images)) != str(images):
        return f"nll_ode_{images}images"
    return "nll_ode"


def _run_client(ckpt: dict, tracking_uri: str | None = None):
    """A client on the checkpoint's store (``tracking_uri`` when its recorded URI hides a password), checked to
    still hold the checkpoint's run."""
    client = tracking.client(tracking.recorded_store(ckpt["tracking_uri"], tracking_uri), must_exist=True)
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


BOUND_TERMS = ("prior", "vb", "decoder")  # a bound's parts, logged as <bound>/<term>: total = prior + vb + decoder


def _number(v: float) -> str:
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def _summary_rows(metrics: dict[str, float]) -> list[tuple[str, ...]]:
    """(name, value, ± its standard error, unit, what it is) for :func:`summarize`; every metric shows once, NaN
    ones not at all."""
    m = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    rows, shown = [], set()

    def row(name: str, unit: str, note: str, error: str | None = None, *also: str) -> None:
        rows.append((name, _number(m[name]), f"± {_number(m[error])}" if error in m else "", unit, note))
        shown.update((name, error, *also))

    for name in [k for k in m if f"{k}/vb" in m]:  # bpd, bpd_unclipped, bpd_eval_exact…
        terms = [f"{name}/{t}" for t in BOUND_TERMS if f"{name}/{t}" in m]
        parts = " + ".join(f"{t.rsplit('/', 1)[1]} {_number(m[t])}" for t in terms)
        clip = "x̂_0 not clipped" if name.endswith("_unclipped") else "lower is better; x̂_0 clipped (DDPM protocol)"
        row(name, "bits/dim", f"{clip}; = {parts}", f"{name}_stderr", *terms)
    if "nll_ode" in m:
        nfe = f", {m['nll_ode_nfe']:.0f} network calls per solve" if "nll_ode_nfe" in m else ""
        row("nll_ode", "bits/dim", f"lower is better; probability-flow ODE NLL, an estimate, not a bound{nfe}",
            "nll_ode_stderr", "nll_ode_nfe", "nll_ode_stderr_draws")
    refs = [f"{what} {_number(m[k])}" for k, what in (("fid_ref_noise", "noise images (worst)"),
                                                       ("fid_ref_test", "real test images (the floor)")) if k in m]
    if "fid" in m:
        row("fid", "", "lower is better, against the train split" + (f"; for scale: {', '.join(refs)}" if refs else ""),
            None, "fid_ref_noise", "fid_ref_test")
    for name, note, error in (("kid", "lower is better", "kid_std"),
                              ("precision", "higher is better: samples near real images", None),
                              ("recall", "higher is better: real images near samples", None),
                              ("isc", "higher is better (inception score or its digits analogue)", "isc_std")):
        if name in m:
            row(name, "", note, error)
    rows += [(k, _number(v), "", "", "") for k, v in m.items() if k not in shown]
    return rows


def summarize(metrics: dict[str, float], indent: str = "") -> str:
    """The metrics of an evaluation as aligned lines: name, value ± its standard error, unit, what it is (which
    way is better, the bound's terms, FID's reference points)."""
    rows = _summary_rows(metrics)
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    return "\n".join(f"{indent}{name:<{widths[0]}}  {value:>{widths[1]}} {error:<{widths[2]}} {unit:<{widths[3]}}  {note}"
                     .rstrip() for name, value, error, unit, note in rows)
