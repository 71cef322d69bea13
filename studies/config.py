"""What a study is: its settings (:class:`StudyConfig`, the trials' base RunConfig), its objectives and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError, check_choice
from bench.runtime.urls import masked
from bench.tracking import store as tracking
from bench.training.config import RunConfig, assemble_config
from studies.space import Param, load_space

OBJECTIVES = {"bpd": ("bpd",), "fid": ("fid",), "both": ("bpd", "fid")}
SAMPLERS = ("tpe", "random", "gp", "nsga2")


class TrialDiverged(Exception):
    """A trial whose training diverged: Optuna records it FAIL and the study goes on."""


@dataclass(frozen=True)
class StudyConfig:
    variants: tuple[str, ...] = ("simple",)  # one study per variant
    dataset: str = "digits"
    # the study's number of trials (finished and running); a trial lost with its worker is replaced by its retry
    trials: int = 20
    timeout: float | None = None  # seconds per study and worker (None: no limit)
    steps: int = 500  # optimiser steps per trial
    objective: str = "bpd"  # 'bpd', 'fid' or 'both' (a Pareto front)
    sampler: str = "tpe"  # 'tpe', 'random', 'gp' or 'nsga2'
    seed: int = 0  # seeds the sampler (trial n draws with a seed from (seed, n)) and every trial's training
    workers: int = 1  # worker processes sharing the study
    storage: str | None = None  # Optuna RDB URL (default: sqlite optuna.db in BENCH_HOME)
    study_name: str | None = None  # resume or name the study (several variants: NAME-VARIANT)
    tracking_uri: str | None = None  # MLflow URI
    experiment: str = "elbo-bench-studies"  # MLflow experiment of the parent and trial runs
    space_file: str | None = None  # study TOML (path or name in studies/)
    tune_lr: bool = False  # add the learning rate to the space
    exact_top: int = 3  # best trials re-evaluated with the exact bound at the end
    fid_samples: int = 500  # samples per trial when the objective includes FID
    heartbeat: int = 60  # seconds between a worker's heartbeats; a trial silent for 2× is failed and retried
    run_overrides: dict = field(default_factory=dict)  # other RunConfig fields for every trial

    def validate(self) -> StudyConfig:
        check_choice("objective", self.objective, tuple(OBJECTIVES), field=True)
        check_choice("sampler", self.sampler, SAMPLERS, field=True)
        for name in ("trials", "steps", "workers", "heartbeat"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BenchError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if "fid" in OBJECTIVES[self.objective] and self.fid_samples < 2:
            raise BenchError(f"--objective {self.objective} needs --fid-samples >= 2, got {self.fid_samples}")
        if self.exact_top < 0:
            raise BenchError(f"--exact-top must be >= 0, got {self.exact_top}")
        if self.timeout is not None and self.timeout <= 0:
            raise BenchError(f"timeout must be > 0 seconds, got {self.timeout}")
        if not self.variants:
            raise BenchError("give at least one --variant")
        self.base_config(self.variants[0])  # validates dataset, variants, overrides
        for v in self.variants[1:]:
            self.base_config(v)
        return self

    def base_config(self, variant: str) -> RunConfig:
        """A trial's config before its search space's values: the study's own defaults below ``run_overrides``
        (a --config file's values and the `bench run` options given), the study's settings above them."""
        uses_fid = "fid" in OBJECTIVES[self.objective]
        own = {"final_eval": "estimate", "final_eval_images": 0, "eval_every": max(1, self.steps // 4),
               "checkpoint_every": self.steps}
        given = {"variant": variant, "steps": self.steps, "seed": self.seed,
                 "fid_samples": self.fid_samples if uses_fid else 0,
                 "experiment": self.experiment, "tracking_uri": self.tracking_uri, **self.run_overrides}
        return assemble_config(given, own=lambda dataset: own, dataset=self.dataset)

    def space(self, variant: str) -> dict[str, Param]:
        """The search space of ``variant``'s study: its kind's default space (studies.space.default_space), the
        learning rate if tuned, the study file's changes, checked against the variant's trial config."""
        return load_space(self.space_file, self.tune_lr, self.base_config(variant))

    def storage_url(self) -> str:
        url = self.storage or f"sqlite:///{tracking.bench_home() / 'optuna.db'}"
        if _same_store(url, tracking.resolve_tracking_uri(self.tracking_uri)):
            raise BenchError(f"the Optuna storage {masked(url)} is the MLflow store; give --storage another database")
        return url

    def name_for(self, variant: str) -> str:
        if self.study_name and len(self.variants) == 1:
            return self.study_name
        base = self.study_name or f"schedule-{self.dataset}-{self.objective}"
        return f"{base}-{variant}"


def _same_store(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        return str(Path(u.removeprefix("sqlite:///")).resolve()) if u.startswith("sqlite:///") else u

    return norm(a) == norm(b)


@dataclass
class StudyResult:
    name: str
    variant: str
    parent_run_id: str
    best: list[dict]  # the best trial (single objective) or the Pareto front: params, values, exact bpd
    default: dict | None  # the default schedule's trial, for comparison
    counts: dict[str, int]
    exact: dict[int, float] = field(default_factory=dict)  # trial number → exact bpd (bits/dim) of those re-evaluated
