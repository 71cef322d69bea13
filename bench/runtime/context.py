"""Where and how an evaluator runs, apart from what it computes: one small object, :class:`Runtime`.

Every evaluator (``bits_per_dim``, ``estimate_bits_per_dim``, ``sample``, ``nll_ode``, ``flow_nll``) takes
the arguments of what it computes (the model, the images, the seed…) and one ``runtime`` for the device,
the ranks that share the work, the batch size, the precision of its own arithmetic and its progress bars,
in the spirit of k-diffusion's one signature across a family of samplers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from bench.runtime.dist import SINGLE, Dist


@dataclass(frozen=True)
class Runtime:
    """Where and how an evaluator runs. The defaults: this process alone, on the model's device, the
    evaluator's own batch size, float64 terms (float32 on MPS), no progress bars."""

    device: torch.device | str | None = None  # where it runs; None: where the model's parameters are (else the CPU)
    # the ranks that share the work: each does a contiguous block of whole batches, all get the result
    dist: Dist = SINGLE
    batch_size: int | None = None  # pairs, samples or images per batch; None: the evaluator's default (its docstring)
    precision: torch.dtype | None = None  # the dtype the likelihoods' terms are formed in; None: see default_precision
    progress: bool = False  # show progress bars (on the main rank only)
    desc: str = ""  # what the progress bars are about, before their own name (``trial 3: exact bits/dim``)

    def resolve(self, model=None, batch_size: int | None = None) -> Runtime:
        """This runtime as an evaluator of ``model`` runs it: ``device`` a torch.device (where ``model``'s
        parameters are when None; the CPU without a model), ``precision`` a dtype, and ``batch_size`` the
        evaluator's default ``batch_size`` when this runtime has none."""
        device = torch.device(self.device) if self.device is not None else model_device(model)
        return replace(self, device=device, precision=self.precision or default_precision(device),
                       batch_size=batch_size if self.batch_size is None else self.batch_size)

    @property
    def shows_progress(self) -> bool:
        """Whether this process draws the progress bars: asked for, and the main rank."""
        return self.progress and self.dist.main

    def label(self, what: str) -> str:
        """A progress bar's name: ``what``, after ``desc`` when given (``exact bound, trial 3: exact bits/dim``)."""
        return f"{self.desc}: {what}" if self.desc else what


LOCAL = Runtime()  # the default of every evaluator


def model_device(model) -> torch.device:
    """Where ``model``'s parameters are (the CPU when it has none, or is None)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def default_precision(device: torch.device) -> torch.dtype:
    """The dtype the likelihoods' terms are formed in on ``device``: float64, float32 on MPS (it has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


@contextmanager
def evaluating(model) -> Iterator[None]:
    """``model`` in eval mode for the block, its training mode restored afterwards (anything without
    ``eval``/``train`` is left as it is)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
