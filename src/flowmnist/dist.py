"""Devices and distributed training: torchrun's environment, the process group, the few collectives
training needs, and the GPU precision switches.

One process per device (DistributedDataParallel). A launcher such as torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE=1) there is no process group
and every helper here is a no-op, so a plain `flowmnist train` runs the same code as it always did.

Every decision that changes control flow (stop now, skip this step, give up with an error) is reduced
across ranks before anyone acts on it: a rank that leaves the loop alone would leave the others
waiting forever in their next collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .config import FlowmnistError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. ``device`` is where it computes; ``comm_device`` is where
    collective tensors must live for the backend (the GPU for NCCL, the CPU for gloo)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (a copy on ``comm_device``; ``t`` itself is untouched)."""
        t = t.detach().to(self.comm_device, copy=True)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def agree_max(self, value: int) -> int:
        """The largest ``value`` any rank proposes: how ranks agree on a stop that one of them saw
        (a signal, its own clock passing the budget)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def agreed(self) -> Iterator[None]:
        """Run a block on every rank; if it raises on any rank, raise on all of them.

        Setup errors (an occupied run directory, a missing checkpoint, a bad batch size) would otherwise
        stop one rank and leave the rest hanging in their first collective. The failing rank re-raises
        its own error; the others raise a FlowmnistError naming it. The exchange doubles as a barrier.
        """
        error: str | None = None
        try:
            yield
        except Exception as e:
            if not self.distributed:
                raise
            error = f"{type(e).__name__}: {e}" if not isinstance(e, FlowmnistError) else str(e)
            _gather_errors(self.world, error)
            raise
        if self.distributed:
            errors = _gather_errors(self.world, error)
            failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
            if failed:
                r, msg = failed[0]
                raise FlowmnistError(f"rank {r} failed: {msg}")


def _gather_errors(world: int, error: str | None) -> list[str | None]:
    out: list[str | None] = [None] * world
    dist.all_gather_object(out, error)
    return out


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank): from an existing process group, else from the launcher's
    environment variables, else a single process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local


def resolve_device(device: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto``: the GPU of this local rank when CUDA is present, else the CPU. ``cuda`` without an
    index also means this local rank's GPU, so one command line serves every rank; an explicit
    ``cuda:N`` is refused under a multi-process launch (every rank would share one GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise FlowmnistError(f"--device {device}: not a torch device ({e})") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise FlowmnistError(f"--device {device}: CUDA is not available (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if dev.index is None:
        if local_rank >= count:
            raise FlowmnistError(
                f"local rank {local_rank} has no GPU: {count} visible; launch at most {count} processes per node"
            )
        return torch.device("cuda", local_rank)
    if world > 1:
        raise FlowmnistError(f"--device {device}: under a multi-process launch use --device cuda or auto")
    if dev.index >= count:
        raise FlowmnistError(f"--device {device}: only {count} CUDA device(s) visible")
    return dev


@contextmanager
def process_group(device: str = "cpu") -> Iterator[Dist]:
    """This process's ``Dist``; joins the job's process group when the environment describes one
    (NCCL on GPUs, gloo on CPUs) and leaves it on exit. A group the caller already made is used as
    is and left for the caller to destroy."""
    rank, world, local = env_ranks()
    dev = resolve_device(device, local, world)
    owned = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # env:// reads MASTER_ADDR/MASTER_PORT (torchrun's rendezvous sets them, also across nodes).
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        owned = True
    comm = dev if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    try:
        yield Dist(rank, world, local, dev, comm)
    finally:
        if owned:
            dist.destroy_process_group()
