"""Several processes, one run: torch.distributed data parallelism, launched by ``torchrun``.

``torchrun --nproc_per_node N -m bench run …`` (or ``bench run --nproc N``, which starts the same through
torch's elastic launcher) starts N ranks; each reads its place from the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and joins the process group: NCCL on
CUDA (rank → ``cuda:LOCAL_RANK``), gloo on CPU. Without those variables a process is rank 0 of 1 and
nothing here touches torch.distributed, so the single-process path is the plain one.

What the ranks share, and how:

- **Work**: a global batch, an evaluation or a set of samples is cut into contiguous blocks of whole
  items (:meth:`Dist.block`); each rank does its block and the results are gathered in order
  (:meth:`Dist.gather`), so the result is laid out as one process would have produced it.
- **Collectives time out** after ``BENCH_DIST_TIMEOUT`` seconds (default 1800: longer than anything
  rank 0 does alone, such as FID, while the others wait), so a rank that vanishes ends the others
  with an error instead of a hang; ``torchrun`` also stops every rank when one dies (SIGTERM, which the
  trainer records as the run's failure reason).
- **Cores**: every rank takes its share of the machine's cores (:mod:`bench.runtime.cores`).
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from bench.errors import BenchError
from bench.runtime.cores import cpu_count

TIMEOUT_ENV = "BENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks of one job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes MLflow, checkpoints and what is printed."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def block(self, n: int, rank: int | None = None, unit: int = 1) -> range:
        """This rank's contiguous share of ``n`` items, cut in whole units of ``unit`` items (a batch, say):
        the ranks' numbers of units differ by at most one; the last unit may be short."""
        r = self.rank if rank is None else rank
        units = -(-n // unit)
        return range(min(units * r // self.world * unit, n), min(units * (r + 1) // self.world * unit, n))

    def gather(self, local: torch.Tensor, n: int, unit: int = 1) -> torch.Tensor:
        """The blocks of every rank (``local`` holds this rank's :meth:`block` of ``n`` items along dim 0),
        concatenated in rank order on every rank: the whole [n, …] tensor, on ``local``'s device."""
        if not self.active:
            return local
        sizes = [len(self.block(n, r, unit)) for r in range(self.world)]
        if local.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} items, its block is {sizes[self.rank]}")
        comm = _comm_device()
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=comm)
        padded[: local.shape[0]] = local.to(comm)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)

    def reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` reduced over the ranks (``op``: sum, max or min), on every rank, on ``values``' device."""
        if not self.active:
            return values
        comm = values.to(_comm_device(), copy=True)
        torch_dist.all_reduce(comm, op=_OPS[op])
        return comm.to(values.device)

    def share(self, obj, src: int = 0):
        """``obj`` of rank ``src`` (any picklable value it made itself), on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        torch_dist.broadcast_object_list(box, src=src, device=_comm_device())
        return box[0]

    def main_decides(self, decide):
        """Run ``decide()`` on rank 0 alone (a check or a step only it may take); its BenchError is raised on
        every rank, so no rank waits for one that gave up. Returns its value on rank 0, None elsewhere."""
        value, outcome = None, None
        if self.main:
            try:
                value = decide()
            except BenchError as err:
                outcome = str(err)
        outcome = self.share(outcome)
        if outcome is not None:
            raise BenchError(outcome)
        return value

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()


SINGLE = Dist()
_OPS = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}


def _comm_device() -> torch.device:
    """Where a tensor must be for a collective: the rank's GPU under NCCL, the CPU under gloo."""
    return (torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl"
            else torch.device("cpu"))


def from_env() -> Dist:
    """The rank this process is, from torchrun's environment (rank 0 of 1 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise BenchError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                         "(torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise BenchError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank; launch with torchrun")
    return Dist(rank, world, local_rank, local_world)


def setup(device_name: str) -> tuple[Dist, str]:
    """Join the job's process group when launched with several ranks; returns (this rank, the device
    name it uses: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under NCCL, else ``device_name``)."""
    d = from_env()
    if not d.active:
        return d, device_name
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= d.local_rank:
            raise BenchError(f"rank {d.rank} needs GPU {d.local_rank} but {torch.cuda.device_count()} are visible; "
                             "start at most one rank per GPU (--nproc_per_node), or use --device cpu")
        if device_name not in ("auto", "cuda"):
            raise BenchError(f"--device {device_name} names one GPU, but every rank needs its own: use --device cuda "
                             "(rank k takes cuda:LOCAL_RANK)")
        device_name = f"cuda:{d.local_rank}"
        torch.cuda.set_device(d.local_rank)
    if not torch_dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        torch_dist.init_process_group("nccl" if wants_cuda else "gloo", timeout=timeout)
    return d, device_name


def child_env(processes: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment (``env``, default this process's) for ``processes`` children started at once: each
    gets its share of the cores through ``OMP_NUM_THREADS``, unless the environment sets it already."""
    env = dict(os.environ if env is None else env)
    if processes > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // processes))
    return env


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m bench ARGV`` as ``nproc`` ranks on this machine through torch's elastic launcher
    (what ``torchrun --standalone --nproc_per_node N`` does), each with its share of the cores. Returns
    rank 0's exit status (that of the first failed rank when rank 0 succeeded)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # heavy: the --nproc launcher only
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1)
    saved = dict(os.environ)
    os.environ.update(child_env(nproc))
    try:
        elastic_launch(config, sys.executable)("-m", "bench", *argv)
        return 0
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        code = codes.get(0) or next((c for c in codes.values() if c), 1)
        return code if code > 0 else 128 - code  # killed by signal s: 128 + s, as a shell reports it
    finally:
        os.environ.clear()
        os.environ.update(saved)
