"""The step loop: the step (loss, backward, clip, optimiser, EMA), then logging, evaluation and the checkpoint at
their intervals.

The step never waits for the device: the loss means are accumulated on it (:class:`bench.training.state.Window`)
and a non-finite loss or gradient norm is flagged on it (:class:`Health`), checked every ``log_every`` steps and
before an evaluation or checkpoint, when the logged means are read anyway. Under torchrun every rank draws the same
global batch (data indices, flips; then the variant's t and ε) and trains on its contiguous share.
"""

from __future__ import annotations

import torch

from bench.diffusion.bound import to_device
from bench.diffusion.gaussian import to_data_scale
from bench.runtime.devices import channels_last
from bench.runtime.dist import Dist
from bench.runtime.progress import Progress
from bench.training.evaluation import evaluate_during_training, evaluation_plan
from bench.training.record import Throughput, log_totals, log_training
from bench.training.signals import Interrupt, Interrupted, stop_requested
from bench.training.state import RunContext, TrainState, save


class Health:
    """Non-finite loss or gradient norm, flagged on the device without waiting for it; read at checks."""

    REASONS = ("non-finite loss", "non-finite gradient norm")
    LOSS, GRADIENT = 0, 1

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


class Batches:
    """The training batches x_0 on the [-1, 1] scale: the global batch drawn from ``data_gen`` (indices, then the
    horizontal flips), this rank's contiguous share of it on the device."""

    def __init__(self, ctx: RunContext, data_gen: torch.Generator):
        config, d = ctx.config, ctx.dist
        self.config, self.device, self.gen = config, ctx.device, data_gen
        self.data = ctx.train_images.to(ctx.device)
        self.mine = slice(d.rank * config.batch_size // d.world, (d.rank + 1) * config.batch_size // d.world)
        self.channels_last = channels_last(config.channels_last, ctx.device)

    def next(self) -> torch.Tensor:
        B, mine = self.config.batch_size, self.mine
        idx = torch.randint(0, len(self.data), (B,), generator=self.gen)  # the global batch
        if self.config.hflip:
            flip = torch.rand(B, generator=self.gen) < 0.5
        batch = self.data[to_device(idx[mine], self.device)]
        if self.config.hflip:
            batch = torch.where(to_device(flip[mine], self.device)[:, None, None, None], batch.flip(3), batch)
        x0 = to_data_scale(batch)
        return x0.contiguous(memory_format=torch.channels_last) if self.channels_last else x0


def training_loop(state: TrainState, model, ema_model, ctx: RunContext, interrupt: Interrupt | None = None):
    """Optimiser steps up to config.steps. Returns (reason, step) when the loss diverges, else None."""
    config, d = ctx.config, ctx.dist
    batches, health = Batches(ctx, state.data_gen), Health(ctx.device)
    bar = Progress(config.steps, f"train {ctx.variant.label}", "step", ctx.progress, initial=state.step)
    interrupt = interrupt or Interrupt()
    clock = Throughput(ctx.device)
    while state.step < config.steps:
        if stop_requested(interrupt, d, at_check=state.step % config.log_every == 0):
            bar.close()
            raise Interrupted
        interrupt.deferring = True

        # the step
        result = ctx.variant.loss(model, ctx.sched, batches.next())
        loss = result.loss.mean()
        health.flag(~torch.isfinite(loss), state.step, Health.LOSS)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), config.grad_clip)
            health.flag(~torch.isfinite(norm), state.step, Health.GRADIENT)
        state.opt.step()
        lr = state.opt.param_groups[0]["lr"]  # this step's
        state.lr_schedule.step()
        state.ema.update_parameters(state.net, state.step)  # its decay warms up with the step
        state.step += 1
        state.images_seen += config.batch_size
        state.window.add(result)
        clock.count(config.batch_size)
        bar.update(1)

        # logging, evaluation and checkpoint at their intervals
        ending = state.step == config.steps
        evaluating = bool(config.eval_every) and state.step % config.eval_every == 0 and not ending
        saving = state.step % config.checkpoint_every == 0 and not ending
        if state.step % config.log_every == 0 or ending:
            means, ips = state.window.means(d), clock.lap(state)  # the means wait for the device
            if failure := health.check(d):
                bar.close()
                return failure
            log_training(ctx, state.step, means, ips, lr, bar, state.net)
        if evaluating or saving:
            clock.pause()
            if failure := health.check(d):
                bar.close()
                return failure
            if evaluating:
                with bar.paused(f"step {state.step}: evaluating ({evaluation_plan(config)})"):
                    evaluate_during_training(ema_model, ctx, state.step, bar)
            if saving:
                save(state, ctx)
            clock.resume()
    interrupt.deferring = False
    bar.close()
    if interrupt.requested:
        raise Interrupted
    log_totals(ctx, state)
    return None
