"""Opening a run: ``train(config)`` sets it up (config checked, data, network, optimiser), creates its MLflow run or
reopens a checkpoint's (refusing one that cannot be resumed) and hands over to the step loop
(:mod:`bench.training.loop`), then to the final evaluation (:mod:`bench.training.evaluation`); every way out ends
the MLflow run with the matching status. A non-finite loss ends the run FAILED with the reason and step as tags: a
result, not a crash.

Under ``torchrun`` (see :mod:`bench.runtime.dist`) every rank runs this same code: the global batch of
``batch_size`` images is drawn identically on every rank (data indices, timesteps, noise: the same
streams as one process) and each rank trains on its contiguous share, with DDP averaging the
gradients, so EMA and optimiser stay identical across ranks; the importance sampler sees every rank's
losses in global batch order. Rank 0 alone writes MLflow and checkpoints; evaluation and sampling are
shared (:mod:`bench.diffusion.bound`, :mod:`bench.diffusion.sample`). A checkpoint resumes at any number of ranks.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from bench.errors import BenchError, reraised
from bench.nets.ema import Ema, horizon, initial_share
from bench.runtime import dist as dist_mod
from bench.runtime.cores import CoreShare
from bench.runtime.devices import Autocast, channels_last
from bench.runtime.progress import say
from bench.runtime.urls import masked
from bench.tracking import liveness, provenance
from bench.tracking import store as tracking
from bench.tracking.logger import RunLogger
from bench.training.checkpoint import claim_run_dir, load_checkpoint
from bench.training.config import RunConfig
from bench.training.evaluation import final_evaluation
from bench.training.loop import training_loop
from bench.training.record import ADAPTIVE_FIGURE, NoLog, log_adaptive_schedule, log_model, log_start
from bench.training.signals import Interrupt, Interrupted, closing, sigterm_fails
from bench.training.state import RunContext, TrainState, Window, checkpoint_path, load_state, save, setup


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
    device, train_images, test_images, variant, sched = setup(config, device_name)
    if config.batch_size % d.world:
        raise BenchError(f"batch_size {config.batch_size} does not split over {d.world} ranks; use a multiple of "
                         f"{d.world} (the global batch stays batch_size whatever the number of ranks)")
    variant.distribute(d)
    C, H = train_images.shape[1], train_images.shape[2]

    torch.manual_seed(config.seed)
    net = config.build_model(variant, C, H).to(device)
    if channels_last(config.channels_last, device):
        net = net.to(memory_format=torch.channels_last)
    ema = Ema(net, config.ema_decay, config.ema_warmup)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_factor, config.warmup_steps))
    state = TrainState(net, ema, opt, lr_schedule, torch.Generator().manual_seed(config.seed), Window(sched.T, device))
    if ckpt is not None:  # before the run is reopened: weights that do not fit are refused with the store untouched
        load_state(state, variant, sched, ckpt, device, d)
    uri = tracking.resolve_tracking_uri(config.tracking_uri)

    with ExitStack() as held:
        cores = held.enter_context(CoreShare())
        # rank 0 alone touches the store; the others learn the run id, or the error, from it
        run_id, client = d.main_decides(lambda: _open_run(held, uri, config, ckpt, reopen, parent_run_id, tags)) \
            or (None, None)
        run_id = d.share(run_id)
        log = RunLogger(client, run_id) if d.main else NoLog()
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
            held.enter_context(liveness.heartbeat(client, run_id))
            if config.system_metrics:
                held.enter_context(provenance.system_metrics(uri, run_id, resume=ckpt is not None))
        if d.active:
            held.enter_context(sigterm_fails())
        ctx = RunContext(config, variant, sched, device, train_images, test_images, log, run_id, uri, d,
                         progress and d.main, on_eval, cores)
        return _run(state, ctx, fresh=ckpt is None)


def _open_run(held: ExitStack, uri: str, config: RunConfig, ckpt: dict | None, reopen: bool, parent_run_id, tags):
    """Create the MLflow run, or reopen the checkpoint's, and claim its checkpoint folder (rank 0).
    Returns (run id, client)."""
    # refuses an unreachable store before anything is written
    client = tracking.client(uri, must_exist=ckpt is not None)
    if ckpt is not None:
        run_id = ckpt["run_id"]
        held.enter_context(claim_run_dir(checkpoint_path(run_id).parent, run_id))  # before the status check
        _check_resumable(client, run_id, uri, ckpt["step"], config.steps, reopen)
        # this process's owner tags first: a run RUNNING under its last owner's tags (a dead process) is
        # what `bench runs --cleanup`, a report or a study worker marks KILLED
        RunLogger(client, run_id).tags(liveness.owner_tags())
        client.update_run(run_id, status="RUNNING")
    else:
        exp = tracking.experiment_id(client, config.experiment)
        run_tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id = client.create_run(exp, run_name=config.default_run_name,
                                   tags={**run_tags, **provenance.source_tags(),
                                         **{k: str(v) for k, v in (tags or {}).items()},
                                         **liveness.owner_tags()}).info.run_id
        held.enter_context(claim_run_dir(checkpoint_path(run_id).parent, run_id))
    return run_id, client


def _check_resumable(client, run_id: str, uri: str, step: int, steps: int, reopen: bool) -> None:
    """Refuse to resume a run that is gone from the store, FINISHED (unless reopened to train further),
    or RUNNING in a live process elsewhere."""
    with reraised(lambda _: f"the checkpoint's MLflow run {run_id} is not in {uri}; cannot resume it",
                  Exception):  # MLflow raises many kinds for a missing run
        run = client.get_run(run_id)
    status, run_tags = run.info.status, run.data.tags
    if status == "RUNNING" and "owner.pid" in run_tags and not liveness.owner_gone(run_tags):
        raise BenchError(f"run {run_id} is being trained by process {run_tags['owner.pid']} "
                         f"on {run_tags.get('owner.host')}; "
                         "wait for it to finish or stop it, then resume")
    if status == "FINISHED" and not reopen:
        raise BenchError(f"run {run_id} is FINISHED at step {step}: resuming would redo and log its final evaluation "
                         f"again; to train it further add --reopen and --steps above {step}; to re-evaluate it use "
                         "`bench eval CHECKPOINT --log-to-run`")
    if status == "FINISHED" and steps <= step:
        raise BenchError(f"run {run_id} is FINISHED at step {step}; --reopen needs --steps above {step}")


def _run(state: TrainState, ctx: RunContext, fresh: bool) -> RunResult:
    """The training loop and the final evaluation of a run that is claimed and open in MLflow; every
    way out ends the MLflow run with the matching status."""
    config, log, d = ctx.config, ctx.log, ctx.dist
    interrupt = Interrupt()
    model = Autocast(torch.compile(state.net) if config.compile else state.net, config.precision, ctx.device)
    if d.active:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, gradient_as_bucket_view=True)
    ema_model = Autocast(state.ema.module, config.precision, ctx.device)
    result = partial(RunResult, ctx.run_id, tracking_uri=ctx.uri, rank=d.rank)
    try:
        if fresh:
            log_start(log, config, ctx.variant, ctx.sched, state.net, ctx.train_images, ctx.device, d,
                      checkpoint_path(ctx.run_id))
        with interrupt.installed():
            failure = training_loop(state, model, ema_model, ctx, interrupt)
        if failure:
            closing(d)
            reason, step = failure
            log.tags({"diverged": "true", "failure_reason": reason, "failure_step": step})
            log.end("FAILED")
            return result("FAILED", step, checkpoint=None, reason=reason)
        path = save(state, ctx)
        if d.main:
            log_adaptive_schedule(log, ctx.variant, state.net, ADAPTIVE_FIGURE, state.step)
        metrics = final_evaluation(ema_model, ctx.variant, ctx.sched, config, ctx.train_images, ctx.test_images,
                                   ctx.device, log, state.step, ctx.progress, d)
        if d.main and config.log_model:
            log_model(state.ema.module, ctx, state.step)
        # the others wait for rank 0's export: a rank that exits first takes the process group down under it
        d.barrier()
        log.end("FINISHED")
        return result("FINISHED", state.step, checkpoint=path, metrics=metrics)
    except StopRun as stop:
        closing(d)
        log.tags({"stop_reason": stop.reason, "stop_step": state.step})
        log.end(stop.status)
        return result(stop.status, state.step, checkpoint=None, reason=stop.reason)
    except Interrupted:
        closing(d)
        save(state, ctx)
        log.tags({"interrupted_at_step": state.step, "resume_from_step": state.step})
        log.end("KILLED")
        raise
    except KeyboardInterrupt:  # a forced (second) Ctrl-C: the last periodic checkpoint is the one to resume
        closing(d)
        log.tags({"interrupted_at_step": state.step, "resume_from": "the last periodic checkpoint"})
        log.end("KILLED")
        raise
    except BaseException as err:
        closing(d)
        log.tags({"failure_reason": f"{type(err).__name__}: {err}"[:500], "failure_step": state.step})
        log.end("FAILED")
        raise

